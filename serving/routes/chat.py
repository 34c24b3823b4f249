"""`POST /v1/chat/completions`: messages through the base's chat template, OpenAI's chat shapes.

Design decisions:
- The conversation goes through the base tokenizer's own chat template (the app tokenizes for
  every backend, so usage counts and length checks agree); a tokenizer without one is a 400
  pointing at `/v1/completions`, and a template that rejects the messages is the client's 400.
- `max_completion_tokens` (OpenAI's newer name) wins over `max_tokens`; with neither, the
  completion may fill the context window.
- Logprobs are chat's `content` entries, each token with its exact UTF-8 `bytes` and up to
  `top_logprobs` alternatives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from adapterhub.serving.backends.base import GenerationChunk, TokenLogprob
from adapterhub.serving.errors import OpenAIError
from adapterhub.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    TopLogprob,
    Usage,
)
from adapterhub.serving.routes.checks import check_context, check_prompt_ids, refuse_unsupported, sampling_params
from adapterhub.serving.routes.deps import State
from adapterhub.serving.routes.generation import Choice, GenerationJob, floor_logprob, respond, usage_of
from adapterhub.serving.state import ServerState

router = APIRouter()


def _chat_logprobs(state: ServerState, scored: Sequence[TokenLogprob], top: int) -> ChatLogprobs:
    """Chat's `logprobs.content`: each token with its exact UTF-8 bytes and its `top` alternatives."""
    texts = state.token_texts

    def entry(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=texts.token_text(token_id), logprob=floor_logprob(logprob), bytes=list(texts.token_bytes(token_id)))

    content = []
    for item in scored:
        chosen = entry(item.token_id, item.logprob)
        alternatives = [entry(token_id, value) for token_id, value in item.top[:top]]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=alternatives))
    return ChatLogprobs(content=content)


class ChatShaper:
    """Chat completions' payloads for one request (`ResponseShaper`)."""

    id_prefix = "chatcmpl"

    def __init__(self, state: ServerState, body: ChatCompletionRequest) -> None:
        self.state = state
        self.body = body
        self.top = body.top_logprobs or 0

    def _logprobs(self, scored: Sequence[TokenLogprob]) -> ChatLogprobs | None:
        return _chat_logprobs(self.state, scored, self.top) if self.body.logprobs else None

    def final(self, response_id: str, created: int, choices: list[Choice], last: dict[int, GenerationChunk]) -> dict[str, Any]:
        return ChatCompletionResponse(
            id=response_id, created=created, model=self.body.model,
            choices=[
                ChatChoice(
                    index=c.index, message=AssistantMessage(content="".join(c.text)), finish_reason=last[c.index].finish_reason or "stop",
                    logprobs=self._logprobs(c.logprobs),
                )
                for c in choices
            ],
            usage=usage_of(choices, last, self.body.n),
        ).model_dump()

    def chunk(
        self, response_id: str, created: int, index: int, chunk: GenerationChunk, first: bool, logprobs: list[TokenLogprob]
    ) -> dict[str, Any]:
        delta = ChatDelta(role="assistant" if first else None, content=chunk.text)
        return ChatCompletionChunk(
            id=response_id, created=created, model=self.body.model,
            choices=[ChatChunkChoice(index=index, delta=delta, logprobs=self._logprobs(logprobs), finish_reason=chunk.finish_reason)],
        ).model_dump(exclude_none=False)

    def usage_chunk(self, response_id: str, created: int, usage: Usage) -> dict[str, Any]:
        return ChatCompletionChunk(id=response_id, created=created, model=self.body.model, choices=[], usage=usage).model_dump()


def chat_prompt_ids(tokenizer: Any, conversation: Sequence[Mapping[str, str]]) -> list[int]:
    """The prompt token ids of a conversation: the tokenizer's chat template with the generation
    prompt, its special tokens placed by the template. A 400 when the template rejects it.

    Shared with the in-process client (`serving/chat_clients.py`), so a conversation is the same
    prompt with or without HTTP.
    """
    try:
        text = tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template itself rejects the conversation (e.g. role order)
        raise OpenAIError(400, f"the chat template rejected the messages: {exc}", param="messages") from exc
    return tokenizer(text, add_special_tokens=False).input_ids


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, state: State) -> Response:
    refuse_unsupported(body)
    if body.top_logprobs and not body.logprobs:
        raise OpenAIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    adapter = await state.resolve_model(body.model)
    tokenizer = state.backend.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(400, "the base model's tokenizer has no chat template; use /v1/completions", param="messages")
    prompt_ids = chat_prompt_ids(tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
    check_prompt_ids(state.backend, [prompt_ids])
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = requested if requested is not None else state.backend.max_model_len - len(prompt_ids)
    if max_tokens < 1:
        max_tokens = 1  # reported as context_length_exceeded just below
    check_context(state.backend, prompt_ids, max_tokens, "messages")
    sampling = sampling_params(state.backend, body, max_tokens, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    job = GenerationJob(
        adapter=adapter, prompts=[prompt_ids], n=body.n, sampling=sampling, stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )
    return await respond(state, job, ChatShaper(state, body))


__all__ = ["ChatShaper", "chat_prompt_ids", "router"]

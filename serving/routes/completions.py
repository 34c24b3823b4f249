"""`POST /v1/completions`: text (or token-id) prompts, OpenAI's completion shapes.

Design decisions:
- A prompt is a string, a list of strings, a list of token ids or a list of such lists, as
  OpenAI's API takes them; choices run prompt by prompt, `n` each.
- `echo` with `logprobs` (`max_tokens` 0 or more) scores the prompt itself, which is how
  lm-eval-harness computes log-likelihoods through an OpenAI-compatible server. With echo, a
  choice's text starts with its prompt (as sent, or decoded from token ids: decoded only then).
- Logprobs travel from the backend as token ids (`TokenLogprob`); they are shaped here into
  completions' parallel lists with each token's exact text (`token_text.py`). Text offsets
  count characters of the returned text: generated text is decoded without special tokens, so
  they take no room in it; an echoed prompt is decoded on its own, special tokens spelled out.
  A stream keeps one `TextOffsets` per choice, since a chunk may end inside a character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from adapterhub.serving.backends.base import Backend, GenerationChunk, TokenLogprob
from adapterhub.serving.errors import OpenAIError
from adapterhub.serving.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage
from adapterhub.serving.routes.checks import check_context, check_prompt_ids, refuse_unsupported, sampling_params
from adapterhub.serving.routes.deps import State
from adapterhub.serving.routes.generation import Choice, GenerationJob, floor_logprob, respond, usage_of
from adapterhub.serving.state import ServerState
from adapterhub.serving.token_text import TextOffsets

router = APIRouter()


def _prompt_ids(backend: Backend, prompt: Any) -> list[list[int]]:
    tokenizer = backend.tokenizer
    if isinstance(prompt, str):
        return [tokenizer(prompt).input_ids]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [tokenizer(p).input_ids for p in prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise OpenAIError(400, "`prompt` must be a non-empty string, list of strings or list of token ids", param="prompt")


def _append_logprobs(
    state: ServerState, shaped: CompletionLogprobs, entries: Sequence[tuple[int, TokenLogprob | None]], offsets: list[int]
) -> None:
    """Add `(token id, its score or None)` pairs and their text offsets to completions' parallel
    lists. Each top map holds the alternatives and the chosen token, as vLLM's do."""
    texts = state.token_texts
    shaped.text_offset.extend(offsets)
    for token_id, scored in entries:
        text = texts.token_text(token_id)
        shaped.tokens.append(text)
        if scored is None:
            shaped.token_logprobs.append(None)
            shaped.top_logprobs.append(None)
            continue
        shaped.token_logprobs.append(floor_logprob(scored.logprob))
        top = {texts.token_text(alternative): floor_logprob(value) for alternative, value in scored.top}
        top.setdefault(text, floor_logprob(scored.logprob))
        shaped.top_logprobs.append(top)


class CompletionShaper:
    """Completions' payloads for one request (`ResponseShaper`)."""

    id_prefix = "cmpl"

    def __init__(self, state: ServerState, body: CompletionRequest, prompts: list[list[int]]) -> None:
        self.state = state
        self.body = body
        self.prompts = prompts
        self.prompt_texts: list[str] = []  # decoded only to be echoed
        if body.echo and isinstance(body.prompt, str):
            self.prompt_texts = [body.prompt]
        elif body.echo and all(isinstance(p, str) for p in body.prompt):
            self.prompt_texts = list(body.prompt)  # type: ignore[arg-type]
        elif body.echo:
            self.prompt_texts = [state.backend.tokenizer.decode(ids) for ids in prompts]
        self._offsets: dict[int, TextOffsets] = {}  # per choice, across its chunks

    def _echo_text(self, index: int) -> str:
        return self.prompt_texts[index // self.body.n] if self.body.echo else ""

    def _logprobs(
        self, index: int, first: bool, prompt_scores: Sequence[TokenLogprob | None] | None, scored: Sequence[TokenLogprob]
    ) -> CompletionLogprobs | None:
        if self.body.logprobs is None:
            return None
        shaped = CompletionLogprobs()
        offsets = self._offsets.setdefault(index, TextOffsets(self.state.token_texts))
        if first and self.body.echo:
            # The echoed prompt is decoded on its own, special tokens spelled out.
            prompt = self.prompts[index // self.body.n]
            scores = prompt_scores or [None] * len(prompt)
            _append_logprobs(self.state, shaped, list(zip(prompt, scores, strict=True)), offsets.advance(prompt))
            offsets.end_text()
        generated = [item.token_id for item in scored]
        entries = [(item.token_id, item) for item in scored]
        # Generated text is decoded without special tokens: they take no room in it.
        _append_logprobs(self.state, shaped, entries, offsets.advance(generated, skip_special=True))
        return shaped

    def final(self, response_id: str, created: int, choices: list[Choice], last: dict[int, GenerationChunk]) -> dict[str, Any]:
        return CompletionResponse(
            id=response_id, created=created, model=self.body.model,
            choices=[
                CompletionChoice(
                    index=c.index, text=self._echo_text(c.index) + "".join(c.text), finish_reason=last[c.index].finish_reason,
                    logprobs=self._logprobs(c.index, True, c.first.prompt_logprobs, c.logprobs),
                )
                for c in choices
            ],
            usage=usage_of(choices, last, self.body.n),
        ).model_dump()

    def chunk(
        self, response_id: str, created: int, index: int, chunk: GenerationChunk, first: bool, logprobs: list[TokenLogprob]
    ) -> dict[str, Any]:
        text = (self._echo_text(index) if first else "") + chunk.text
        shaped = self._logprobs(index, first, chunk.prompt_logprobs, logprobs)
        return CompletionResponse(
            id=response_id, created=created, model=self.body.model,
            choices=[CompletionChoice(index=index, text=text, logprobs=shaped, finish_reason=chunk.finish_reason)], usage=None,
        ).model_dump()

    def usage_chunk(self, response_id: str, created: int, usage: Usage) -> dict[str, Any]:
        return CompletionResponse(id=response_id, created=created, model=self.body.model, choices=[], usage=usage).model_dump()


@router.post("/completions")
async def completions(body: CompletionRequest, state: State) -> Response:
    refuse_unsupported(body)
    adapter = await state.resolve_model(body.model)
    prompts = _prompt_ids(state.backend, body.prompt)
    check_prompt_ids(state.backend, prompts)
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    if max_tokens == 0 and not body.echo:
        raise OpenAIError(400, "max_tokens must be at least 1 (0 is allowed with echo, to score the prompt)", param="max_tokens")
    for ids in prompts:
        check_context(state.backend, ids, max_tokens, "prompt")
    sampling = sampling_params(
        state.backend, body, max_tokens, logprobs=body.logprobs, prompt_logprobs=body.logprobs if body.echo else None
    )
    job = GenerationJob(
        adapter=adapter, prompts=prompts, n=body.n, sampling=sampling, stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )
    return await respond(state, job, CompletionShaper(state, body, prompts))


__all__ = ["CompletionShaper", "router"]

"""Every check of a request's content, made at the edge before the backend sees it.

Design decisions:
- A check lives on one side of the `Backend` boundary only, and for what a request asks it is
  this side: an empty prompt, token ids outside `Backend.vocab_size`, prompt plus `max_tokens`
  beyond `Backend.max_model_len`, sampling values out of range, fields that are not
  implemented. The app has the tokenizer and these limits for every backend, so the answers
  (status, `param`, OpenAI's wording) are the same whichever engine runs, and a backend trusts
  what it is given. The backend checks only what only it knows: its queue, its slots, whether
  it runs, whether an adapter can be loaded.
- Fields that would change the output and are not implemented are refused with 400 rather than
  ignored; values that change nothing (clients send defaults) are accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from adapterhub.serving.backends.base import Backend, SamplingParams
from adapterhub.serving.errors import OpenAIError
from adapterhub.serving.protocol import ChatCompletionRequest, CompletionRequest

# Fields that would change the output and are not implemented (chat's `echo` included), each
# with the values that change nothing and are therefore accepted (clients send defaults).
_UNSUPPORTED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "echo": lambda value: not value,
    "suffix": lambda value: not value,
    "best_of": lambda value: value in (None, 1),
    "tools": lambda value: not value,
    "functions": lambda value: not value,
    "tool_choice": lambda value: value in (None, "none", "auto"),
    "function_call": lambda value: value in (None, "none", "auto"),
    "response_format": lambda value: value is None or (isinstance(value, dict) and value.get("type") == "text"),
    # vLLM's structured-output extensions.
    "guided_json": lambda value: value is None,
    "guided_regex": lambda value: value is None,
    "guided_choice": lambda value: value is None,
    "guided_grammar": lambda value: value is None,
    "structured_outputs": lambda value: value is None,
}


def refuse_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    """400 for a field this server does not implement, set to a value that would matter."""
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(400, "stream_options can only be given with stream: true", param="stream_options")
    extra = body.model_extra or {}
    for name, changes_nothing in _UNSUPPORTED_FIELDS.items():
        if name in extra and not changes_nothing(extra[name]):
            raise OpenAIError(400, f"`{name}` is not supported by this server", param=name, code="unsupported_parameter")


def vocab_size(backend: Backend) -> int:
    """Token ids requests may use are below this: ids the tokenizer and the model both know."""
    return backend.vocab_size if backend.vocab_size is not None else len(backend.tokenizer)


def check_prompt_ids(backend: Backend, prompts: list[list[int]]) -> None:
    """400 for an empty prompt or a token id the model does not have."""
    vocab = vocab_size(backend)
    for ids in prompts:
        if not ids:
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        if any(not 0 <= token < vocab for token in ids):
            raise OpenAIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")


def check_context(backend: Backend, prompt_ids: list[int], max_tokens: int, param: str) -> None:
    """400 `context_length_exceeded` when prompt plus completion exceed the context window."""
    if len(prompt_ids) + max_tokens > backend.max_model_len:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {backend.max_model_len} tokens. However, you requested "
            f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the {param}, {max_tokens} for the completion).",
            param=param,
            code="context_length_exceeded",
        )


def check_request_rows(backend: Backend, rows: int) -> None:
    """400 for more completions (prompts x `n`) than the backend could ever queue at once: a
    429 would be retried for ever."""
    limit = backend.max_request_rows
    if limit is not None and rows > limit:
        raise OpenAIError(
            400, f"this request asks for {rows} completions (prompts x n); this server takes at most {limit} at once",
            param="n", code="too_many_completions",
        )


def _logit_bias(backend: Backend, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias` map (token id as a string -> bias in [-100, 100]) as id pairs."""
    vocab = vocab_size(backend)
    pairs = []
    for key, value in (bias or {}).items():
        if not re.fullmatch(r"[0-9]{1,12}", key.strip()) or not 0 <= int(key) < vocab:  # ASCII digits only
            raise OpenAIError(400, f"logit_bias key {key!r} is not a token id in [0, {vocab})", param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise OpenAIError(400, f"logit_bias value {value} for token {key} is outside [-100, 100]", param="logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def sampling_params(
    backend: Backend, body: CompletionRequest | ChatCompletionRequest, max_tokens: int, *,
    logprobs: int | None = None, prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The backend's `SamplingParams` of a (chat) completion request, its token ids checked."""
    vocab = vocab_size(backend)
    stop_token_ids = tuple(body.stop_token_ids or ())
    if any(not 0 <= token < vocab for token in stop_token_ids):
        raise OpenAIError(400, f"stop_token_ids must lie in [0, {vocab})", param="stop_token_ids")
    if body.min_tokens > max_tokens:
        raise OpenAIError(400, f"min_tokens ({body.min_tokens}) is more than max_tokens ({max_tokens})", param="min_tokens")
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k or 0, 0),
        min_p=body.min_p, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, logit_bias=_logit_bias(backend, body.logit_bias),
        stop=body.stop_strings(), stop_token_ids=stop_token_ids, min_tokens=body.min_tokens, seed=body.seed,
        ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
    )


__all__ = [
    "check_context", "check_prompt_ids", "check_request_rows", "refuse_unsupported", "sampling_params", "vocab_size",
]

"""The OpenAI-compatible HTTP server: `create_app(backend, resolver)` -> FastAPI.

Design decisions:
- Thin edge: handlers tokenize (chat template included), resolve the `model` field to the base
  or an `AdapterSpec`, call the `Backend`, and shape responses; engines live behind the backend
  ABC and adapters behind the `AdapterResolver`, both injected, so the vLLM backend and other
  resolvers slot in without touching this file.
- `model` resolution order: the base name; adapters added with `/v1/load_lora_adapter` (the
  vLLM way, by path); then the resolver (the registry), which turns `name`, `name:version` or
  `name@sha` into a canonical key. A name nobody knows is 404 with close matches listed.
  Loading a path under a name the registry already knows is refused; if the registry gets that
  name later, the path adapter keeps it while loaded (the registry's stays reachable by
  `name:version`), and `/v1/models` never lists one name twice.
- Streaming responses are only started once the first chunk of every choice exists, so an
  adapter that fails to load, a full queue or an engine that stopped still get a proper JSON
  error with the right status; a failure after that arrives as an SSE `error` event, then
  `[DONE]`. A client that disconnects cancels its rows in the engine (the generator closes).
- The API key (if any) guards every `/v1` route; `/health` and `/metrics` stay open for probes
  and scrapers, as in vLLM.
- Loading by `lora_path` makes the server read a directory a client names, so it is off unless
  the operator turns it on (`LoraPathPolicy`), as vLLM keeps it behind
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING`; loading a registry adapter by `lora_name` always works.
  A path outside what is allowed is refused before anything under it is read. Adapters loaded
  by path are capped in number (`max_path_adapters`), and their metrics series live only while
  they are loaded.
- `/v1/models` lists what this backend can serve, decided from each record's kind
  (`Backend.unservable_reason`) without reading weights: no prompt tuning, no classification head.
- Logprobs travel from the backend as token ids (`TokenLogprob`); this edge turns them into
  OpenAI's completion or chat shapes, with each token's exact bytes (`token_text.py`). A
  streamed token whose text is held back (a possible stop string, a partial UTF-8 character)
  keeps its logprob for the next chunk that is sent, so the streamed logprobs are the same as
  the whole response's.
- `echo` with `logprobs` (`max_tokens` 0 or more) scores the prompt itself, which is how
  lm-eval-harness computes log-likelihoods through an OpenAI-compatible server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from adapterhub.serving.backends.base import AdapterSpec, Backend, GenerationChunk, SamplingParams, TokenLogprob
from adapterhub.serving.errors import OpenAIError, from_exception, install_error_handlers, model_not_found
from adapterhub.serving.metrics import ServingMetrics
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
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TopLogprob,
    UnloadLoRAAdapterRequest,
    Usage,
)
from adapterhub.serving.resolver import AdapterResolver
from adapterhub.serving.token_text import TextOffsets, TokenTexts

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
# Engine keys of adapters added by `lora_path` (registry keys are `name:version`, never with '/').
LORA_PATH_KEY_PREFIX = "lora_path/"
#: Longest `lora_name` of an adapter loaded by path (as registry names): it is a metrics label.
MAX_PATH_ADAPTER_NAME = 128
#: Adapters loaded by path at once, by default: each is a name the server keeps.
DEFAULT_MAX_PATH_ADAPTERS = 256
_PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class LoraPathPolicy:
    """Which directories `/v1/load_lora_adapter` may load by `lora_path`.

    Off by default: `allow_any` (`serve --allow-lora-path`) takes any directory of the machine;
    `root` (`serve --adapter-dir DIR`) takes directories below it only, with symlinks resolved
    (the directory's and its two PEFT files'), and bounds `allow_any` too when both are given.
    """

    allow_any: bool = False
    root: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.allow_any or self.root is not None

    def check(self, lora_path: str) -> Path:
        """The directory to load, symlinks resolved; an `OpenAIError` naming the rule when
        `lora_path` is not allowed. Nothing under the path is opened here."""
        if not self.enabled:
            raise OpenAIError(
                403, "loading adapters by lora_path is turned off on this server: start it with --allow-lora-path "
                "(any directory) or --adapter-dir DIR (directories below DIR); registry adapters load by lora_name alone",
                param="lora_path", code="lora_path_not_allowed",
            )
        try:
            if self.root is None:
                return Path(lora_path).resolve()
            root = self.root.resolve()
            target = (root / lora_path).resolve()  # a relative lora_path is taken below the root
            resolved = [target, *((target / name).resolve() for name in _PEFT_FILES)]
        except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, a symlink loop
            raise OpenAIError(400, "lora_path is not a usable path", param="lora_path", code="invalid_value") from None
        if target == root or not all(path.is_relative_to(root) for path in resolved):
            raise OpenAIError(
                403, f"lora_path must be a directory below {root} (this server's --adapter-dir), symlinks resolved, "
                "its adapter_config.json and adapter_model.safetensors included",
                param="lora_path", code="lora_path_not_allowed",
            )
        return target


# vLLM's floor for logprobs, so -inf never reaches JSON (which cannot spell it).
_LOGPROB_FLOOR = -9999.0


@dataclass
class _Choice:
    """One generation of a request: its stream, with the first chunk already in hand."""

    index: int
    stream: AsyncIterator[GenerationChunk]
    first: GenerationChunk
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class ServerState:
    """What the route handlers share: backend, resolver, metrics and runtime-loaded adapters."""

    backend: Backend
    resolver: AdapterResolver | None
    metrics: ServingMetrics
    api_key: str | None
    preload: tuple[str, ...]
    lora_paths: LoraPathPolicy = field(default_factory=LoraPathPolicy)
    max_path_adapters: int = DEFAULT_MAX_PATH_ADAPTERS
    # Adapters added by path through /v1/load_lora_adapter: name -> spec (their key is the name).
    loaded_by_path: dict[str, AdapterSpec] = field(default_factory=dict)
    started_at: int = field(default_factory=lambda: int(time.time()))

    def may_label(self, key: str) -> bool:
        """Whether adapter `key` may get metrics series of its own: registry adapters (as many
        as the registry holds), an adapter loaded by path only while it is loaded."""
        if not key.startswith(LORA_PATH_KEY_PREFIX):
            return True
        spec = self.loaded_by_path.get(key.removeprefix(LORA_PATH_KEY_PREFIX))
        return spec is not None and spec.key == key

    @functools.cached_property
    def token_texts(self) -> TokenTexts:
        """Exact bytes and text of each token, for logprobs (built on first use)."""
        return TokenTexts(self.backend.tokenizer)

    async def resolve_model(self, model: str, *, param: str = "model") -> AdapterSpec | None:
        """None for the base model, else the adapter `model` names; 404 when it names nothing."""
        if model == self.backend.base_name:
            return None
        spec = self.loaded_by_path.get(model)
        if spec is not None:
            return spec
        if self.resolver is not None:
            spec = await asyncio.to_thread(self.resolver.resolve, self.backend.base_name, model)
            if spec is not None:
                return spec
        known = [self.backend.base_name, *self.loaded_by_path]
        if self.resolver is not None:
            listings = await asyncio.to_thread(self.resolver.list, self.backend.base_name)
            known += [name for listing in listings for name in (listing.id, *listing.aliases)]
        raise model_not_found(model, known, param=param)


def _state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(_state)]


async def _require_api_key(request: Request) -> None:
    expected = request.app.state.server.api_key
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise OpenAIError(401, "Incorrect or missing API key (send `Authorization: Bearer <key>`)", code="invalid_api_key")


def _refuse_unsupported(body: Any) -> None:
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(400, "stream_options can only be given with stream: true", param="stream_options")
    extra = body.model_extra or {}
    for name, changes_nothing in _UNSUPPORTED_FIELDS.items():
        if name in extra and not changes_nothing(extra[name]):
            raise OpenAIError(400, f"`{name}` is not supported by this server", param=name, code="unsupported_parameter")


def _usage(choices: Sequence[_Choice], last: dict[int, GenerationChunk], n: int) -> Usage:
    """Token counts of a whole request: each prompt counted once, however many choices it has."""
    prompt_tokens = sum(last[c.index].prompt_tokens for c in choices if c.index % n == 0)
    completion_tokens = sum(last[c.index].completion_tokens for c in choices)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


class _RequestTimer:
    """Measures one HTTP request for the metrics (TTFT, latency, tokens)."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics
        self.started = time.perf_counter()
        self.first_token: float | None = None

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter() - self.started

    def finish(self, model: str, status: int, completion_tokens: int = 0) -> None:
        self.metrics.request_finished(
            model,
            status=status,
            ttft=self.first_token,
            latency=time.perf_counter() - self.started,
            completion_tokens=completion_tokens,
        )


async def _start_choices(
    backend: Backend, prompts: list[list[int]], n: int, sampling: SamplingParams, adapter: AdapterSpec | None
) -> list[_Choice]:
    """Submit every prompt x n and wait for each first chunk; on any error close them all.

    With a seed, the i-th choice of a prompt draws with `seed + i` (as vLLM does), so `n` seeded
    choices differ from each other and the request still repeats exactly.
    """
    def child(i: int) -> SamplingParams:
        return sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + i)

    streams = [backend.generate(prompt, child(i), adapter) for prompt in prompts for i in range(n)]
    firsts = await asyncio.gather(*(anext(stream) for stream in streams), return_exceptions=True)
    errors = [f for f in firsts if isinstance(f, BaseException)]
    if errors:
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]
        raise errors[0]
    return [_Choice(index=i, stream=s, first=f) for i, (s, f) in enumerate(zip(streams, firsts))]  # type: ignore[arg-type]


async def _drain(choice: _Choice) -> GenerationChunk:
    """Read a choice to its end; returns the last chunk (finish reason and counts)."""
    last = choice.first
    choice.text.append(last.text)
    choice.logprobs.extend(last.logprobs)
    async with contextlib.aclosing(choice.stream):  # type: ignore[type-var]
        if last.finish_reason is None:
            async for chunk in choice.stream:
                choice.text.append(chunk.text)
                choice.logprobs.extend(chunk.logprobs)
                last = chunk
    return last


async def _interleave(choices: list[_Choice]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Chunks of all choices as they come, each tagged with its choice index."""
    queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

    async def pump(choice: _Choice) -> None:
        try:
            await queue.put((choice.index, choice.first))
            if choice.first.finish_reason is None:
                async for chunk in choice.stream:
                    await queue.put((choice.index, chunk))
            await queue.put((choice.index, None))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((choice.index, exc))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        remaining = len(choices)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for choice in choices:
            with contextlib.suppress(Exception):
                await choice.stream.aclose()  # type: ignore[attr-defined]


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


def _vocab_size(backend: Backend) -> int:
    """Token ids requests may use are below this: ids the tokenizer and the model both know."""
    return backend.vocab_size if backend.vocab_size is not None else len(backend.tokenizer)


def _logit_bias(backend: Backend, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias` map (token id as a string -> bias in [-100, 100]) as id pairs."""
    vocab = _vocab_size(backend)
    pairs = []
    for key, value in (bias or {}).items():
        if not re.fullmatch(r"[0-9]{1,12}", key.strip()) or not 0 <= int(key) < vocab:  # ASCII digits only
            raise OpenAIError(400, f"logit_bias key {key!r} is not a token id in [0, {vocab})", param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise OpenAIError(400, f"logit_bias value {value} for token {key} is outside [-100, 100]", param="logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def _sampling(
    backend: Backend, body: CompletionRequest | ChatCompletionRequest, max_tokens: int, *,
    logprobs: int | None = None, prompt_logprobs: int | None = None,
) -> SamplingParams:
    vocab = _vocab_size(backend)
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


def _floor(logprob: float) -> float:
    return max(logprob, _LOGPROB_FLOOR)


def _append_completion_logprobs(
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
        shaped.token_logprobs.append(_floor(scored.logprob))
        top = {texts.token_text(alternative): _floor(value) for alternative, value in scored.top}
        top.setdefault(text, _floor(scored.logprob))
        shaped.top_logprobs.append(top)


def _chat_logprobs(state: ServerState, scored: Sequence[TokenLogprob], top: int) -> ChatLogprobs:
    """Chat's `logprobs.content`: each token with its exact UTF-8 bytes and its `top` alternatives."""
    texts = state.token_texts

    def entry(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=texts.token_text(token_id), logprob=_floor(logprob), bytes=list(texts.token_bytes(token_id)))

    content = []
    for item in scored:
        chosen = entry(item.token_id, item.logprob)
        alternatives = [entry(token_id, value) for token_id, value in item.top[:top]]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=alternatives))
    return ChatLogprobs(content=content)


def _check_context(backend: Backend, prompt_ids: list[int], max_tokens: int, param: str) -> None:
    if len(prompt_ids) + max_tokens > backend.max_model_len:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {backend.max_model_len} tokens. However, you requested "
            f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the {param}, {max_tokens} for the completion).",
            param=param,
            code="context_length_exceeded",
        )


async def _respond(
    state: ServerState,
    *,
    adapter: AdapterSpec | None,
    prompts: list[list[int]],
    n: int,
    sampling: SamplingParams,
    stream: bool,
    include_usage: bool,
    shape_final: Callable[[str, int, list[_Choice], dict[int, GenerationChunk]], dict[str, Any]],
    shape_chunk: Callable[[str, int, int, GenerationChunk, bool, list[TokenLogprob]], dict[str, Any]],
    shape_usage_chunk: Callable[[str, int, Usage], dict[str, Any]],
    id_prefix: str,
) -> Response:
    """Run a (chat) completion, streaming or not, with metrics; shapes come from the caller.

    `shape_chunk` gets the logprobs of every token since the last chunk sent for that choice.
    """
    limit = state.backend.max_request_rows
    if limit is not None and len(prompts) * n > limit:
        raise OpenAIError(
            400, f"this request asks for {len(prompts) * n} completions (prompts x n); this server takes at most {limit} at once",
            param="n", code="too_many_completions",
        )
    timer = _RequestTimer(state.metrics)
    label = adapter.key if adapter is not None else state.backend.base_name
    response_id = f"{id_prefix}-{uuid.uuid4().hex}"
    created = int(time.time())
    try:
        choices = await _start_choices(state.backend, prompts, n, sampling, adapter)
    except asyncio.CancelledError:  # the client went away, or the server stops: not an error to answer
        timer.finish(label, 499)
        raise
    except Exception as exc:
        error = from_exception(exc)
        timer.finish(label, error.status_code)
        raise error from exc
    timer.token()

    if not stream:
        try:
            lasts = await asyncio.gather(*(_drain(c) for c in choices))
        except asyncio.CancelledError:
            timer.finish(label, 499)
            raise
        except Exception as exc:
            error = from_exception(exc)
            timer.finish(label, error.status_code)
            raise error from exc
        last_by_index = {c.index: last for c, last in zip(choices, lasts)}
        timer.finish(label, 200, sum(last.completion_tokens for last in lasts))
        return JSONResponse(shape_final(response_id, created, choices, last_by_index))

    async def events() -> AsyncIterator[str]:
        last_by_index: dict[int, GenerationChunk] = {}
        status = 200
        first_sent: set[int] = set()
        held_logprobs: dict[int, list[TokenLogprob]] = {}
        try:
            async for index, chunk in _interleave(choices):
                last_by_index[index] = chunk
                finished = chunk.finish_reason is not None
                logprobs = held_logprobs.setdefault(index, [])
                logprobs.extend(chunk.logprobs)
                if not chunk.text and not finished and index in first_sent:
                    continue  # a token whose text is held back (stop-string prefix, partial UTF-8)
                payload = shape_chunk(response_id, created, index, chunk, index not in first_sent, logprobs)
                held_logprobs[index] = []
                first_sent.add(index)
                yield _sse(payload)
            if include_usage:  # OpenAI: usage only on one last chunk with no choices, if asked for
                yield _sse(shape_usage_chunk(response_id, created, _usage(choices, last_by_index, n)))
        except BaseException as exc:  # noqa: BLE001 - reported in-band, the status line is gone
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                status = 499  # the client went away
                raise
            error = from_exception(exc)
            status = error.status_code
            yield _sse(error.body())
        finally:
            timer.finish(label, status, sum(last.completion_tokens for last in last_by_index.values()))
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _completion_prompts(backend: Backend, prompt: Any) -> list[list[int]]:
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


def _check_prompt_ids(backend: Backend, prompts: list[list[int]]) -> None:
    vocab = _vocab_size(backend)
    for ids in prompts:
        if not ids:
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        if any(not 0 <= token < vocab for token in ids):
            raise OpenAIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")


def _build_v1_router() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_require_api_key)])

    @router.get("/models")
    async def list_models(state: State) -> ModelList:
        return ModelList(data=await _model_cards(state))

    @router.get("/models/{model_id:path}")
    async def retrieve_model(model_id: str, state: State) -> ModelCard:
        """One model's card, by id, alias or any ref requests accept (`client.models.retrieve`)."""
        cards = await _model_cards(state)
        for card in cards:
            if model_id == card.id or model_id in card.aliases:
                return card
        spec = await state.resolve_model(model_id)  # `name@sha`, `name:version`: 404 when unknown
        found = next((card for card in cards if spec is not None and card.root == spec.key), None)
        if found is None:  # known to the registry but not servable here (prompt tuning, a full model)
            raise model_not_found(model_id, [name for card in cards for name in (card.id, *card.aliases)])
        return found

    async def _model_cards(state: ServerState) -> list[ModelCard]:
        """The base, adapters added by path, then the registry's servable adapters of the base."""
        backend = state.backend
        held = {adapter.key: adapter for adapter in backend.resident_adapters()}
        cards = [
            ModelCard(
                id=backend.base_name, created=state.started_at, root=str(getattr(backend, "model_dir", "")) or None,
                parent=None, resident=True, tier="device", max_model_len=backend.max_model_len, meta=backend.describe(),
            )
        ]

        def adapter_card(model_id: str, key: str, created: int, aliases: Sequence[str], meta: dict[str, Any]) -> ModelCard:
            resident = held.get(key)
            return ModelCard(
                id=model_id, created=created, parent=backend.base_name, root=key,
                resident=resident is not None and resident.tier == "device",
                tier=resident.tier if resident is not None else None,
                aliases=list(aliases), max_model_len=backend.max_model_len,
                meta={**meta, **({"pinned": resident.pinned} if resident is not None else {})},
            )

        for name, spec in state.loaded_by_path.items():
            cards.append(adapter_card(name, spec.key, state.started_at, (), {"source": "load_lora_adapter"}))
        if state.resolver is not None:
            for listing in await asyncio.to_thread(state.resolver.list, backend.base_name):
                peft_type, task_type = listing.meta.get("peft_type"), listing.meta.get("task_type")
                if backend.unservable_reason(
                    str(peft_type) if peft_type is not None else None, str(task_type) if task_type is not None else None
                ) is not None:
                    continue  # prompt/prefix tuning, a classification head, full models: not advertised
                if listing.id in state.loaded_by_path:
                    continue  # that name means the adapter loaded by path while it is loaded
                # A registry adapter that took a path adapter's name later is listed by its versioned id only.
                aliases = [alias for alias in listing.aliases if alias not in state.loaded_by_path]
                cards.append(adapter_card(listing.id, listing.key, listing.created, aliases, dict(listing.meta)))
        return cards

    @router.post("/completions")
    async def completions(body: CompletionRequest, state: State) -> Response:
        _refuse_unsupported(body)
        adapter = await state.resolve_model(body.model)
        prompts = _completion_prompts(state.backend, body.prompt)
        _check_prompt_ids(state.backend, prompts)
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        if max_tokens == 0 and not body.echo:
            raise OpenAIError(400, "max_tokens must be at least 1 (0 is allowed with echo, to score the prompt)", param="max_tokens")
        for ids in prompts:
            _check_context(state.backend, ids, max_tokens, "prompt")
        sampling = _sampling(
            state.backend, body, max_tokens, logprobs=body.logprobs, prompt_logprobs=body.logprobs if body.echo else None
        )
        # Choices run prompt by prompt, `n` each. With echo, a choice's text starts with its prompt
        # (as sent, or decoded from token ids) and, with logprobs, its scores with the prompt's.
        prompt_texts: list[str] = []  # decoded only to be echoed
        if body.echo and isinstance(body.prompt, str):
            prompt_texts = [body.prompt]
        elif body.echo and all(isinstance(p, str) for p in body.prompt):
            prompt_texts = list(body.prompt)  # type: ignore[arg-type]
        elif body.echo:
            prompt_texts = [state.backend.tokenizer.decode(ids) for ids in prompts]
        stream_offsets: dict[int, TextOffsets] = {}  # per choice, across its chunks

        def echo_text(index: int) -> str:
            return prompt_texts[index // body.n] if body.echo else ""

        def choice_logprobs(
            index: int, first: bool, prompt_scores: Sequence[TokenLogprob | None] | None, scored: Sequence[TokenLogprob]
        ) -> CompletionLogprobs | None:
            if body.logprobs is None:
                return None
            shaped = CompletionLogprobs()
            offsets = stream_offsets.setdefault(index, TextOffsets(state.token_texts))
            if first and body.echo:
                # The echoed prompt is decoded on its own, special tokens spelled out.
                prompt = prompts[index // body.n]
                scores = prompt_scores or [None] * len(prompt)
                _append_completion_logprobs(state, shaped, list(zip(prompt, scores, strict=True)), offsets.advance(prompt))
                offsets.end_text()
            generated = [item.token_id for item in scored]
            entries = [(item.token_id, item) for item in scored]
            # Generated text is decoded without special tokens: they take no room in it.
            _append_completion_logprobs(state, shaped, entries, offsets.advance(generated, skip_special=True))
            return shaped

        def shape_final(rid: str, created: int, choices: list[_Choice], last: dict[int, GenerationChunk]) -> dict[str, Any]:
            return CompletionResponse(
                id=rid, created=created, model=body.model,
                choices=[
                    CompletionChoice(
                        index=c.index, text=echo_text(c.index) + "".join(c.text), finish_reason=last[c.index].finish_reason,
                        logprobs=choice_logprobs(c.index, True, c.first.prompt_logprobs, c.logprobs),
                    )
                    for c in choices
                ],
                usage=_usage(choices, last, body.n),
            ).model_dump()

        def shape_chunk(
            rid: str, created: int, index: int, chunk: GenerationChunk, first: bool, scored: list[TokenLogprob]
        ) -> dict[str, Any]:
            text = (echo_text(index) if first else "") + chunk.text
            logprobs = choice_logprobs(index, first, chunk.prompt_logprobs, scored)
            return CompletionResponse(
                id=rid, created=created, model=body.model,
                choices=[CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=chunk.finish_reason)], usage=None,
            ).model_dump()

        def shape_usage_chunk(rid: str, created: int, usage: Usage) -> dict[str, Any]:
            return CompletionResponse(id=rid, created=created, model=body.model, choices=[], usage=usage).model_dump()

        return await _respond(
            state, adapter=adapter, prompts=prompts, n=body.n, sampling=sampling,
            stream=body.stream, include_usage=bool(body.stream_options and body.stream_options.include_usage),
            shape_final=shape_final, shape_chunk=shape_chunk, shape_usage_chunk=shape_usage_chunk, id_prefix="cmpl",
        )

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, state: State) -> Response:
        _refuse_unsupported(body)
        if body.top_logprobs and not body.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        top = body.top_logprobs or 0
        adapter = await state.resolve_model(body.model)
        tokenizer = state.backend.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise OpenAIError(400, "the base model's tokenizer has no chat template; use /v1/completions", param="messages")
        conversation = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template itself rejects the conversation (e.g. role order)
            raise OpenAIError(400, f"the chat template rejected the messages: {exc}", param="messages") from exc
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        _check_prompt_ids(state.backend, [prompt_ids])
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = requested if requested is not None else state.backend.max_model_len - len(prompt_ids)
        if max_tokens < 1:
            max_tokens = 1  # reported as context_length_exceeded just below
        _check_context(state.backend, prompt_ids, max_tokens, "messages")
        sampling = _sampling(state.backend, body, max_tokens, logprobs=top if body.logprobs else None)

        def shape_final(rid: str, created: int, choices: list[_Choice], last: dict[int, GenerationChunk]) -> dict[str, Any]:
            return ChatCompletionResponse(
                id=rid, created=created, model=body.model,
                choices=[
                    ChatChoice(
                        index=c.index, message=AssistantMessage(content="".join(c.text)), finish_reason=last[c.index].finish_reason or "stop",
                        logprobs=_chat_logprobs(state, c.logprobs, top) if body.logprobs else None,
                    )
                    for c in choices
                ],
                usage=_usage(choices, last, body.n),
            ).model_dump()

        def shape_chunk(
            rid: str, created: int, index: int, chunk: GenerationChunk, first: bool, scored: list[TokenLogprob]
        ) -> dict[str, Any]:
            delta = ChatDelta(role="assistant" if first else None, content=chunk.text)
            logprobs = _chat_logprobs(state, scored, top) if body.logprobs else None
            return ChatCompletionChunk(
                id=rid, created=created, model=body.model,
                choices=[ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=chunk.finish_reason)],
            ).model_dump(exclude_none=False)

        def shape_usage_chunk(rid: str, created: int, usage: Usage) -> dict[str, Any]:
            return ChatCompletionChunk(id=rid, created=created, model=body.model, choices=[], usage=usage).model_dump()

        return await _respond(
            state, adapter=adapter, prompts=[prompt_ids], n=body.n, sampling=sampling,
            stream=body.stream, include_usage=bool(body.stream_options and body.stream_options.include_usage),
            shape_final=shape_final, shape_chunk=shape_chunk, shape_usage_chunk=shape_usage_chunk, id_prefix="chatcmpl",
        )

    @router.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest, state: State) -> PlainTextResponse:
        name = body.lora_name
        if name == state.backend.base_name or name in state.loaded_by_path:
            raise OpenAIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name", code="already_loaded")
        if body.lora_path is None:
            spec = await state.resolve_model(name, param="lora_name")
            assert spec is not None
            try:
                await state.backend.load_adapter(spec)
            except Exception as exc:
                raise from_exception(exc, param="lora_name") from exc
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        path = state.lora_paths.check(body.lora_path)  # refused before anything under it is read
        if len(name) > MAX_PATH_ADAPTER_NAME:
            raise OpenAIError(
                400, f"lora_name of an adapter loaded by path has at most {MAX_PATH_ADAPTER_NAME} characters ({len(name)} given)",
                param="lora_name", code="invalid_value",
            )
        if len(state.loaded_by_path) >= state.max_path_adapters:
            raise OpenAIError(
                400, f"{len(state.loaded_by_path)} adapters are loaded by path, the most this server takes; unload one first",
                param="lora_path", code="too_many_adapters",
            )
        if not await asyncio.to_thread((path / "adapter_config.json").is_file):
            raise OpenAIError(404, f"no PEFT adapter at lora_path {body.lora_path!r}", param="lora_path", code="not_found")
        if state.resolver is not None and await asyncio.to_thread(state.resolver.resolve, state.backend.base_name, name):
            raise OpenAIError(
                400, f"'{name}' already names an adapter in the registry; load this path under another lora_name",
                param="lora_name", code="already_loaded",
            )
        if name in state.loaded_by_path:  # loaded meanwhile, by a concurrent request
            raise OpenAIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name", code="already_loaded")
        # Registry names cannot hold '/', so this key never meets a registry adapter's key. The
        # name is taken before the load, so its load events are labelled and a concurrent load
        # of the same name is refused; a failed load gives it back.
        spec = AdapterSpec(key=f"{LORA_PATH_KEY_PREFIX}{name}", locate=lambda: path, name=name)
        state.loaded_by_path[name] = spec
        try:
            await state.backend.load_adapter(spec)
        except BaseException as exc:
            if state.loaded_by_path.get(name) is spec:
                del state.loaded_by_path[name]
            state.metrics.forget(spec.key)
            if isinstance(exc, Exception):
                raise from_exception(exc, param="lora_path") from exc
            raise  # cancelled: the client went away or the server stops
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @router.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, state: State) -> PlainTextResponse:
        name = body.lora_name
        spec = state.loaded_by_path.pop(name, None)
        added_by_path = spec is not None
        if spec is None and state.resolver is not None and name != state.backend.base_name:
            spec = await asyncio.to_thread(state.resolver.resolve, state.backend.base_name, name)
        if spec is None:
            raise OpenAIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name", code="not_found")
        removed = await state.backend.unload_adapter(spec.key)
        state.metrics.forget(spec.key)  # unloaded: its series go (a path adapter's name may never return)
        if not removed and not added_by_path:
            raise OpenAIError(404, f"The lora adapter '{name}' is not loaded.", param="lora_name", code="not_found")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return router


def create_app(
    backend: Backend,
    resolver: AdapterResolver | None = None,
    *,
    api_key: str | None = None,
    preload: Sequence[str] = (),
    metrics: ServingMetrics | None = None,
    lora_paths: LoraPathPolicy | None = None,
    max_path_adapters: int = DEFAULT_MAX_PATH_ADAPTERS,
) -> FastAPI:
    """The server for `backend`; adapters come from `resolver`; `preload` refs are pinned.

    `api_key` (the CLI also reads `ADAPTERHUB_API_KEY`) guards every `/v1` route. `lora_paths`
    says which directories `/v1/load_lora_adapter` may load by path (default: none), and
    `max_path_adapters` how many may be loaded that way at once.
    """
    metrics = metrics or ServingMetrics(backend)
    backend.listener = metrics
    state = ServerState(
        backend=backend, resolver=resolver, metrics=metrics, api_key=api_key or None, preload=tuple(preload),
        lora_paths=lora_paths or LoraPathPolicy(), max_path_adapters=max_path_adapters,
    )
    metrics.label_allowed = state.may_label

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            for ref in state.preload:
                spec = await state.resolve_model(ref)
                if spec is None:
                    continue
                await backend.load_adapter(spec, pin=True)
            yield
        finally:
            await backend.shutdown()

    app = FastAPI(title="adapterhub", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(_build_v1_router())

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        status = await request.app.state.server.backend.health()
        body = {"status": "ok" if status.ok else "unavailable", "detail": status.detail,
                "running": status.running_requests, "waiting": status.waiting_requests}
        return JSONResponse(body, status_code=200 if status.ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        payload = await asyncio.to_thread(request.app.state.server.metrics.render)
        return Response(payload, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


__all__ = ["LoraPathPolicy", "ServerState", "create_app"]

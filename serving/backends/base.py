"""The async backend interface every serving engine implements.

Design decisions:
- The HTTP layer (`adapterhub.serving.app`) speaks only to `Backend`; the embedded torch engine
  and a later vLLM engine are interchangeable behind it (vLLM's `EngineClient` plays this role
  there). Only `backends/vllm_engine.py` may ever import vllm.
- The app tokenizes prompts and applies chat templates with `Backend.tokenizer` (a Hugging Face
  tokenizer), so prompt length checks and usage counts are the same for every backend; the
  backend turns token ids into streamed text, because engines like vLLM detokenize internally.
- Each check of a request lives on one side of this boundary. What a request asks for is
  checked by the app (`serving/routes/checks.py`) before `generate` is called: a non-empty
  prompt, token ids below `vocab_size`, prompt plus `max_tokens` within `max_model_len`,
  sampling values in range. A backend trusts those and checks only what only it knows: its
  queue (`CapacityError`), whether it runs (`UnavailableError`), whether an adapter can be
  loaded (`AdapterLoadError`), what its own engine refuses.
- Adapters reach a backend as `AdapterSpec(key, locate)`: `key` is the canonical identity
  (a registry `name:version`, or the name given to `/v1/load_lora_adapter`) and `locate()`
  returns a local PEFT directory. `locate` is only called when the adapter is not already held,
  so a resident adapter never costs a registry read or a hash check.
- Adapter lifecycle events go to an `AdapterEventListener` (the app wires metrics to it), so the
  backend knows nothing about Prometheus.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from adapterhub import kinds
from adapterhub.errors import AdapterhubError

FinishReason = Literal["stop", "length"]
#: Temperatures below this decode greedily (vLLM's `_SAMPLING_EPS`).
GREEDY_BELOW = 1e-5


class BackendError(AdapterhubError):
    """An error a backend raises for one request, carrying the answer it deserves at the HTTP edge.

    Each subclass names its HTTP status, OpenAI error `code` and `type`, and the request field it
    concerns (`param`, None when it concerns no one field), so the edge turns any of them into
    OpenAI's error JSON by reading these attributes (`serving/errors.py`) instead of testing
    classes one by one, and a new backend's errors need no change there. A raise site may name
    the field itself (`param=...`); a route may name it for errors whose class concerns a field
    (`/v1/load_lora_adapter` says `lora_name` where a completion says `model`).
    """

    status_code: ClassVar[int] = 400
    code: ClassVar[str | None] = None
    error_type: ClassVar[str] = "invalid_request_error"
    #: The request field this kind of error concerns by default (None: none in particular).
    default_param: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class AdapterLoadError(BackendError):
    """An adapter could not be loaded (unsupported kind, does not fit the base, unreadable).

    Only the request that needed the adapter fails; the server keeps serving the rest. The
    message names the adapter (ref or `lora_name`) and its kind.
    """

    code = "adapter_load_failed"
    default_param = "model"


class CapacityError(BackendError):
    """Too many requests queued; the client should retry later (HTTP 429)."""

    status_code = 429
    code = "rate_limit_exceeded"
    error_type = "rate_limit_error"


class UnavailableError(BackendError):
    """The engine cannot take work now: starting, stopping, or every slot pinned (HTTP 503)."""

    status_code = 503
    code = "service_unavailable"
    error_type = "service_unavailable_error"


class ContextLengthError(BackendError):
    """Prompt plus requested tokens exceed what the engine accepts (HTTP 400). The app checks
    `max_model_len` itself; this is for an engine that refuses a length of its own accord."""

    code = "context_length_exceeded"
    default_param = "max_tokens"


class GenerationError(BackendError):
    """The model gave this request no usable next-token distribution, e.g. non-finite logits in
    fp16 (HTTP 500). Only that request fails; its batch-mates and the engine go on."""

    status_code = 500
    code = "generation_failed"
    error_type = "server_error"


class SamplingSettingsError(BackendError):
    """The request's own settings left no usable distribution: a bias or penalty that overflows
    the logits, `min_tokens` masking every token (HTTP 400, `param` names the setting). Only
    that request fails; a retry with the same settings would fail again."""

    code = "invalid_value"

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, param=param)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings, with vLLM's meanings so every backend answers alike.

    Choosing a token: a temperature below `GREEDY_BELOW` (vLLM's 1e-5) means greedy arg-max, since
    dividing logits by less overflows. Otherwise sampling applies the temperature, then `min_p`,
    `top_k` (0: off) and `top_p`.

    Before either, `logit_bias` (token id -> value added to its logit) and the penalties change
    the logits: `presence_penalty` and `frequency_penalty` (OpenAI's: subtracted once, or once
    per occurrence) count the request's own output tokens; `repetition_penalty` (CTRL's: divides
    positive logits, multiplies negative ones) covers prompt and output tokens.

    Ending: `stop_token_ids` end a request like end-of-sequence. Neither can be chosen, and no
    stop string counts, before `min_tokens` tokens are out. `max_tokens == 0` scores the prompt
    only.

    `logprobs`/`prompt_logprobs` ask for the chosen token's log-probability plus that many
    alternatives per position (None: none). They are of the model's raw distribution, before
    bias, penalties and temperature (vLLM's default), so a score does not depend on how the text
    was sampled.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def adjusts_logits(self) -> bool:
        """Whether a bias or penalty changes this request's logits before the token is chosen."""
        return (
            bool(self.logit_bias)
            or self.min_tokens > 0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def truncated(self) -> bool:
        """Whether sampling draws from fewer tokens than the whole vocabulary."""
        return self.top_p < 1.0 or self.top_k > 0 or self.min_p > 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the `top` most likely tokens at its position (id, logprob),
    most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter a request needs: a canonical key and a way to get its directory.

    `name` is how messages name it to clients (the registry ref, or the `lora_name` it was
    loaded under; default the key). `peft_type`, `task_type` and `config` are what its record
    says, when a record exists: a backend refuses a kind it cannot serve from them, before
    `locate` materializes anything.
    """

    key: str
    locate: Callable[[], Path] = field(compare=False, repr=False)
    name: str | None = field(default=None, compare=False)
    peft_type: str | None = field(default=None, compare=False)
    task_type: str | None = field(default=None, compare=False, repr=False)
    config: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def display_name(self) -> str:
        return self.name or self.key


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of one request's output; the last chunk carries `finish_reason` and the counts.

    `logprobs` matches `token_ids` one to one when the request asked for them. The first chunk
    carries `prompt_logprobs` when asked for: one per prompt token, None for the first (nothing
    predicts it). A request with `max_tokens == 0` gets one chunk with no token.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass(frozen=True)
class ResidentAdapter:
    """An adapter the backend holds: `tier` is "device" (in a compute slot) or "cpu"."""

    key: str
    tier: Literal["device", "cpu"]
    size_bytes: int
    pinned: bool
    rank: int
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class HealthStatus:
    """What `/health` reports; `ok` False makes it answer 503."""

    ok: bool
    detail: str
    running_requests: int = 0
    waiting_requests: int = 0


class AdapterEventListener(Protocol):
    """Receives adapter lifecycle events (the app turns them into Prometheus metrics)."""

    def adapter_loaded(self, key: str, *, source: Literal["disk", "cpu"], seconds: float, size_bytes: int) -> None: ...

    def adapter_evicted(self, key: str, *, tier: Literal["device", "cpu"], seconds: float) -> None: ...


class NullEventListener:
    """The listener of a backend nobody observes."""

    def adapter_loaded(self, key: str, *, source: Literal["disk", "cpu"], seconds: float, size_bytes: int) -> None:
        pass

    def adapter_evicted(self, key: str, *, tier: Literal["device", "cpu"], seconds: float) -> None:
        pass


def adapter_kind(peft_type: Any, config: Mapping[str, Any] | None = None) -> kinds.AdapterKind:
    """The kind of an adapter from its record or config: a registry summary names it (`kind`), a
    PEFT config has the variant's flags. `kinds.UnknownKindError` (listing the known types) else."""
    if config and isinstance(config.get("kind"), str):
        return kinds.get_kind(config["kind"])
    return kinds.kind_of(peft_type.upper() if isinstance(peft_type, str) else str(peft_type), config)


def kind_label(peft_type: Any, task_type: Any = None, config: Mapping[str, Any] | None = None) -> str:
    """How messages name an adapter: "lora with DoRA", "prompt tuning", "lora, sequence
    classification head"; "unknown kind" when its PEFT type is not in the table."""
    try:
        kind = adapter_kind(peft_type, config)
    except kinds.UnknownKindError:
        return f"{peft_type.lower()[:40]}" if isinstance(peft_type, str) and peft_type else "unknown kind"
    return kinds.describe_kind(kind, {"task_type": task_type, **(config or {})})


def why_backend_cannot_serve(
    backend: str, peft_type: Any, task_type: Any = None, config: Mapping[str, Any] | None = None,
    tensor_names: Collection[str] = (),
) -> str | None:
    """`kinds.why_not_served` for an adapter known by its PEFT type (and config): the table's
    reason, or that the type is not one adapterhub knows, with what `backend` serves instead."""
    try:
        kind = adapter_kind(peft_type, config)
    except kinds.UnknownKindError as exc:
        served = ", ".join(k.label for k in kinds.served_kinds(backend))
        return f"{exc}; the {backend} backend serves {served} adapters"
    return kinds.why_not_served(kind, backend, {"task_type": task_type, **(config or {})}, tensor_names)


class Backend(abc.ABC):
    """An engine that generates for the base model and any number of adapters of it."""

    #: Where adapter load/evict events go; `create_app` points it at the server's metrics.
    listener: AdapterEventListener = NullEventListener()

    #: Name of the base model, as clients put it in the `model` field.
    base_name: str
    #: A Hugging Face tokenizer of the base model (chat template, encoding, usage counts).
    tokenizer: Any
    #: Longest prompt + completion the engine accepts, in tokens.
    max_model_len: int
    #: Token ids a request may use (prompt, `stop_token_ids`, `logit_bias`) lie in
    #: [0, vocab_size): the ids both the tokenizer and the model's embeddings and logits have. A
    #: tokenizer given tokens the model was never resized for is longer than the model's
    #: vocabulary. None: the tokenizer's length.
    vocab_size: int | None = None
    #: Most completions (prompts x `n`) one request may ask for; None: no limit. More could never
    #: be queued at once, so the app refuses them with a 400 instead of an endless 429.
    max_request_rows: int | None = None
    #: This backend's column in the table of adapter kinds (`adapterhub.kinds.BACKENDS`): what
    #: it serves and why not is read there, so `/v1/models`, load errors, `adapterhub show` and
    #: the model card say the same thing.
    kinds_backend: ClassVar[str]

    def unservable_reason(
        self, peft_type: str | None, task_type: str | None = None, config: Mapping[str, Any] | None = None
    ) -> str | None:
        """Why this backend cannot serve an adapter of this kind (None: it can), from what its
        record says, without reading its weights. `/v1/models` lists only adapters this
        returns None for; a request for another gets an `AdapterLoadError` with the reason.
        """
        if peft_type is None:
            return None
        return why_backend_cannot_serve(self.kinds_backend, peft_type, task_type, config)

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the engine (threads, preloads); called once before the first request."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine; pending requests end with an `UnavailableError`."""

    @abc.abstractmethod
    def generate(
        self, prompt_token_ids: list[int], sampling: SamplingParams, adapter: AdapterSpec | None
    ) -> AsyncIterator[GenerationChunk]:
        """Stream one request's output; `adapter=None` runs the base model.

        The caller has checked the request (see the module's design decisions): the prompt is
        not empty, its ids are below `vocab_size`, and it fits `max_model_len` with
        `sampling.max_tokens`. Raises (before the first chunk) `AdapterLoadError`,
        `CapacityError`, `UnavailableError`, or another `BackendError` its engine gives.
        Closing the iterator early cancels the request in the engine.
        """

    @abc.abstractmethod
    async def load_adapter(self, adapter: AdapterSpec, *, pin: bool = False) -> ResidentAdapter:
        """Make an adapter resident ahead of use; `pin` keeps it in a device slot for good."""

    @abc.abstractmethod
    async def unload_adapter(self, key: str) -> bool:
        """Drop an adapter from every tier (after its running requests end); False if not held."""

    @abc.abstractmethod
    def resident_adapters(self) -> list[ResidentAdapter]:
        """Adapters held now, device tier first."""

    def holds(self, key: str) -> bool:
        """Whether adapter `key` is held in any tier now, so a request for it reads nothing.

        Asked on every request that names an adapter (the app then trusts what its resolver
        cached instead of asking the registry), so engines answer it from memory; this default
        scans `resident_adapters`.
        """
        return any(adapter.key == key for adapter in self.resident_adapters())

    @abc.abstractmethod
    def memory_stats(self) -> dict[str, float]:
        """Byte counts worth exporting: base weights, adapters per tier, KV cache, device memory."""

    @abc.abstractmethod
    async def health(self) -> HealthStatus:
        """Whether the engine is running and how busy it is."""

    def prometheus_registry(self) -> Any | None:
        """A prometheus_client registry of the engine's own series, which `/metrics` appends to the
        server's (vLLM's `vllm:*`); None: the engine exports none of its own."""
        return None

    def describe(self) -> dict[str, Any]:
        """Engine settings worth showing clients (`/v1/models` puts them on the base card)."""
        return {}

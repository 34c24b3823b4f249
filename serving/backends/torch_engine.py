"""The embedded engine: transformers + gathered LoRA, continuous batching across adapters.

Design decisions:
- One engine thread owns the model and runs steps; the asyncio side only queues requests and
  reads tokens back (`loop.call_soon_threadsafe`). torch releases the GIL in its kernels, so the
  HTTP server stays responsive while a step runs.
- Continuous batching: each step first prefills the requests admitted since the last step (one
  left-padded batch), merges their KV cache into the running batch, then decodes one token for
  every running row. Rows leave as soon as they finish. The KV cache is a transformers
  `DynamicCache` over a left-padded batch with an explicit attention mask and per-row position
  ids, so padding never changes a row's result.
- Rows of different adapters share every forward pass via `SlotTable` (gathered LoRA, DoRA and
  (IA)³, see `lora_slots.py`); a request's output does not depend on its batch-mates.
- Two adapter tiers. CPU tier: an LRU of parsed adapters (`--max-cpu-adapters`), filled by
  worker threads (`asyncio.to_thread`), so a disk read never stalls the engine. Device tier:
  `--max-resident` numbered slots; putting an adapter into a slot is a memory copy done on the
  engine thread between two steps. `--preload` adapters are pinned to slots. The CPU tier never
  drops an adapter a request holds, a slot owns or a pin keeps, so it may run over its size
  while those alone fill it (always the case for a moment when `--max-cpu-adapters` equals
  `--max-resident`) and shrinks back when they fall idle: every pair with
  `max_cpu_adapters >= max_resident >= 1` is served.
- A row's failure stays the row's: what one request's work raises fails that request, a
  prefill that raises is retried row by row to find the row, and a step that fails as a whole
  fails only the requests it held. The engine thread ends only on shutdown.
- Fair slot eviction: when the oldest waiting request needs a slot and none is free, the
  least-busy unpinned slot is *drained* (no new rows admitted to it) and swapped as soon as its
  rows finish, so a hot adapter cannot starve a cold one.
- Greedy decoding is argmax on the logits; sampling applies temperature, min-p, top-k and top-p
  with a per-request `torch.Generator` seeded from `seed`, so seeded requests repeat exactly.
  Penalties and logprobs follow vLLM's meanings (`sampling.py`).
- Prompt logprobs (OpenAI's `echo` with `logprobs`, how lm-eval-harness scores text) need the
  logits of every prompt position; requests that ask for them are prefilled in a batch of their
  own, so the full `[tokens, vocab]` logits are never computed for anybody else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.models import default_device, default_dtype
from adapterhub.serving.backends.base import (
    AdapterEventListener,
    AdapterLoadError,
    AdapterSpec,
    Backend,
    CapacityError,
    GenerationChunk,
    GenerationError,
    HealthStatus,
    ResidentAdapter,
    SamplingParams,
    TokenLogprob,
    UnavailableError,
)
from adapterhub.serving.backends.config import EngineConfig
from adapterhub.serving.backends.detokenizer import Detokenizer, TokenDecoding
from adapterhub.serving.backends.lora_slots import (
    SERVED_PEFT_TYPES,
    AdapterWeights,
    SlotTable,
    describe_kind,
    read_adapter_config,
    read_adapter_dir,
    why_not_served,
)
from adapterhub.serving.backends.sampling import choose_tokens, token_logprobs

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _AdapterEntry:
    key: str
    weights: AdapterWeights
    pinned: bool = False
    slot: int | None = None
    refs: int = 0  # requests holding it (waiting or running): never dropped from the CPU tier then
    running_rows: int = 0  # rows in the running batch: never evicted from its slot then
    draining: bool = False  # chosen for eviction: admit no new rows
    unloaded: bool = False  # removed by unload_adapter: free the slot once idle
    last_used: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    entry: _AdapterEntry | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    generator: torch.Generator | None
    end_token_ids: tuple[int, ...] = ()  # end-of-sequence (unless ignored) and stop_token_ids
    cancelled: bool = False
    request_id: int = 0


@dataclass(frozen=True)
class _Emitted:
    """What the engine thread sends a request per step: its new token, or the reason it ended."""

    token_id: int | None  # None: the request ends without a new token (`max_tokens == 0`)
    finish_reason: str | None
    logprob: TokenLogprob | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # with the first token only


@dataclass(eq=False)
class _Row:
    request: _Request
    slot: int
    output_ids: list[int] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # computed at prefill, sent once

    # What `choose_tokens` reads of a row (`sampling.SamplingRow`).
    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def generator(self) -> torch.Generator | None:
        return self.request.generator

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def end_token_ids(self) -> tuple[int, ...]:
        return self.request.end_token_ids

    @property
    def next_position(self) -> int:
        """Position id of the token fed next: the last sampled one."""
        return len(self.request.prompt_ids) + len(self.output_ids) - 1


def _pad_left(tensor: torch.Tensor, length: int, dim: int, value: float = 0) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    pad_shape = list(tensor.shape)
    pad_shape[dim] = missing
    return torch.cat([tensor.new_full(pad_shape, value), tensor], dim=dim)


class TorchEngine(Backend):
    """A `Backend` running a transformers causal LM in-process, CPU or CUDA."""

    supported_peft_types = SERVED_PEFT_TYPES

    def __init__(
        self,
        model_dir: Path,
        *,
        base_name: str,
        config: EngineConfig | None = None,
        listener: AdapterEventListener | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config or EngineConfig()
        if self.config.max_resident < 1:
            raise AdapterhubError("max_resident must be at least 1")
        if self.config.max_cpu_adapters < self.config.max_resident:
            raise AdapterhubError("max_cpu_adapters must be at least max_resident (device adapters stay in the CPU tier)")
        self.device = torch.device(self.config.device or default_device())
        self.dtype = self.config.dtype or default_dtype(str(self.device))
        self.base_name = base_name
        self.model_dir = Path(model_dir)
        if listener is not None:
            self.listener = listener
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()
        model_config = self.model.config
        self.max_model_len = int(self.config.max_model_len or getattr(model_config, "max_position_embeddings", 2048))
        self.max_request_rows = self.config.max_waiting
        output_layer = self.model.get_output_embeddings()
        self.vocab_size = min(
            len(self.tokenizer), self.model.get_input_embeddings().num_embeddings,
            *([output_layer.weight.shape[0]] if output_layer is not None else []),
        )
        self.eos_token_ids = self._eos_token_ids()
        self.token_decoding = TokenDecoding.of(self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        self.base_weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.slots = SlotTable(self.model, max_slots=self.config.max_resident + 1, dtype=self.dtype)

        self._lock = threading.Lock()  # guards the adapter tables, waiting queue and counters
        self._wakeup = threading.Condition(self._lock)
        self._entries: collections.OrderedDict[str, _AdapterEntry] = collections.OrderedDict()
        self._slot_owner: list[_AdapterEntry | None] = [None] * (self.config.max_resident + 1)
        self._loading: dict[str, asyncio.Future[_AdapterEntry | None]] = {}
        self._waiting: collections.deque[_Request] = collections.deque()
        self._commands: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._rows: list[_Row] = []
        self._prefilling: list[_Row] = []  # admitted, not yet in `_rows` (failed too if the engine dies)
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._request_ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._engine_error: BaseException | None = None
        self.steps = 0

    def _eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        generation_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for candidate in (generation_eos, self.tokenizer.eos_token_id):
            if isinstance(candidate, int):
                ids.append(candidate)
            elif isinstance(candidate, (list, tuple)):
                ids.extend(int(c) for c in candidate)
        if not ids:
            raise AdapterhubError(f"{self.model_dir}: the tokenizer defines no end-of-sequence token")
        return sorted(set(ids))

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="adapterhub-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "torch",
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_resident": self.config.max_resident,
            "max_cpu_adapters": self.config.max_cpu_adapters,
            "max_batch_size": self.config.max_batch_size,
        }

    async def health(self) -> HealthStatus:
        with self._lock:
            running, waiting = len(self._rows), len(self._waiting)
        if self._engine_error is not None:
            return HealthStatus(False, f"engine failed: {self._engine_error!r}", running, waiting)
        if self._thread is None or self._stopping:
            return HealthStatus(False, "engine not running", running, waiting)
        return HealthStatus(True, "ok", running, waiting)

    # ----------------------------------------------------------------- adapters

    def unservable_reason(
        self, peft_type: str | None, task_type: str | None = None, config: Mapping[str, Any] | None = None
    ) -> str | None:
        return why_not_served(peft_type, task_type, config) if peft_type is not None else None

    def _read_adapter(self, adapter: AdapterSpec) -> AdapterWeights:
        """Read `adapter` for the CPU tier; every failure is an `AdapterLoadError` that names it
        as the client knows it (its ref or `lora_name`) and its kind, never a cache path or hash.

        A kind the engine cannot serve is refused from the record before anything is read.
        """
        name = adapter.display_name
        if adapter.peft_type is not None:
            reason = self.unservable_reason(adapter.peft_type, adapter.task_type, adapter.config)
            if reason is not None:
                kind = describe_kind(adapter.peft_type, adapter.task_type, adapter.config)
                raise AdapterLoadError(f"adapter {name!r} ({kind}) cannot be served by the torch backend: {reason}")
        try:
            adapter_dir = Path(adapter.locate())
        except AdapterhubError as exc:
            raise AdapterLoadError(f"adapter {name!r} cannot be read from the registry: {exc}") from exc
        kind = "unknown kind"
        try:
            config = read_adapter_config(adapter_dir)
            kind = describe_kind(config.get("peft_type"), config.get("task_type"), config)
            reason = why_not_served(config.get("peft_type"), config.get("task_type"), config)
            if reason is None:
                return read_adapter_dir(adapter_dir, self.slots.base_layers, config)
        except AdapterLoadError as exc:
            raise AdapterLoadError(f"adapter {name!r} ({kind}) cannot be served: {exc}") from None
        except OSError as exc:  # unreadable files: the log gets the path, the client the file's role
            logger.warning("adapter %r: cannot read %s: %s", name, adapter_dir, exc)
            what = Path(exc.filename).name if exc.filename else "its files"
            raise AdapterLoadError(f"adapter {name!r} ({kind}) cannot be read: {what}: {exc.strerror or exc}") from None
        except Exception as exc:  # noqa: BLE001 - a file that parses into something unexpected
            logger.warning("adapter %r: cannot read %s", name, adapter_dir, exc_info=exc)
            raise AdapterLoadError(f"adapter {name!r} ({kind}) cannot be read: {type(exc).__name__}: {exc}") from None
        raise AdapterLoadError(f"adapter {name!r} ({kind}) cannot be served by the torch backend: {reason}")

    async def _acquire(self, adapter: AdapterSpec) -> _AdapterEntry:
        """The CPU-tier entry of `adapter` with one more reference, read from disk if needed."""
        while True:
            with self._lock:
                entry = self._entries.get(adapter.key)
                if entry is not None:
                    entry.refs += 1
                    entry.last_used = time.monotonic()
                    self._entries.move_to_end(adapter.key)
                    return entry
            pending = self._loading.get(adapter.key)
            if pending is not None:
                await asyncio.shield(pending)
                continue  # loaded (or failed: the shielded await raised)
            # Resolves to the entry, or to None when the reader was cancelled (its client went
            # away): then the others read it themselves instead of failing with it.
            future: asyncio.Future[_AdapterEntry | None] = asyncio.get_running_loop().create_future()
            self._loading[adapter.key] = future
            try:
                started = time.perf_counter()
                weights = await asyncio.to_thread(self._read_adapter, adapter)
                seconds = time.perf_counter() - started
            except asyncio.CancelledError:
                future.set_result(None)
                raise
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # mark retrieved: waiters re-raise it themselves
                raise
            finally:
                self._loading.pop(adapter.key, None)
            # Born with this caller's reference: trimming the tier to make room can only drop
            # other, idle adapters, never the one just read for a request (which once made an
            # adapter beyond equal tiers be read from disk forever).
            entry = _AdapterEntry(key=adapter.key, weights=weights, refs=1)
            with self._lock:
                self._entries[adapter.key] = entry
                evicted = self._trim_cpu_tier()
            future.set_result(entry)
            self.listener.adapter_loaded(adapter.key, source="disk", seconds=seconds, size_bytes=weights.size_bytes)
            self._report_cpu_evictions(evicted)
            return entry

    def _trim_cpu_tier(self) -> list[tuple[str, float]]:
        """Drop least recently used idle adapters beyond `max_cpu_adapters` (lock held).

        The tier's invariant: adapters that requests hold (waiting or running), that own a
        device slot or are pinned are never dropped; idle ones are dropped, oldest first, while
        the tier holds more than `max_cpu_adapters`. The tier may so exceed its size while the
        adapters in use alone do (every slot taken and one more adapter being read for a
        request, which `max_cpu_adapters == max_resident` always gives); it shrinks back as soon
        as they become idle: this runs whenever an adapter is added, released, or leaves a slot.
        """
        evicted: list[tuple[str, float]] = []
        for key in list(self._entries):
            if len(self._entries) <= self.config.max_cpu_adapters:
                break
            entry = self._entries[key]
            if entry.refs == 0 and entry.slot is None and not entry.pinned:
                started = time.perf_counter()
                del self._entries[key]
                evicted.append((key, time.perf_counter() - started))
        return evicted

    def _release(self, entry: _AdapterEntry) -> None:
        with self._lock:
            entry.refs -= 1
            evicted = self._trim_cpu_tier()
        self._report_cpu_evictions(evicted)

    def _report_cpu_evictions(self, evicted: list[tuple[str, float]]) -> None:
        for key, seconds in evicted:
            self.listener.adapter_evicted(key, tier="cpu", seconds=seconds)

    async def load_adapter(self, adapter: AdapterSpec, *, pin: bool = False) -> ResidentAdapter:
        entry = await self._acquire(adapter)
        try:
            if pin:
                with self._lock:
                    pinned = sum(1 for e in self._entries.values() if e.pinned and e is not entry)
                    if pinned >= self.config.max_resident:
                        raise UnavailableError(f"all {self.config.max_resident} device slots are pinned")
                    entry.pinned = True
            if pin or self._thread is not None:
                await self._run_on_engine(lambda: self._place(entry, allow_drain=False))
        finally:
            self._release(entry)
        return self._describe(entry)

    async def unload_adapter(self, key: str) -> bool:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            entry.unloaded = True
            entry.pinned = False
        await self._run_on_engine(self._free_idle_slots)
        return True

    def _describe(self, entry: _AdapterEntry) -> ResidentAdapter:
        return ResidentAdapter(
            key=entry.key,
            tier="device" if entry.slot is not None else "cpu",
            size_bytes=entry.weights.size_bytes,
            pinned=entry.pinned,
            rank=entry.weights.rank,
            target_modules=entry.weights.target_modules,
        )

    def resident_adapters(self) -> list[ResidentAdapter]:
        with self._lock:
            described = [self._describe(e) for e in self._entries.values()]
        return sorted(described, key=lambda r: (r.tier != "device", r.key))

    def memory_stats(self) -> dict[str, float]:
        with self._lock:
            cpu_bytes = sum(e.weights.size_bytes for e in self._entries.values())
            device_adapter_bytes = sum(e.weights.size_bytes for e in self._slot_owner if e is not None)
            cache = self._cache
        kv_bytes = 0
        if cache is not None:
            for layer in getattr(cache, "layers", []):
                for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(tensor, torch.Tensor):
                        kv_bytes += tensor.numel() * tensor.element_size()
        stats = {
            "base_weight_bytes": float(self.base_weight_bytes),
            "adapter_cpu_tier_bytes": float(cpu_bytes),
            "adapter_device_bytes": float(device_adapter_bytes),
            "adapter_slot_stack_bytes": float(self.slots.stack_bytes()),
            "kv_cache_bytes": float(kv_bytes),
        }
        if self.device.type == "cuda":
            stats["device_allocated_bytes"] = float(torch.cuda.memory_allocated(self.device))
            stats["device_reserved_bytes"] = float(torch.cuda.memory_reserved(self.device))
        return stats

    async def _run_on_engine(self, command: Callable[[], Any]) -> Any:
        """Run `command` on the engine thread between two steps (inline if it is not running)."""
        if self._thread is None:
            return command()
        future: Future[Any] = Future()
        with self._lock:
            # A stopped or failed engine thread runs no more commands: answer now instead of
            # leaving the caller waiting (commands queued before that are failed by `_fail_all`).
            if self._stopping or self._engine_error is not None:
                raise UnavailableError("the engine is not running")
            self._commands.append((command, future))
            self._wakeup.notify_all()
        return await asyncio.wrap_future(future)

    # ----------------------------------------------------------------- slots (engine thread)

    def _place(self, entry: _AdapterEntry, *, allow_drain: bool) -> int | None:
        """Give `entry` a device slot; None when every slot is busy (then maybe drain one)."""
        with self._lock:
            if entry.slot is not None:
                return entry.slot
            free = next((i for i in range(1, len(self._slot_owner)) if self._slot_owner[i] is None), None)
            victim = None
            if free is None:
                idle = [
                    e for e in self._slot_owner[1:]
                    if e is not None and not e.pinned and e.running_rows == 0
                ]
                if idle:
                    victim = min(idle, key=lambda e: (not e.draining, e.last_used))
                    free = victim.slot
                elif allow_drain:
                    busy = [e for e in self._slot_owner[1:] if e is not None and not e.pinned]
                    if busy and not any(e.draining for e in busy):
                        min(busy, key=lambda e: (e.running_rows, e.last_used)).draining = True
            if free is None:
                if all(e is not None and e.pinned for e in self._slot_owner[1:]):
                    raise UnavailableError(
                        f"all {self.config.max_resident} device slots hold pinned adapters; raise --max-resident"
                    )
                return None
            evicted: list[tuple[str, float]] = []
            if victim is not None:
                victim.slot = None
                victim.draining = False
                self._slot_owner[free] = None
            entry.slot = free
            self._slot_owner[free] = entry
            if victim is not None:
                evicted = self._trim_cpu_tier()  # the victim may be the tier's oldest idle adapter now
        started = time.perf_counter()
        if victim is not None:
            self.listener.adapter_evicted(victim.key, tier="device", seconds=0.0)
            self._report_cpu_evictions(evicted)
        try:
            self.slots.write(free, entry.weights)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except BaseException:
            # Out of memory growing the stacks, say: the slot holds nothing usable, so it is free.
            with self._lock:
                entry.slot = None
                self._slot_owner[free] = None
            with contextlib.suppress(Exception):
                self.slots.clear(free)
            raise
        self.listener.adapter_loaded(
            entry.key, source="cpu", seconds=time.perf_counter() - started, size_bytes=entry.weights.size_bytes
        )
        return free

    def _free_idle_slots(self) -> None:
        """Clear slots of unloaded adapters whose rows have all finished."""
        with self._lock:
            freed = [
                e for e in self._slot_owner[1:] if e is not None and e.unloaded and e.running_rows == 0
            ]
            for entry in freed:
                self._slot_owner[entry.slot] = None
        for entry in freed:
            started = time.perf_counter()
            self.slots.clear(entry.slot)
            entry.slot = None
            self.listener.adapter_evicted(entry.key, tier="device", seconds=time.perf_counter() - started)

    # ----------------------------------------------------------------- requests (asyncio side)

    async def generate(
        self, prompt_token_ids: list[int], sampling: SamplingParams, adapter: AdapterSpec | None
    ) -> AsyncIterator[GenerationChunk]:
        if self._thread is None or self._stopping or self._engine_error is not None:
            raise UnavailableError("the engine is not running")
        entry = await self._acquire(adapter) if adapter is not None else None
        request: _Request | None = None
        try:
            with self._lock:
                if len(self._waiting) >= self.config.max_waiting:
                    raise CapacityError(f"{len(self._waiting)} requests are waiting; retry later")
                generator = None
                if not sampling.greedy:
                    generator = torch.Generator()  # CPU: draws happen on host copies of the probabilities
                    if sampling.seed is not None:
                        generator.manual_seed(sampling.seed)
                    else:
                        generator.seed()  # fresh entropy, without reseeding torch's global generators
                request = _Request(
                    prompt_ids=list(prompt_token_ids),
                    sampling=sampling,
                    entry=entry,
                    loop=asyncio.get_running_loop(),
                    queue=asyncio.Queue(),
                    generator=generator,
                    end_token_ids=self._end_token_ids(sampling),
                    request_id=next(self._request_ids),
                )
                self._waiting.append(request)
                self._wakeup.notify_all()
            async for chunk in self._detokenize(request):
                yield chunk
        finally:
            if request is not None:
                request.cancelled = True  # a no-op when it already finished
            if entry is not None:
                self._release(entry)

    def _end_token_ids(self, sampling: SamplingParams) -> tuple[int, ...]:
        """Tokens that end a request: `stop_token_ids`, and end-of-sequence unless ignored."""
        ends = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            ends.update(self.eos_token_ids)
        return tuple(sorted(ends))

    async def _detokenize(self, request: _Request) -> AsyncIterator[GenerationChunk]:
        """Turn the engine's token ids into text deltas, applying stop strings (`Detokenizer`:
        incremental, equal to a full decode of the output without its end tokens)."""
        sampling = request.sampling
        text = Detokenizer(
            self.token_decoding, stops=sampling.stop, min_tokens=sampling.min_tokens,
            ending_ids=set(self.eos_token_ids) | set(sampling.stop_token_ids),  # never in the text
        )
        completion_tokens = 0  # every token generated, end-of-sequence included (as vLLM counts)
        prompt_tokens = len(request.prompt_ids)
        while True:
            item: _Emitted | BaseException = await request.queue.get()
            if isinstance(item, BaseException):
                raise item
            token_id, finish_reason = item.token_id, item.finish_reason
            if token_id is None:  # prompt scoring only: nothing generated
                yield GenerationChunk(
                    text="", token_ids=(), finish_reason="length", prompt_tokens=prompt_tokens,
                    completion_tokens=0, prompt_logprobs=item.prompt_logprobs,
                )
                return
            step = text.step(token_id, last=finish_reason is not None)
            if step.stopped:
                finish_reason = "stop"
                request.cancelled = True  # the engine drops the row at its next step
            completion_tokens += 1
            yield GenerationChunk(
                text=step.text,
                token_ids=(token_id,),
                finish_reason=finish_reason,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                logprobs=(item.logprob,) if item.logprob is not None else (),
                prompt_logprobs=item.prompt_logprobs,
            )
            if finish_reason is not None:
                return

    # ----------------------------------------------------------------- engine thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while True:
                with self._lock:
                    while not (self._stopping or self._waiting or self._rows or self._commands):
                        self._wakeup.wait(timeout=1.0)
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for command, future in commands:
                    try:
                        future.set_result(command())
                    except BaseException as exc:  # reported to the caller, engine goes on
                        future.set_exception(exc)
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - fails the batch it hit, never the engine
                    self._recover(exc)
        except BaseException as exc:  # a bug: fail every request rather than hang them
            logger.exception("engine thread failed")
            self._engine_error = exc
        self._fail_all(UnavailableError("the engine stopped" if self._engine_error is None else f"engine failed: {self._engine_error!r}"))

    def _row_error(self, request: _Request, exc: Exception) -> Exception:
        """What a request that raised `exc` in the engine is failed with.

        An `AdapterhubError` already says what went wrong in the client's terms. Anything else is
        unexpected: logged here with its traceback, and the client gets a 500 that names no
        internals, only the request number to find it in the log.
        """
        if isinstance(exc, AdapterhubError):
            return exc
        logger.error("request %d failed in the engine", request.request_id, exc_info=exc)
        return GenerationError(f"the engine failed on this request (request {request.request_id}; the server log has the details)")

    def _recover(self, exc: Exception) -> None:
        """A step raised outside any one row's work (a forward pass of the whole batch, merging
        caches): fail the rows it involved, drop the batch state, and go on with the next step.
        Waiting requests and every later request are served as usual."""
        logger.error("an engine step failed; its %d running request(s) fail", len(self._rows) + len(self._prefilling), exc_info=exc)
        with self._lock:
            rows = self._rows + self._prefilling
            self._rows, self._prefilling, self._cache, self._mask = [], [], None, None
            for row in rows:
                if row.request.entry is not None:
                    row.request.entry.running_rows -= 1
        for row in rows:
            if not row.request.cancelled:
                self._fail(row.request, self._row_error(row.request, exc))

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            pending = [row.request for row in self._rows + self._prefilling] + list(self._waiting)
            self._rows, self._prefilling, self._cache, self._mask = [], [], None, None
            self._waiting.clear()
            commands = list(self._commands)
            self._commands.clear()
        for request in pending:
            request.loop.call_soon_threadsafe(request.queue.put_nowait, error)
        for _, future in commands:
            future.set_exception(error)

    def _fail(self, request: _Request, error: BaseException) -> None:
        """End one request with `error`; its row is dropped at the next step."""
        request.cancelled = True
        try:
            request.loop.call_soon_threadsafe(request.queue.put_nowait, error)
        except RuntimeError:  # the client's event loop is gone
            pass

    def _emit(self, request: _Request, emitted: _Emitted) -> None:
        try:
            request.loop.call_soon_threadsafe(request.queue.put_nowait, emitted)
        except RuntimeError:  # the client's event loop is gone
            request.cancelled = True

    def _admit(self) -> list[_Row]:
        """Move waiting requests into the batch, in arrival order, as slots and space allow."""
        admitted: list[_Row] = []
        budget = self.config.max_prefill_tokens
        blocked_on_slot = False
        with self._lock:
            candidates = list(self._waiting)
        room = self.config.max_batch_size - len(self._rows)
        for request in candidates:
            if room <= 0:
                break
            if request.cancelled:
                with self._lock:
                    self._waiting.remove(request)
                continue
            if len(request.prompt_ids) > budget and admitted:
                break
            entry = request.entry
            slot = 0
            if entry is not None:
                if entry.draining:
                    if entry.running_rows > 0:
                        continue  # let its rows finish so the slot can change hands
                    entry.draining = False  # idle now; requests older than the blocked one go first
                if entry.slot is None:
                    if blocked_on_slot:
                        continue  # first come, first served for the next free slot
                    try:
                        placed = self._place(entry, allow_drain=True)
                    except Exception as exc:  # noqa: BLE001 - every slot pinned, or writing it failed
                        with self._lock:
                            self._waiting.remove(request)
                        self._fail(request, self._row_error(request, exc))
                        continue
                    if placed is None:
                        blocked_on_slot = True
                        continue
                slot = entry.slot
                with self._lock:
                    entry.running_rows += 1
                    entry.last_used = time.monotonic()
            row = _Row(request=request, slot=slot)
            with self._lock:
                self._waiting.remove(request)
                self._prefilling.append(row)  # failed with the rest if the step fails before it joins
            admitted.append(row)
            budget -= len(request.prompt_ids)
            room -= 1
        return admitted

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[tuple[int, TokenLogprob | None]]:
        """Next token per row, with its logprob if asked for; rows with non-finite logits fail."""
        step = choose_tokens(logits, rows)
        for index, error in step.failed.items():
            # Overflowed logits (an adapter with huge weights, fp16, a huge penalty), or a row's
            # own work that raised: this request fails on its own and its row leaves the batch at
            # the next step; the others go on.
            if not rows[index].request.cancelled:
                self._fail(rows[index].request, self._row_error(rows[index].request, error))
        return list(zip(step.token_ids, step.logprobs, strict=True))

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, row_slots: list[int],
        *, every_position: bool = False,
    ) -> torch.Tensor:
        """Logits `[batch, vocab]` of the last position, or `[batch, tokens, vocab]` of all."""
        self.slots.context.set_rows(row_slots, self.device)
        try:
            output = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=0 if every_position else 1,
            )
        finally:
            self.slots.context.set_rows(None)
        return output.logits if every_position else output.logits[:, -1, :]

    def _prefill(self, rows: list[_Row]) -> tuple[Any, torch.Tensor, list[TokenLogprob | None]]:
        """Run the prompts of `rows` (one left-padded batch): their cache, mask and first tokens."""
        from transformers import DynamicCache

        length = max(len(row.request.prompt_ids) for row in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            prompt = row.request.prompt_ids
            ids[index, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[index, length - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = DynamicCache()
        scoring = any(row.request.sampling.prompt_logprobs is not None for row in rows)
        logits = self._forward(ids, mask, positions, cache, [row.slot for row in rows], every_position=scoring)
        if scoring:
            for index, row in enumerate(rows):
                top = row.request.sampling.prompt_logprobs
                if top is None:
                    continue
                prompt = row.request.prompt_ids
                # Position p's logits predict token p + 1; nothing predicts the first token.
                predicting = logits[index, length - len(prompt) : length - 1]
                row.prompt_logprobs = (None, *token_logprobs(predicting, prompt[1:], [top] * (len(prompt) - 1)))
            logits = logits[:, -1, :]
        logprobs = []
        for row, (token_id, logprob) in zip(rows, self._sample(logits, rows)):
            row.output_ids.append(token_id)
            logprobs.append(logprob)
        return cache, mask, logprobs

    def _merge(self, cache: Any, mask: torch.Tensor) -> None:
        """Append a prefilled batch to the running one, left-padding both to one length."""
        from transformers import DynamicCache

        if self._cache is None or self._mask is None:
            self._cache, self._mask = cache, mask
            return
        length = max(self._mask.shape[1], mask.shape[1])
        layers = []
        for old, new in zip(self._cache.layers, cache.layers):
            keys = torch.cat([_pad_left(old.keys, length, 2), _pad_left(new.keys, length, 2)], dim=0)
            values = torch.cat([_pad_left(old.values, length, 2), _pad_left(new.values, length, 2)], dim=0)
            layers.append((keys, values))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([_pad_left(self._mask, length, 1), _pad_left(mask, length, 1)], dim=0)

    def _retire(self, finished: list[int]) -> None:
        """Drop finished rows from the batch and trim padding no remaining row needs."""
        from transformers import DynamicCache

        if not finished:
            return
        done = set(finished)
        keep = [i for i in range(len(self._rows)) if i not in done]
        with self._lock:
            for i in finished:
                entry = self._rows[i].request.entry
                if entry is not None:
                    entry.running_rows -= 1
            self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0])
        layers = [
            (layer.keys.index_select(0, index)[:, :, first:], layer.values.index_select(0, index)[:, :, first:])
            for layer in self._cache.layers
        ]
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = mask[:, first:]

    def _step(self) -> None:
        # Rows whose clients went away (or hit a stop string) leave before any compute.
        self._retire([i for i, row in enumerate(self._rows) if row.request.cancelled])
        self._free_idle_slots()
        admitted = self._admit()
        scoring = [row for row in admitted if row.request.sampling.prompt_logprobs is not None]
        plain = [row for row in admitted if row.request.sampling.prompt_logprobs is None]
        for group in (plain, scoring):  # only scoring rows pay for every position's logits
            if group:
                self._prefill_into_batch(group, isolate=len(group) > 1)
        if not self._rows:
            if self._waiting:
                time.sleep(0.001)  # everything waits on a slot that is draining
            return
        rows = self._rows
        input_ids = torch.tensor([[row.output_ids[-1]] for row in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[row.next_position] for row in rows], dtype=torch.long, device=self.device)
        assert self._mask is not None
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        logits = self._forward(input_ids, self._mask, positions, self._cache, [row.slot for row in rows])
        self.steps += 1
        finished: list[int] = []
        for index, (row, (token_id, logprob)) in enumerate(zip(rows, self._sample(logits, rows))):
            row.output_ids.append(token_id)
            if self._report(row, logprob):
                finished.append(index)
        self._retire(finished)

    def _prefill_into_batch(self, rows: list[_Row], *, isolate: bool) -> None:
        """Prefill newly admitted rows (in `_prefilling`), add them to the running batch and report
        their first token.

        A prefill that raises is the work of these rows only (the running batch is untouched), so
        with `isolate` each row is prefilled again alone, from the same generator state: a row
        that fails alone fails its own request, the others go on exactly as they would have.
        """
        states = [row.generator.get_state() if row.generator is not None else None for row in rows]
        try:
            cache, mask, logprobs = self._prefill(rows)
        except Exception as exc:  # noqa: BLE001 - one of these rows; find which
            if not isolate:
                self._abandon(rows, exc)
                return
            for row, state in zip(rows, states):
                row.output_ids.clear()
                row.prompt_logprobs = None
                if state is not None:
                    row.generator.set_state(state)  # type: ignore[union-attr]
                self._prefill_into_batch([row], isolate=False)
            return
        start = len(self._rows)
        with self._lock:
            self._rows.extend(rows)
            for row in rows:
                self._prefilling.remove(row)
        self._merge(cache, mask)
        finished = [start + offset for offset, (row, logprob) in enumerate(zip(rows, logprobs)) if self._report(row, logprob)]
        self._retire(finished)

    def _abandon(self, rows: list[_Row], exc: Exception) -> None:
        """Fail admitted rows that never joined the running batch, giving back their slots' rows."""
        with self._lock:
            for row in rows:
                self._prefilling.remove(row)
                if row.request.entry is not None:
                    row.request.entry.running_rows -= 1
        for row in rows:
            if not row.request.cancelled:
                self._fail(row.request, self._row_error(row.request, exc))

    def _report(self, row: _Row, logprob: TokenLogprob | None) -> bool:
        """Send the row's newest token to its client; True when the row is finished."""
        request = row.request
        token_id: int | None = row.output_ids[-1]
        finish_reason: str | None = None
        if request.sampling.max_tokens == 0:  # prompt scoring: the prefill's token is not wanted
            token_id, logprob, finish_reason = None, None, "length"
        elif token_id in request.end_token_ids:
            finish_reason = "stop"
        elif len(row.output_ids) >= request.sampling.max_tokens:
            finish_reason = "length"
        if not request.cancelled:
            self._emit(request, _Emitted(token_id, finish_reason, logprob, row.prompt_logprobs))
            row.prompt_logprobs = None
        return finish_reason is not None or request.cancelled

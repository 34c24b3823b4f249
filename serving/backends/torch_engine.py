"""The embedded engine: transformers + gathered LoRA, continuous batching across adapters.

Design decisions:
- The engine is made of parts with names of their own, as vLLM's `v1/engine` is: the adapter
  tiers (`tiers.py::AdapterTiers`: parsed adapters in host memory, device slots), the scheduler
  and running batch with its KV cache (`batch.py`), the gathered-adapter layers
  (`lora_slots.py::SlotTable`), sampling (`sampling.py`) and the incremental detokenizer
  (`detokenizer.py`). This module runs them: the engine thread's loop and step, the model's
  forward passes, and the asyncio side of a request.
- One engine thread owns the model and runs steps; the asyncio side only queues requests and
  reads tokens back (`loop.call_soon_threadsafe`). torch releases the GIL in its kernels, so the
  HTTP server stays responsive while a step runs. Commands that touch slots (loading, pinning,
  unloading) run on the engine thread between two steps.
- Rows of different adapters share every forward pass via `SlotTable` (gathered LoRA, DoRA and
  (IA)³); a request's output does not depend on its batch-mates. Decode steps keep each row's
  gathered A and B' while the batch's rows stay the same (`SlotContext.keep_gathers`), so a
  step reads every row's adapter once instead of copying it first, and rows that share an
  adapter read it once between them (`RowGroups`); on a CPU, slots and adapter
  math are fp32 whatever the model's precision (see `lora_slots.py`).
- A row's failure stays the row's: what one request's work raises fails that request, a
  prefill that raises is retried row by row to find the row, and a step that fails as a whole
  fails only the requests it held. The engine thread ends only on shutdown.
- The engine trusts what a request asks for (the app checks it, `serving/routes/checks.py`);
  it refuses only what it alone knows: a full queue, an engine that does not run, an adapter it
  cannot load.
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
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.models import default_device, default_dtype
from adapterhub.serving.backends.base import (
    AdapterEventListener,
    AdapterSpec,
    Backend,
    GenerationChunk,
    GenerationError,
    HealthStatus,
    ResidentAdapter,
    SamplingParams,
    TokenLogprob,
    UnavailableError,
)
from adapterhub.serving.backends.batch import Emitted, Request, Row, Scheduler, left_padded
from adapterhub.serving.backends.config import EngineConfig
from adapterhub.serving.backends.detokenizer import Detokenizer, TokenDecoding
from adapterhub.serving.backends.lora_slots import SlotTable
from adapterhub.serving.backends.sampling import choose_tokens, token_logprobs
from adapterhub.serving.backends.tiers import AdapterTiers

logger = logging.getLogger(__name__)


class TorchEngine(Backend):
    """A `Backend` running a transformers causal LM in-process, CPU or CUDA."""

    kinds_backend = "torch"

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
        # Adapter math in fp32 on a CPU whatever the model's precision (as PEFT's default
        # `autocast_adapter_dtype` keeps adapter weights): the CPU's bf16 `bmm` at a LoRA's shapes
        # is ~4x slower than fp32's (measured here), and the delta is added rounded once.
        slot_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.slots = SlotTable(self.model, max_slots=self.config.max_resident + 1, dtype=slot_dtype)

        self._lock = threading.Lock()  # guards the adapter tables, the queue, the batch's rows and counters
        self._wakeup = threading.Condition(self._lock)
        self.tiers = AdapterTiers(
            self.slots, max_resident=self.config.max_resident, max_cpu_adapters=self.config.max_cpu_adapters,
            lock=self._lock, listener=lambda: self.listener, device=self.device,
        )
        self.scheduler = Scheduler(
            self.tiers, self._wakeup, self.device, max_batch_size=self.config.max_batch_size,
            max_prefill_tokens=self.config.max_prefill_tokens, max_waiting=self.config.max_waiting,
            fail=lambda request, exc: self._fail(request, self._row_error(request, exc)),
            delay_factor=self.config.scheduler_delay_factor,
        )
        self._commands: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._request_ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._engine_error: BaseException | None = None
        self.steps = 0  # decode steps run
        self.prefills = 0  # prefill passes run (one per group of rows admitted together)

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
        running, waiting = self.scheduler.counts()
        if self._engine_error is not None:
            return HealthStatus(False, f"engine failed: {self._engine_error!r}", running, waiting)
        if self._thread is None or self._stopping:
            return HealthStatus(False, "engine not running", running, waiting)
        return HealthStatus(True, "ok", running, waiting)

    # ----------------------------------------------------------------- adapters

    async def load_adapter(self, adapter: AdapterSpec, *, pin: bool = False) -> ResidentAdapter:
        entry = await self.tiers.acquire(adapter)
        try:
            if pin:
                self.tiers.pin(entry)
            if pin or self._thread is not None:
                await self._run_on_engine(lambda: self.tiers.place(entry, allow_drain=False))
        finally:
            self.tiers.release(entry)
        return self.tiers.describe(entry)

    async def unload_adapter(self, key: str) -> bool:
        if not self.tiers.unload(key):
            return False
        await self._run_on_engine(self.tiers.free_idle_slots)
        return True

    def resident_adapters(self) -> list[ResidentAdapter]:
        return self.tiers.resident()

    def holds(self, key: str) -> bool:
        return self.tiers.holds(key)

    def memory_stats(self) -> dict[str, float]:
        with self._lock:
            batch_kv = self.scheduler.batch.kv_bytes()
        stats = {
            "base_weight_bytes": float(self.base_weight_bytes),
            **self.tiers.memory_stats(),
            "adapter_gather_bytes": float(self.slots.gather_bytes()),
            "kv_cache_bytes": float(batch_kv),
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

    # ----------------------------------------------------------------- requests (asyncio side)

    async def generate(
        self, prompt_token_ids: list[int], sampling: SamplingParams, adapter: AdapterSpec | None
    ) -> AsyncIterator[GenerationChunk]:
        if self._thread is None or self._stopping or self._engine_error is not None:
            raise UnavailableError("the engine is not running")
        entry = await self.tiers.acquire(adapter) if adapter is not None else None
        request: Request | None = None
        try:
            generator = None
            if not sampling.greedy:
                generator = torch.Generator()  # CPU: draws happen on host copies of the probabilities
                if sampling.seed is not None:
                    generator.manual_seed(sampling.seed)
                else:
                    generator.seed()  # fresh entropy, without reseeding torch's global generators
            candidate = Request(
                prompt_ids=list(prompt_token_ids),
                sampling=sampling,
                entry=entry,
                loop=asyncio.get_running_loop(),
                queue=asyncio.Queue(),
                generator=generator,
                end_token_ids=self._end_token_ids(sampling),
                request_id=next(self._request_ids),
            )
            self.scheduler.submit(candidate)  # CapacityError (429) when the queue is full
            request = candidate
            async for chunk in self._detokenize(request):
                yield chunk
        finally:
            if request is not None:
                request.cancelled = True  # a no-op when it already finished
            if entry is not None:
                self.tiers.release(entry)

    def _end_token_ids(self, sampling: SamplingParams) -> tuple[int, ...]:
        """Tokens that end a request: `stop_token_ids`, and end-of-sequence unless ignored."""
        ends = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            ends.update(self.eos_token_ids)
        return tuple(sorted(ends))

    async def _detokenize(self, request: Request) -> AsyncIterator[GenerationChunk]:
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
            item: Emitted | BaseException = await request.queue.get()
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
                    while not (self._stopping or self.scheduler.has_work() or self._commands):
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

    def _row_error(self, request: Request, exc: Exception) -> Exception:
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
        rows = self.scheduler.take_running(release_slots=True)
        self.slots.forget_gathers()
        logger.error("an engine step failed; its %d running request(s) fail", len(rows), exc_info=exc)
        for row in rows:
            if not row.request.cancelled:
                self._fail(row.request, self._row_error(row.request, exc))

    def _fail_all(self, error: BaseException) -> None:
        pending = [row.request for row in self.scheduler.take_running(release_slots=False)] + self.scheduler.take_waiting()
        with self._lock:
            commands = list(self._commands)
            self._commands.clear()
        for request in pending:
            request.loop.call_soon_threadsafe(request.queue.put_nowait, error)
        for _, future in commands:
            future.set_exception(error)

    def _fail(self, request: Request, error: BaseException) -> None:
        """End one request with `error`; its row is dropped at the next step."""
        request.cancelled = True
        try:
            request.loop.call_soon_threadsafe(request.queue.put_nowait, error)
        except RuntimeError:  # the client's event loop is gone
            pass

    def _emit(self, request: Request, emitted: Emitted) -> None:
        try:
            request.loop.call_soon_threadsafe(request.queue.put_nowait, emitted)
        except RuntimeError:  # the client's event loop is gone
            request.cancelled = True

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> list[tuple[int, TokenLogprob | None]]:
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
        *, every_position: bool = False, decode: bool = False,
    ) -> torch.Tensor:
        """Logits `[batch, vocab]` of the last position, or `[batch, tokens, vocab]` of all.
        `decode`: a step of the running batch, whose rows' gathered adapters the layers keep."""
        self.slots.context.set_rows(row_slots, self.device, keep_gathers=decode)
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

    def _prefill(self, rows: list[Row]) -> tuple[Any, torch.Tensor, list[TokenLogprob | None]]:
        """Run the prompts of `rows` (one left-padded batch): their cache, mask and first tokens."""
        from transformers import DynamicCache

        ids, mask, positions = left_padded([row.request.prompt_ids for row in rows], self.pad_token_id, self.device)
        length = ids.shape[1]
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

    def _step(self) -> None:
        self.scheduler.retire_cancelled()
        self.tiers.free_idle_slots()
        admitted = self.scheduler.admit()
        scoring = [row for row in admitted if row.request.sampling.prompt_logprobs is not None]
        plain = [row for row in admitted if row.request.sampling.prompt_logprobs is None]
        for group in (plain, scoring):  # only scoring rows pay for every position's logits
            if group:  # in slot order, as the batch is: the adapter layers then reorder nothing
                self._prefill_into_batch(sorted(group, key=lambda row: row.slot), isolate=len(group) > 1)
        batch = self.scheduler.batch
        if not batch.rows:
            self.slots.forget_gathers()  # the rows' adapter copies go with the rows
            if self.scheduler.waiting:
                time.sleep(0.001)  # everything waits on a slot that is draining
            return
        rows = batch.rows
        input_ids, positions, mask = batch.decode_inputs()
        logits = self._forward(input_ids, mask, positions, batch.cache, [row.slot for row in rows], decode=True)
        self.steps += 1
        finished: list[int] = []
        for index, (row, (token_id, logprob)) in enumerate(zip(rows, self._sample(logits, rows))):
            row.output_ids.append(token_id)
            if self._report(row, logprob):
                finished.append(index)
        self.scheduler.retire(finished)

    def _prefill_into_batch(self, rows: list[Row], *, isolate: bool) -> None:
        """Prefill newly admitted rows (in `prefilling`), add them to the running batch and report
        their first token.

        A prefill that raises is the work of these rows only (the running batch is untouched), so
        with `isolate` each row is prefilled again alone, from the same generator state: a row
        that fails alone fails its own request, the others go on exactly as they would have.
        """
        states = [row.generator.get_state() if row.generator is not None else None for row in rows]
        started = time.perf_counter()
        try:
            cache, mask, logprobs = self._prefill(rows)
            self.scheduler.last_prefill_s = time.perf_counter() - started
            self.prefills += 1
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
        places = self.scheduler.join(rows, cache, mask)
        finished = [place for place, row, logprob in zip(places, rows, logprobs) if self._report(row, logprob)]
        self.scheduler.retire(finished)

    def _abandon(self, rows: list[Row], exc: Exception) -> None:
        """Fail admitted rows that never joined the running batch, giving back their slots' rows."""
        self.scheduler.abandon(rows)
        for row in rows:
            if not row.request.cancelled:
                self._fail(row.request, self._row_error(row.request, exc))

    def _report(self, row: Row, logprob: TokenLogprob | None) -> bool:
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
            self._emit(request, Emitted(token_id, finish_reason, logprob, row.prompt_logprobs))
            row.prompt_logprobs = None
        return finish_reason is not None or request.cancelled


__all__ = ["EngineConfig", "TorchEngine"]

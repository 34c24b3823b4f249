"""The torch engine's scheduler and running batch: which requests run, and their KV cache.

Design decisions:
- Continuous batching: each step first prefills the requests admitted since the last step (one
  left-padded batch), merges their KV cache into the running batch, then decodes one token for
  every running row. Rows leave as soon as they finish, and padding no remaining row needs is
  trimmed. The KV cache is a transformers `DynamicCache` over a left-padded batch with an
  explicit attention mask and per-row position ids, so padding never changes a row's result.
- Admission (`Scheduler.admit`) is in arrival order, as slots, the batch size and the prefill
  token budget allow. A request whose adapter has no slot waits for one (first come, first
  served: a later request for another adapter does not take the next free slot); a slot that
  is being drained admits no new rows, so it can change hands once its rows finish.
- Admitted rows sit in `prefilling` until their prefill joins the batch, so a step that fails
  before that still knows which requests it held (and fails only those).
- One lock (the engine's) guards the queue, the batch's rows and the adapters' row counts,
  which change together; tensors are only touched on the engine thread.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterhub.serving.backends.base import CapacityError, SamplingParams, TokenLogprob
from adapterhub.serving.backends.tiers import AdapterEntry, AdapterTiers


@dataclass(eq=False)
class Request:
    """One generation the engine runs: its prompt, settings and adapter, and where tokens go."""

    prompt_ids: list[int]
    sampling: SamplingParams
    entry: AdapterEntry | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    generator: torch.Generator | None
    end_token_ids: tuple[int, ...] = ()  # end-of-sequence (unless ignored) and stop_token_ids
    cancelled: bool = False
    request_id: int = 0
    arrived: float = field(default_factory=time.monotonic)  # when it was queued (the prefill delay's clock)


@dataclass(frozen=True)
class Emitted:
    """What the engine thread sends a request per step: its new token, or the reason it ended."""

    token_id: int | None  # None: the request ends without a new token (`max_tokens == 0`)
    finish_reason: str | None
    logprob: TokenLogprob | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # with the first token only


@dataclass(eq=False)
class Row:
    """A request in the batch: its slot and the tokens it has produced."""

    request: Request
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


def left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`input_ids`, `attention_mask` and `position_ids` of prompts padded on the left to one length."""
    length = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for index, prompt in enumerate(prompts):
        ids[index, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[index, length - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


class RunningBatch:
    """The rows decoding together and their KV cache (left-padded, with its attention mask)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: list[Row] = []
        self.cache: Any = None  # a transformers `DynamicCache`, None while the batch is empty
        self.mask: torch.Tensor | None = None

    def merged(self, rows: list[Row], cache: Any, mask: torch.Tensor) -> tuple[list[Row], Any, torch.Tensor, list[int]]:
        """The batch with prefilled `rows` added (its rows, cache and mask, left-padded to one
        length) and the index each of `rows` takes there; the batch itself is left as it is, for
        the caller to swap in at once (`Scheduler.join`).

        The batch is kept in slot order (stable, so rows of one slot keep their order): rows of
        one adapter then lie next to each other, and the adapter layers multiply them as views
        instead of reordering every layer's input and output on every step (`RowGroups.in_order`).
        Each old and new row is copied once, straight to its place, as a plain append would be.
        """
        from transformers import DynamicCache

        merged = sorted([*self.rows, *rows], key=lambda row: row.slot)  # stable
        place = {id(row): index for index, row in enumerate(merged)}
        new_places = [place[id(row)] for row in rows]
        if self.cache is None or self.mask is None:
            if new_places == list(range(len(rows))):
                return merged, cache, mask, new_places
            parts = [(new_places, cache, mask)]
        else:
            parts = [([place[id(row)] for row in self.rows], self.cache, self.mask), (new_places, cache, mask)]
        length = max(part_mask.shape[1] for _, _, part_mask in parts)
        indices = [torch.tensor(places, dtype=torch.long, device=self.device) for places, _, _ in parts]

        def placed(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
            """Each part's `tensors` at its rows' places in one tensor, right-aligned along `dim`
            to `length` with zeros to the left."""
            shape = list(tensors[0].shape)
            shape[0], shape[dim] = len(merged), length
            out = tensors[0].new_empty(shape)
            for index, tensor in zip(indices, tensors):
                missing = length - tensor.shape[dim]
                out.narrow(dim, missing, tensor.shape[dim]).index_copy_(0, index, tensor)
                if missing:
                    out.narrow(dim, 0, missing).index_fill_(0, index, 0)
            return out

        layers = [
            (placed([part.layers[layer].keys for _, part, _ in parts], 2), placed([part.layers[layer].values for _, part, _ in parts], 2))
            for layer in range(len(cache.layers))
        ]
        return merged, DynamicCache(ddp_cache_data=layers), placed([part_mask for _, _, part_mask in parts], 1), new_places

    def keep(self, kept: list[int]) -> None:
        """Keep the cache of rows `kept` only (`rows` already holds just those) and trim padding
        no remaining row needs."""
        from transformers import DynamicCache

        if not kept:
            self.cache, self.mask = None, None
            return
        assert self.mask is not None
        index = torch.tensor(kept, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0])
        layers = [
            (layer.keys.index_select(0, index)[:, :, first:], layer.values.index_select(0, index)[:, :, first:])
            for layer in self.cache.layers
        ]
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = mask[:, first:]

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`input_ids`, `position_ids` and the attention mask (one position longer) of the next
        decode step: every row's last token."""
        assert self.mask is not None
        rows = self.rows
        input_ids = torch.tensor([[row.output_ids[-1]] for row in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[row.next_position] for row in rows], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(rows), 1))], dim=1)
        return input_ids, positions, self.mask

    def clear(self) -> None:
        self.rows, self.cache, self.mask = [], None, None

    def kv_bytes(self) -> int:
        cache = self.cache
        total = 0
        for layer in getattr(cache, "layers", []) if cache is not None else []:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total


class Scheduler:
    """The waiting queue, admission into the batch, and the running batch itself."""

    def __init__(
        self, tiers: AdapterTiers, wakeup: threading.Condition, device: torch.device, *,
        max_batch_size: int, max_prefill_tokens: int, max_waiting: int, fail: Callable[[Request, Exception], None],
        delay_factor: float = 0.0,
    ) -> None:
        self.tiers = tiers
        self._wakeup = wakeup  # a condition over the engine's lock
        self._lock = wakeup
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_waiting = max_waiting
        self._fail = fail  # ends one request with an error (the engine's, which knows how to say it)
        self.delay_factor = delay_factor
        self.last_prefill_s = 0.0  # the engine's latest prefill took this long
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Row] = []  # admitted, not yet in the batch (failed too if the step fails)
        self.batch = RunningBatch(device)

    def submit(self, request: Request) -> None:
        """Queue `request` and wake the engine; `CapacityError` (429) when the queue is full."""
        with self._wakeup:
            if len(self.waiting) >= self.max_waiting:
                raise CapacityError(f"{len(self.waiting)} requests are waiting; retry later")
            self.waiting.append(request)
            self._wakeup.notify_all()

    def has_work(self) -> bool:
        """Whether anything waits or runs (lock held)."""
        return bool(self.waiting or self.batch.rows)

    def counts(self) -> tuple[int, int]:
        """Running and waiting requests now."""
        with self._lock:
            return len(self.batch.rows), len(self.waiting)

    def holds_prefill(self) -> bool:
        """Whether to decode the running batch once more before prefilling what waits.

        vLLM's `scheduler_delay_factor`: while rows run, new requests wait until the oldest has
        waited `delay_factor` times the latest prefill's duration (or enough wait to fill the
        batch). A prefill costs about the same for one short prompt as for ten, so requests that
        arrive a few milliseconds apart — a closed loop of clients whose requests ended in the
        same step — are better prefilled together than one prefill each.
        """
        if self.delay_factor <= 0 or not self.batch.rows:
            return False
        with self._lock:
            if not self.waiting:
                return False
            oldest, count = self.waiting[0].arrived, len(self.waiting)
        if count >= self.max_batch_size - len(self.batch.rows):
            return False
        return time.monotonic() - oldest < self.delay_factor * self.last_prefill_s

    def admit(self) -> list[Row]:
        """Move waiting requests into `prefilling`, in arrival order, as slots and space allow
        (none while `holds_prefill`)."""
        admitted: list[Row] = []
        if self.holds_prefill():
            return admitted
        budget = self.max_prefill_tokens
        blocked_on_slot = False
        with self._lock:
            candidates = list(self.waiting)
        room = self.max_batch_size - len(self.batch.rows)
        for request in candidates:
            if room <= 0:
                break
            if request.cancelled:
                with self._lock:
                    self.waiting.remove(request)
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
                        placed = self.tiers.place(entry, allow_drain=True)
                    except Exception as exc:  # noqa: BLE001 - every slot pinned, or writing it failed
                        with self._lock:
                            self.waiting.remove(request)
                        self._fail(request, exc)
                        continue
                    if placed is None:
                        blocked_on_slot = True
                        continue
                slot = entry.slot  # type: ignore[assignment]
                with self._lock:
                    entry.running_rows += 1
                    entry.last_used = time.monotonic()
            row = Row(request=request, slot=slot)
            with self._lock:
                self.waiting.remove(request)
                self.prefilling.append(row)  # failed with the rest if the step fails before it joins
            admitted.append(row)
            budget -= len(request.prompt_ids)
            room -= 1
        return admitted

    def join(self, rows: list[Row], cache: Any, mask: torch.Tensor) -> list[int]:
        """Prefilled `rows` join the batch with their cache; the index each of them takes (the
        batch is in slot order, `RunningBatch.merged`)."""
        merged, merged_cache, merged_mask, places = self.batch.merged(rows, cache, mask)
        with self._lock:
            self.batch.rows, self.batch.cache, self.batch.mask = merged, merged_cache, merged_mask
            for row in rows:
                self.prefilling.remove(row)
        return places

    def abandon(self, rows: list[Row]) -> None:
        """Admitted rows that never joined the batch give back their slots' row counts."""
        with self._lock:
            for row in rows:
                self.prefilling.remove(row)
                if row.request.entry is not None:
                    row.request.entry.running_rows -= 1

    def retire(self, finished: list[int]) -> None:
        """Drop finished rows (by index) from the batch and trim padding no remaining row needs."""
        if not finished:
            return
        done = set(finished)
        kept = [i for i in range(len(self.batch.rows)) if i not in done]
        with self._lock:
            for i in finished:
                entry = self.batch.rows[i].request.entry
                if entry is not None:
                    entry.running_rows -= 1
            self.batch.rows = [self.batch.rows[i] for i in kept]
        self.batch.keep(kept)

    def retire_cancelled(self) -> None:
        """Rows whose clients went away (or hit a stop string) leave before any compute."""
        self.retire([i for i, row in enumerate(self.batch.rows) if row.request.cancelled])

    def take_running(self, *, release_slots: bool) -> list[Row]:
        """Empty the batch and `prefilling` (a step failed, or the engine stops); their rows.
        `release_slots`: give back the rows' counts on their adapters' slots."""
        with self._lock:
            rows = self.batch.rows + self.prefilling
            self.batch.clear()
            self.prefilling = []
            if release_slots:
                for row in rows:
                    if row.request.entry is not None:
                        row.request.entry.running_rows -= 1
        return rows

    def take_waiting(self) -> list[Request]:
        """Empty the queue (the engine stops); the requests that waited."""
        with self._lock:
            waiting = list(self.waiting)
            self.waiting.clear()
        return waiting


__all__ = ["Emitted", "Request", "Row", "RunningBatch", "Scheduler", "left_padded"]

"""The torch engine's two adapter tiers: parsed adapters in host memory, and device slots.

Design decisions:
- CPU tier: an LRU of parsed adapters (`max_cpu_adapters`, device ones included), filled by
  worker threads (`asyncio.to_thread`), so a disk read never stalls the engine; concurrent
  requests for one adapter share one read. Device tier: `max_resident` numbered slots of the
  `SlotTable`; putting an adapter into a slot is a memory copy done on the engine thread
  between two steps. `--preload` adapters are pinned to slots.
- The CPU tier never drops an adapter a request holds, a slot owns or a pin keeps, so it may
  run over its size while those alone fill it (always the case for a moment when
  `max_cpu_adapters` equals `max_resident`) and shrinks back when they fall idle: every pair
  with `max_cpu_adapters >= max_resident >= 1` is served, each adapter read at most once per
  request. An adapter just read is born held by its request, so trimming can never drop it.
- Fair slot eviction: when the oldest waiting request needs a slot and none is free, the
  least-busy unpinned slot is *drained* (the scheduler admits no new rows to it) and swapped
  as soon as its rows finish, so a hot adapter cannot starve a cold one.
- A kind the engine cannot serve is refused from its record before anything is read; every
  read failure is an `AdapterLoadError` naming the adapter as the client knows it (its ref or
  `lora_name`) and its kind, never a cache path or hash.
- The tiers share the engine's lock (one lock guards adapters, queue and batch counters, which
  the scheduler updates together) and report loads and evictions to the engine's listener.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterhub.errors import AdapterhubError
from adapterhub.serving.backends.base import (
    AdapterEventListener,
    AdapterLoadError,
    AdapterSpec,
    ResidentAdapter,
    UnavailableError,
    kind_label,
    why_backend_cannot_serve,
)
from adapterhub.serving.backends.lora_slots import AdapterWeights, SlotTable, read_adapter_config, read_adapter_dir

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class AdapterEntry:
    """One adapter in the CPU tier, and its slot when it has one."""

    key: str
    weights: AdapterWeights
    pinned: bool = False
    slot: int | None = None
    refs: int = 0  # requests holding it (waiting or running): never dropped from the CPU tier then
    running_rows: int = 0  # rows in the running batch: never evicted from its slot then
    draining: bool = False  # chosen for eviction: admit no new rows
    unloaded: bool = False  # removed by unload_adapter: free the slot once idle
    last_used: float = field(default_factory=time.monotonic)


class AdapterTiers:
    """Parsed adapters (CPU tier) and the device slots they are copied into."""

    def __init__(
        self, slots: SlotTable, *, max_resident: int, max_cpu_adapters: int, lock: threading.Lock,
        listener: Callable[[], AdapterEventListener], device: torch.device,
    ) -> None:
        self.slots = slots
        self.max_resident = max_resident
        self.max_cpu_adapters = max_cpu_adapters
        self._lock = lock
        self._listener = listener  # read at each event: the app points the engine at its metrics later
        self._device = device
        self._entries: collections.OrderedDict[str, AdapterEntry] = collections.OrderedDict()
        self._slot_owner: list[AdapterEntry | None] = [None] * (max_resident + 1)
        self._loading: dict[str, asyncio.Future[AdapterEntry | None]] = {}

    @property
    def listener(self) -> AdapterEventListener:
        return self._listener()

    # ----------------------------------------------------------------- CPU tier (asyncio side)

    def read(self, adapter: AdapterSpec) -> AdapterWeights:
        """Read `adapter` for the CPU tier; every failure is an `AdapterLoadError` that names it
        as the client knows it (its ref or `lora_name`) and its kind, never a cache path or hash.

        A kind the engine cannot serve is refused from the record before anything is read.
        """
        name = adapter.display_name
        if adapter.peft_type is not None:
            reason = why_backend_cannot_serve("torch", adapter.peft_type, adapter.task_type, adapter.config)
            if reason is not None:
                kind = kind_label(adapter.peft_type, adapter.task_type, adapter.config)
                raise AdapterLoadError(f"adapter {name!r} ({kind}) cannot be served by the torch backend: {reason}")
        try:
            adapter_dir = Path(adapter.locate())
        except AdapterhubError as exc:
            raise AdapterLoadError(f"adapter {name!r} cannot be read from the registry: {exc}") from exc
        kind = "unknown kind"
        try:
            config = read_adapter_config(adapter_dir)
            kind = kind_label(config.get("peft_type"), config.get("task_type"), config)
            reason = why_backend_cannot_serve("torch", config.get("peft_type"), config.get("task_type"), config)
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

    async def acquire(self, adapter: AdapterSpec) -> AdapterEntry:
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
            future: asyncio.Future[AdapterEntry | None] = asyncio.get_running_loop().create_future()
            self._loading[adapter.key] = future
            try:
                started = time.perf_counter()
                weights = await asyncio.to_thread(self.read, adapter)
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
            entry = AdapterEntry(key=adapter.key, weights=weights, refs=1)
            with self._lock:
                self._entries[adapter.key] = entry
                evicted = self._trim_cpu_tier()
            future.set_result(entry)
            self.listener.adapter_loaded(adapter.key, source="disk", seconds=seconds, size_bytes=weights.size_bytes)
            self._report_cpu_evictions(evicted)
            return entry

    def release(self, entry: AdapterEntry) -> None:
        """Give back one reference taken by `acquire`."""
        with self._lock:
            entry.refs -= 1
            evicted = self._trim_cpu_tier()
        self._report_cpu_evictions(evicted)

    def pin(self, entry: AdapterEntry) -> None:
        """Keep `entry` in a device slot for good; 503 when every slot is pinned already."""
        with self._lock:
            pinned = sum(1 for e in self._entries.values() if e.pinned and e is not entry)
            if pinned >= self.max_resident:
                raise UnavailableError(f"all {self.max_resident} device slots are pinned")
            entry.pinned = True

    def unload(self, key: str) -> bool:
        """Drop `key` from the CPU tier now; its slot is freed once its rows finish
        (`free_idle_slots`). False when it is not held."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            entry.unloaded = True
            entry.pinned = False
        return True

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
            if len(self._entries) <= self.max_cpu_adapters:
                break
            entry = self._entries[key]
            if entry.refs == 0 and entry.slot is None and not entry.pinned:
                started = time.perf_counter()
                del self._entries[key]
                evicted.append((key, time.perf_counter() - started))
        return evicted

    def _report_cpu_evictions(self, evicted: list[tuple[str, float]]) -> None:
        for key, seconds in evicted:
            self.listener.adapter_evicted(key, tier="cpu", seconds=seconds)

    # ----------------------------------------------------------------- device slots (engine thread)

    def place(self, entry: AdapterEntry, *, allow_drain: bool) -> int | None:
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
                    raise UnavailableError(f"all {self.max_resident} device slots hold pinned adapters; raise --max-resident")
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
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
        except BaseException:
            # Out of memory growing the stacks, say: the slot holds nothing usable, so it is free.
            with self._lock:
                entry.slot = None
                self._slot_owner[free] = None
            with contextlib.suppress(Exception):
                self.slots.clear(free)
            raise
        self.listener.adapter_loaded(entry.key, source="cpu", seconds=time.perf_counter() - started, size_bytes=entry.weights.size_bytes)
        return free

    def free_idle_slots(self) -> None:
        """Clear slots of unloaded adapters whose rows have all finished."""
        with self._lock:
            freed = [e for e in self._slot_owner[1:] if e is not None and e.unloaded and e.running_rows == 0]
            for entry in freed:
                self._slot_owner[entry.slot] = None  # type: ignore[index]
        for entry in freed:
            started = time.perf_counter()
            self.slots.clear(entry.slot)  # type: ignore[arg-type]
            entry.slot = None
            self.listener.adapter_evicted(entry.key, tier="device", seconds=time.perf_counter() - started)

    # ----------------------------------------------------------------- what is held

    @staticmethod
    def describe(entry: AdapterEntry) -> ResidentAdapter:
        return ResidentAdapter(
            key=entry.key,
            tier="device" if entry.slot is not None else "cpu",
            size_bytes=entry.weights.size_bytes,
            pinned=entry.pinned,
            rank=entry.weights.rank,
            target_modules=entry.weights.target_modules,
        )

    def holds(self, key: str) -> bool:
        """Whether `key` is in the CPU tier (device adapters included) now."""
        return key in self._entries  # one dict lookup: atomic under the GIL, no lock needed

    def resident(self) -> list[ResidentAdapter]:
        """Adapters held now, device tier first."""
        with self._lock:
            described = [self.describe(e) for e in self._entries.values()]
        return sorted(described, key=lambda r: (r.tier != "device", r.key))

    def memory_stats(self) -> Mapping[str, float]:
        """Bytes of adapters held per tier, and of the slot stacks."""
        with self._lock:
            cpu_bytes = sum(e.weights.size_bytes for e in self._entries.values())
            device_adapter_bytes = sum(e.weights.size_bytes for e in self._slot_owner if e is not None)
        return {
            "adapter_cpu_tier_bytes": float(cpu_bytes),
            "adapter_device_bytes": float(device_adapter_bytes),
            "adapter_slot_stack_bytes": float(self.slots.stack_bytes()),
        }


__all__ = ["AdapterEntry", "AdapterTiers"]

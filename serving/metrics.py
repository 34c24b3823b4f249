"""Prometheus metrics of the server, per model (base or adapter key).

Design decisions:
- One `CollectorRegistry` per app (not the process-global default), so several servers in one
  process (tests, benchmarks) never collide, plus prometheus_client's process collector for
  RSS and CPU time.
- Request metrics are measured at the HTTP edge, so they mean the same for every backend:
  time to first token (request received -> first token out), end-to-end latency, output tokens
  and output tokens/s per request. The `model` label is the canonical key (`name:version` or the
  base name); unknown names are never used as labels.
- The label set is bounded, whatever clients do: an adapter gets its own series only while the
  app says its key may be a label (`label_allowed`: registry adapters, and adapters loaded by
  path only while loaded), at most `max_adapter_labels` of them; the rest count under
  `OTHER_LABEL`. Unloading an adapter removes its series (`forget`), so loading and unloading
  adapters under ever new names (300 such names once grew /metrics from 53 KB to 4.9 MB) leaves
  /metrics as it was.
- Adapter lifecycle comes from the backend through `AdapterEventListener`: loads by source
  (`disk` = registry/disk -> CPU tier, `cpu` = CPU tier -> device slot) and evictions by tier,
  with durations. Resident bytes and memory figures are read from the backend at scrape time by
  a custom collector, so they are never stale.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from adapterhub.serving.backends.base import Backend

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
#: Where adapters without a series of their own are counted (never a registry ref or path key).
OTHER_LABEL = "(other)"
#: Adapters with series of their own, at most (each adds 6-12 KB to /metrics, with its name).
DEFAULT_MAX_ADAPTER_LABELS = 128


class _BackendCollector(Collector):
    """Reads resident adapters and memory from the backend whenever Prometheus scrapes."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.process = psutil.Process()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        resident = GaugeMetricFamily(
            "adapterhub_adapter_resident_bytes", "Bytes of an adapter's weights held, per tier", labels=["adapter", "tier"]
        )
        counts = GaugeMetricFamily("adapterhub_resident_adapters", "Adapters held, per tier", labels=["tier"])
        tiers = {"device": 0, "cpu": 0}
        for adapter in self.backend.resident_adapters():
            resident.add_metric([adapter.key, adapter.tier], adapter.size_bytes)
            tiers[adapter.tier] += 1
        for tier, count in tiers.items():
            counts.add_metric([tier], count)
        yield resident
        yield counts
        memory = GaugeMetricFamily("adapterhub_memory_bytes", "Engine memory by kind", labels=["kind"])
        for kind, value in self.backend.memory_stats().items():
            memory.add_metric([kind.removesuffix("_bytes")], value)
        memory.add_metric(["process_rss"], float(self.process.memory_info().rss))
        yield memory


class ServingMetrics:
    """The server's metrics; also the backend's `AdapterEventListener`."""

    def __init__(self, backend: Backend, *, max_adapter_labels: int = DEFAULT_MAX_ADAPTER_LABELS) -> None:
        self.base_name = backend.base_name
        self.max_adapter_labels = max_adapter_labels
        #: Whether an adapter key may get series of its own; `create_app` says which may.
        self.label_allowed: Callable[[str], bool] = lambda key: True
        self._lock = threading.Lock()
        # Label value -> the (metric, label values) series it appears in, so `forget` can remove them.
        self._series: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}
        self._backend = backend
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_BackendCollector(backend))
        self.requests = Counter(
            "adapterhub_requests", "Requests finished, by model and HTTP status", ["model", "status"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "adapterhub_time_to_first_token_seconds", "Request received to first token", ["model"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.latency = Histogram(
            "adapterhub_request_latency_seconds", "Request received to last token", ["model"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.output_tokens = Counter(
            "adapterhub_output_tokens", "Completion tokens generated", ["model"], registry=self.registry
        )
        self.tokens_per_second = Histogram(
            "adapterhub_output_tokens_per_second", "Completion tokens / end-to-end latency, per request", ["model"],
            buckets=_RATE_BUCKETS, registry=self.registry,
        )
        self.adapter_loads = Counter(
            "adapterhub_adapter_loads", "Adapter loads; source disk: into the CPU tier, cpu: into a device slot",
            ["adapter", "source"], registry=self.registry,
        )
        self.adapter_load_seconds = Histogram(
            "adapterhub_adapter_load_seconds", "Duration of adapter loads", ["source"],
            buckets=_LOAD_BUCKETS, registry=self.registry,
        )
        self.adapter_evictions = Counter(
            "adapterhub_adapter_evictions", "Adapters evicted from a tier", ["adapter", "tier"], registry=self.registry
        )
        self.adapter_eviction_seconds = Histogram(
            "adapterhub_adapter_eviction_seconds", "Duration of adapter evictions", ["tier"],
            buckets=_LOAD_BUCKETS, registry=self.registry,
        )

    def _label(self, key: str, *, new: bool) -> str:
        """The label value of `key` (lock held): its own, or `OTHER_LABEL`. Only `new` events
        (a load, a finished request) may give a key series of its own."""
        if key == self.base_name or key in self._series:
            return key
        if new and len(self._series) < self.max_adapter_labels and self.label_allowed(key):
            self._series[key] = set()
            return key
        return OTHER_LABEL

    def _child(self, metric: Any, label: str, *values: str) -> Any:
        """`metric.labels(*values)`, remembered under `label` (lock held)."""
        if label in self._series:
            self._series[label].add((metric, values))
        return metric.labels(*values)

    def forget(self, key: str) -> None:
        """Remove every series of adapter `key` (unloaded: its name may never come back)."""
        with self._lock:
            for metric, values in self._series.pop(key, ()):
                metric.remove(*values)

    # AdapterEventListener
    def adapter_loaded(self, key: str, *, source: Literal["disk", "cpu"], seconds: float, size_bytes: int) -> None:
        with self._lock:
            label = self._label(key, new=True)
            self._child(self.adapter_loads, label, label, source).inc()
        self.adapter_load_seconds.labels(source).observe(seconds)

    def adapter_evicted(self, key: str, *, tier: Literal["device", "cpu"], seconds: float) -> None:
        with self._lock:
            label = self._label(key, new=False)
            self._child(self.adapter_evictions, label, label, tier).inc()
        self.adapter_eviction_seconds.labels(tier).observe(seconds)

    def request_finished(
        self, model: str, *, status: int, ttft: float | None, latency: float, completion_tokens: int
    ) -> None:
        """Record one finished request (`ttft` None when it failed before any token)."""
        with self._lock:
            label = self._label(model, new=True)
            self._child(self.requests, label, label, str(status)).inc()
            if ttft is None:
                return
            self._child(self.time_to_first_token, label, label).observe(ttft)
            self._child(self.latency, label, label).observe(latency)
            self._child(self.output_tokens, label, label).inc(completion_tokens)
            if latency > 0:
                self._child(self.tokens_per_second, label, label).observe(completion_tokens / latency)

    def render(self) -> bytes:
        """Our series, then the engine's own (vLLM's `vllm:*`) when it has any: one endpoint."""
        payload = generate_latest(self.registry)
        engine_registry = self._backend.prometheus_registry()
        return payload + generate_latest(engine_registry) if engine_registry is not None else payload

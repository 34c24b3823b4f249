"""Prometheus metrics of the server, per model (base or adapter key).

Design decisions:
- One `CollectorRegistry` per app (not the process-global default), so several servers in one
  process (tests, benchmarks) never collide, plus prometheus_client's process collector for
  RSS and CPU time.
- Request metrics are measured at the HTTP edge, so they mean the same for every backend:
  time to first token (request received -> first token out), end-to-end latency, output tokens
  and output tokens/s per request. The `model` label is the canonical key (`name:version` or the
  base name); unknown names are never used as labels, which keeps cardinality bounded by the
  registry.
- Adapter lifecycle comes from the backend through `AdapterEventListener`: loads by source
  (`disk` = registry/disk -> CPU tier, `cpu` = CPU tier -> device slot) and evictions by tier,
  with durations. Resident bytes and memory figures are read from the backend at scrape time by
  a custom collector, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from adapterhub.serving.backends.base import Backend

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


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

    def __init__(self, backend: Backend) -> None:
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

    # AdapterEventListener
    def adapter_loaded(self, key: str, *, source: Literal["disk", "cpu"], seconds: float, size_bytes: int) -> None:
        self.adapter_loads.labels(key, source).inc()
        self.adapter_load_seconds.labels(source).observe(seconds)

    def adapter_evicted(self, key: str, *, tier: Literal["device", "cpu"], seconds: float) -> None:
        self.adapter_evictions.labels(key, tier).inc()
        self.adapter_eviction_seconds.labels(tier).observe(seconds)

    def request_finished(
        self, model: str, *, status: int, ttft: float | None, latency: float, completion_tokens: int
    ) -> None:
        """Record one finished request (`ttft` None when it failed before any token)."""
        self.requests.labels(model, str(status)).inc()
        if ttft is None:
            return
        self.time_to_first_token.labels(model).observe(ttft)
        self.latency.labels(model).observe(latency)
        self.output_tokens.labels(model).inc(completion_tokens)
        if latency > 0:
            self.tokens_per_second.labels(model).observe(completion_tokens / latency)

    def render(self) -> bytes:
        return generate_latest(self.registry)

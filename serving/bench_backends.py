"""`adapterhub bench backends`: the serving engines side by side in one run, each as its own server.

Design decisions:
- The systems compared are whole servers, started in turn as processes on a free loopback port
  and stopped before the next starts, so they never share the CPU: `adapterhub serve --backend
  vllm`, vLLM's own OpenAI server given the same adapters (`--lora-modules`, and none of
  adapterhub's vLLM plugins: vLLM as its users get it) and `adapterhub serve --backend torch`.
  The question answered is what adapterhub's front costs on vLLM's engine (goal: at most 10% of
  vLLM's own server's throughput and p50 latency at every level), and how the embedded engine
  compares with both.
- Each is measured by `serving.bench`'s load generator (official `openai` client, streaming,
  `ignore_eos`, exactly `max_tokens` tokens per request) at the base alone and at each count of
  distinct adapters in flight, after an untimed warm-up that loads every adapter and runs every
  code path once. The adapters are `serving.bench`'s random-weight `bench-lora-<i>` records.
- The machine drifts: on the 2-core development machine the system measured first ran 10-25%
  faster than the same system measured second, in either order (two runs, 4 December 2026). So
  the systems are measured in `rounds`, the order reversed every other round (A B, B A, ...), and
  each figure is the median over rounds: every system sits in every position equally often.
- Results: one table, `<name>.json` (the medians, and every round's levels under `"rounds"`) and
  `<name>.png` (throughput and p50/p99 latency against adapters in flight), and each server's
  log next to them.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from adapterhub.errors import AdapterhubError
from adapterhub.serving.bench import BenchSettings, LevelResult, _level, _run_level, ensure_bench_adapters

ADAPTERHUB_VLLM, VLLM_OWN, ADAPTERHUB_TORCH = "adapterhub vllm", "vLLM's own server", "adapterhub torch"
SYSTEMS = (ADAPTERHUB_VLLM, VLLM_OWN, ADAPTERHUB_TORCH)
_SLUGS = {ADAPTERHUB_VLLM: "adapterhub-vllm", VLLM_OWN: "vllm-own", ADAPTERHUB_TORCH: "adapterhub-torch"}
_VLLM_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class BackendsSettings:
    base: str
    systems: tuple[str, ...] = SYSTEMS
    dtype: str = "bf16"
    adapter_counts: tuple[int, ...] = (1, 4, 16)
    concurrency: int = 16
    requests_per_level: int = 32
    max_tokens: int = 32
    rank: int = 16
    kv_cache_gib: int = 2
    rounds: int = 2  # each system measured this many times, the order reversed every other round
    startup_timeout_s: float = 600
    out_dir: Path = Path("benchmarks/results")
    name: str = "vllm_serve_bench"

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise AdapterhubError(f"unknown system(s) {unknown or '(none given)'}; choose from: {', '.join(SYSTEMS)}")
        if self.dtype not in _VLLM_DTYPES:
            raise AdapterhubError(f"dtype {self.dtype!r}: choose bf16 or fp32")
        if not self.adapter_counts or min(self.adapter_counts) < 1:
            raise AdapterhubError("adapter counts must be positive integers, e.g. 1,4,16")
        if self.rounds < 1:
            raise AdapterhubError(f"rounds must be at least 1 (got {self.rounds})")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(system: str, settings: BackendsSettings, base_dir: Path, adapters: dict[str, Path], port: int) -> list[str]:
    """The command line that starts `system` on `port` with every benchmark adapter available."""
    slots = str(max(settings.adapter_counts))
    if system == VLLM_OWN:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir),
            "--served-model-name", settings.base, "--enable-lora", "--max-loras", slots, "--max-cpu-loras", slots,
            "--max-lora-rank", str(settings.rank), "--dtype", _VLLM_DTYPES[settings.dtype],
            "--max-num-seqs", str(settings.concurrency), "--host", "127.0.0.1", "--port", str(port),
            "--lora-modules", *(f"{name}={path}" for name, path in adapters.items()),
        ]
    backend = "vllm" if system == ADAPTERHUB_VLLM else "torch"
    return [
        sys.executable, "-m", "adapterhub.cli.main", "serve", "--base", settings.base, "--backend", backend,
        "--port", str(port), "--max-resident", slots, "--max-cpu-adapters", slots,
        "--max-batch-size", str(settings.concurrency), "--dtype", settings.dtype, "--log-level", "warning",
    ]


def _wait_healthy(process: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> float:
    started = time.monotonic()
    while True:
        if process.poll() is not None:
            raise AdapterhubError(f"the server exited ({process.returncode}); its log, {log_path}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > timeout_s:
            raise AdapterhubError(f"the server was not healthy after {timeout_s:g} s; its log, {log_path}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def measure_system(system: str, settings: BackendsSettings, base_dir: Path, adapters: dict[str, Path], round_index: int = 0) -> dict[str, Any]:
    """Start `system`, warm it, measure every level, stop it; its levels and start-up time."""
    import openai

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    suffix = "" if round_index == 0 else f".round{round_index + 1}"
    log_path = settings.out_dir / f"{settings.name}.{_SLUGS[system]}{suffix}.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib)}
    env.pop("ADAPTERHUB_API_KEY", None)  # the load generator sends no key
    if system == VLLM_OWN:  # an empty allow-list: none of adapterhub's vLLM plugins
        env["VLLM_PLUGINS"] = ""
    with log_path.open("w") as log:
        process = subprocess.Popen(server_command(system, settings, base_dir, adapters, port), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        startup_s = _wait_healthy(process, url, log_path, settings.startup_timeout_s)
        load = BenchSettings(
            url=url, api_key=None, adapter_counts=settings.adapter_counts, concurrency=(settings.concurrency,),
            requests_per_level=settings.requests_per_level, max_tokens=settings.max_tokens, rank=settings.rank,
            naive=False, hot_loads=0, out_dir=settings.out_dir,
        )
        warm = replace(load, requests_per_level=max(settings.adapter_counts) * 2, max_tokens=2)
        names = list(adapters)
        levels: list[LevelResult] = []

        async def run() -> None:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
            clients = settings.concurrency
            await _run_level(client, names, warm, clients)  # untimed: every adapter loaded, every code path run once
            wall, samples, errors = await _run_level(client, [settings.base], load, clients)
            levels.append(_level(system, 0, clients, wall, samples, errors))
            for count in settings.adapter_counts:
                wall, samples, errors = await _run_level(client, names[:count], load, clients)
                levels.append(_level(system, count, clients, wall, samples, errors))

        asyncio.run(run())
        return {"system": system, "startup_s": round(startup_s, 1), "levels": [asdict(level) for level in levels]}
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_MEDIAN_FIELDS = ("wall_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms", "latency_p99_ms")


def median_over_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's rounds as one result: per level the median of each time and rate, the errors
    of every round added up (requests and tokens are the same in every round); the rounds kept."""
    import statistics

    levels = []
    for index, first in enumerate(runs[0]["levels"]):
        same = [run["levels"][index] for run in runs]
        level = {**first, **{key: statistics.median(lv[key] for lv in same) for key in _MEDIAN_FIELDS}}
        level["errors"] = sum(lv["errors"] for lv in same)
        levels.append(level)
    return {"system": runs[0]["system"], "startup_s": statistics.median(run["startup_s"] for run in runs),
            "levels": levels, "rounds": runs}


def front_cost(results: list[dict[str, Any]]) -> dict[str, float]:
    """adapterhub on vLLM over vLLM's own server, per level: throughput (goal >= 0.9) and p50 latency (goal <= 1.1)."""
    by_system = {r["system"]: {lv["adapters"]: lv for lv in r["levels"]} for r in results}
    ours, theirs = by_system.get(ADAPTERHUB_VLLM), by_system.get(VLLM_OWN)
    ratios: dict[str, float] = {}
    if not ours or not theirs:
        return ratios
    for count, level in theirs.items():
        if count in ours and level["tokens_per_s"] and level["latency_p50_ms"]:
            key = "base" if count == 0 else f"{count}_adapters"
            ratios[f"{key}_throughput_vs_vllm"] = round(ours[count]["tokens_per_s"] / level["tokens_per_s"], 3)
            ratios[f"{key}_p50_latency_vs_vllm"] = round(ours[count]["latency_p50_ms"] / level["latency_p50_ms"], 3)
    return ratios


def _plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for result in results:
        levels = result["levels"]
        labels = ["base" if lv["adapters"] == 0 else str(lv["adapters"]) for lv in levels]
        left.plot(labels, [lv["tokens_per_s"] for lv in levels], marker="o", label=result["system"])
        right.plot(labels, [lv["latency_p50_ms"] for lv in levels], marker="o", label=f"{result['system']} p50")
        right.plot(labels, [lv["latency_p99_ms"] for lv in levels], marker="o", linestyle="--", label=f"{result['system']} p99")
    left.set_ylabel("output tokens/s")
    right.set_ylabel("end-to-end latency (ms)")
    for axis in (left, right):
        axis.set_xlabel("distinct adapters in flight")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_backends_benchmark(settings: BackendsSettings, registry: Any = None) -> dict[str, Any]:
    """Measure every system of `settings` in turn on the registry's base; print, write and return the report."""
    from rich.console import Console
    from rich.table import Table

    from adapterhub.registry import Registry

    registry = registry or Registry.open()
    base_record = registry.get_base_model(settings.base)
    base_dir = Path(base_record.path)
    settings = replace(settings, base=base_record.name)
    names = ensure_bench_adapters(registry, base_record.name, base_dir, max(settings.adapter_counts), settings.rank)
    adapters = {name: Path(registry.materialize(registry.get(name))) for name in names}
    settings.out_dir.mkdir(parents=True, exist_ok=True)

    rounds: dict[str, list[dict[str, Any]]] = {system: [] for system in settings.systems}
    for round_index in range(settings.rounds):
        order = settings.systems if round_index % 2 == 0 else tuple(reversed(settings.systems))
        for system in order:
            print(f"measuring {system} (round {round_index + 1} of {settings.rounds}) …", flush=True)
            rounds[system].append(measure_system(system, settings, base_dir, adapters, round_index))
    results = [median_over_rounds(rounds[system]) for system in settings.systems]
    ratios = front_cost(results)

    title = (f"{settings.base} · {settings.dtype} · {settings.concurrency} clients · {settings.max_tokens} tokens · "
             f"rank-{settings.rank} LoRAs")
    table = Table(title=title)
    for column in ("system", "adapters", "tok/s", "lat p50 ms", "lat p99 ms", "TTFT p50 ms", "errors"):
        table.add_column(column, justify="left" if column == "system" else "right")
    for result in results:
        for lv in result["levels"]:
            table.add_row(result["system"], "base" if lv["adapters"] == 0 else str(lv["adapters"]), f"{lv['tokens_per_s']:.1f}",
                          f"{lv['latency_p50_ms']:.0f}", f"{lv['latency_p99_ms']:.0f}", f"{lv['ttft_p50_ms']:.0f}", str(lv["errors"]))
    console = Console(width=140)
    console.print(table)
    if ratios:
        console.print(f"{ADAPTERHUB_VLLM} / {VLLM_OWN} (goal: throughput >= 0.9, p50 latency <= 1.1): {json.dumps(ratios)}")
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "results": results, "goals": ratios,
    }
    json_path = settings.out_dir / f"{settings.name}.json"
    json_path.write_text(json.dumps(report, indent=2))
    _plot(results, settings.out_dir / f"{settings.name}.png", title)
    print(f"wrote {json_path} and {settings.out_dir / (settings.name + '.png')}")
    return report

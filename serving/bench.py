"""`adapterhub bench serve`: multi-adapter serving throughput, latency, hot-load time and memory.

Design decisions:
- It measures a *running* server over HTTP with the official `openai` client (streaming, so
  time to first token is real), at each concurrency of `--concurrency` (e.g. 16,32) in one
  run, with 1/4/16/64 distinct adapters in flight and with the base alone. The table names the
  server's dtype and each row's concurrency, and every row's ratio to base-only at its concurrency. Every request generates exactly `max_tokens` tokens
  (`ignore_eos`, vLLM's extension), so levels compare equal work.
- The naive baseline is what one gets from PEFT without a scheduler: requests arrive in waves
  of `concurrency`; each wave is grouped by adapter and every group runs as one
  `set_adapter(...)` + `generate(...)` batch. It runs in this process on the same base and the
  same adapters (the server sits idle meanwhile), and a request's latency is its wave's start to
  its group's end (its first token is only visible then, so TTFT = latency there).
- Adapters are random-weight rank-`rank` LoRAs on q/k/v/o registered as `bench-lora-<i>`
  (tag `bench`): random weights cost the same FLOPs as trained ones, and the benchmark
  should not need a training run. They are written in PEFT's format and go through the
  registry's validation like any import.
- Hot-load latency is `/v1/load_lora_adapter` by registry name after an unload: resolve,
  materialize, parse, copy into a device slot. The first load of each adapter in the server
  process also hash-verifies its blobs and is reported apart. Memory per adapter is read from
  the server's own `/metrics` while adapters are loaded one by one.
- Results: a table on stdout, `serve_bench.json` and `serve_bench.png` in `out_dir`.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from adapterhub.errors import AdapterhubError

PROMPTS = [
    "Write a short note about the weather in spring and what people do outside.",
    "List three reasons why small task adapters are useful for one base model.",
    "Explain in two sentences how a bicycle stays upright while moving.",
    "Give a friendly greeting to a new colleague who joined the team today.",
]
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class BenchSettings:
    url: str
    api_key: str | None
    adapter_counts: tuple[int, ...]
    concurrency: tuple[int, ...]  # one measurement per value: clients (requests in flight at once)
    requests_per_level: int
    max_tokens: int
    rank: int
    naive: bool
    hot_loads: int
    out_dir: Path


@dataclass
class LevelResult:
    """One measured configuration (a row of the table)."""

    system: str  # "server", "server (base only)" or "naive PEFT set_adapter"
    adapters: int
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    errors: int = 0


@dataclass
class BenchReport:
    settings: dict[str, Any]
    server: dict[str, Any]
    levels: list[LevelResult] = field(default_factory=list)
    hot_load_ms: list[float] = field(default_factory=list)  # unload, then load by registry name
    hot_load_first_ms: list[float] = field(default_factory=list)  # first load in the server process
    memory: dict[str, Any] = field(default_factory=dict)
    goals: dict[str, Any] = field(default_factory=dict)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _level(system: str, adapters: int, concurrency: int, wall: float, samples: list[tuple[float, float, int]], errors: int) -> LevelResult:
    ttfts = [s[0] * 1000 for s in samples]
    latencies = [s[1] * 1000 for s in samples]
    tokens = sum(s[2] for s in samples)
    return LevelResult(
        system=system, adapters=adapters, concurrency=concurrency, requests=len(samples), output_tokens=tokens, wall_s=round(wall, 3),
        tokens_per_s=round(tokens / wall, 2) if wall > 0 else 0.0,
        ttft_p50_ms=round(_percentile(ttfts, 0.5), 1), ttft_p99_ms=round(_percentile(ttfts, 0.99), 1),
        latency_p50_ms=round(_percentile(latencies, 0.5), 1), latency_p99_ms=round(_percentile(latencies, 0.99), 1),
        errors=errors,
    )


def _write_random_lora(out_dir: Path, linear_shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> Path:
    """A PEFT-format LoRA with random A and B on q/k/v/o (PEFT loads it; the registry validates it)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in linear_shapes.items():
        if module.rsplit(".", 1)[-1] not in TARGET_MODULES:
            continue
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.02
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.02
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(TARGET_MODULES), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "base_model_name_or_path": None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def ensure_bench_adapters(registry: Any, base_name: str, base_dir: Path, count: int, rank: int) -> list[str]:
    """Register `bench-lora-0..count-1` on `base_name` when missing; returns their names."""
    from safetensors import safe_open

    names = [f"bench-lora-{i}" for i in range(count)]
    missing = [(i, name) for i, name in enumerate(names) if registry.resolve(name, base=base_name) is None]
    if not missing:
        return names
    linear_shapes = _linear_shapes(base_dir, safe_open)
    with tempfile.TemporaryDirectory() as scratch:
        for index, name in missing:
            adapter_dir = _write_random_lora(Path(scratch) / name, linear_shapes, rank, seed=10_000 + index)
            registry.put_adapter(name=name, source_dir=adapter_dir, base=base_name, tags=("bench",))
    return names


def _linear_shapes(base_dir: Path, safe_open: Any) -> dict[str, tuple[int, int]]:
    """`module -> (out, in)` of the base's 2-D `*.weight` tensors, read from safetensors headers."""
    shapes: dict[str, tuple[int, int]] = {}
    for weights_file in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(weights_file), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(".weight"):
                    shape = handle.get_slice(key).get_shape()
                    if len(shape) == 2:
                        shapes[key.removesuffix(".weight")] = (int(shape[0]), int(shape[1]))
    return shapes


async def _run_level(
    client: Any, models: list[str], settings: BenchSettings, concurrency: int
) -> tuple[float, list[tuple[float, float, int]], int]:
    """Send `requests_per_level` streaming requests over `models` from `concurrency` clients."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(settings.requests_per_level):
        queue.put_nowait(index)
    samples: list[tuple[float, float, int]] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        while not queue.empty():
            index = queue.get_nowait()
            started = time.perf_counter()
            first: float | None = None
            tokens = 0
            try:
                stream = await client.completions.create(
                    model=models[index % len(models)], prompt=PROMPTS[index % len(PROMPTS)],
                    max_tokens=settings.max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                )
                async for chunk in stream:
                    if first is None and chunk.choices:
                        first = time.perf_counter() - started
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
            except Exception:  # counted, reported in the table
                errors += 1
                continue
            samples.append((first or 0.0, time.perf_counter() - started, tokens))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, samples, errors


def _naive_baseline(
    base_dir: Path, adapter_dirs: dict[str, Path], counts: tuple[int, ...], settings: BenchSettings
) -> list[LevelResult]:
    """PEFT with one active adapter at a time: waves of `concurrency` requests, one batch per adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterhub.models import default_device, default_dtype

    device = default_device()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=default_dtype(device)).to(device)
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(model, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    model.eval()
    results = []
    for concurrency, count in ((c, n) for c in settings.concurrency for n in counts):
        samples: list[tuple[float, float, int]] = []
        level_started = time.perf_counter()
        for wave_start in range(0, settings.requests_per_level, concurrency):
            wave = list(range(wave_start, min(wave_start + concurrency, settings.requests_per_level)))
            began = time.perf_counter()
            groups: dict[str, list[int]] = {}
            for index in wave:
                groups.setdefault(names[index % count], []).append(index)
            for adapter, indices in groups.items():
                model.set_adapter(adapter)
                batch = tokenizer([PROMPTS[i % len(PROMPTS)] for i in indices], return_tensors="pt", padding=True).to(device)
                with torch.no_grad():
                    output = model.generate(
                        **batch, max_new_tokens=settings.max_tokens, min_new_tokens=settings.max_tokens,
                        do_sample=False, pad_token_id=tokenizer.pad_token_id,
                    )
                done = time.perf_counter() - began
                new_tokens = output.shape[1] - batch["input_ids"].shape[1]
                samples.extend((done, done, int(new_tokens)) for _ in indices)
        results.append(_level("naive PEFT set_adapter", count, concurrency, time.perf_counter() - level_started, samples, 0))
    return results


def _scrape(http: httpx.Client) -> dict[str, float]:
    """A few gauges of the server's /metrics, by `name{labels}`."""
    values: dict[str, float] = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(("adapterhub_memory_bytes", "adapterhub_adapter_resident_bytes", "adapterhub_resident_adapters")):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def _print_table(report: BenchReport) -> None:
    from rich.console import Console
    from rich.table import Table

    server = report.server
    table = Table(title=f"adapterhub bench serve — {server.get('base')} on {server.get('device')}, dtype {server.get('dtype', '?')}, "
                        f"{server.get('backend', '?')} backend, {report.settings['max_tokens']} tokens/request")
    for column in ("system", "clients", "adapters", "req", "tok/s", "vs base", "TTFT p50 ms", "TTFT p99 ms", "lat p50 ms", "lat p99 ms", "errors"):
        table.add_column(column, justify="left" if column == "system" else "right")
    base_tps = {lv.concurrency: lv.tokens_per_s for lv in report.levels if lv.system == "server (base only)"}
    for level in report.levels:
        base = base_tps.get(level.concurrency)
        table.add_row(
            level.system, str(level.concurrency), str(level.adapters), str(level.requests), f"{level.tokens_per_s:.1f}",
            f"{level.tokens_per_s / base:.2f}x" if base else "-",
            f"{level.ttft_p50_ms:.0f}", f"{level.ttft_p99_ms:.0f}", f"{level.latency_p50_ms:.0f}",
            f"{level.latency_p99_ms:.0f}", str(level.errors),
        )
    console = Console(width=150)
    console.print(table)
    if report.hot_load_ms:
        console.print(
            f"hot-load (registry -> resident, rank {report.settings['rank']}): median "
            f"{statistics.median(report.hot_load_ms):.1f} ms, max {max(report.hot_load_ms):.1f} ms over {len(report.hot_load_ms)}; "
            f"first load in the process (blob hash check included): median {statistics.median(report.hot_load_first_ms):.1f} ms"
        )
    if report.memory:
        console.print(f"memory: {json.dumps(report.memory)}")
    console.print(f"goals: {json.dumps(report.goals)}")


def _plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for concurrency in report.settings["concurrency"]:
        for system, marker in (("server", "o"), ("naive PEFT set_adapter", "s")):
            rows = [lv for lv in report.levels if lv.system == system and lv.concurrency == concurrency]
            if not rows:
                continue
            counts = [lv.adapters for lv in rows]
            label = f"{system} · {concurrency} clients"
            left.plot(counts, [lv.tokens_per_s for lv in rows], marker=marker, label=label)
            right.plot(counts, [lv.latency_p50_ms for lv in rows], marker=marker, label=f"{label} p50")
            right.plot(counts, [lv.latency_p99_ms for lv in rows], marker=marker, linestyle="--", label=f"{label} p99")
        base = [lv for lv in report.levels if lv.system == "server (base only)" and lv.concurrency == concurrency]
        if base:
            left.axhline(base[0].tokens_per_s, color="gray", linestyle=":", label=f"base only · {concurrency} clients")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("distinct adapters in flight")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    left.set_ylabel("output tokens/s")
    right.set_ylabel("end-to-end latency (ms)")
    right.set_yscale("log")
    figure.suptitle(
        f"{report.server.get('base')} · dtype {report.server.get('dtype', '?')} · concurrency "
        f"{', '.join(map(str, report.settings['concurrency']))} · {report.settings['max_tokens']} tokens/request"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_serve_benchmark(settings: BenchSettings) -> BenchReport:
    """Run every measurement against `settings.url`; print, write JSON and PNG; return the report."""
    try:
        import openai
    except ImportError:  # pragma: no cover - openai is a dev dependency
        raise AdapterhubError("`adapterhub bench serve` needs the `openai` package (pip install openai)") from None
    from adapterhub.registry import Registry

    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    http = httpx.Client(base_url=settings.url, headers=headers, timeout=600)
    try:
        models = http.get("/v1/models")
    except httpx.HTTPError as exc:
        raise AdapterhubError(f"no server at {settings.url}: {exc}") from None
    if models.status_code != 200:
        raise AdapterhubError(f"{settings.url}/v1/models answered {models.status_code}: {models.text[:200]}")
    base_card = next(card for card in models.json()["data"] if card.get("parent") is None)
    base_name = base_card["id"]
    server_info = {"base": base_name, **base_card.get("meta", {})}
    registry = Registry.open()
    base_record = registry.get_base_model(base_name)
    names = ensure_bench_adapters(
        registry, base_name, Path(base_record.path), max(*settings.adapter_counts, settings.hot_loads), settings.rank
    )
    report = BenchReport(settings={k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}, server=server_info)

    # Hot-load latency and memory per adapter, on adapters not yet resident (a fresh server is best).
    before = _scrape(http)
    loaded_for_memory = 0

    def timed_load(name: str) -> float:
        http.post("/v1/unload_lora_adapter", json={"lora_name": name})  # 404 when not held: fine
        started = time.perf_counter()
        response = http.post("/v1/load_lora_adapter", json={"lora_name": name})
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise AdapterhubError(f"loading {name} failed: {response.status_code} {response.text[:200]}")
        return round(elapsed, 2)

    # First load of each adapter in this server process: registry blob verification included.
    for name in names[: settings.hot_loads]:
        report.hot_load_first_ms.append(timed_load(name))
        loaded_for_memory += 1
    after = _scrape(http)
    # Again after an unload (dropped from every tier, so read from disk again; blobs already verified).
    for name in names[: settings.hot_loads]:
        report.hot_load_ms.append(timed_load(name))
    if loaded_for_memory:
        device = int(after.get('adapterhub_resident_adapters{tier="device"}', 0))
        adapter_sizes = [v for k, v in after.items() if k.startswith("adapterhub_adapter_resident_bytes") and 'tier="device"' in k]
        stack_growth = after.get('adapterhub_memory_bytes{kind="adapter_slot_stack"}', 0) - before.get('adapterhub_memory_bytes{kind="adapter_slot_stack"}', 0)
        rss_growth = after.get('adapterhub_memory_bytes{kind="process_rss"}', 0) - before.get('adapterhub_memory_bytes{kind="process_rss"}', 0)
        report.memory = {
            "adapters_loaded": loaded_for_memory,
            "device_resident_after": device,
            "adapter_size_bytes": int(statistics.median(adapter_sizes)) if adapter_sizes else None,
            "slot_memory_growth_per_adapter_bytes": int(stack_growth / max(1, min(device, loaded_for_memory))),
            "rss_growth_per_adapter_bytes": int(rss_growth / loaded_for_memory),
        }

    client = openai.AsyncOpenAI(base_url=f"{settings.url}/v1", api_key=settings.api_key or "unused", max_retries=0, timeout=600)

    async def measure() -> None:
        # Warm every adapter into the CPU tier (and the engine's code paths) outside the timings.
        warm = BenchSettings(**{**asdict(settings), "requests_per_level": max(settings.adapter_counts), "max_tokens": 1})
        await _run_level(client, names[: max(settings.adapter_counts)], warm, max(settings.concurrency))
        for concurrency in settings.concurrency:
            wall, samples, errors = await _run_level(client, [base_name], settings, concurrency)
            report.levels.append(_level("server (base only)", 0, concurrency, wall, samples, errors))
            for count in settings.adapter_counts:
                wall, samples, errors = await _run_level(client, names[:count], settings, concurrency)
                report.levels.append(_level("server", count, concurrency, wall, samples, errors))

    asyncio.run(measure())
    if settings.naive:
        adapter_dirs = {name: Path(registry.materialize(registry.get(name))) for name in names[: max(settings.adapter_counts)]}
        report.levels.extend(_naive_baseline(Path(base_record.path), adapter_dirs, settings.adapter_counts, settings))

    by_key = {(lv.system, lv.adapters, lv.concurrency): lv for lv in report.levels}
    reference_count = 16 if 16 in settings.adapter_counts else max(settings.adapter_counts)
    for concurrency in settings.concurrency:
        base_level = by_key.get(("server (base only)", 0, concurrency))
        server_level = by_key.get(("server", reference_count, concurrency))
        naive_level = by_key.get(("naive PEFT set_adapter", reference_count, concurrency))
        if base_level and server_level and base_level.tokens_per_s:
            report.goals[f"{reference_count}_adapters_vs_base_only_at_{concurrency}_clients"] = round(server_level.tokens_per_s / base_level.tokens_per_s, 3)
        if naive_level and server_level and naive_level.tokens_per_s:
            report.goals[f"{reference_count}_adapters_vs_naive_at_{concurrency}_clients"] = round(server_level.tokens_per_s / naive_level.tokens_per_s, 2)
    if report.hot_load_ms:
        report.goals["hot_load_median_ms"] = round(statistics.median(report.hot_load_ms), 1)
        report.goals["first_load_median_ms"] = round(statistics.median(report.hot_load_first_ms), 1)

    settings.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = settings.out_dir / "serve_bench.json"
    json_path.write_text(json.dumps(asdict(report), indent=2))
    _plot(report, settings.out_dir / "serve_bench.png")
    _print_table(report)
    print(f"wrote {json_path} and {settings.out_dir / 'serve_bench.png'}")
    return report

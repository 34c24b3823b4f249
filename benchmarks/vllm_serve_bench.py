"""Side by side in one run: `adapterhub serve --backend vllm`, vLLM's own OpenAI server given the
same adapters (`--lora-modules`), and `adapterhub serve --backend torch` — on one base with the
same rank-`rank` LoRAs, the same prompts and the same concurrency.

Each server is started as its own process in turn (so they never share the CPU), warmed, then
measured with the official `openai` client (streaming, `ignore_eos`, exactly `max_tokens` tokens
per request: `serving.bench`'s load generator) at base-only and 1/4/16 distinct adapters in
flight. The goal of issue 13: adapterhub's front on vLLM costs at most 10% of vLLM's own
server's throughput and p50 latency at every level.

Usage:
    ADAPTERHUB_HOME=/tmp/bench-home python benchmarks/vllm_serve_bench.py [--base smollm2] [--dtype bf16]
The base must be registered (`adapterhub models add smollm2`); benchmark LoRAs are registered
as `bench-lora-<i>` (tag `bench`) when missing. Writes benchmarks/results/vllm_serve_bench.json
and .png, and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx

from adapterhub.serving.bench import BenchSettings, LevelResult, _level, _run_level, ensure_bench_adapters

SYSTEMS = ("adapterhub vllm", "vLLM's own server", "adapterhub torch")
_SLUGS = dict(zip(SYSTEMS, ("adapterhub-vllm", "vllm-own", "adapterhub-torch")))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(system: str, base: str, base_dir: Path, adapters: dict[str, Path], port: int, args: argparse.Namespace) -> list[str]:
    slots = str(max(args.adapter_counts))
    if system == "vLLM's own server":
        modules = [f"{name}={path}" for name, path in adapters.items()]
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir), "--served-model-name", base,
            "--enable-lora", "--max-loras", slots, "--max-cpu-loras", slots, "--max-lora-rank", str(args.rank),
            "--dtype", {"bf16": "bfloat16", "fp32": "float32"}[args.dtype], "--max-num-seqs", str(args.concurrency),
            "--host", "127.0.0.1", "--port", str(port), "--lora-modules", *modules,
        ]
    backend = "vllm" if system == "adapterhub vllm" else "torch"
    return [
        sys.executable, "-m", "adapterhub.cli.main", "serve", "--base", base, "--backend", backend, "--port", str(port),
        "--max-resident", slots, "--max-cpu-adapters", slots, "--max-batch-size", str(args.concurrency),
        "--dtype", args.dtype, "--log-level", "warning",
    ]


def _wait_healthy(process: subprocess.Popen, url: str, log_path: Path, timeout_s: float = 600) -> float:
    started = time.monotonic()
    while True:
        if process.poll() is not None:
            raise SystemExit(f"server exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > timeout_s:
            raise SystemExit(f"server not healthy after {timeout_s} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def measure_system(system: str, base: str, base_dir: Path, adapters: dict[str, Path], args: argparse.Namespace) -> dict:
    import openai

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = args.out_dir / f"vllm_serve_bench.{_SLUGS[system]}.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    if system == "vLLM's own server":  # as users get it: none of adapterhub's vLLM plugins (an empty allow-list)
        env["VLLM_PLUGINS"] = ""
    with log_path.open("w") as log:
        process = subprocess.Popen(_command(system, base, base_dir, adapters, port, args), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        startup_s = _wait_healthy(process, url, log_path)
        settings = BenchSettings(
            url=url, api_key=None, adapter_counts=tuple(args.adapter_counts), concurrency=args.concurrency,
            requests_per_level=args.requests, max_tokens=args.max_tokens, rank=args.rank, naive=False, hot_loads=0,
            out_dir=args.out_dir,
        )
        names = list(adapters)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
        levels: list[LevelResult] = []

        async def run() -> None:
            warm = BenchSettings(**{**asdict(settings), "requests_per_level": max(args.adapter_counts) * 2, "max_tokens": 2})
            await _run_level(client, names, warm)  # every adapter loaded and every code path warmed, untimed
            wall, samples, errors = await _run_level(client, [base], settings)
            levels.append(_level(system, 0, wall, samples, errors))
            for count in args.adapter_counts:
                wall, samples, errors = await _run_level(client, names[:count], settings)
                levels.append(_level(system, count, wall, samples, errors))

        asyncio.run(run())
        return {"system": system, "startup_s": round(startup_s, 1), "levels": [asdict(level) for level in levels]}
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _plot(results: list[dict], path: Path, title: str) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--adapter-counts", type=lambda text: [int(c) for c in text.split(",")], default=[1, 4, 16])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of: " + ", ".join(SYSTEMS))
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    from adapterhub.registry import Registry

    registry = Registry.open()
    base_record = registry.get_base_model(args.base)
    base_dir = Path(base_record.path)
    names = ensure_bench_adapters(registry, base_record.name, base_dir, max(args.adapter_counts), args.rank)
    adapters = {name: Path(registry.materialize(registry.get(name))) for name in names}

    results = []
    for system in [s.strip() for s in args.systems.split(",") if s.strip()]:
        if system not in SYSTEMS:
            raise SystemExit(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
        print(f"measuring {system} …", flush=True)
        results.append(measure_system(system, base_record.name, base_dir, adapters, args))

    by_system = {r["system"]: {lv["adapters"]: lv for lv in r["levels"]} for r in results}
    goals = {}
    ours, theirs = by_system.get("adapterhub vllm"), by_system.get("vLLM's own server")
    if ours and theirs:
        for count, level in theirs.items():
            if count in ours and level["tokens_per_s"]:
                key = "base" if count == 0 else f"{count}_adapters"
                goals[f"{key}_throughput_vs_vllm"] = round(ours[count]["tokens_per_s"] / level["tokens_per_s"], 3)
                goals[f"{key}_p50_latency_vs_vllm"] = round(ours[count]["latency_p50_ms"] / level["latency_p50_ms"], 3)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.base} · {args.dtype} · {args.concurrency} clients · {args.max_tokens} tokens · rank-{args.rank} LoRAs")
    for column in ("system", "adapters", "tok/s", "lat p50 ms", "lat p99 ms", "TTFT p50 ms", "errors"):
        table.add_column(column, justify="left" if column == "system" else "right")
    for result in results:
        for lv in result["levels"]:
            table.add_row(result["system"], "base" if lv["adapters"] == 0 else str(lv["adapters"]), f"{lv['tokens_per_s']:.1f}",
                          f"{lv['latency_p50_ms']:.0f}", f"{lv['latency_p99_ms']:.0f}", f"{lv['ttft_p50_ms']:.0f}", str(lv["errors"]))
    console = Console(width=140)
    console.print(table)
    console.print(f"adapterhub vllm / vLLM's own server (throughput: higher is better; latency: lower): {json.dumps(goals)}")
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": results, "goals": goals}
    json_path = args.out_dir / "vllm_serve_bench.json"
    json_path.write_text(json.dumps(report, indent=2))
    _plot(results, args.out_dir / "vllm_serve_bench.png", table.title)
    print(f"wrote {json_path} and {args.out_dir / 'vllm_serve_bench.png'}")


if __name__ == "__main__":
    main()

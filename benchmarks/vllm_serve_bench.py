"""Side by side in one run: `adapterhub serve --backend vllm`, vLLM's own OpenAI server given the
same adapters (`--lora-modules`), and `adapterhub serve --backend torch` — on one base with the
same rank-`rank` LoRAs, the same prompts and the same concurrency.

The same as `adapterhub bench backends` (adapterhub/serving/bench_backends.py does the work):
each server is started as its own process in turn, warmed, then measured with the official
`openai` client at base-only and 1/4/16 distinct adapters in flight. The goal of issue 13:
adapterhub's front on vLLM costs at most 10% of vLLM's own server's throughput and p50 latency
at every level.

Usage:
    ADAPTERHUB_HOME=/tmp/bench-home python benchmarks/vllm_serve_bench.py [--base smollm2] [--dtype bf16]
The base must be registered (`adapterhub models add smollm2`); benchmark LoRAs are registered
as `bench-lora-<i>` (tag `bench`) when missing. Writes benchmarks/results/vllm_serve_bench.json
and .png, and prints a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adapterhub.serving.bench_backends import SYSTEMS, BackendsSettings, run_backends_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--adapter-counts", type=lambda text: tuple(int(c) for c in text.split(",")), default=(1, 4, 16))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="times each system is measured, the order reversed every other round")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of: " + ", ".join(SYSTEMS))
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    run_backends_benchmark(BackendsSettings(
        base=args.base, systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()), dtype=args.dtype,
        adapter_counts=args.adapter_counts, concurrency=args.concurrency, requests_per_level=args.requests,
        max_tokens=args.max_tokens, rank=args.rank, kv_cache_gib=args.kv_cache_gib, rounds=args.rounds, out_dir=args.out_dir,
    ))


if __name__ == "__main__":
    main()

"""Merge methods on one module, in weight space: time, output rank at 99% energy, retention.

Why: `merge_bench.py` part 2 judges methods by what eight trained adapters still do, which
needs SmolLM2 and trained LoRAs (tens of minutes on a CPU). This script answers the cheaper
questions first, for every registered method on SmolLM2-135M-shaped modules and synthetic
rank-16 LoRA updates that partly share their input directions (so tasks interfere, as trained
adapters on one base do):

- seconds per module (median of 3), to see what the SVD-based methods cost;
- the LoRA rank the merged ΔW needs to keep 99% of its energy (the default output rank,
  `adapterhub.merge.lowrank.rank_for_energy`), i.e. how large the written adapter gets;
- per task, ⟨ΔW_merged, ΔWᵢ⟩ / ‖ΔWᵢ‖²: how much of task i's own update the merge keeps along
  it (1 = all of it, as the plain sum does for orthogonal tasks). A weight-space proxy, not
  accuracy: min and mean over tasks are printed.

    .venv/bin/python benchmarks/merge_methods_bench.py [--tasks 2 8] [--out DIR]

Writes merge_methods_bench.json (and prints the table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from adapterhub.merge.lowrank import rank_for_energy
from adapterhub.merge.methods import GlobalParams, InputParams, get_method, method_names

# SmolLM2-135M: hidden 576, 3 KV heads × 64, MLP 1536.
SHAPES = {"q_proj": (576, 576), "v_proj": (192, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
RANK = 16
SHARED_DIRECTIONS = 8  # of each task's 16 input directions, this many come from a pool all tasks draw on


def task_updates(shape: tuple[int, int], count: int, seed: int) -> list[torch.Tensor]:
    """`count` rank-16 ΔW = B·A whose A rows partly come from one shared pool (interference)."""
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    pool = torch.randn(2 * SHARED_DIRECTIONS, in_features, generator=generator)
    updates = []
    for _ in range(count):
        shared = pool[torch.randperm(pool.shape[0], generator=generator)[:SHARED_DIRECTIONS]]
        own = torch.randn(RANK - SHARED_DIRECTIONS, in_features, generator=generator)
        a = torch.cat([shared, own]) / in_features**0.5
        b = torch.randn(out_features, RANK, generator=generator) * 0.05
        updates.append(b @ a)
    return updates


def measure(name: str, updates: list[torch.Tensor], seed: int) -> dict[str, Any]:
    method = get_method(name)
    params = [InputParams(weight=1.0, density=0.5) for _ in updates]
    base = torch.randn(updates[0].shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.02
    times, merged = [], None
    for _ in range(3):
        start = time.perf_counter()
        merged = method.function(
            updates, base if method.needs_base else None, params=params, global_params=GlobalParams(seed=seed),
            generator=torch.Generator().manual_seed(seed),
        )
        times.append(time.perf_counter() - start)
    assert merged is not None
    retention = [float((merged * u).sum() / (u * u).sum()) for u in updates]
    return {
        "seconds": statistics.median(times),
        "rank_99": rank_for_energy(torch.linalg.svdvals(merged.double()), 0.99),
        "retention_min": min(retention),
        "retention_mean": statistics.fmean(retention),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, Any] = {"rank_per_input": RANK, "shared_directions": SHARED_DIRECTIONS, "runs": []}
    for count in args.tasks:
        for module, shape in SHAPES.items():
            updates = task_updates(shape, count, args.seed)
            for name in method_names():
                method = get_method(name)
                if count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
                    continue
                row = {"tasks": count, "module": module, "shape": list(shape), "method": name, **measure(name, updates, args.seed)}
                results["runs"].append(row)
    print(f"{'tasks':>5} {'method':<18}{'ms/module':>10}{'rank@99%':>10}{'keep min':>10}{'keep mean':>10}   (mean over {', '.join(SHAPES)})")
    for count in args.tasks:
        for name in method_names():
            rows = [r for r in results["runs"] if r["tasks"] == count and r["method"] == name]
            if not rows:
                continue
            print(
                f"{count:>5} {name:<18}{1000 * statistics.fmean(r['seconds'] for r in rows):>10.1f}"
                f"{statistics.fmean(r['rank_99'] for r in rows):>10.1f}{min(r['retention_min'] for r in rows):>10.2f}"
                f"{statistics.fmean(r['retention_mean'] for r in rows):>10.2f}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "merge_methods_bench.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(f"wrote {args.out / 'merge_methods_bench.json'}")


if __name__ == "__main__":
    main()

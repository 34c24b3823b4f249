"""Where the time of a mixed-adapter decode step goes: `torch.profiler` (CPU) of decode steps of
one batch, every row on its own LoRA, against the same batch on the base alone.

The model is wrapped by the engine's own `SlotTable` (the gathered-slot LoRA math of
`serving/backends/lora_slots.py`, slots in fp32 on a CPU as the engine keeps them), so the
profile is of the code the server runs, without the scheduler around it. Decode steps reuse the
batch's KV cache and keep their gathers, as the engine does.

Usage:
    python benchmarks/serve_engine_profile.py --random-from DIR --dtypes fp32,bf16 --threads 1,2
Prints, per dtype x threads, the step time base vs mixed (median of `--repeats`), their ratio,
and the operators whose self CPU time grows most; writes benchmarks/results/serve_engine_profile.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adapterhub.serving.backends.lora_slots import SlotTable, read_adapter_dir
from adapterhub.serving.bench import PROMPTS, _linear_shapes, _write_random_lora

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def decode_steps(model: torch.nn.Module, slots: SlotTable, batch: dict, rows: list[int] | None, steps: int, profiler: Any = None) -> float:
    """Seconds per decode step (after a prefill, not counted) of `batch` with `rows`' slots (None:
    base only); `profiler` (a `torch.profiler.profile`) records the decode steps only."""
    slots.forget_gathers()
    slots.context.set_rows(rows, keep_gathers=False)
    out = model(**batch, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    mask = batch["attention_mask"]
    slots.context.set_rows(rows, keep_gathers=True)
    if profiler is not None:
        profiler.start()
    started = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    elapsed = (time.perf_counter() - started) / steps
    if profiler is not None:
        profiler.stop()
    slots.context.set_rows(None)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-from", type=Path, required=True, help="a config.json + tokenizer folder (SmolLM2's)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_engine_profile.json"))
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from serve_engine_bench import build_random_model  # this folder is on sys.path when run as a script

    scratch = Path(tempfile.mkdtemp(prefix="engine-profile-"))
    tokenizer = AutoTokenizer.from_pretrained(args.random_from)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer([PROMPTS[i % len(PROMPTS)] for i in range(args.rows)], return_tensors="pt", padding=True)
    report: dict = {"model": str(args.random_from), "rows": args.rows, "rank": args.rank, "steps": args.steps, "cells": []}
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        model_dir = build_random_model(args.random_from, scratch / f"model-{dtype_name}", dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        slots = SlotTable(model, max_slots=args.rows + 1, dtype=torch.float32)  # fp32 slots on a CPU, as the engine
        shapes = _linear_shapes(model_dir, __import__("safetensors").safe_open)
        for i in range(args.rows):
            lora = _write_random_lora(scratch / f"lora-{i}", shapes, args.rank, seed=i)
            slots.write(i + 1, read_adapter_dir(lora, slots.base_layers))
        mixed_rows = list(range(1, args.rows + 1))
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            with torch.no_grad():
                decode_steps(model, slots, batch, mixed_rows, 2)  # warm-up
                base, mixed = [], []
                for _ in range(args.repeats):  # interleaved: load from other processes hits both alike
                    base.append(decode_steps(model, slots, batch, None, args.steps))
                    mixed.append(decode_steps(model, slots, batch, mixed_rows, args.steps))
                tables = {}
                for label, rows in (("base", None), ("mixed", mixed_rows)):
                    prof = profile(activities=[ProfilerActivity.CPU])
                    decode_steps(model, slots, batch, rows, args.steps, prof)
                    tables[label] = {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}
            grown = sorted(
                ((key, (tables["mixed"].get(key, (0, 0))[0] - tables["base"].get(key, (0, 0))[0]) / args.steps / 1000,
                  tables["mixed"].get(key, (0, 0))[1] // args.steps) for key in set(tables["mixed"]) | set(tables["base"])),
                key=lambda item: -item[1])[: args.top]
            total_base = sum(v[0] for v in tables["base"].values()) / args.steps / 1000
            total_mixed = sum(v[0] for v in tables["mixed"].values()) / args.steps / 1000
            cell = {"dtype": dtype_name, "threads": threads, "base_step_ms": statistics.median(base) * 1000,
                    "mixed_step_ms": statistics.median(mixed) * 1000,
                    "profiled_self_cpu_ms": {"base": total_base, "mixed": total_mixed},
                    "extra_ms_per_step_by_op": [{"op": k, "extra_ms": round(ms, 3), "calls_per_step": n} for k, ms, n in grown]}
            cell["throughput_ratio"] = cell["base_step_ms"] / cell["mixed_step_ms"]
            report["cells"].append(cell)
            print(f"\n{dtype_name} threads={threads}: step base {cell['base_step_ms']:.1f} ms, mixed {cell['mixed_step_ms']:.1f} ms, "
                  f"ratio {cell['throughput_ratio']:.3f}; profiled self CPU {total_base:.1f} -> {total_mixed:.1f} ms/step")
            print(f"  {'op':<32} {'extra ms/step':>13} {'calls/step':>10}")
            for k, ms, n in grown:
                print(f"  {k:<32} {ms:>13.3f} {n:>10}")
        del model, slots
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

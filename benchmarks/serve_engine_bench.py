"""In-process benchmark of the embedded torch engine (no HTTP): mixed-adapter batching vs
base-only, vs PEFT's own mixed batches (`adapter_names`), vs naive `set_adapter` per group.

Also checks correctness on the device it runs on: the engine's greedy output of every request
inside a mixed batch must equal PEFT's greedy output of that request alone.

One run measures the matrix: every dtype of `--dtypes` x every `--clients` count (concurrent
requests) x base-only and each `--counts` level of distinct adapters, each cell as tokens/s and
its ratio to base-only of the same dtype, client count and system. `--vllm` adds vLLM's engine
(`VllmEngine`) as a system, driven through the same `Backend.generate` as the torch engine with
the same adapters and prompts (one engine start per dtype, ~1 min each on a CPU).

Usage (CPU or CUDA):
    python benchmarks/serve_engine_bench.py --model-dir DIR
    python benchmarks/serve_engine_bench.py --random-from DIR   # DIR: config.json + tokenizer;
        # builds a random-weight model of that shape (throughput does not depend on the weights)
    python benchmarks/serve_engine_bench.py --random-from DIR --quick --no-peft   # smoke run
    python benchmarks/serve_engine_bench.py --random-from DIR --dtypes fp32,bf16 --clients 16,32 --vllm

Prints a table and writes benchmarks/results/serve_engine_bench.json and .png (ratio to base-only
vs adapters, a line per dtype x clients x system). `adapterhub bench serve`
is the end-to-end (HTTP) benchmark; this one isolates the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adapterhub.serving.backends.base import AdapterSpec, Backend, SamplingParams
from adapterhub.serving.backends.torch_engine import EngineConfig, TorchEngine
from adapterhub.serving.bench import PROMPTS, _linear_shapes, _write_random_lora


def build_random_model(config_dir: Path, out_dir: Path, dtype: torch.dtype) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
        if (config_dir / name).exists():
            shutil.copy(config_dir / name, out_dir / name)
    return out_dir


def engine_level(engine: Backend, specs: list[AdapterSpec | None], requests: int, clients: int, max_tokens: int) -> tuple[float, list[str]]:
    """Output tokens/s of `requests` greedy requests from `clients` concurrent clients, request i
    on `specs[i % len(specs)]` (None: the base), and each request's text. Any `Backend` (the torch
    engine, the vLLM engine) is driven the same way, through `Backend.generate`."""
    tokenizer = engine.tokenizer

    async def one(index: int) -> tuple[int, str]:
        # Exactly max_tokens tokens with end-of-sequence masked until then: what transformers'
        # `min_new_tokens` does on the PEFT side, so the outputs can be compared. (`ignore_eos`
        # lets end-of-sequence be chosen and goes on, which diverges wherever greedy picks it.)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0, min_tokens=max_tokens)
        count, pieces = 0, []
        async for chunk in engine.generate(tokenizer(PROMPTS[index % len(PROMPTS)]).input_ids, sampling, specs[index % len(specs)]):
            count += len(chunk.token_ids)
            pieces.append(chunk.text)
        return count, "".join(pieces)

    async def clients_run(indices: list[int]) -> list[tuple[int, str]]:
        queue = list(reversed(indices))
        results: dict[int, tuple[int, str]] = {}

        async def client() -> None:
            while queue:
                index = queue.pop()
                results[index] = await one(index)

        await asyncio.gather(*(client() for _ in range(min(clients, len(indices)))))
        return [results[i] for i in indices]

    async def run() -> tuple[float, list[str]]:
        await clients_run(list(range(min(requests, max(len(specs) * 2, clients)))))  # warm slots and code paths
        started = time.perf_counter()
        results = await clients_run(list(range(requests)))
        if getattr(engine, "device", None) is not None and engine.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        return sum(c for c, _ in results) / elapsed, [t for _, t in results]

    return asyncio.run(run())


def peft_levels(model_dir: Path, adapter_dirs: dict[str, Path], counts: list[int], args: argparse.Namespace, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """PEFT's own mixed batches (`adapter_names`) and naive `set_adapter` per group, `batch` rows at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    names = list(adapter_dirs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model = PeftModel.from_pretrained(model, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    model.eval()

    def generate(prompts: list[str], **kwargs: object) -> int:
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, **kwargs)
        return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)

    def timed(fn) -> float:
        fn()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        tokens = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return tokens / (time.perf_counter() - started)

    results: dict[str, dict[int, float]] = {"peft_mixed_adapter_names": {}, "naive_set_adapter": {}}
    for count in counts:
        def mixed() -> int:
            tokens = 0
            for start in range(0, args.requests, batch):
                idx = list(range(start, min(start + batch, args.requests)))
                tokens += generate([PROMPTS[i % len(PROMPTS)] for i in idx], adapter_names=[names[i % count] for i in idx])
            return tokens

        def naive() -> int:
            tokens = 0
            for start in range(0, args.requests, batch):
                groups: dict[str, list[int]] = {}
                for i in range(start, min(start + batch, args.requests)):
                    groups.setdefault(names[i % count], []).append(i)
                for name, idx in groups.items():
                    model.set_adapter(name)
                    tokens += generate([PROMPTS[i % len(PROMPTS)] for i in idx])
            return tokens

        results["peft_mixed_adapter_names"][count] = timed(mixed)
        results["naive_set_adapter"][count] = timed(naive)
    return results


def peft_greedy_alone(model_dir: Path, adapter_dir: Path | None, prompt: str, max_tokens: int, device: torch.device, dtype: torch.dtype) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = torch.tensor([tokenizer(prompt).input_ids], device=device)
    with torch.no_grad():
        out = model.eval().generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def measure_backend(engine: Backend, specs: dict[str, AdapterSpec], counts: list[int], clients_list: list[int], args: argparse.Namespace) -> dict:
    """`{clients: {"base": tok/s, count: tok/s, ...}}` and the texts of the largest level at the most clients.

    Each figure is the median of `--repeats` runs, the levels interleaved (base, 1, 4, ..., base,
    1, 4, ...): a run is a few seconds, so one run measures the machine's moment as much as the
    engine, and interleaving makes a slow moment hit every level alike. The runs' spread is kept
    (`"runs"`) so a reader can see how much a ratio can be trusted. `"paired_ratio"` is the
    median of each repeat's own ratio (a level's run over the base run just before it), which a
    drift of the machine between repeats does not move.
    """
    cells: dict[int, dict] = {}
    spread: dict[int, dict] = {}
    paired: dict[int, dict] = {}
    texts: list[str] = []
    levels: list[tuple[str | int, list[AdapterSpec | None]]] = [("base", [None])]
    levels += [(count, [specs[f"lora-{i}"] for i in range(count)]) for count in counts]
    for clients in clients_list:
        runs: dict[str | int, list[float]] = {label: [] for label, _ in levels}
        for _ in range(args.repeats):
            for label, level_specs in levels:
                tps, level_texts = engine_level(engine, level_specs, args.requests, clients, args.max_tokens)
                runs[label].append(tps)
                if label == max(counts) and clients == max(clients_list):
                    texts = level_texts
        cells[clients] = {label: statistics.median(values) for label, values in runs.items()}
        spread[clients] = {str(label): [round(v, 2) for v in values] for label, values in runs.items()}
        paired[clients] = {
            label: statistics.median(value / base for value, base in zip(values, runs["base"], strict=True))
            for label, values in runs.items() if label != "base"
        }
    return {"tokens_per_s": cells, "runs": spread, "paired_ratio": paired, "texts": texts}


def run_vllm(model_dir: Path, specs: dict[str, AdapterSpec], counts: list[int], clients_list: list[int], args: argparse.Namespace, dtype_name: str) -> dict:
    from adapterhub.serving.backends.vllm_engine import VllmEngine

    engine = VllmEngine(model_dir, base_name="base", max_resident=max(counts), max_cpu_adapters=max(counts), max_lora_rank=args.rank,
                        max_num_seqs=max(clients_list), dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype_name],
                        kv_cache_gib=2)
    asyncio.run(engine.start())
    try:
        return measure_backend(engine, specs, counts, clients_list, args)
    finally:
        asyncio.run(engine.shutdown())


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.8))
    for dtype_name, by_system in report["results"].items():
        for system, result in by_system.items():
            for clients, cell in result["tokens_per_s"].items():
                if "base" not in cell:  # PEFT's rows have no base-only level of their own
                    continue
                counts = [c for c in cell if c != "base"]
                axis.plot(counts, [cell[c] / cell["base"] for c in counts], marker="o",
                          linestyle="-" if system == "torch engine" else "--", label=f"{system} {dtype_name} {clients} clients")
    axis.axhline(report["floor"], color="gray", linestyle=":", label=f"LoRA FLOPs floor ~{report['floor']}")
    axis.axhline(0.85, color="red", linestyle=":", label="goal 0.85")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("distinct adapters in flight")
    axis.set_ylabel("throughput / base-only (same dtype, clients, system)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    axis.set_title(f"{report['model']} · rank {report['rank']} q/k/v/o · {report['max_tokens']} tokens/request · {report['device']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _print_table(report: dict, counts: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"serve_engine_bench — {report['model']} on {report['device']}, rank {report['rank']}, "
                        f"{report['requests']} requests x {report['max_tokens']} tokens (ratio: vs base-only of the same dtype, clients, system)")
    for column in ("dtype", "clients", "system", "base tok/s", *(f"{c} adapters" for c in counts)):
        table.add_column(column, justify="left" if column in ("dtype", "system") else "right")
    for dtype_name, by_system in report["results"].items():
        for system, result in by_system.items():
            for clients, cell in result["tokens_per_s"].items():
                base = cell.get("base")
                paired = result.get("paired_ratio", {}).get(clients, {})
                table.add_row(dtype_name, str(clients), system, f"{base:.1f}" if base else "-",
                              *(f"{cell[c]:.1f} ({cell[c] / base:.2f}x, paired {paired[c]:.2f}x)" if base and c in paired
                                else f"{cell[c]:.1f} ({cell[c] / base:.2f}x)" if base else f"{cell[c]:.1f}" for c in counts))
    Console(width=200).print(table)
    for dtype_name, check in report["greedy_matches_peft_alone"].items():
        print(f"{dtype_name}: greedy outputs in mixed batches equal PEFT alone: {check}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path)
    source.add_argument("--random-from", type=Path)
    parser.add_argument("--counts", default="1,4,16,64", help="distinct adapters in flight per level")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma list of {', '.join(DTYPES)}")
    parser.add_argument("--clients", default="16,32", help="concurrent clients (requests in flight), comma list")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--vllm", action="store_true", help="also drive vLLM's engine (VllmEngine) through the same Backend interface")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's adapter_names and naive set_adapter rows")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 requests x 8 tokens, counts 1,16, clients 16")
    parser.add_argument("--repeats", type=int, default=3, help="runs per level, interleaved; the median is reported")
    parser.add_argument("--check", type=int, default=8, help="requests checked against PEFT greedy alone")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_engine_bench.json"))
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_tokens, args.check, args.repeats = 16, 8, 2, 1
        args.counts, args.clients = "1,16", "16"

    from adapterhub.models import default_device

    device = torch.device(args.device or default_device())
    counts, clients_list = _ints(args.counts), _ints(args.clients)
    dtype_names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtype_names if d not in DTYPES]
    if unknown or not counts or not clients_list or min(counts + clients_list) < 1:
        parser.error(f"--dtypes takes {', '.join(DTYPES)} (got {args.dtypes}); --counts and --clients positive integers")
    scratch = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    report: dict = {"device": str(device), "model": str(args.model_dir or args.random_from), "rank": args.rank,
                    "clients": clients_list, "counts": counts, "requests": args.requests, "max_tokens": args.max_tokens,
                    "torch_threads": torch.get_num_threads(), "floor": 0.94, "results": {}, "greedy_matches_peft_alone": {}}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    try:
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            if args.model_dir:
                model_dir = args.model_dir
            else:
                model_dir = build_random_model(args.random_from, scratch / f"model-{dtype_name}", dtype)
            shapes = _linear_shapes(model_dir, __import__("safetensors").safe_open)
            adapter_dirs = {f"lora-{i}": _write_random_lora(scratch / f"lora-{i}", shapes, args.rank, seed=i) for i in range(max(counts))}
            specs = {name: AdapterSpec(key=name, locate=lambda d=path: d) for name, path in adapter_dirs.items()}
            by_system: dict[str, dict] = {}
            engine = TorchEngine(model_dir, base_name="base", config=EngineConfig(
                max_resident=max(counts), max_cpu_adapters=max(counts), max_batch_size=max(clients_list), device=str(device), dtype=dtype))
            asyncio.run(engine.start())
            try:
                by_system["torch engine"] = measure_backend(engine, specs, counts, clients_list, args)
            finally:
                asyncio.run(engine.shutdown())
            del engine
            if args.vllm:
                try:
                    by_system["vllm engine"] = run_vllm(model_dir, specs, counts, clients_list, args, dtype_name)
                except Exception as exc:  # vLLM's engine core can die (memory on a shared host): keep the torch figures
                    report.setdefault("vllm_errors", {})[dtype_name] = repr(exc)
                    print(f"vLLM engine ({dtype_name}) failed: {exc!r}; its column is left out")
            if not args.no_peft:
                peft = peft_levels(model_dir, adapter_dirs, counts, args, max(clients_list), device, dtype)
                for label, levels in peft.items():
                    by_system[label] = {"tokens_per_s": {max(clients_list): dict(levels)}, "texts": []}
            # Correctness on this device: requests of the largest mixed level vs PEFT greedy alone.
            texts = by_system["torch engine"]["texts"]
            checked = min(args.check, args.requests)
            matches = sum(
                peft_greedy_alone(model_dir, adapter_dirs[f"lora-{i % max(counts)}"], PROMPTS[i % len(PROMPTS)], args.max_tokens, device, dtype) == texts[i]
                for i in range(checked))
            report["greedy_matches_peft_alone"][dtype_name] = f"{matches}/{checked}"
            report["results"][dtype_name] = {
                system: {key: r[key] for key in ("tokens_per_s", "runs", "paired_ratio") if key in r} for system, r in by_system.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _print_table(report, counts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    png = args.out.with_suffix(".png")
    _plot(report, png)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()

"""In-process benchmark of the embedded torch engine (no HTTP): mixed-adapter batching vs
base-only, vs PEFT's own mixed batches (`adapter_names`), vs naive `set_adapter` per group.

Also checks correctness on the device it runs on: the engine's greedy output of every request
inside a mixed batch must equal PEFT's greedy output of that request alone.

Usage (CPU or CUDA):
    python benchmarks/serve_engine_bench.py --model-dir DIR
    python benchmarks/serve_engine_bench.py --random-from DIR   # DIR: config.json + tokenizer;
        # builds a random-weight model of that shape (throughput does not depend on the weights)

Prints a table and writes benchmarks/results/serve_engine_bench.json. `adapterhub bench serve`
is the end-to-end (HTTP) benchmark; this one isolates the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from adapterhub.serving.backends.base import AdapterSpec, SamplingParams
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


def engine_level(engine: TorchEngine, specs: list[AdapterSpec | None], requests: int, max_tokens: int) -> tuple[float, list[str]]:
    tokenizer = engine.tokenizer

    async def one(index: int) -> tuple[int, str]:
        # Exactly max_tokens tokens with end-of-sequence masked until then: what transformers'
        # `min_new_tokens` does on the PEFT side, so the outputs can be compared. (`ignore_eos`
        # lets end-of-sequence be chosen and goes on, which diverges wherever greedy picks it.)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0, min_tokens=max_tokens)
        count, pieces = 0, []
        async for chunk in engine.generate(tokenizer(PROMPTS[index % len(PROMPTS)]).input_ids, sampling, specs[index % len(specs)]):
            count += 1
            pieces.append(chunk.text)
        return count, "".join(pieces)

    async def run() -> tuple[float, list[str]]:
        await asyncio.gather(*(one(i) for i in range(min(requests, len(specs) * 2))))  # warm slots and code paths
        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(requests)))
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        return sum(c for c, _ in results) / elapsed, [t for _, t in results]

    return asyncio.run(run())


def peft_levels(model_dir: Path, adapter_dirs: dict[str, Path], counts: list[int], args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
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
            for start in range(0, args.requests, args.batch):
                idx = list(range(start, min(start + args.batch, args.requests)))
                tokens += generate([PROMPTS[i % len(PROMPTS)] for i in idx], adapter_names=[names[i % count] for i in idx])
            return tokens

        def naive() -> int:
            tokens = 0
            for start in range(0, args.requests, args.batch):
                groups: dict[str, list[int]] = {}
                for i in range(start, min(start + args.batch, args.requests)):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path)
    source.add_argument("--random-from", type=Path)
    parser.add_argument("--counts", default="1,4,16,64")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="concurrency / batch size")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--check", type=int, default=8, help="requests checked against PEFT greedy alone")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_engine_bench.json"))
    args = parser.parse_args()

    from adapterhub.models import default_device, resolve_dtype

    device = torch.device(args.device or default_device())
    dtype = resolve_dtype(args.dtype, str(device))
    counts = [int(c) for c in args.counts.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    model_dir = args.model_dir or build_random_model(args.random_from, scratch / "model", dtype)
    shapes = _linear_shapes(model_dir, __import__("safetensors").safe_open)
    adapter_dirs = {f"lora-{i}": _write_random_lora(scratch / f"lora-{i}", shapes, args.rank, seed=i) for i in range(max(counts))}
    specs = {name: AdapterSpec(key=name, locate=lambda d=path: d) for name, path in adapter_dirs.items()}

    engine = TorchEngine(model_dir, base_name="base", config=EngineConfig(
        max_resident=max(counts), max_cpu_adapters=max(counts), max_batch_size=args.batch, device=str(device), dtype=dtype))
    asyncio.run(engine.start())
    report: dict = {"device": str(device), "dtype": str(dtype), "model": str(args.model_dir or args.random_from),
                    "rank": args.rank, "batch": args.batch, "requests": args.requests, "max_tokens": args.max_tokens}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    base_tps, _ = engine_level(engine, [None], args.requests, args.max_tokens)
    engine_tps = {}
    mixed_texts: dict[int, list[str]] = {}
    for count in counts:
        engine_tps[count], mixed_texts[count] = engine_level(engine, [specs[f"lora-{i}"] for i in range(count)], args.requests, args.max_tokens)
    asyncio.run(engine.shutdown())
    del engine
    peft = peft_levels(model_dir, adapter_dirs, counts, args, device, dtype)

    # Correctness on this device: requests of the largest mixed level vs PEFT greedy alone.
    top = max(counts)
    matches = 0
    for index in range(min(args.check, args.requests)):
        name = f"lora-{index % top}"
        expected = peft_greedy_alone(model_dir, adapter_dirs[name], PROMPTS[index % len(PROMPTS)], args.max_tokens, device, dtype)
        matches += expected == mixed_texts[top][index]
    report.update({
        "tokens_per_s": {"engine_base_only": base_tps, "engine_mixed": engine_tps, **peft},
        "greedy_matches_peft_alone": f"{matches}/{min(args.check, args.requests)}",
    })
    header = f"{'adapters':>8} {'engine tok/s':>13} {'vs base':>8} {'PEFT mixed':>11} {'naive swap':>11} {'vs naive':>9}"
    print(f"device {report['device']} {report.get('gpu', '')} dtype {dtype}; base-only engine: {base_tps:.1f} tok/s")
    print(header)
    for count in counts:
        naive = peft["naive_set_adapter"][count]
        print(f"{count:>8} {engine_tps[count]:>13.1f} {engine_tps[count] / base_tps:>8.2f} "
              f"{peft['peft_mixed_adapter_names'][count]:>11.1f} {naive:>11.1f} {engine_tps[count] / naive:>9.2f}")
    print(f"greedy outputs in mixed batches equal PEFT alone: {report['greedy_matches_peft_alone']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

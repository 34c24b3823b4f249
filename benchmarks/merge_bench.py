"""Merge benchmark: adapterhub's merge engine against mergekit and PEFT on SmolLM2-135M.

Part 1 — full models. Two full SmolLM2 variants (base + a rank-16 LoRA each, merged in with
PEFT's `merge_and_unload`) are merged with `task_arithmetic`, `ties` and `dare_ties` by
mergekit (`mergekit-yaml`, from its own virtual environment) and by adapterhub
(`merge(..., full_model=True)`), from the *same* YAML file. Each run is a separate process;
we report wall time, peak RSS (getrusage of the child), and for the deterministic methods
the max absolute difference of the outputs and the share of elements differing by > 1e-5.
`dare_ties` draws random masks; the two tools use different generators, so its outputs
are not comparable element-wise (reported, not judged).

Part 2 — adapter → adapter. Eight rank-16 LoRAs on q/k/v/o are merged into one adapter by
adapterhub (from disk to disk) and by PEFT's `add_weighted_adapter` (in memory, after the
adapters are loaded; loading is not timed). Quality is measured in weight space, per
module, against the method's definition on the exact ΔW = scale·B·A: the relative Frobenius
error of the merged ΔW (for the random DARE, against its expectation: the same merge
without the drop), and "retention" of each parent i, ⟨ΔW_merged, ΔWᵢ⟩ / ⟨ΔW_ref, ΔWᵢ⟩
(1.0 = the parent's direction kept as the exact merge keeps it). PEFT's non-SVD types merge
A and B separately, which shows up here as a large error.

By default the LoRAs are synthetic (seeded random, PEFT-style init for A, small random B),
because training sixteen adapters takes longer than the benchmark; pass `--adapters DIR...`
(at least two, rank 16 on q/k/v/o for part 2) to use trained ones.

Run:  .venv/bin/python benchmarks/merge_bench.py [--mergekit benchmarks/.venv-mergekit/bin/mergekit-yaml]
Writes benchmarks/results/merge_bench.json and merge_bench.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_WORK = Path("/tmp/adapterhub-merge-bench")
DEFAULT_MERGEKIT = REPO / "benchmarks" / ".venv-mergekit" / "bin" / "mergekit-yaml"
FULL_METHODS = ("task_arithmetic", "ties", "dare_ties")
DETERMINISTIC = ("task_arithmetic", "ties")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ATTENTION + ("gate_proj", "up_proj", "down_proj")

_MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "child = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
    "wall = time.perf_counter() - start\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'rc': child.returncode, 'wall_s': wall, 'peak_rss_kb': peak, 'stderr': child.stderr[-1500:]}))\n"
)


def measure(command: list[str]) -> dict[str, Any]:
    """Wall time and peak RSS of `command`, run as the only child of a fresh process."""
    completed = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True)
    if completed.returncode != 0 or not completed.stdout.strip():
        raise RuntimeError(f"measuring {command[:3]} failed: {completed.stderr[-2000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(command[:4])} … exited {result['rc']}: {result['stderr']}")
    return {"wall_s": result["wall_s"], "peak_rss_mb": result["peak_rss_kb"] / 1024}


# ---------------------------------------------------------------------------------------------
# Inputs


def prepare_base(work: Path, base: Path | None) -> Path:
    if base is not None:
        return base
    target = work / "smollm2"
    if not (target / "config.json").exists():
        from adapterhub.models import prepare_base_model

        print("preparing SmolLM2-135M from the packaged GGUF (once) …", flush=True)
        prepare_base_model(None, target)
    return target


def synthetic_lora(base_dir: Path, out_dir: Path, *, seed: int, targets: tuple[str, ...], rank: int = 16) -> Path:
    """A rank-`rank` LoRA with PEFT's A init and a small random B (a stand-in for a trained one)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from adapterhub.formats import base_model_spec

    if (out_dir / "adapter_model.safetensors").exists():
        return out_dir
    spec = base_model_spec(base_dir)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, shape in spec.module_shapes.items():
        if module.rsplit(".", 1)[-1] not in targets or len(shape) != 2:
            continue
        out_features, in_features = shape
        bound = 1 / math.sqrt(in_features)
        tensors[f"base_model.model.{module}.lora_A.weight"] = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    out_dir.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), task_type="CAUSAL_LM").save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def full_variant(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """base + the adapter's ΔW, merged by PEFT (independent of adapterhub's engine)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if (out_dir / "config.json").exists():
        return out_dir
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, out_dir / name)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Part 1: full models vs mergekit


def run_ours(recipe_path: Path, out_dir: Path) -> None:
    """Child-process entry: one full-model merge with adapterhub's engine."""
    from adapterhub.merge import MergeRecipe, merge

    merge(MergeRecipe.from_yaml(recipe_path), out_dir=out_dir, full_model=True)


def compare_models(ours: Path, theirs: Path) -> dict[str, Any]:
    from adapterhub.merge.io import LazyTensorReader

    a, b = LazyTensorReader(ours), LazyTensorReader(theirs)
    missing = sorted(set(a.names()) ^ set(b.names()))
    max_diff, differing, total = 0.0, 0, 0
    for name in a.names():
        if name not in b:
            continue
        x, y = a.get_float(name), b.get_float(name)
        diff = (x - y).abs()
        max_diff = max(max_diff, float(diff.max()))
        differing += int((diff > 1e-5).sum())
        total += diff.numel()
        del x, y, diff
    return {"max_abs_diff": max_diff, "share_differing_gt_1e-5": differing / max(total, 1), "tensor_name_mismatches": missing}


def part_full(base: Path, variants: list[Path], work: Path, mergekit: Path, seed: int) -> list[dict[str, Any]]:
    rows = []
    for method in FULL_METHODS:
        recipe = work / f"full-{method}.yml"
        models = "".join(f"  - model: {v}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for v in variants)
        recipe.write_text(f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}parameters:\n  seed: {seed}\ndtype: float32\n")
        ours_out, theirs_out = work / f"out-ours-{method}", work / f"out-mergekit-{method}"
        for path in (ours_out, theirs_out):
            shutil.rmtree(path, ignore_errors=True)
        print(f"[full] {method}: adapterhub …", flush=True)
        ours = measure([sys.executable, __file__, "--_run-ours", str(recipe), str(ours_out)])
        print(f"[full] {method}: mergekit …", flush=True)
        theirs = measure([str(mergekit), str(recipe), str(theirs_out), "--random-seed", str(seed), "--quiet"])
        comparison = compare_models(ours_out, theirs_out)
        rows.append({
            "method": method,
            "adapterhub": ours,
            "mergekit": theirs,
            "wall_ratio": ours["wall_s"] / theirs["wall_s"],
            "rss_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
            "deterministic": method in DETERMINISTIC,
            **comparison,
        })
        for path in (ours_out, theirs_out):
            shutil.rmtree(path, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Part 2: 8 adapters, adapterhub vs PEFT add_weighted_adapter

# (label, adapterhub method, PEFT combination types, weight per input, density, output rank)
ADAPTER_CASES = (
    ("linear (weights 1/8)", "task_arithmetic", ("cat", "linear", "svd"), 0.125, 1.0, None),
    ("ties (density 0.5)", "ties", ("ties_svd", "ties"), 1.0, 0.5, 16),
    ("dare_linear (density 0.5)", "dare_linear", ("dare_linear_svd", "dare_linear"), 0.125, 0.5, 16),
)


def _lora_deltas(adapter_dir: Path) -> dict[str, Any]:
    from adapterhub.merge.task_vectors import InputModel

    model = InputModel.open(adapter_dir)
    return {name: model.task_vector(name, lambda n: None) for name in sorted(model.touched_weights())}  # type: ignore[arg-type,return-value]


def _peft_deltas(peft_model: Any, adapter_name: str) -> dict[str, Any]:
    deltas = {}
    for module_name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and adapter_name in module.lora_A:
            deltas[f"{module_name}.weight"] = module.get_delta_weight(adapter_name).detach().float()
    return deltas


def _quality(merged: dict[str, Any], reference: dict[str, Any], parents: list[dict[str, Any]]) -> dict[str, float]:
    import torch

    error_num = sum(float((merged[n] - reference[n]).norm() ** 2) for n in reference)
    error_den = sum(float(reference[n].norm() ** 2) for n in reference)
    retention = []
    for parent in parents:
        kept = sum(float(torch.sum(merged[n] * parent[n])) for n in parent)
        ideal = sum(float(torch.sum(reference[n] * parent[n])) for n in parent)
        retention.append(kept / ideal if ideal else float("nan"))
    return {
        "relative_error": math.sqrt(error_num / error_den),
        "retention_min": min(retention),
        "retention_mean": sum(retention) / len(retention),
    }


def part_adapters(base: Path, adapters: list[Path], work: Path, seed: int) -> list[dict[str, Any]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapterhub.merge import MergeRecipe, get_method, merge
    from adapterhub.merge.methods import GlobalParams, InputParams

    parents = [_lora_deltas(a) for a in adapters]
    names = sorted(parents[0])
    rows = []
    print(f"[adapters] loading base + {len(adapters)} adapters into PEFT …", flush=True)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[0], adapter_name="p0")
    for i, adapter in enumerate(adapters[1:], 1):
        peft_model.load_adapter(adapter, adapter_name=f"p{i}")
    for label, method, peft_types, weight, density, rank in ADAPTER_CASES:
        # Random methods are judged against their expectation, the merge without the drop.
        reference_method = get_method(method)
        if reference_method.random:
            reference_method = get_method("task_arithmetic")
        params = [InputParams(weight=weight, density=1.0 if reference_method.name == "task_arithmetic" else density)] * len(adapters)
        reference = {}
        for name in names:
            vectors = [p.get(name, torch.zeros_like(parents[0][name])) for p in parents]
            reference[name] = reference_method.function(
                vectors, None, params=params, global_params=GlobalParams(seed=seed), generator=torch.Generator().manual_seed(seed)
            )
        recipe = MergeRecipe.from_dict({
            "merge_method": method,
            "models": [{"model": str(a), "parameters": {"weight": weight, "density": density}} for a in adapters],
            "parameters": {"seed": seed},
        })
        out = work / f"adapters-{method}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"[adapters] {label}: adapterhub …", flush=True)
        start = time.perf_counter()
        result = merge(recipe, base_dir=base, out_dir=out, rank=rank)
        ours_time = time.perf_counter() - start
        rows.append({
            "case": label, "tool": "adapterhub", "type": method + (" (exact concat)" if result.exact else f" (SVD r{rank})"),
            "seconds": ours_time, "rank": result.rank, "reported_max_error": result.max_relative_error,
            **_quality(_lora_deltas(out), reference, parents),
        })
        for combination in peft_types:
            adapter_name = f"m_{combination}"
            kwargs: dict[str, Any] = {"combination_type": combination}
            if "svd" in combination:
                kwargs["svd_rank"] = rank or 16
            if combination.startswith(("ties", "dare")):
                kwargs["density"] = density
            print(f"[adapters] {label}: PEFT {combination} …", flush=True)
            torch.manual_seed(seed)
            start = time.perf_counter()
            peft_model.add_weighted_adapter([f"p{i}" for i in range(len(adapters))], [weight] * len(adapters), adapter_name, **kwargs)
            seconds = time.perf_counter() - start
            merged = _peft_deltas(peft_model, adapter_name)
            rows.append({
                "case": label, "tool": "peft", "type": combination, "seconds": seconds,
                "rank": int(peft_model.peft_config[adapter_name].r),
                "reported_max_error": None, **_quality(merged, reference, parents),
            })
            peft_model.delete_adapter(adapter_name)
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def print_tables(full_rows: list[dict[str, Any]], adapter_rows: list[dict[str, Any]]) -> None:
    if full_rows:
        print("\nFull-model merges of two SmolLM2-135M variants (fp32), adapterhub vs mergekit 0.1.5")
        print(f"{'method':<16}{'ours s':>9}{'mk s':>9}{'ratio':>7}{'ours MB':>10}{'mk MB':>9}{'ratio':>7}{'max |diff|':>13}{'differ>1e-5':>13}")
        for r in full_rows:
            diff = f"{r['max_abs_diff']:.2e}" if r["deterministic"] else "random"
            share = f"{r['share_differing_gt_1e-5']:.2e}" if r["deterministic"] else "-"
            print(
                f"{r['method']:<16}{r['adapterhub']['wall_s']:>9.1f}{r['mergekit']['wall_s']:>9.1f}{r['wall_ratio']:>7.2f}"
                f"{r['adapterhub']['peak_rss_mb']:>10.0f}{r['mergekit']['peak_rss_mb']:>9.0f}{r['rss_ratio']:>7.2f}{diff:>13}{share:>13}"
            )
    if adapter_rows:
        print("\nEight rank-16 LoRAs → one LoRA, adapterhub (disk to disk) vs PEFT add_weighted_adapter (in memory)")
        print(f"{'case':<26}{'tool':<12}{'type':<28}{'s':>7}{'rank':>6}{'rel err':>9}{'keep min':>10}{'keep mean':>10}")
        for r in adapter_rows:
            print(
                f"{r['case']:<26}{r['tool']:<12}{r['type']:<28}{r['seconds']:>7.2f}{r['rank']:>6}"
                f"{r['relative_error']:>9.4f}{r['retention_min']:>10.3f}{r['retention_mean']:>10.3f}"
            )


def plot(full_rows: list[dict[str, Any]], adapter_rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    if full_rows:
        methods = [r["method"] for r in full_rows]
        x = range(len(methods))
        for ax, key, unit in ((axes[0], "wall_s", "wall time (s)"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
            ax.bar([i - 0.2 for i in x], [r["adapterhub"][key] for r in full_rows], 0.4, label="adapterhub")
            ax.bar([i + 0.2 for i in x], [r["mergekit"][key] for r in full_rows], 0.4, label="mergekit")
            ax.set_xticks(list(x), methods)
            ax.set_ylabel(unit)
            ax.set_title(f"full-model merge: {unit}")
            ax.legend()
    if adapter_rows:
        labels = [f"{r['tool']}\n{r['type'].split(' ')[0]}" for r in adapter_rows]
        colors = ["tab:blue" if r["tool"] == "adapterhub" else "tab:orange" for r in adapter_rows]
        axes[2].bar(range(len(adapter_rows)), [r["relative_error"] for r in adapter_rows], color=colors)
        axes[2].set_xticks(range(len(adapter_rows)), labels, rotation=70, fontsize=7)
        axes[2].set_ylabel("relative error of merged ΔW vs the method's definition")
        axes[2].set_title("8 LoRAs → 1 (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="a prepared SmolLM2 (safetensors) directory; default: prepared from the GGUF")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT, help="the mergekit-yaml executable")
    parser.add_argument("--adapters", type=Path, nargs="*", help="trained LoRA dirs instead of synthetic ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--skip-adapters", action="store_true")
    parser.add_argument("--_run-ours", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._run_ours:
        run_ours(*args._run_ours)
        return

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    base = prepare_base(work, args.base)
    full_rows: list[dict[str, Any]] = []
    adapter_rows: list[dict[str, Any]] = []
    synthetic = not args.adapters
    if not args.skip_full:
        if not args.mergekit.exists():
            sys.exit(f"mergekit-yaml not found at {args.mergekit}: create its venv (pip install torch==2.13.0+cpu mergekit==0.1.5)")
        sources = args.adapters[:2] if args.adapters else [
            synthetic_lora(base, work / f"full-lora-{i}", seed=100 + i, targets=ALL_LINEAR) for i in range(2)
        ]
        variants = [full_variant(base, source, work / f"variant-{i}") for i, source in enumerate(sources)]
        full_rows = part_full(base, variants, work, args.mergekit, args.seed)
        write_results(full_rows, [], synthetic=synthetic, base=base)
    if not args.skip_adapters:
        adapters = args.adapters or [synthetic_lora(base, work / f"lora-{i}", seed=i, targets=ATTENTION) for i in range(8)]
        adapter_rows = part_adapters(base, adapters, work, args.seed)

    print_tables(full_rows, adapter_rows)
    write_results(full_rows, adapter_rows, synthetic=synthetic, base=base)


def write_results(full_rows: list[dict[str, Any]], adapter_rows: list[dict[str, Any]], *, synthetic: bool, base: Path) -> None:
    """Write JSON + PNG; a part that was skipped keeps its rows from the previous run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "merge_bench.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    payload = {
        "synthetic_adapters": synthetic,
        "base": str(base),
        "full_model": full_rows or previous.get("full_model", []),
        "adapters": adapter_rows or previous.get("adapters", []),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    plot(payload["full_model"], payload["adapters"], RESULTS / "merge_bench.png")
    print(f"\nwrote {path} and {RESULTS / 'merge_bench.png'}")

if __name__ == "__main__":
    main()

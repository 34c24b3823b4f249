"""Merge benchmark: adapterhub's merge engine against mergekit and PEFT on SmolLM2-135M.

Part 1 — full models. Two full SmolLM2 variants (base + a rank-16 LoRA each, merged in with
PEFT's `merge_and_unload`) are merged with `task_arithmetic`, `ties` and `dare_ties` by
mergekit (`mergekit-yaml`, from its own virtual environment) and by adapterhub
(`merge(..., full_model=True)`), from the *same* YAML file. Each run is a separate process;
we report wall time, peak RSS (getrusage of the child), and for the deterministic methods
the max absolute difference of the outputs and the share of elements differing by > 1e-5.
`dare_ties` draws random masks; the two tools use different generators, so its outputs
are not comparable element-wise (reported, not judged).

Part 2 — adapter → adapter, judged by what the merged adapter still does. Eight rank-16
LoRAs (q/k/v/o) are trained with adapterhub.train on eight synthetic tasks
(`adapterhub.demo.SYNTHETIC_TASKS`: reverse, spell digits, spell a word letter by letter,
first word, last word, count words, sort words, repeat twice; 240 training rows each, cached
under the work directory so reruns do not retrain). They are merged into one adapter by
adapterhub (disk to disk) and by PEFT's `add_weighted_adapter` (in memory, after the
adapters are loaded; loading is not timed) with the matching definitions, and every merged
adapter, every single adapter (on its own task) and the base are scored by exact match on
held-out rows of every task (adapterhub.eval, batched greedy generation). Weight-space
figures come along: the relative error of the merged ΔW against the method's definition on
the exact ΔW = scale·B·A (random methods: against the merge without the drop), and a
retention proxy per parent, ⟨ΔW_merged, ΔWᵢ⟩ / ⟨ΔW_ref, ΔWᵢ⟩.

`--skip-adapters` runs part 1 alone, `--skip-full` part 2 alone; a skipped part keeps its
figures from the previous run in the JSON.

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
from collections.abc import Sequence
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
# Part 2: 8 trained adapters, adapterhub vs PEFT add_weighted_adapter

LORA_RANK = 16
TRAIN_ROWS = 240

# (label, adapterhub method, extra recipe parameters, weight per input, density, PEFT combination types)
# Weights and normalisation are chosen so both tools compute the same definition: PEFT's
# `ties`/`dare_ties` take the disjoint mean of the agreeing entries, which is adapterhub's
# `normalize: true` (the default of `ties`; set here for `dare_ties`, whose mergekit default sums).
# PEFT's non-SVD types combine A and B separately; they are listed as PEFT offers them.
ADAPTER_CASES: tuple[tuple[str, str, dict[str, Any], float, float, tuple[str, ...]], ...] = (
    ("sum (task arithmetic, w=1)", "task_arithmetic", {}, 1.0, 1.0, ("cat",)),
    ("mean (w=1/8)", "task_arithmetic", {}, 0.125, 1.0, ("cat", "linear")),
    ("ties (density 0.5, w=1)", "ties", {}, 1.0, 0.5, ("ties_svd", "ties")),
    ("dare_ties (density 0.5, w=1)", "dare_ties", {"normalize": True}, 1.0, 0.5, ("dare_ties_svd",)),
    # Subspace methods (docs/merging.md); PEFT has no counterpart.
    ("tsv (w=1)", "tsv", {}, 1.0, 1.0, ()),
    ("iso_c (w=1)", "iso_c", {}, 1.0, 1.0, ()),
    ("iso_cts (w=1)", "iso_cts", {}, 1.0, 1.0, ()),
    ("knots (density 0.5, w=1)", "knots", {}, 1.0, 0.5, ()),
)


def task_data(work: Path, heldout: int) -> dict[str, tuple[Path, Path]]:
    """Train and held-out JSONL of the eight synthetic tasks (deterministic, disjoint)."""
    from adapterhub.demo import SYNTHETIC_TASKS, write_task_data

    return {task: write_task_data(task, work / "tasks", train_rows=TRAIN_ROWS, heldout_rows=heldout) for task in SYNTHETIC_TASKS}


def trained_adapters(base: Path, data: dict[str, tuple[Path, Path]], work: Path, *, steps: int, seed: int) -> dict[str, Path]:
    """One rank-16 LoRA (q/k/v/o) per task, trained with adapterhub.train; cached across runs."""
    from adapterhub.train import TrainConfig

    adapters = {}
    for task, (train_file, _) in data.items():
        run_dir = work / "trained" / f"{task}-r{LORA_RANK}-s{steps}-seed{seed}"
        final = run_dir / "final"
        if not (final / "adapter_model.safetensors").exists():
            from adapterhub.train import train

            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"[adapters] training the {task!r} adapter ({steps} steps) …", flush=True)
            config = TrainConfig(
                data=train_file, method="lora", task="sft", lora_rank=LORA_RANK, lora_alpha=2 * LORA_RANK,
                target_modules=list(ATTENTION), max_steps=steps, batch_size=8, learning_rate=2e-3,
                validation_split=0.0, max_length=96, seed=seed,
            )
            final = train(config, base_dir=base, output_dir=run_dir, progress=False).output_path
        adapters[task] = final
    return adapters


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


def _weight_space(merged: dict[str, Any], reference: dict[str, Any], parents: list[dict[str, Any]]) -> dict[str, float]:
    """Relative error of the merged ΔW against the method's definition, and a retention proxy.

    Retention of parent i: ⟨ΔW_merged, ΔWᵢ⟩ / ⟨ΔW_ref, ΔWᵢ⟩ (1.0 = kept as the exact merge keeps it).
    """
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


def retained_gain(merged: dict[str, float], base: dict[str, float], single: dict[str, float]) -> dict[str, float]:
    """Per task, the share of its adapter's gain the merge keeps: (merged − base) / (adapter − base).

    A task its adapter did not improve has no gain to keep and is left out (NaN would hide
    the other tasks' figures in a min).
    """
    return {t: (merged[t] - base[t]) / (single[t] - base[t]) for t in merged if single.get(t, 0) - base.get(t, 0) > 0}


class _Scorer:
    """Exact match on held-out rows through adapterhub.eval, one PEFT model holding every adapter.

    The base is loaded once; parents and adapterhub's merges are loaded into the same
    `PeftModel` that PEFT's `add_weighted_adapter` merges in, and each is scored after
    `set_adapter` with batched greedy generation (`adapterhub.eval.runner.score_loaded`).
    """

    def __init__(self, base: Path, parents: dict[str, Path], heldout: dict[str, Path], *, max_new_tokens: int) -> None:
        from peft import PeftModel

        from adapterhub.eval.data import load_eval_dataset
        from adapterhub.eval.loading import load_causal

        self.base = base
        self.loaded = load_causal(base)
        self.datasets = {task: load_eval_dataset(path) for task, path in heldout.items()}
        self.max_new_tokens = max_new_tokens
        first, *rest = parents.items()
        self.model = PeftModel.from_pretrained(self.loaded.model, str(first[1]), adapter_name=first[0], is_trainable=False)
        for name, path in rest:
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        self.model.eval()

    def load(self, name: str, adapter_dir: Path) -> None:
        self.model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)

    def score(self, adapter_name: str | None, tasks: Sequence[str]) -> dict[str, float]:
        """Exact match per task; `adapter_name=None` scores the base with every adapter off."""
        import contextlib

        from adapterhub.eval.loading import LoadedModel
        from adapterhub.eval.runner import score_loaded

        loaded = LoadedModel(model=self.model, tokenizer=self.loaded.tokenizer, is_classifier=False)
        if adapter_name is not None:
            self.model.set_adapter(adapter_name)
        context = self.model.disable_adapter() if adapter_name is None else contextlib.nullcontext()
        scores = {}
        with context:
            for task in tasks:
                dataset = self.datasets[task]
                report = score_loaded(
                    loaded, dataset, ("exact_match",), model_dir=self.base, adapter_dir=None,
                    max_new_tokens=self.max_new_tokens, batch_size=len(dataset.rows),
                )
                scores[task] = report.metrics["exact_match"]
        return scores


def part_adapters(base: Path, work: Path, *, seed: int, steps: int, heldout: int) -> dict[str, Any]:
    import torch

    from adapterhub.merge import MergeRecipe, get_method, merge

    data = task_data(work, heldout)
    tasks = list(data)
    parents = trained_adapters(base, data, work, steps=steps, seed=seed)
    parent_deltas = [_lora_deltas(parents[t]) for t in tasks]
    names = sorted(parent_deltas[0])
    print(f"[adapters] loading base + {len(parents)} adapters into PEFT …", flush=True)
    scorer = _Scorer(base, parents, {t: h for t, (_, h) in data.items()}, max_new_tokens=20)
    print("[adapters] scoring the base and each adapter on its own task …", flush=True)
    base_scores = scorer.score(None, tasks)
    single_scores = {t: scorer.score(t, [t])[t] for t in tasks}
    rows: list[dict[str, Any]] = []
    for label, method, extra, weight, density, peft_types in ADAPTER_CASES:
        recipe_dict = {
            "merge_method": method,
            "models": [{"model": str(parents[t]), "parameters": {"weight": weight, "density": density}} for t in tasks],
            "parameters": {"seed": seed, **extra},
        }
        recipe = MergeRecipe.from_dict(recipe_dict)
        # The reference is the method's own definition on the dense ΔW; a random method is
        # judged against its expectation, the same merge without the drop (density 1).
        definition = get_method(method)
        params = recipe.input_params()
        if definition.random:
            params = [type(p)(weight=p.weight, density=1.0) for p in params]
        reference = {}
        for name in names:
            vectors = [d.get(name, torch.zeros_like(parent_deltas[0][name])) for d in parent_deltas]
            reference[name] = definition.function(
                vectors, None, params=params, global_params=recipe.global_params(), generator=torch.Generator().manual_seed(seed)
            )
        out = work / f"adapters-{method}-{weight}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"[adapters] {label}: adapterhub …", flush=True)
        rank = None if definition.linear else LORA_RANK * len(tasks)
        start = time.perf_counter()
        result = merge(recipe, base_dir=base, out_dir=out, rank=rank)
        seconds = time.perf_counter() - start
        adapter_name = f"ah_{len(rows)}"
        scorer.load(adapter_name, out)
        rows.append({
            "case": label, "tool": "adapterhub", "type": method + (" (exact concat)" if result.exact else f" (SVD r{result.rank})"),
            "seconds": seconds, "rank": result.rank, "exact_match": scorer.score(adapter_name, tasks),
            **_weight_space(_lora_deltas(out), reference, parent_deltas),
        })
        scorer.model.delete_adapter(adapter_name)
        for combination in peft_types:
            adapter_name = f"peft_{len(rows)}"
            kwargs: dict[str, Any] = {"combination_type": combination}
            if "svd" in combination:
                kwargs["svd_rank"] = LORA_RANK * len(tasks)
            if combination.startswith(("ties", "dare")):
                kwargs["density"] = density
            print(f"[adapters] {label}: PEFT {combination} …", flush=True)
            torch.manual_seed(seed)
            start = time.perf_counter()
            scorer.model.add_weighted_adapter(tasks, [weight] * len(tasks), adapter_name, **kwargs)
            seconds = time.perf_counter() - start
            rows.append({
                "case": label, "tool": "peft", "type": combination, "seconds": seconds,
                "rank": int(scorer.model.peft_config[adapter_name].r), "exact_match": scorer.score(adapter_name, tasks),
                **_weight_space(_peft_deltas(scorer.model, adapter_name), reference, parent_deltas),
            })
            scorer.model.delete_adapter(adapter_name)
    for row in rows:
        row["mean_exact_match"] = sum(row["exact_match"].values()) / len(tasks)
        row["retained_gain"] = retained_gain(row["exact_match"], base_scores, single_scores)
        row["worst_retained_gain"] = min(row["retained_gain"].values(), default=float("nan"))
    return {
        "tasks": tasks, "train_steps": steps, "heldout_per_task": heldout, "rank": LORA_RANK,
        "base": base_scores, "single": single_scores, "merges": rows,
    }


# ---------------------------------------------------------------------------------------------
# Report


def print_tables(full_rows: list[dict[str, Any]], adapters: dict[str, Any] | None) -> None:
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
    if adapters:
        tasks = adapters["tasks"]
        print(
            f"\nEight rank-{adapters['rank']} LoRAs (q/k/v/o, {adapters['train_steps']} steps each) → one LoRA: "
            f"exact match on {adapters['heldout_per_task']} held-out rows per task"
        )
        head = f"{'case':<30}{'tool':<11}{'type':<30}{'s':>7}{'rank':>5}" + "".join(f"{t[:7]:>8}" for t in tasks)
        print(head + f"{'mean':>7}{'rel err':>9}{'keep':>7}{'worst':>7}")
        base, single = adapters["base"], adapters["single"]
        print(f"{'base model':<30}{'':<11}{'':<30}{'':>7}{'':>5}" + "".join(f"{base[t]:>8.2f}" for t in tasks)
              + f"{sum(base.values()) / len(tasks):>7.2f}")
        print(f"{'each adapter on its own task':<30}{'':<11}{'':<30}{'':>7}{adapters['rank']:>5}" + "".join(f"{single[t]:>8.2f}" for t in tasks)
              + f"{sum(single.values()) / len(tasks):>7.2f}")
        for r in adapters["merges"]:
            print(
                f"{r['case']:<30}{r['tool']:<11}{r['type']:<30}{r['seconds']:>7.2f}{r['rank']:>5}"
                + "".join(f"{r['exact_match'][t]:>8.2f}" for t in tasks)
                + f"{r['mean_exact_match']:>7.2f}{r['relative_error']:>9.3f}{r['retention_mean']:>7.2f}"
                + f"{r['worst_retained_gain']:>7.2f}"
            )
        print("rel err: ‖ΔW − ΔW_definition‖/‖ΔW_definition‖ (random methods: vs the merge without the drop); "
              "keep: mean over parents of ⟨ΔW, ΔWᵢ⟩/⟨ΔW_definition, ΔWᵢ⟩; "
              "worst: the smallest share of a task's gain kept, (merged − base)/(adapter − base)")
        reaching = [r["type"] for r in adapters["merges"] if r["worst_retained_gain"] >= 0.75]
        print("merges keeping ≥ 75% of every task's gain: " + (", ".join(reaching) if reaching else "none"))


def plot(full_rows: list[dict[str, Any]], adapters: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
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
    if adapters:
        rows = adapters["merges"]
        labels = [f"{r['tool']}\n{r['type'].split(' ')[0]}\n{r['case'].split(' (')[0]}" for r in rows]
        colors = ["tab:blue" if r["tool"] == "adapterhub" else "tab:orange" for r in rows]
        axes[2].bar(range(len(rows)), [r["mean_exact_match"] for r in rows], color=colors)
        single = sum(adapters["single"].values()) / len(adapters["single"])
        base = sum(adapters["base"].values()) / len(adapters["base"])
        axes[2].axhline(single, color="green", linestyle="--", label=f"each adapter on its own task ({single:.2f})")
        axes[2].axhline(base, color="gray", linestyle=":", label=f"base model ({base:.2f})")
        axes[2].set_xticks(range(len(rows)), labels, rotation=70, fontsize=7)
        axes[2].set_ylabel("mean exact match over the 8 tasks")
        axes[2].set_title("8 trained LoRAs → 1: what the merge still does")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="a prepared SmolLM2 (safetensors) directory; default: prepared from the GGUF")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT, help="the mergekit-yaml executable")
    parser.add_argument("--adapters", type=Path, nargs="*", help="part 1: two LoRA dirs to build the full variants from (default: synthetic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=30, help="part 2: training steps per task adapter")
    parser.add_argument("--heldout", type=int, default=24, help="part 2: held-out rows scored per task")
    parser.add_argument("--skip-full", action="store_true", help="skip part 1 (full models vs mergekit)")
    parser.add_argument("--skip-adapters", action="store_true", help="skip part 2 (8 trained adapters vs PEFT)")
    parser.add_argument("--_run-ours", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._run_ours:
        run_ours(*args._run_ours)
        return

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    base = prepare_base(work, args.base)
    full_rows: list[dict[str, Any]] = []
    adapters: dict[str, Any] | None = None
    if not args.skip_full:
        if not args.mergekit.exists():
            sys.exit(f"mergekit-yaml not found at {args.mergekit}: create its venv (pip install torch==2.13.0+cpu mergekit==0.1.5)")
        sources = args.adapters[:2] if args.adapters else [
            synthetic_lora(base, work / f"full-lora-{i}", seed=100 + i, targets=ALL_LINEAR) for i in range(2)
        ]
        variants = [full_variant(base, source, work / f"variant-{i}") for i, source in enumerate(sources)]
        full_rows = part_full(base, variants, work, args.mergekit, args.seed)
        write_results(full_rows, None, base=base)
    if not args.skip_adapters:
        adapters = part_adapters(base, work, seed=args.seed, steps=args.train_steps, heldout=args.heldout)

    print_tables(full_rows, adapters)
    write_results(full_rows, adapters, base=base)


def write_results(full_rows: list[dict[str, Any]], adapters: dict[str, Any] | None, *, base: Path) -> None:
    """Write JSON + PNG; a part that was skipped keeps its figures from the previous run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "merge_bench.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous_adapters = previous.get("adapters")
    payload = {
        "base": str(base),
        "full_model": full_rows or previous.get("full_model", []),
        "adapters": adapters or (previous_adapters if isinstance(previous_adapters, dict) else None),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    plot(payload["full_model"], payload["adapters"], RESULTS / "merge_bench.png")
    print(f"\nwrote {path} and {RESULTS / 'merge_bench.png'}")


if __name__ == "__main__":
    main()

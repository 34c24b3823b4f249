"""Merge benchmark: adapterhub's merge engine against mergekit and PEFT on SmolLM2-135M.

Part 1 — full models. Two full SmolLM2 variants (base + a rank-16 LoRA each, merged in with
PEFT's `merge_and_unload`) are merged with `task_arithmetic`, `ties` and `dare_ties` by
mergekit (`mergekit-yaml`, from its own virtual environment) and by adapterhub
(`merge(..., full_model=True)`), from the *same* YAML file. Each run is a separate process;
we report wall time, peak RSS (the child's own VmHWM, read at its exit), and for the deterministic methods
the max absolute difference of the outputs and the share of elements differing by > 1e-5.
`dare_ties` draws random masks; the two tools use different generators, so its outputs
are not comparable element-wise (reported, not judged).

Part 2 — adapter → adapter, judged by what the merged adapter still does. Eight rank-16
LoRAs (q/k/v/o) are trained with adapterhub.train on eight synthetic tasks
(`adapterhub.demo.SYNTHETIC_TASKS`: reverse, spell digits, spell a word letter by letter,
first word, last word, count words, sort words, repeat twice; 240 training rows each, cached
under the work directory so reruns do not retrain); `--tasks N` takes the first N. They are
merged into one adapter by every registered adapterhub method (`adapter_cases`; a method that
takes exactly two inputs — slerp, nuslerp — is run for two tasks and skipped, with the reason
in the JSON, for more) and by PEFT's `add_weighted_adapter` (in memory, after the adapters are
loaded; loading is not timed) with the matching combination types, and by a searched merge
(`adapterhub.merge.search`, `--trials` trials, scored on `--search-rows` rows per task from
`adapterhub.demo.write_search_rows`: in neither the training nor the held-out rows). Every merged
adapter, every single adapter (on its own task) and the base are scored by exact match on the
held-out rows of every task (adapterhub.eval, batched greedy generation), and each merge's
retained gain per task, (merged − base) / (adapter − base), is reported with the worst task's,
a line naming the merges that keep the goal's share of every task's gain (90% for two tasks,
75% for more) or saying that none does, and what task arithmetic and TIES keep.
Weight-space figures come along: the relative error of the merged ΔW against the method's
definition on the exact ΔW = scale·B·A (random methods: against the merge without the drop),
and a retention proxy per parent, ⟨ΔW_merged, ΔWᵢ⟩ / ⟨ΔW_ref, ΔWᵢ⟩.

`--skip-adapters` runs part 1 alone, `--skip-full` part 2 alone; a skipped part keeps its
figures from the previous run in the JSON.

Run:  .venv/bin/python benchmarks/merge_bench.py [--mergekit benchmarks/.venv-mergekit/bin/mergekit-yaml]
Reduced: .venv/bin/python benchmarks/merge_bench.py --skip-full --tasks 4 --train-steps 20 --trials 4
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

# Peak memory is the child's own VmHWM (its resident high-water mark), read by the child at
# exit: a wrapper sets an atexit hook and runs the real program in the same interpreter
# (runpy), so the figure belongs to that one process. Not getrusage(RUSAGE_CHILDREN): Linux
# carries the forking process's peak into the child's ru_maxrss across fork + exec, and
# ru_maxrss of several children is their maximum, not their sum.
_PEAK_WRAPPER = (
    "import atexit, json, runpy, sys\n"
    "report, script = sys.argv[1], sys.argv[2]\n"
    "def _peak():\n"
    "    fields = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
    "    open(report, 'w').write(json.dumps({'vm_hwm_kb': int(fields['VmHWM'].split()[0])}))\n"
    "atexit.register(_peak)\n"
    "sys.argv = sys.argv[2:]\n"
    "runpy.run_path(script, run_name='__main__')\n"
)


def script_interpreter(script: Path) -> str:
    """The Python a console script runs under (its shebang): mergekit lives in its own venv."""
    first = script.read_text(errors="replace").splitlines()[0] if script.exists() else ""
    if not first.startswith("#!") or "python" not in first:
        raise RuntimeError(f"{script} is not a Python script with a shebang line")
    return first[2:].strip().split()[0]


def measure(interpreter: str, script: Path, args: list[str]) -> dict[str, Any]:
    """Wall time and peak RSS (VmHWM) of the Python program `script`, run in a child process."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="merge-bench-peak-") as scratch:
        report = Path(scratch) / "peak.json"
        start = time.perf_counter()
        child = subprocess.run([interpreter, "-c", _PEAK_WRAPPER, str(report), str(script), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        if child.returncode != 0 or not report.exists():
            raise RuntimeError(f"{script.name} {' '.join(args[:3])} … exited {child.returncode}: {child.stderr[-1500:]}")
        peak_kb = json.loads(report.read_text())["vm_hwm_kb"]
    return {"wall_s": wall, "peak_rss_mb": peak_kb / 1024}


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
        ours = measure(sys.executable, Path(__file__), ["--_run-ours", str(recipe), str(ours_out)])
        print(f"[full] {method}: mergekit …", flush=True)
        theirs = measure(script_interpreter(mergekit), mergekit, [str(recipe), str(theirs_out), "--random-seed", str(seed), "--quiet"])
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
TASK_COUNT = 8
# The goal: the best merge keeps this share of every task's gain (2 tasks: 90%, more: 75%).
GOAL = {2: 0.9}
GOAL_MANY = 0.75


def goal_for(task_count: int) -> float:
    return GOAL.get(task_count, GOAL_MANY)


@dataclass(frozen=True)
class AdapterCase:
    """One fixed merge of the N task adapters, by adapterhub and by the matching PEFT types.

    `weight` is ours per input; `peft_weight` PEFT's (None: the same). Weights and
    normalisation are chosen so both tools compute the same definition: PEFT's
    `ties`/`dare_ties` take the disjoint mean of the agreeing entries, which is adapterhub's
    `normalize: true` (the default of `ties`; set here for `dare_ties`, whose mergekit default
    sums); PEFT's `magnitude_prune` sums, ours averages by default (`normalize: false` here).
    PEFT's non-SVD types combine A and B separately; they are listed as PEFT offers them.
    """

    label: str
    method: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    density: float = 1.0
    peft_types: tuple[str, ...] = ()
    peft_weight: float | None = None


def adapter_cases(task_count: int) -> list[AdapterCase]:
    """A case per registered merge method (and PEFT's types beside the ones it shares)."""
    mean = 1.0 / task_count
    return [
        AdapterCase("sum (task arithmetic, w=1)", "task_arithmetic", peft_types=("cat", "svd")),
        AdapterCase(f"mean (w=1/{task_count})", "linear", peft_types=("cat", "linear"), peft_weight=mean),
        AdapterCase("magnitude_prune (density 0.5, w=1)", "magnitude_prune", {"normalize": False}, density=0.5,
                    peft_types=("magnitude_prune_svd", "magnitude_prune")),
        AdapterCase("ties (density 0.5, w=1)", "ties", density=0.5, peft_types=("ties_svd", "ties")),
        AdapterCase("dare_linear (density 0.5, w=1)", "dare_linear", density=0.5, peft_types=("dare_linear_svd", "dare_linear")),
        AdapterCase("dare_ties (density 0.5, w=1)", "dare_ties", {"normalize": True}, density=0.5,
                    peft_types=("dare_ties_svd", "dare_ties")),
        # No PEFT counterpart from here on (docs/merging.md describes each).
        AdapterCase("breadcrumbs (density 0.5, w=1)", "breadcrumbs", density=0.5),
        AdapterCase("breadcrumbs_ties (density 0.5, w=1)", "breadcrumbs_ties", density=0.5),
        AdapterCase("della (density 0.5, w=1)", "della", density=0.5),
        AdapterCase("della_linear (density 0.5, w=1)", "della_linear", density=0.5),
        AdapterCase("tsv (w=1)", "tsv"),
        AdapterCase("iso_c (w=1)", "iso_c"),
        AdapterCase("iso_cts (w=1)", "iso_cts"),
        AdapterCase("knots (density 0.5, w=1)", "knots", density=0.5),
        AdapterCase("knots_dare (density 0.5, w=1)", "knots_dare", density=0.5),
        AdapterCase("model_stock", "model_stock"),
        AdapterCase("slerp (t=0.5)", "slerp"),
        AdapterCase("nuslerp (w=1 each)", "nuslerp"),
    ]


def runnable_cases(task_count: int, only: Sequence[str] | None) -> tuple[list[AdapterCase], dict[str, str]]:
    """The cases to run and, for every registered method not run, why not.

    A method taking a fixed number of inputs (slerp, nuslerp: exactly 2) is skipped for any
    other count rather than run on a subset, which would not be the same comparison.
    """
    from adapterhub.merge import get_method
    from adapterhub.merge.methods import method_names

    cases = adapter_cases(task_count)
    covered = {case.method for case in cases}
    missing = sorted(set(method_names()) - covered)
    if missing:
        raise RuntimeError(f"merge_bench has no case for the registered method(s) {missing}: add them to adapter_cases")
    chosen, skipped = [], {}
    for case in cases:
        method = get_method(case.method)
        if only and case.method not in only:
            skipped[case.method] = "not selected (--methods)"
        elif task_count < method.min_inputs or (method.max_inputs is not None and task_count > method.max_inputs):
            most = method.max_inputs if method.max_inputs is not None else "any"
            skipped[case.method] = f"takes {method.min_inputs}..{most} inputs, not {task_count}"
        else:
            chosen.append(case)
    return chosen, skipped


def task_data(work: Path, tasks: Sequence[str], heldout: int, search_rows: int) -> dict[str, dict[str, Path]]:
    """Per task: train, held-out and search JSONL (deterministic, pairwise disjoint)."""
    from adapterhub.demo import write_search_rows, write_task_data

    data = {}
    for task in tasks:
        train_file, heldout_file = write_task_data(task, work / "tasks", train_rows=TRAIN_ROWS, heldout_rows=heldout)
        search_file = write_search_rows(task, work / "tasks", rows=search_rows, train_rows=TRAIN_ROWS, heldout_rows=heldout)
        data[task] = {"train": train_file, "heldout": heldout_file, "search": search_file}
    return data


def trained_adapters(base: Path, data: Mapping[str, Mapping[str, Path]], work: Path, *, steps: int, seed: int) -> dict[str, Path]:
    """One rank-16 LoRA (q/k/v/o) per task, trained with adapterhub.train; cached across runs."""
    from adapterhub.train import TrainConfig

    adapters = {}
    for task, files in data.items():
        run_dir = work / "trained" / f"{task}-r{LORA_RANK}-s{steps}-seed{seed}"
        final = run_dir / "final"
        if not (final / "adapter_model.safetensors").exists():
            from adapterhub.train import train

            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"[adapters] training the {task!r} adapter ({steps} steps) …", flush=True)
            config = TrainConfig(
                data=files["train"], method="lora", task="sft", lora_rank=LORA_RANK, lora_alpha=2 * LORA_RANK,
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


def _reference(recipe: Any, parent_deltas: list[dict[str, Any]], base: Path, seed: int) -> dict[str, Any]:
    """The method's own definition on the dense ΔW of every module.

    A random method is judged against its expectation, the same merge without the drop
    (density 1); a method reading the base weight (slerp) gets it, as the engine does.
    """
    import dataclasses

    import torch

    from adapterhub.merge import get_method
    from adapterhub.merge.io import LazyTensorReader

    definition = get_method(recipe.merge_method)
    params = recipe.input_params()
    if definition.random:
        params = [dataclasses.replace(p, density=1.0) for p in params]
    reader = LazyTensorReader(base) if definition.needs_base else None
    reference = {}
    for name in sorted(parent_deltas[0]):
        vectors = [d.get(name, torch.zeros_like(parent_deltas[0][name])) for d in parent_deltas]
        base_weight = reader.get_float(name) if reader is not None else None
        reference[name] = definition.function(
            vectors, base_weight, params=params, global_params=recipe.global_params(), generator=torch.Generator().manual_seed(seed)
        )
    return reference


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
        "relative_error": math.sqrt(error_num / error_den) if error_den else float("nan"),
        "retention_min": min(retention),
        "retention_mean": sum(retention) / len(retention),
    }


class _Scorer:
    """Exact match through adapterhub.eval, one PEFT model holding every adapter.

    The base is loaded once; parents, adapterhub's merges and the search's trials are loaded
    into the same `PeftModel` that PEFT's `add_weighted_adapter` merges in, and each is scored
    after `set_adapter` with batched greedy generation (`adapterhub.eval.runner.score_loaded`),
    on the held-out rows or on the search rows (a split of its own, never the held-out one).
    """

    def __init__(self, base: Path, parents: dict[str, Path], splits: Mapping[str, Mapping[str, Path]], *, max_new_tokens: int) -> None:
        from peft import PeftModel

        from adapterhub.eval.data import load_eval_dataset
        from adapterhub.eval.loading import load_causal

        self.base = base
        self.loaded = load_causal(base)
        self.datasets = {split: {task: load_eval_dataset(path) for task, path in files.items()} for split, files in splits.items()}
        self.max_new_tokens = max_new_tokens
        first, *rest = parents.items()
        self.first_parent = first[0]
        self.model = PeftModel.from_pretrained(self.loaded.model, str(first[1]), adapter_name=first[0], is_trainable=False)
        for name, path in rest:
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        self.model.eval()

    def load(self, name: str, adapter_dir: Path) -> None:
        self.model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)

    def score(self, adapter_name: str | None, tasks: Sequence[str], *, split: str = "heldout") -> dict[str, float]:
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
                dataset = self.datasets[split][task]
                report = score_loaded(
                    loaded, dataset, ("exact_match",), model_dir=self.base, adapter_dir=None,
                    max_new_tokens=self.max_new_tokens, batch_size=len(dataset.rows),
                )
                scores[task] = report.metrics["exact_match"]
        return scores

    def score_dir(self, adapter_dir: Path, tasks: Sequence[str], *, split: str) -> dict[str, float]:
        """Load a LoRA directory, score it, drop it again (the search's judge)."""
        name = "scored_dir"
        self.load(name, adapter_dir)
        try:
            return self.score(name, tasks, split=split)
        finally:
            self.model.set_adapter(self.first_parent)  # PEFT warns when the active adapter is deleted
            self.model.delete_adapter(name)


def searched_merge(
    scorer: _Scorer, parents: Mapping[str, Path], base: Path, out: Path, *, trials: int, methods: Sequence[str], seed: int,
) -> tuple[Any, Any, dict[str, Any]]:
    """`adapterhub.merge.search` over the parents, judged on the search rows only.

    Returns the best recipe, its merge result (written to `out` with the same output settings
    the trials used, so the held-out figure is of the adapter the search picked) and the
    search's figures: wall time, per-trial table, base and adapter scores on the search rows.
    """
    from adapterhub.merge import MergeRecipe, merge
    from adapterhub.merge.search import search_merge

    tasks = list(parents)
    started = time.perf_counter()
    base_scores = scorer.score(None, tasks, split="search")
    single_scores = {t: scorer.score(t, [t], split="search")[t] for t in tasks}
    found = search_merge(
        [str(parents[t]) for t in tasks], base_dir=base, input_dirs={str(p): p for p in parents.values()},
        score=lambda adapter_dir: scorer.score_dir(adapter_dir, tasks, split="search"),
        base_scores=base_scores, single_scores=single_scores, trials=trials, methods=methods, seed=seed,
        task_inputs={t: str(parents[t]) for t in tasks},
    )
    wall = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    result = merge(found.best_recipe, base_dir=base, out_dir=out)
    recipe = MergeRecipe.from_dict(found.best_recipe.to_json())
    details = {
        "trials": [dict(row) for row in found.trials], "best_trial": found.best_trial,
        "best_objective_search_rows": found.best_objective, "methods": list(methods),
        "base_search_rows": base_scores, "single_search_rows": single_scores,
        "wall_s": wall, "seconds_per_trial": wall / max(len(found.trials), 1),
        "recipe": found.best_recipe.to_json(),
    }
    return recipe, result, details


def part_adapters(
    base: Path, work: Path, *, seed: int, steps: int, heldout: int, task_count: int, trials: int, search_rows: int,
    search_methods: Sequence[str], only: Sequence[str] | None,
) -> dict[str, Any]:
    import torch

    from adapterhub.demo import SYNTHETIC_TASKS
    from adapterhub.merge import MergeRecipe, get_method, merge
    from adapterhub.merge.search import retention

    tasks = list(SYNTHETIC_TASKS[:task_count])
    cases, skipped = runnable_cases(task_count, only)
    data = task_data(work, tasks, heldout, search_rows)
    parents = trained_adapters(base, data, work, steps=steps, seed=seed)
    parent_deltas = [_lora_deltas(parents[t]) for t in tasks]
    print(f"[adapters] loading base + {len(parents)} adapters into PEFT …", flush=True)
    splits = {"heldout": {t: f["heldout"] for t, f in data.items()}, "search": {t: f["search"] for t, f in data.items()}}
    scorer = _Scorer(base, parents, splits, max_new_tokens=20)
    print("[adapters] scoring the base and each adapter on its own task …", flush=True)
    base_scores = scorer.score(None, tasks)
    single_scores = {t: scorer.score(t, [t])[t] for t in tasks}
    print(f"[adapters]   base {base_scores}, each adapter on its own task {single_scores}", flush=True)
    rows: list[dict[str, Any]] = []
    for case in cases:
        recipe = MergeRecipe.from_dict({
            "merge_method": case.method,
            "models": [{"model": str(parents[t]), "parameters": {"weight": case.weight, "density": case.density}} for t in tasks],
            "parameters": {"seed": seed, **case.extra},
        })
        reference = _reference(recipe, parent_deltas, base, seed)
        out = work / f"adapters-{case.method}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"[adapters] {case.label}: adapterhub …", flush=True)
        rank = None if get_method(case.method).linear else LORA_RANK * len(tasks)
        start = time.perf_counter()
        result = merge(recipe, base_dir=base, out_dir=out, rank=rank)
        seconds = time.perf_counter() - start
        adapter_name = f"ah_{len(rows)}"
        scorer.load(adapter_name, out)
        rows.append({
            "case": case.label, "tool": "adapterhub", "method": case.method,
            "type": case.method + (" (exact concat)" if result.exact else f" (SVD r{result.rank})"),
            "seconds": seconds, "rank": result.rank, "exact_match": scorer.score(adapter_name, tasks),
            **_weight_space(_lora_deltas(out), reference, parent_deltas),
        })
        print(f"[adapters]   exact match {rows[-1]['exact_match']}", flush=True)
        scorer.model.delete_adapter(adapter_name)
        shutil.rmtree(out, ignore_errors=True)
        for combination in case.peft_types:
            adapter_name = f"peft_{len(rows)}"
            kwargs: dict[str, Any] = {"combination_type": combination}
            if "svd" in combination:
                kwargs["svd_rank"] = LORA_RANK * len(tasks)
            if combination.startswith(("ties", "dare", "magnitude")):
                kwargs["density"] = case.density
            weight = case.peft_weight if case.peft_weight is not None else case.weight
            print(f"[adapters] {case.label}: PEFT {combination} …", flush=True)
            torch.manual_seed(seed)
            start = time.perf_counter()
            scorer.model.add_weighted_adapter(tasks, [weight] * len(tasks), adapter_name, **kwargs)
            seconds = time.perf_counter() - start
            rows.append({
                "case": case.label, "tool": "peft", "method": case.method, "type": combination, "seconds": seconds,
                "rank": int(scorer.model.peft_config[adapter_name].r), "exact_match": scorer.score(adapter_name, tasks),
                **_weight_space(_peft_deltas(scorer.model, adapter_name), reference, parent_deltas),
            })
            print(f"[adapters]   exact match {rows[-1]['exact_match']}", flush=True)
            scorer.model.delete_adapter(adapter_name)
    search: dict[str, Any] | None = None
    if trials > 0:
        print(f"[adapters] merge search: {trials} trials over {', '.join(search_methods)} on {search_rows} search rows per task …", flush=True)
        out = work / "adapters-searched"
        recipe, result, search = searched_merge(scorer, parents, base, out, trials=trials, methods=search_methods, seed=seed)
        scorer.load("searched", out)
        rows.append({
            "case": f"searched ({trials} trials)", "tool": "adapterhub", "method": recipe.merge_method,
            "type": f"{recipe.merge_method} (searched, " + ("exact concat)" if result.exact else f"SVD r{result.rank})"),
            "seconds": search["wall_s"], "rank": result.rank, "exact_match": scorer.score("searched", tasks),
            **_weight_space(_lora_deltas(out), _reference(recipe, parent_deltas, base, seed), parent_deltas),
        })
        scorer.model.delete_adapter("searched")
    for row in rows:
        row["mean_exact_match"] = sum(row["exact_match"].values()) / len(tasks)
        row["retained_gain"] = retention(row["exact_match"], base_scores, single_scores)
        row["worst_retained_gain"] = min(row["retained_gain"].values(), default=float("nan"))
    return {
        "tasks": tasks, "train_steps": steps, "heldout_per_task": heldout, "search_rows_per_task": search_rows,
        "rank": LORA_RANK, "base": base_scores, "single": single_scores, "merges": rows, "skipped_methods": skipped,
        "search": search, "goal": goal_for(len(tasks)),
    }


# ---------------------------------------------------------------------------------------------
# Report


def _merge_label(row: Mapping[str, Any]) -> str:
    """A merge's name in the verdict lines: tool, type and case, unique per row."""
    return f"{row['tool']} {row['type']} [{row['case']}]"


def verdict_lines(adapters: Mapping[str, Any]) -> list[str]:
    """Which merges keep the goal's share of every task's gain (or that none does), and what
    task arithmetic and TIES keep, in adapterhub's and PEFT's versions."""
    from adapterhub.demo import retention_of, retention_verdict

    retention = {_merge_label(r): r["retained_gain"] for r in adapters["merges"]}
    usual = [_merge_label(r) for r in adapters["merges"] if r.get("method") in ("task_arithmetic", "ties") and not r["case"].startswith("searched")]
    goal = adapters.get("goal", goal_for(len(adapters["tasks"])))
    return [retention_verdict(retention, threshold=goal), retention_of(retention, usual)]


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
            f"\n{len(tasks)} rank-{adapters['rank']} LoRAs (q/k/v/o, {adapters['train_steps']} steps each) → one LoRA: "
            f"exact match on {adapters['heldout_per_task']} held-out rows per task, then the share of each task's gain kept"
        )
        head = f"{'case':<36}{'tool':<11}{'type':<30}{'s':>7}{'rank':>5}" + "".join(f"{t[:7]:>8}" for t in tasks)
        print(head + f"{'mean':>7}{'rel err':>9}{'keep':>7}" + "".join(f"{'k:' + t[:5]:>8}" for t in tasks) + f"{'worst':>7}")
        base, single = adapters["base"], adapters["single"]
        print(f"{'base model':<36}{'':<11}{'':<30}{'':>7}{'':>5}" + "".join(f"{base[t]:>8.2f}" for t in tasks)
              + f"{sum(base.values()) / len(tasks):>7.2f}")
        print(f"{'each adapter on its own task':<36}{'':<11}{'':<30}{'':>7}{adapters['rank']:>5}" + "".join(f"{single[t]:>8.2f}" for t in tasks)
              + f"{sum(single.values()) / len(tasks):>7.2f}")
        for r in adapters["merges"]:
            kept = r["retained_gain"]
            print(
                f"{r['case']:<36}{r['tool']:<11}{r['type']:<30}{r['seconds']:>7.2f}{r['rank']:>5}"
                + "".join(f"{r['exact_match'][t]:>8.2f}" for t in tasks)
                + f"{r['mean_exact_match']:>7.2f}{r['relative_error']:>9.3f}{r['retention_mean']:>7.2f}"
                + "".join(f"{kept[t]:>8.2f}" if t in kept else f"{'-':>8}" for t in tasks)
                + f"{r['worst_retained_gain']:>7.2f}"
            )
        print("rel err: ‖ΔW − ΔW_definition‖/‖ΔW_definition‖ (random methods: vs the merge without the drop); "
              "keep: mean over parents of ⟨ΔW, ΔWᵢ⟩/⟨ΔW_definition, ΔWᵢ⟩; "
              "k:task: the share of that task's gain kept, (merged − base)/(adapter − base); worst: the smallest of them")
        for method, reason in adapters.get("skipped_methods", {}).items():
            print(f"not run: {method} ({reason})")
        search = adapters.get("search")
        if search:
            print(f"searched merge: {len(search['trials'])} trials in {search['wall_s']:.0f} s (≈{search['seconds_per_trial']:.0f} s "
                  f"per trial), scored on {adapters['search_rows_per_task']} search rows per task (disjoint from the held-out "
                  f"rows); best recipe {search['recipe']}")
        for line in verdict_lines(adapters):
            if line:
                print(line)


def _short_label(row: Mapping[str, Any]) -> str:
    """A plot label: tool and type, with the case where one PEFT type serves two (cat: sum, mean)."""
    kind = row["type"].split(" ")[0]
    case = row["case"].split(" (")[0]
    if row["case"].startswith("searched"):
        return f"{row['tool']} {kind} (searched)"
    return f"{row['tool']} {kind}" + ("" if kind.startswith(case) or case.startswith(kind) else f" [{case}]")


def plot(full_rows: list[dict[str, Any]], adapters: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ([1, 1] if full_rows else []) + ([2, 2] if adapters else [])
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * sum(panels), 6), gridspec_kw={"width_ratios": panels}, squeeze=False)
    axes = list(axes[0])
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
        quality_ax, kept_ax = axes[-2:]
        rows = adapters["merges"]
        tasks = adapters["tasks"]
        labels = [_short_label(r) for r in rows]
        colors = ["tab:blue" if r["tool"] == "adapterhub" else "tab:orange" for r in rows]
        quality_ax.bar(range(len(rows)), [r["mean_exact_match"] for r in rows], color=colors)
        single = sum(adapters["single"].values()) / len(adapters["single"])
        base = sum(adapters["base"].values()) / len(adapters["base"])
        quality_ax.axhline(single, color="green", linestyle="--", label=f"each adapter on its own task ({single:.2f})")
        quality_ax.axhline(base, color="gray", linestyle=":", label=f"base model ({base:.2f})")
        quality_ax.set_xticks(range(len(rows)), labels, rotation=75, fontsize=7)
        quality_ax.set_ylabel(f"mean exact match over the {len(tasks)} tasks")
        quality_ax.set_title(f"{len(tasks)} trained LoRAs → 1: what the merge still does (blue: adapterhub, orange: PEFT)")
        quality_ax.legend(fontsize=7)
        # Retained gain per task (rows: merges, columns: tasks); the goal is drawn in the title.
        matrix = [[r["retained_gain"].get(t, float("nan")) for t in tasks] for r in rows]
        image = kept_ax.imshow(matrix, aspect="auto", cmap="RdYlGn", vmin=0.0, vmax=1.0)
        kept_ax.set_xticks(range(len(tasks)), tasks, rotation=30, fontsize=8)
        kept_ax.set_yticks(range(len(rows)), labels, fontsize=7)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    kept_ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=6)
        goal = adapters.get("goal", goal_for(len(tasks)))
        kept_ax.set_title(f"share of each task's gain kept (goal: ≥ {goal:.0%} on every task)")
        fig.colorbar(image, ax=kept_ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    from adapterhub.merge.search import DEFAULT_SEARCH_METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="a prepared SmolLM2 (safetensors) directory; default: prepared from the GGUF")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT, help="the mergekit-yaml executable")
    parser.add_argument("--adapters", type=Path, nargs="*", help="part 1: two LoRA dirs to build the full variants from (default: synthetic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=30, help="part 2: training steps per task adapter")
    parser.add_argument("--heldout", type=int, default=24, help="part 2: held-out rows scored per task")
    parser.add_argument("--tasks", type=int, default=TASK_COUNT, help=f"part 2: merge the first N of the {TASK_COUNT} task adapters (2..{TASK_COUNT})")
    parser.add_argument("--methods", help="part 2: only these adapterhub methods (comma-separated; PEFT's types come with their case)")
    parser.add_argument("--trials", type=int, default=12, help="part 2: trials of the searched merge (0: no search)")
    parser.add_argument("--search-rows", type=int, default=8, help="part 2: rows per task the search scores (disjoint from held-out)")
    parser.add_argument("--search-methods", default=",".join(DEFAULT_SEARCH_METHODS), help="part 2: methods the search chooses among")
    parser.add_argument("--skip-full", action="store_true", help="skip part 1 (full models vs mergekit)")
    parser.add_argument("--skip-adapters", action="store_true", help="skip part 2 (trained task adapters vs PEFT)")
    parser.add_argument("--_run-ours", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 2 <= args.tasks <= TASK_COUNT:
        parser.error(f"--tasks must be between 2 and {TASK_COUNT}, got {args.tasks}")
    if args.trials < 0 or args.search_rows < 1:
        parser.error("--trials must be at least 0 and --search-rows at least 1")
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
        only = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        adapters = part_adapters(
            base, work, seed=args.seed, steps=args.train_steps, heldout=args.heldout, task_count=args.tasks,
            trials=args.trials, search_rows=args.search_rows, only=only,
            search_methods=[m.strip() for m in args.search_methods.split(",") if m.strip()],
        )

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

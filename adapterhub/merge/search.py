"""Merge weights found by evaluation: Optuna over method, per-input weights and densities.

Why the objective is the worst task's retained gain: a merge is only useful if it keeps
every task; maximizing the mean lets a search trade one task away for another. With
retention_t = (merged_t − base_t) / (adapter_t − base_t), the search maximizes min_t.

The core knows nothing about models or evaluation files: each trial writes a LoRA merge to a
scratch directory and the caller's `score(adapter_dir) -> {task: score}` judges it (the CLI
attaches the candidate to an already loaded base, so the base is never reloaded). Trials run
in LoRA space with the engine's default output (exact rank concatenation where the method is
linear, else the rank keeping `energy` per module). Every trial — its parameters, per-task
scores and retention — goes into `SearchResult.trials`, for the lineage of the best merge.

Why the first trial is the plain average: it is the merge users try first, and on most task
pairs the strongest fixed recipe; TPE's first trials are random draws. Enqueued as trial 0
(Optuna's `enqueue_trial`), it gives the search a floor — the best trial is never worse than
the average on the search rows — and a point to sample around. Weights are drawn relative to
that average, in [0.4/n, 3/n] for n inputs (0.2–1.5 for two), so the range means the same
for 2 inputs as for 8.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub.errors import ValidationError
from adapterhub.merge.engine import merge
from adapterhub.merge.methods import get_method
from adapterhub.merge.recipe import MergeRecipe

DEFAULT_SEARCH_METHODS = ("task_arithmetic", "ties", "tsv", "iso_c")
WEIGHT_SCALE = (0.4, 3.0)  # each input's weight is drawn in [low/n, high/n] for n inputs
DENSITY_RANGE = (0.2, 1.0)

Scorer = Callable[[Path], Mapping[str, float]]


@dataclass(frozen=True)
class SearchResult:
    """The best recipe found, its objective and per-task figures, and every trial."""

    best_recipe: MergeRecipe
    best_objective: float
    best_retention: Mapping[str, float]
    trials: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    best_trial: int = 0  # the number of the trial `best_recipe` comes from (Optuna's pick among ties)


def weight_range(inputs: int) -> tuple[float, float]:
    """The range each input's weight is drawn from: `WEIGHT_SCALE` over the number of inputs."""
    return WEIGHT_SCALE[0] / inputs, WEIGHT_SCALE[1] / inputs


def average_trial(methods: Sequence[str], inputs: int) -> dict[str, Any] | None:
    """The parameters of the plain average among `methods` (linear, else task arithmetic with
    every weight 1/n), for Optuna's `enqueue_trial`; None when neither method is searched."""
    name = next((m for m in ("linear", "task_arithmetic") if m in methods), None)
    if name is None:
        return None
    params: dict[str, Any] = {"method": name}
    params.update({f"weight_{index}": 1.0 / inputs for index in range(inputs)})
    return params


def retention(scores: Mapping[str, float], base: Mapping[str, float], single: Mapping[str, float]) -> dict[str, float]:
    """(merged − base) / (adapter − base) per task whose adapter gained anything."""
    return {t: (scores[t] - base[t]) / (single[t] - base[t]) for t in single if single[t] - base[t] > 0 and t in scores}


def search_merge(
    inputs: Sequence[str],
    *,
    base_dir: Path,
    input_dirs: Mapping[str, Path],
    score: Scorer,
    base_scores: Mapping[str, float],
    single_scores: Mapping[str, float],
    trials: int = 20,
    methods: Sequence[str] = DEFAULT_SEARCH_METHODS,
    seed: int = 0,
    energy: float | None = None,
) -> SearchResult:
    """Search `trials` merges of `inputs` (recipe model strings) for the best worst-task retention.

    Trial 0 is the plain average (`average_trial`) when linear or task arithmetic is searched;
    the rest are TPE's.

    Raises `ValidationError` before any trial when no task has a gain to keep or a method is
    unknown or cannot take this many inputs.
    """
    import optuna

    problems = []
    if not retention(single_scores, base_scores, single_scores):
        problems.append("no adapter scores above the base on its task: there is no gain for a merge to keep")
    for name in methods:
        method = get_method(name)
        if len(inputs) < method.min_inputs or (method.max_inputs is not None and len(inputs) > method.max_inputs):
            problems.append(f"method {name} cannot merge {len(inputs)} inputs")
    if trials < 1:
        problems.append(f"trials must be at least 1, got {trials}")
    if problems:
        raise ValidationError("merge search", problems)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    low, high = weight_range(len(inputs))
    table: list[dict[str, Any]] = []
    recipes: dict[int, MergeRecipe] = {}
    scratch = Path(tempfile.mkdtemp(prefix="adapterhub-merge-search-"))

    def objective(trial: optuna.Trial) -> float:
        name = trial.suggest_categorical("method", list(methods))
        uses_density = get_method(name).uses_density
        models = []
        for index, label in enumerate(inputs):
            parameters = {"weight": trial.suggest_float(f"weight_{index}", low, high)}
            if uses_density:
                parameters["density"] = trial.suggest_float(f"density_{index}", *DENSITY_RANGE)
            models.append({"model": label, "parameters": parameters})
        recipe = MergeRecipe.from_dict({"merge_method": name, "models": models, "parameters": {"seed": seed}})
        out = scratch / f"trial-{trial.number}"
        merge(recipe, out_dir=out, base_dir=base_dir, input_dirs=input_dirs, energy=energy)
        try:
            scores = dict(score(out))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        kept = retention(scores, base_scores, single_scores)
        value = min(kept.values())
        recipes[trial.number] = recipe
        table.append({"trial": trial.number, "params": dict(trial.params), "scores": scores, "retention": kept, "objective": value})
        return value

    try:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        start = average_trial(methods, len(inputs))
        if start is not None:
            study.enqueue_trial(start)
        study.optimize(objective, n_trials=trials)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best = study.best_trial.number
    best_row = next(row for row in table if row["trial"] == best)
    return SearchResult(
        best_recipe=recipes[best], best_objective=best_row["objective"], best_retention=best_row["retention"],
        trials=tuple(table), best_trial=best,
    )

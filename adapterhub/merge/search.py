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

Ties are broken by the mean retention (Optuna is told min + `TIE_BREAK` x mean): with many
tasks the worst one often sits at 0 for most merges, and a flat objective leaves TPE and the
leans nothing to follow. A better mean does not outrank a better worst task: retention moves
in steps of at least 1/rows scored, more than the tie-break can add for any few hundred rows.
The table's `objective` is the worst task's retention alone.

Why the next trials lean toward the worst task (given `task_inputs`): the objective is the
worst task, and a weighted average that moves weight to that task's input is the step most
likely to raise it — on SmolLM2's reverse/spell pair the average keeps 85% of reverse's
held-out gain, 0.6/0.4 keeps 100% of both (measured), while TPE's random first draws spent
the trials on other methods and found neither. So after the average, up to half the trials
are a pattern search on the weights (the LoraHub idea: gradient-free search over how much
of each adapter to take): each moves `step`/n of weight from the other inputs to the input
of the best trial's worst task; a lean that does not beat the best halves the step. TPE takes
the rest of the trials, with the leans in its history.
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
LEAN_STEP = 0.2  # the first lean moves this share of the average weight (1/n) to the worst task's input
MIN_LEAN_STEP = 0.05  # leaning stops once a step would be smaller
TIE_BREAK = 1e-3  # weight of the mean retention in the value Optuna maximizes (ties of the worst task)

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


def lean_trial(params: Mapping[str, Any], inputs: int, toward: int, step: float) -> dict[str, Any]:
    """`params` (a weighted-average trial) with `step`/n of weight moved to input `toward`, taken
    evenly from the others, each weight kept inside `weight_range`."""
    low, high = weight_range(inputs)
    moved = step / inputs
    leaned: dict[str, Any] = {"method": params["method"]}
    for index in range(inputs):
        weight = float(params[f"weight_{index}"])
        weight = weight + moved if index == toward else weight - moved / max(inputs - 1, 1)
        leaned[f"weight_{index}"] = min(high, max(low, weight))
    return leaned


def ranking(row: Mapping[str, Any]) -> float:
    """What the search maximizes for a trial row: its worst task's retention, ties broken by the mean."""
    kept = row["retention"]
    return row["objective"] + TIE_BREAK * sum(kept.values()) / max(len(kept), 1)


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
    task_inputs: Mapping[str, str] | None = None,
) -> SearchResult:
    """Search `trials` merges of `inputs` (recipe model strings) for the best worst-task retention.

    Trial 0 is the plain average (`average_trial`) when linear or task arithmetic is searched;
    with `task_inputs` (each task's input, one of `inputs`) up to half of the next trials lean
    the best average toward its worst task (`lean_trial`); the rest are TPE's.

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
    strays = sorted(str(label) for label in (task_inputs or {}).values() if label not in inputs)
    if strays:
        problems.append(f"task_inputs names {', '.join(strays)}, not among the inputs")
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
        return ranking(table[-1])

    start = average_trial(methods, len(inputs))
    leaning = _Leaning(start, inputs, task_inputs, budget=(trials - 1) // 2) if start is not None and task_inputs else None
    try:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        if start is not None:
            study.enqueue_trial(start)
        for _ in range(trials):  # Optuna's ask-and-tell, so each lean can follow the trial before it
            if leaning is not None and table and (params := leaning.next(table)) is not None:
                study.enqueue_trial(params)
            trial = study.ask()
            study.tell(trial, objective(trial))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best = study.best_trial.number
    best_row = next(row for row in table if row["trial"] == best)
    return SearchResult(
        best_recipe=recipes[best], best_objective=best_row["objective"], best_retention=best_row["retention"],
        trials=tuple(table), best_trial=best,
    )


class _Leaning:
    """The pattern search of the trials after the average: which lean comes next, if any."""

    def __init__(self, start: Mapping[str, Any], inputs: Sequence[str], task_inputs: Mapping[str, str], *, budget: int) -> None:
        self.method = start["method"]
        self.inputs = list(inputs)
        self.task_inputs = task_inputs
        self.budget = budget
        self.step = LEAN_STEP
        self.best_before_lean: float | None = None

    def next(self, table: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
        """The next lean given the trials so far, or None when leaning is over."""
        averages = [row for row in table if row["params"].get("method") == self.method]
        if self.budget <= 0 or not averages:
            return None
        best = max(averages, key=ranking)
        if self.best_before_lean is not None and ranking(best) <= self.best_before_lean:
            self.step /= 2  # the last lean did not help: smaller steps from the best
        if self.step < MIN_LEAN_STEP or best["objective"] >= 1.0:
            self.budget = 0
            return None
        kept = {task: value for task, value in best["retention"].items() if task in self.task_inputs}
        if not kept:
            self.budget = 0
            return None
        worst = min(kept, key=lambda task: kept[task])
        self.budget -= 1
        self.best_before_lean = ranking(best)
        return lean_trial(best["params"], len(self.inputs), self.inputs.index(self.task_inputs[worst]), self.step)

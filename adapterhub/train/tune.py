"""Hyperparameter search: Optuna over a small space from YAML, each trial one `train()` run.

Design decisions:
- Optuna does the searching (GridSampler, RandomSampler, TPESampler for Bayesian search),
  seeded from the run's seed so a search can be repeated. Nothing here proposes values.
- A trial is an ordinary training run in its own directory (`runs_dir/trial-N`), so every
  trial has the same checks, metrics and learning curve as `adapterhub train`, and the best
  trial's `final/` directory is registered by the caller as is: no retraining.
- The space is small and explicit: a list means "one of these values" (categorical, the only
  kind a grid takes); `{low, high, log}` means a float (or int when both bounds are ints) range.
  Keys are `TrainConfig` fields; an unknown key or a bad bound is reported before any trial.
- The objective is the final validation loss when there is validation data (always lower is
  better), else the training loss of the last steps; a trial that fails with a user error
  (e.g. a rank the base cannot take) is recorded as failed and the search goes on.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapterhub.errors import AdapterhubError, ValidationError
from adapterhub.train.config import TrainConfig, load_config, unknown_setting_problem
from adapterhub.train.runner import TrainResult, train

Sampler = Literal["grid", "random", "tpe"]
_SAMPLERS = ("grid", "random", "tpe")


@dataclass(frozen=True)
class ParamRange:
    """A numeric range; `integer` when both bounds are ints."""

    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass
class SearchSpec:
    """What to search: parameter -> list of choices or a range; how, and for how many trials."""

    space: dict[str, list[Any] | ParamRange]
    sampler: Sampler = "tpe"
    trials: int = 8
    metric: str = "eval_loss"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, *, trials: int | None = None, sampler: str | None = None) -> SearchSpec:
        """Parse the `search:` section of a run file; one `ValidationError` lists every problem."""
        problems: list[str] = []
        if not data:
            raise ValidationError("search", ["the config has no `search:` section (with `space:` of parameters to tune)"])
        if not isinstance(data, Mapping):
            raise ValidationError("search", ["`search:` must be a mapping with `space`, `sampler`, `trials`"])
        unknown = set(data) - {"space", "sampler", "trials"}
        if unknown:
            problems.append(f"unknown keys {sorted(unknown)} (allowed: space, sampler, trials)")
        chosen_sampler = sampler or data.get("sampler", "tpe")
        if chosen_sampler not in _SAMPLERS:
            problems.append(f"sampler must be one of {list(_SAMPLERS)}, got {chosen_sampler!r}")
        raw_space = data.get("space") or {}
        if not isinstance(raw_space, Mapping) or not raw_space:
            problems.append("space must map at least one parameter to a list of values or {low, high[, log]}")
            raw_space = {}
        space: dict[str, list[Any] | ParamRange] = {}
        fields = set(TrainConfig.model_fields)
        for key, spec in raw_space.items():
            if key not in fields:
                problems.append(unknown_setting_problem(key, f"space.{key}"))
            elif isinstance(spec, list):
                if not spec:
                    problems.append(f"space.{key}: empty list of values")
                space[key] = list(spec)
            elif isinstance(spec, Mapping) and {"low", "high"} <= set(spec) and set(spec) <= {"low", "high", "log"}:
                low, high = spec["low"], spec["high"]
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
                    problems.append(f"space.{key}: needs numbers low < high, got {low!r}, {high!r}")
                    continue
                log = bool(spec.get("log", False))
                if log and low <= 0:
                    problems.append(f"space.{key}: a log range needs low > 0")
                space[key] = ParamRange(float(low), float(high), log, isinstance(low, int) and isinstance(high, int))
            else:
                problems.append(f"space.{key}: use a list of values or {{low, high[, log]}}, got {spec!r}")
        if chosen_sampler == "grid":
            ranges = [key for key, spec in space.items() if isinstance(spec, ParamRange)]
            if ranges:
                problems.append(f"grid search needs lists of values, not ranges: {ranges}")
        count = trials if trials is not None else data.get("trials")
        if chosen_sampler == "grid" and count is None and not problems:
            count = 1
            for spec in space.values():
                count *= len(spec)  # type: ignore[arg-type]
        if count is None:
            count = 8
        if not isinstance(count, int) or count < 1:
            problems.append(f"trials must be a positive integer, got {count!r}")
        if problems:
            raise ValidationError("search", problems)
        return cls(space=space, sampler=chosen_sampler, trials=count)


@dataclass
class TrialOutcome:
    """One trial: its parameters, objective value, run and state."""

    number: int
    params: dict[str, Any]
    value: float | None
    state: str
    steps: int = 0
    wall_time_s: float = 0.0
    error: str | None = None
    result: TrainResult | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number, "params": self.params, "value": self.value, "state": self.state,
            "steps": self.steps, "wall_time_s": round(self.wall_time_s, 3), "error": self.error,
        }


@dataclass
class TuneOutcome:
    trials: list[TrialOutcome]
    best: TrialOutcome

    @property
    def best_result(self) -> TrainResult:
        assert self.best.result is not None
        return self.best.result


def _sampler(spec: SearchSpec, seed: int) -> Any:
    import optuna

    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({k: list(v) for k, v in spec.space.items()}, seed=seed)  # type: ignore[arg-type]
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _suggest(trial: Any, space: Mapping[str, list[Any] | ParamRange]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, spec in space.items():
        if isinstance(spec, ParamRange):
            if spec.integer:
                params[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
            else:
                params[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
        else:
            params[key] = trial.suggest_categorical(key, spec)
    return params


def tune(config: TrainConfig, search: SearchSpec, *, base_dir: Path, runs_dir: Path, progress: bool = False) -> TuneOutcome:
    """Run `search.trials` training runs of `config` with sampled overrides; the best one wins."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base_values = config.model_dump()
    # Every sampled value must form a valid config: check each choice (ranges at their bounds) first.
    problems: list[str] = []
    for key, spec in search.space.items():
        candidates = [spec.low, spec.high] if isinstance(spec, ParamRange) else spec
        for value in candidates:
            try:
                load_config({**base_values, key: int(value) if isinstance(spec, ParamRange) and spec.integer else value})
            except ValidationError as exc:
                problems.append(f"space.{key}={value!r}: {exc}")
    if problems:
        raise ValidationError("search", problems)

    study = optuna.create_study(direction="minimize", sampler=_sampler(search, config.seed))
    outcomes: list[TrialOutcome] = []

    def objective(trial: Any) -> float:
        params = _suggest(trial, search.space)
        trial_config = load_config({**base_values, **params})
        started = time.perf_counter()
        try:
            result = train(trial_config, base_dir=base_dir, output_dir=runs_dir / f"trial-{trial.number}", progress=progress)
        except AdapterhubError as exc:
            outcomes.append(TrialOutcome(trial.number, params, None, "failed", wall_time_s=time.perf_counter() - started, error=str(exc)))
            raise optuna.TrialPruned(str(exc)) from None
        metrics = result.metrics
        value = metrics.get("eval_loss")
        if value is None:
            value = metrics.get("final_train_loss") or metrics.get("train_loss")
        outcomes.append(TrialOutcome(
            trial.number, params, float(value), "complete", steps=int(metrics.get("global_step") or 0),
            wall_time_s=time.perf_counter() - started, result=result,
        ))
        return float(value)

    study.optimize(objective, n_trials=search.trials, catch=())
    complete = [t for t in outcomes if t.state == "complete"]
    if not complete:
        errors = [f"trial {t.number}: {t.error}" for t in outcomes]
        raise ValidationError("search: every trial failed", errors or ["no trial ran"])
    best = min(complete, key=lambda t: t.value)  # type: ignore[arg-type, return-value]
    search.metric = "eval_loss" if best.result and best.result.metrics.get("eval_loss") is not None else "train_loss"
    return TuneOutcome(trials=outcomes, best=best)

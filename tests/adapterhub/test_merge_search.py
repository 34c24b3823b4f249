"""Merge search on the tiny real model with a real (weight-space) scorer: each task's score is
how much of its adapter's ΔW the written merge keeps, ⟨ΔW_merged, ΔW_t⟩ / ‖ΔW_t‖², read back
from the merged adapter's files — so the search machinery (Optuna, merges, the worst-task
objective, the trial table) runs for real without a trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterhub.errors import ValidationError
from adapterhub.merge import merge
from adapterhub.merge.io import LazyTensorReader
from adapterhub.merge.search import average_trial, lean_trial, ranking, retention, search_merge, weight_range
from adapterhub.merge.task_vectors import InputModel
from tests.conftest import build_lora_adapter


@pytest.fixture(scope="module")
def setting(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("search")
    dirs = {
        "first": build_lora_adapter(tiny_base, root / "first", rank=4, alpha=8, seed=11),
        "second": build_lora_adapter(tiny_base, root / "second", rank=4, alpha=8, seed=12, target_modules=("q_proj", "k_proj")),
    }
    base = LazyTensorReader(tiny_base)

    def deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
        model = InputModel.open(adapter_dir)
        return {n: model.task_vector(n, base.get_float) for n in model.touched_weights()}

    parents = {task: deltas(d) for task, d in dirs.items()}

    def score(adapter_dir: Path) -> dict[str, float]:
        merged = deltas(adapter_dir)
        out = {}
        for task, own in parents.items():
            kept = sum(float((merged[n] * d).sum()) for n, d in own.items() if n in merged)
            out[task] = kept / sum(float((d * d).sum()) for d in own.values())
        return out

    return dirs, score


def test_retention_is_the_share_of_the_gain() -> None:
    assert retention({"a": 0.5, "b": 0.2}, {"a": 0.0, "b": 0.2}, {"a": 1.0, "b": 0.2}) == {"a": 0.5}


def test_search_maximizes_the_worst_task_and_keeps_every_trial(tiny_base: Path, setting, tmp_path: Path) -> None:
    dirs, score = setting
    labels = {str(d): d for d in dirs.values()}
    result = search_merge(
        list(labels), base_dir=tiny_base, input_dirs=labels, score=score,
        base_scores={"first": 0.0, "second": 0.0}, single_scores={"first": 1.0, "second": 1.0}, trials=8, seed=1,
        methods=("linear", "task_arithmetic", "ties"),
    )
    assert len(result.trials) == 8
    # Trial 0 is the plain average, enqueued before TPE draws anything.
    assert result.trials[0]["params"] == {"method": "linear", "weight_0": 0.5, "weight_1": 0.5}
    assert result.best_objective == max(row["objective"] for row in result.trials)
    assert result.trials[result.best_trial]["objective"] == result.best_objective
    for row in result.trials:
        assert row["objective"] == min(row["retention"].values())
    # Plain average keeps about half of each task; the search must do better than that.
    mean = merge(
        type(result.best_recipe).from_dict({"merge_method": "linear", "models": [{"model": m} for m in labels]}),
        out_dir=tmp_path / "mean", base_dir=tiny_base, input_dirs=labels,
    )
    assert min(score(mean.out_dir).values()) < 0.6 < result.best_objective
    # The best recipe reproduces its figure when merged again.
    again = merge(result.best_recipe, out_dir=tmp_path / "again", base_dir=tiny_base, input_dirs=labels)
    assert min(score(again.out_dir).values()) == pytest.approx(result.best_objective, abs=1e-6)


def test_the_first_trial_is_the_average_and_weights_scale_with_the_inputs() -> None:
    assert average_trial(("ties", "task_arithmetic"), 4) == {
        "method": "task_arithmetic", "weight_0": 0.25, "weight_1": 0.25, "weight_2": 0.25, "weight_3": 0.25,
    }
    assert average_trial(("task_arithmetic", "linear"), 2)["method"] == "linear"
    assert average_trial(("ties", "tsv"), 2) is None
    assert weight_range(2) == (0.2, 1.5)
    low, high = weight_range(8)
    assert low < 1 / 8 < high


def test_ranking_is_the_worst_task_with_ties_broken_by_the_mean() -> None:
    def row(*kept: float) -> dict:
        return {"retention": dict(enumerate(kept)), "objective": min(kept)}

    assert ranking(row(0.0, 0.9, 0.8)) > ranking(row(0.0, 0.1, 0.0))  # same worst task: the mean decides
    assert ranking(row(0.05, 0.05, 0.05)) > ranking(row(0.0, 1.0, 1.0))  # a better worst task always wins


def test_leans_move_weight_to_the_worst_task_and_stay_in_range() -> None:
    leaned = lean_trial({"method": "linear", "weight_0": 0.5, "weight_1": 0.5}, 2, toward=0, step=0.2)
    assert leaned == pytest.approx({"method": "linear", "weight_0": 0.6, "weight_1": 0.4})
    four = lean_trial({"method": "task_arithmetic", **{f"weight_{i}": 0.25 for i in range(4)}}, 4, toward=3, step=0.2)
    assert four["weight_3"] == pytest.approx(0.3) and four["weight_0"] == pytest.approx(0.25 - 0.05 / 3)
    assert sum(four[f"weight_{i}"] for i in range(4)) == pytest.approx(1.0)
    low, high = weight_range(2)
    edge = lean_trial({"method": "linear", "weight_0": high, "weight_1": low}, 2, toward=0, step=0.2)
    assert (edge["weight_0"], edge["weight_1"]) == (high, low)


def test_trials_after_the_average_lean_toward_the_worst_task(tiny_base: Path, setting) -> None:
    dirs, score = setting
    labels = {str(d): d for d in dirs.values()}
    task_inputs = {task: str(d) for task, d in dirs.items()}
    result = search_merge(
        list(labels), base_dir=tiny_base, input_dirs=labels, score=score,
        base_scores={"first": 0.0, "second": 0.0}, single_scores={"first": 1.0, "second": 1.0}, trials=5, seed=1,
        methods=("linear", "ties"), task_inputs=task_inputs,
    )
    average, first_lean = result.trials[0], result.trials[1]
    worst = min(average["retention"], key=average["retention"].get)
    toward = list(labels).index(task_inputs[worst])
    assert first_lean["params"] == pytest.approx(lean_trial(average["params"], 2, toward=toward, step=0.2))
    assert first_lean["retention"][worst] > average["retention"][worst]
    assert [row["params"]["method"] for row in result.trials[:3]] == ["linear"] * 3  # (5 - 1) // 2 leans
    assert result.best_objective > average["objective"]
    with pytest.raises(ValidationError, match="task_inputs names nowhere, not among the inputs"):
        search_merge(
            list(labels), base_dir=tiny_base, input_dirs=labels, score=score, base_scores={"first": 0.0},
            single_scores={"first": 1.0}, trials=2, task_inputs={"first": "nowhere"},
        )


def test_search_refuses_when_no_task_has_a_gain(tiny_base: Path, setting) -> None:
    dirs, score = setting
    labels = {str(d): d for d in dirs.values()}
    with pytest.raises(ValidationError, match="no gain for a merge to keep"):
        search_merge(
            list(labels), base_dir=tiny_base, input_dirs=labels, score=score,
            base_scores={"first": 0.5, "second": 0.5}, single_scores={"first": 0.5, "second": 0.4}, trials=2,
        )
    with pytest.raises(ValidationError, match="method nuslerp cannot merge 3 inputs"):
        search_merge(
            [*labels, "x"], base_dir=tiny_base, input_dirs=labels, score=score,
            base_scores={"first": 0.0}, single_scores={"first": 1.0}, trials=2, methods=("nuslerp",),
        )

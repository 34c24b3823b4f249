"""The demo's "what each merge keeps" figures: retention arithmetic, the plain verdict, the plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub.demo import gain_retention, plot_quality, retention_verdict

SCORES = {
    "base": {"reverse": 0.0, "spell": 0.1},
    "rev": {"reverse": 1.0, "spell": 0.1},
    "spl": {"reverse": 0.0, "spell": 0.9},
    "linear": {"reverse": 0.67, "spell": 0.9},
    "ties": {"reverse": 0.95, "spell": 0.84},
    "bad": {"reverse": -0.0, "spell": 0.0},
}


def _retention(merges=("linear", "ties", "bad")):
    return gain_retention(SCORES, base="base", adapter_for_task={"reverse": "rev", "spell": "spl"}, merges=list(merges))


def test_retention_is_the_share_of_each_adapters_gain() -> None:
    retention = _retention()
    assert retention["linear"] == pytest.approx({"reverse": 0.67, "spell": 1.0})
    assert retention["ties"] == pytest.approx({"reverse": 0.95, "spell": 0.925})
    assert retention["bad"]["spell"] == pytest.approx(-0.125)  # worse than the base: negative


def test_a_task_whose_adapter_gained_nothing_is_left_out() -> None:
    scores = SCORES | {"spl": {"reverse": 0.0, "spell": 0.1}}
    retention = gain_retention(scores, base="base", adapter_for_task={"reverse": "rev", "spell": "spl"}, merges=["linear"])
    assert retention == {"linear": pytest.approx({"reverse": 0.67})}


def test_the_verdict_names_the_merges_reaching_the_threshold_or_says_none_does() -> None:
    assert retention_verdict(_retention()) == "Merges keeping at least 90% of every task's gain: ties."
    verdict = retention_verdict(_retention(("linear", "bad")))
    assert verdict == "No merge keeps 90% of every task's gain; the best, linear, keeps 67% of reverse's."


def test_the_retention_plot_draws_negative_shares(tmp_path: Path) -> None:
    out = plot_quality(_retention(), tmp_path / "retention.png", metric="share kept", title="kept")
    assert out.stat().st_size > 1000

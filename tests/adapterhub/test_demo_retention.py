"""The demo's "what each merge keeps" figures: retention arithmetic, the plain verdict, the plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub.demo import gain_retention, plot_quality, retention_of, retention_verdict

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


def test_retention_of_states_each_named_merges_worst_task_and_skips_missing_names() -> None:
    sentence = retention_of(_retention(), ["linear", "not_run", "ties"])
    assert sentence == (
        "linear keeps 67% of reverse's gain at worst (reverse 67%, spell 100%); "
        "ties keeps 92% of spell's gain at worst (reverse 95%, spell 92%)."
    )
    assert retention_of(_retention(), ["not_run"]) == ""


def test_the_retention_plot_draws_negative_shares(tmp_path: Path) -> None:
    out = plot_quality(_retention(), tmp_path / "retention.png", metric="share kept", title="kept")
    assert out.stat().st_size > 1000


def test_search_rows_are_in_neither_the_training_nor_the_heldout_file(tmp_path: Path) -> None:
    import json

    from adapterhub.demo import write_search_rows, write_task_data

    train, heldout = write_task_data("reverse", tmp_path, train_rows=30, heldout_rows=10)
    before = train.read_text(), heldout.read_text()
    search = write_search_rows("reverse", tmp_path, rows=6, train_rows=30, heldout_rows=10)

    def prompts(path: Path) -> set[str]:
        return {json.loads(line)["prompt"] for line in path.read_text().splitlines()}

    assert len(prompts(search)) == 6
    assert not prompts(search) & (prompts(train) | prompts(heldout))
    assert (train.read_text(), heldout.read_text()) == before  # the demo's other files are unchanged

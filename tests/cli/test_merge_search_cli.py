"""`adapterhub merge --search` end to end on the tiny model: real LoRAs, real scoring, real registry.

Each task's rows are what its adapter answers (and the base does not), so each adapter scores
1.0 on its own task and the base 0.0: a real gain for the merges to keep, with no trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterhub.cli.main import app
from adapterhub.errors import ValidationError
from adapterhub.registry import Lineage, Registry
from tests.conftest import build_lora_adapter

runner = CliRunner()
WORDS = "apple river stone cloud tiger lamp garden window silver honey bridge forest candle rocket pepper mirror".split()


def _strengthen(adapter_dir: Path, factor: float) -> Path:
    """Scale lora_B so a random adapter changes the tiny model's greedy answers."""
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()}, path)
    return adapter_dir


def _task_rows(base: Path, adapter: Path, prompts: list[str], out: Path) -> Path:
    """Rows whose reference is the adapter's greedy answer where the base answers otherwise."""
    from adapterhub.eval import evaluate_model

    draft = out.with_suffix(".draft.jsonl")
    draft.write_text("".join(json.dumps({"prompt": p, "completion": "x"}) + "\n" for p in prompts))
    by_adapter = evaluate_model(model_dir=base, adapter_dir=adapter, data=draft, metrics=["exact_match"])
    by_base = evaluate_model(model_dir=base, data=draft, metrics=["exact_match"])
    rows = [
        {"prompt": a.prompt, "completion": a.prediction.strip()}
        for a, b in zip(by_adapter.examples, by_base.examples)
        if a.prediction.strip() and a.prediction.strip().casefold() != b.prediction.strip().casefold()
    ]
    assert len(rows) >= 3, "the strengthened adapter must change the base's answers"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    return out


@pytest.fixture(scope="module")
def tasks(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("merge-search")
    made = {}
    for index, name in enumerate(("alpha", "beta")):
        adapter = _strengthen(build_lora_adapter(tiny_base, root / name, seed=index + 11, rank=4), 40.0)
        prompts = [f"say {a} {b}" for a, b in zip(WORDS[index::2], WORDS[::-1])]
        made[name] = (adapter, _task_rows(tiny_base, adapter, prompts, root / f"{name}.jsonl"))
    return made


@pytest.fixture()
def registry(adapterhub_home: Path, tiny_base: Path, tasks: dict[str, tuple[Path, Path]]) -> Registry:
    reg = Registry.open(home=adapterhub_home)
    reg.add_base_model(name="tiny", model_dir=tiny_base)
    for name, (adapter, _) in tasks.items():
        reg.put_adapter(name=name, source_dir=adapter, base="tiny", lineage=Lineage(kind="imported"))
    return reg


def test_search_registers_the_best_with_its_trials_and_loads_the_base_once(
    registry: Registry, tasks: dict[str, tuple[Path, Path]], tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adapterhub.models

    loads: list[Path] = []
    real = adapterhub.models.load_causal_lm

    def counting(model_dir: Path, *args: object, **kwargs: object) -> object:
        loads.append(Path(model_dir))
        return real(model_dir, *args, **kwargs)

    monkeypatch.setattr(adapterhub.models, "load_causal_lm", counting)
    result = runner.invoke(app, [
        "merge", "--search", "--trials", "3", "--adapter", "alpha", "--adapter", "beta",
        "--eval", f"{tasks['beta'][1]}:beta", "--eval", f"{tasks['alpha'][1]}:alpha", "--out", "found", "--json",
    ])
    assert result.exit_code == 0, result.output
    assert loads == [Path(registry.get_base_model("tiny").path)], "the base is loaded once for the base, both adapters and every trial"

    payload = json.loads(result.stdout)
    search = payload["search"]
    assert payload["ref"] == "found:1" and payload["parents"] == ["alpha:1", "beta:1"]
    assert search["base_scores"] == {"beta": 0.0, "alpha": 0.0} and search["adapter_scores"] == {"beta": 1.0, "alpha": 1.0}
    assert len(search["trials"]) == 3 and search["base_loads"] == 1 and search["models_scored"] == 1 + 2 + 3
    for row in search["trials"]:
        assert set(row["scores"]) == {"alpha", "beta"} and row["params"]["method"] in search["methods"]
        assert row["objective"] == min(row["retention"].values())
        assert row["retention"] == {t: row["scores"][t] for t in ("alpha", "beta")}  # base 0, adapter 1
    assert search["best_objective"] == max(row["objective"] for row in search["trials"])
    assert search["trials"][search["best_trial"]]["objective"] == search["best_objective"]
    best = next(row for row in search["trials"] if row["trial"] == search["best_trial"])
    assert payload["method"] == best["params"]["method"]
    assert search["tasks"]["alpha"]["adapter"] == "alpha:1" and search["tasks"]["alpha"]["rows"] >= 3

    record = registry.get("found")
    assert record.lineage.kind == "merged" and record.lineage.parents == ("alpha:1", "beta:1")
    stored = record.lineage.details
    assert stored["search"]["trials"] == search["trials"] and stored["method"] == best["params"]["method"]
    weights = [m["parameters"]["weight"] for m in stored["recipe"]["models"]]
    assert weights == [best["params"]["weight_0"], best["params"]["weight_1"]]


def test_search_table_is_printed(registry: Registry, tasks: dict[str, tuple[Path, Path]]) -> None:
    result = runner.invoke(app, [
        "merge", "--search", "--trials", "2", "--method", "task_arithmetic", "--adapter", "alpha", "--adapter", "beta",
        "--eval", str(tasks["alpha"][1]), "--eval", str(tasks["beta"][1]), "--out", "shown",
    ])
    assert result.exit_code == 0, result.output
    assert "merge search: 2 trials" in result.output and "WORST KEPT" in result.output
    assert "each adapter on its task: alpha 1.000, beta 1.000" in result.output
    assert registry.get("shown").lineage.details["search"]["methods"] == ["task_arithmetic"]


def test_one_mixed_file_with_a_task_field(registry: Registry, tasks: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.jsonl"
    lines = [json.loads(line) | {"task": name} for name in ("alpha", "beta") for line in tasks[name][1].read_text().splitlines()]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = runner.invoke(app, [
        "merge", "--search", "--trials", "1", "--adapter", "alpha", "--adapter", "beta",
        "--eval", f"{mixed}:alpha", "--eval", f"{mixed}:beta", "--out", "mixed", "--json",
    ])
    assert result.exit_code == 0, result.output
    search = json.loads(result.stdout)["search"]
    assert search["adapter_scores"] == {"alpha": 1.0, "beta": 1.0}
    assert search["tasks"]["alpha"]["split"] == "task alpha"


def test_bad_search_input_is_one_error_and_registers_nothing(
    registry: Registry, tasks: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    before = [r.ref for r in registry.list()]
    alpha, beta = str(tasks["alpha"][1]), str(tasks["beta"][1])
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "p", "completion": "c", "task": "gamma"}) + "\n")
    perplexity = tmp_path / "text.jsonl"
    perplexity.write_text(json.dumps({"text": "just text"}) + "\n")
    cases = (
        (["--eval", f"{alpha}:gamma", "--eval", beta], "unknown task 'gamma'"),
        (["--eval", f"{other}:alpha", "--eval", beta], "has no rows of task 'alpha'"),
        (["--eval", alpha], "one --eval FILE[:TASK] per input adapter (2), got 1"),
        (["--eval", alpha, "--eval", beta, "--trials", "0"], "--trials must be at least 1, got 0"),
        (["--eval", str(perplexity), "--eval", beta], "holds text rows (perplexity)"),
        (["--eval", f"{alpha}:alpha", "--eval", f"{beta}:alpha"], "task alpha already has an eval file"),
        (["--eval", alpha, "--eval", beta, "--method", "ties,tie"], "unknown merge method 'tie'"),
        (["--eval", alpha, "--eval", beta, "--method", ","], "name at least one method to search over"),
    )
    for extra, expected in cases:
        outcome = runner.invoke(app, ["merge", "--search", "--adapter", "alpha", "--adapter", "beta", *extra, "--out", "bad"])
        assert isinstance(outcome.exception, ValidationError) and expected in str(outcome.exception), (extra, outcome.output)
    outcome = runner.invoke(app, ["merge", "--search", "--adapter", "alpha=0.5", "--adapter", "beta", "--eval", alpha, "--eval", beta])
    text = str(outcome.exception)
    assert "give --out NAME" in text and "chooses weights and densities" in text
    assert [r.ref for r in registry.list()] == before


def test_the_demos_search_step_runs_on_tiny_inputs(registry: Registry, tasks: dict[str, tuple[Path, Path]]) -> None:
    from adapterhub.cli.demo import search_merge_args

    args = search_merge_args(
        {"first": "alpha:1", "second": "beta:1"}, {"first": tasks["alpha"][1], "second": tasks["beta"][1]},
        base="tiny", out="demo-merge-search", trials=2, rows=3, max_new_tokens=32,
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = registry.get("demo-merge-search")
    search = record.lineage.details["search"]
    assert len(search["trials"]) == 2 and record.tags == ("demo",)
    assert {task: info["rows"] for task, info in search["tasks"].items()} == {"alpha": 3, "beta": 3}

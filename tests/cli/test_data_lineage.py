"""`adapterhub train` links the adapter to dataset records; `adapterhub show` follows adapter → dataset → parents."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from adapterhub.cli.main import app
from adapterhub.registry import Registry
from tests.adapterhub.conftest import reverse_rows, write_jsonl

runner = CliRunner()


def test_train_lineage_points_at_the_dataset_chain(adapterhub_home: Path, tiny_base: Path, tmp_path: Path) -> None:
    registry = Registry.open(home=adapterhub_home)
    registry.add_base_model(name="tiny", model_dir=tiny_base)
    raw = write_jsonl(tmp_path / "raw.jsonl", reverse_rows(16) + reverse_rows(2))
    clean = tmp_path / "rev.jsonl"
    made = runner.invoke(app, ["data", "dedup", str(raw), "--out", str(clean)])
    assert made.exit_code == 0, made.output
    result = runner.invoke(app, ["train", "--base", "tiny", "--data", str(clean), "--name", "rev", "--max-steps", "1",
                                 "--batch-size", "4", "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    details = registry.get("rev").lineage.details
    assert [(d["role"], d["ref"]) for d in details["datasets"]] == [("train", "rev:1")]
    assert details["datasets"][0]["sha256"] == details["dataset_fingerprint"]
    shown = json.loads(runner.invoke(app, ["show", "rev", "--json"]).stdout)
    assert [(s["depth"], s["ref"], s["verb"]) for s in shown["datasets"]["train"]] == [(0, "rev:1", "dedup"), (1, "raw:1", "source")]
    text = runner.invoke(app, ["show", "rev"]).output
    assert "data (train): rev:1 (dedup, " in text and "← raw:1 (source, 18 rows)" in text


def test_a_training_file_not_yet_a_record_becomes_one(adapterhub_home: Path, tiny_base: Path, tmp_path: Path) -> None:
    registry = Registry.open(home=adapterhub_home)
    registry.add_base_model(name="tiny", model_dir=tiny_base)
    data = write_jsonl(tmp_path / "plain.jsonl", reverse_rows(12))
    result = runner.invoke(app, ["train", "--base", "tiny", "--data", str(data), "--name", "p", "--max-steps", "1",
                                 "--batch-size", "4", "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    record = registry.datasets.get("plain")
    assert record.verb == "source" and record.rows == 12
    assert registry.get("p").lineage.details["datasets"][0]["ref"] == "plain:1"


def test_several_weighted_data_files_train_on_their_mix(adapterhub_home: Path, tiny_base: Path, tmp_path: Path) -> None:
    registry = Registry.open(home=adapterhub_home)
    registry.add_base_model(name="tiny", model_dir=tiny_base)
    a = write_jsonl(tmp_path / "taska.jsonl", reverse_rows(12))
    b = write_jsonl(tmp_path / "taskb.jsonl", [{"prompt": f"echo {i}", "completion": f"{i}"} for i in range(12)])
    result = runner.invoke(app, ["train", "--base", "tiny", "--data", f"{a}:0.5", "--data", f"{b}:0.5", "--name", "multi",
                                 "--max-steps", "1", "--batch-size", "4", "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    dataset = registry.get("multi").lineage.details["datasets"][0]
    mix = registry.datasets.get(dataset["ref"])
    assert mix.verb == "mix" and mix.parameters["weights"] == [0.5, 0.5]
    assert sorted(p.name for p in registry.datasets.parents(mix)) == ["taska", "taskb"]
    rows = [json.loads(line) for line in mix.path.read_text().splitlines()]
    assert {r["source"] for r in rows} == {"taska", "taskb"}
    refused = runner.invoke(app, ["train", "--base", "tiny", "--data", f"{a}:heavy", "--data", str(b), "--name", "x", "--max-steps", "1"])
    assert refused.exit_code != 0 and "weight 'heavy' is not a number" in str(refused.exception or refused.output)

"""`adapterhub data ...` through the real console entry point."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.test_registry_cli import run_cli


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_of(n: int) -> list[dict]:
    return [{"text": f"example {i} with some words {i * 3}", "label": "a" if i % 4 else "b"} for i in range(n)]


def test_inspect_json_and_exit_code_on_a_bad_line(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", rows_of(8))
    result = run_cli(tmp_path / "home", "data", "inspect", str(good), "--json", "--histogram", str(tmp_path / "h.png"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rows"] == 8 and report["labels"] == {"a": 6, "b": 2}
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows_of(3) + ['{"text": 5, "label": "a"}'])
    failed = run_cli(tmp_path / "home", "data", "inspect", str(bad))
    assert failed.returncode == 1 and "line 4" in failed.stderr and "Traceback" not in failed.stderr


def test_clean_dedup_balance_split_mix_from_the_shell(tmp_path: Path) -> None:
    home = tmp_path / "home"
    source = write_jsonl(tmp_path / "src.jsonl", rows_of(40) + [rows_of(1)[0], {"text": "mail x@y.org", "label": "a"}])
    cleaned = tmp_path / "clean.jsonl"
    result = run_cli(home, "data", "clean", str(source), "--out", str(cleaned), "--scrub-pii", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stats"]["pii_replaced"] == {"email": 1}
    deduped = tmp_path / "dedup.jsonl"
    test_file = write_jsonl(tmp_path / "test.jsonl", rows_of(3))
    result = run_cli(home, "data", "dedup", str(cleaned), "--out", str(deduped), "--near", "0.9", "--against", str(test_file), "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["leaked_removed"] == 4 and stats["rows_out"] == 38  # row 0 twice, rows 1 and 2
    balanced = tmp_path / "bal.jsonl"
    assert run_cli(home, "data", "balance", str(deduped), "--out", str(balanced), "--seed", "2").returncode == 0
    assert (balanced.with_name("bal.jsonl.card.json")).is_file()
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    result = run_cli(home, "data", "split", str(deduped), "--out-dir", str(split_dir), "--test", "0.2", "--json")
    assert result.returncode == 0, result.stderr
    assert sum(json.loads(result.stdout)["stats"]["rows_out"].values()) == 38
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": f"other {i}", "label": "z"} for i in range(10)])
    mixed = tmp_path / "mix.jsonl"
    result = run_cli(home, "data", "mix", "--data", f"{deduped}:0.5", "--data", f"{other}:0.5", "--out", str(mixed))
    assert result.returncode == 0, result.stderr
    assert {json.loads(line)["source"] for line in mixed.read_text().splitlines()} == {"dedup", "other"}


def test_bad_weight_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", rows_of(3))
    result = run_cli(tmp_path / "home", "data", "mix", "--data", f"{a}:0.5", "--data", f"{a}:heavy", "--out", str(tmp_path / "m.jsonl"))
    assert result.returncode == 1 and "weight 'heavy' is not a number" in result.stderr
    assert not (tmp_path / "m.jsonl").exists()


def test_outputs_become_records_with_their_parents(tmp_path: Path) -> None:
    home = tmp_path / "home"
    source = write_jsonl(tmp_path / "raw.jsonl", rows_of(20) + rows_of(2))
    assert run_cli(home, "data", "clean", str(source), "--out", str(tmp_path / "clean.jsonl")).returncode == 0
    assert run_cli(home, "data", "dedup", str(tmp_path / "clean.jsonl"), "--out", str(tmp_path / "dedup.jsonl")).returncode == 0
    again = run_cli(home, "data", "dedup", str(tmp_path / "clean.jsonl"), "--out", str(tmp_path / "dedup.jsonl"), "--json")
    assert json.loads(again.stdout)["records"] == ["dedup:1"]  # same bytes: the same record
    listed = json.loads(run_cli(home, "data", "list", "--json").stdout)
    assert [(r["ref"], r["verb"], r["rows"]) for r in listed] == [("dedup:1", "dedup", 20), ("clean:1", "clean", 22), ("raw:1", "source", 22)]
    shown = json.loads(run_cli(home, "data", "show", "dedup", "--json").stdout)
    assert shown["file_matches"] is True and shown["stats"]["exact_removed"] == 2
    assert [(p["depth"], p["ref"]) for p in shown["parents"]] == [(1, "clean:1"), (2, "raw:1")]
    (tmp_path / "dedup.jsonl").write_text("changed\n")
    assert "changed since it was registered" in run_cli(home, "data", "show", "dedup:1").stdout
    missing = run_cli(home, "data", "show", "nothing")
    assert missing.returncode == 1 and "no dataset 'nothing'" in missing.stderr

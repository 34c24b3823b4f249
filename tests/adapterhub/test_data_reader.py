"""`iter_data_file` streams exactly the rows `read_data_file` reads: same values, locations and problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub.datafiles import iter_data_file, read_data_file
from adapterhub.errors import ValidationError

ROWS = [{"text": f"row {i}", "label": "a" if i % 2 else "b"} for i in range(7)]


def _jsonl(path: Path) -> Path:
    lines = [json.dumps(r) for r in ROWS[:3]] + ["", "not json", "[1]"] + [json.dumps(r) for r in ROWS[3:]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _csv(path: Path) -> Path:
    path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS), encoding="utf-8")
    return path


def _parquet(path: Path) -> Path:
    from datasets import Dataset

    Dataset.from_list(ROWS).to_parquet(str(path))
    return path


@pytest.mark.parametrize("make", [_jsonl, _csv, _parquet], ids=["jsonl", "csv", "parquet"])
def test_streaming_matches_the_whole_file_reader(tmp_path: Path, make) -> None:
    path = make(tmp_path / f"data.{make.__name__[1:]}")
    streamed = list(iter_data_file(path))
    assert streamed == read_data_file(path)
    assert [r.where for r in streamed if r.problem is None][:2] == (["line 1", "line 2"] if path.suffix == ".jsonl" else
                                                                  ["line 2", "line 3"] if path.suffix == ".csv" else ["row 1", "row 2"])


def test_jsonl_problems_keep_their_line_numbers(tmp_path: Path) -> None:
    rows = list(iter_data_file(_jsonl(tmp_path / "d.jsonl")))
    assert [(r.where, r.problem is not None) for r in rows if r.problem] == [("line 5", True), ("line 6", True)]
    assert rows[0].raw == json.dumps(ROWS[0])


def test_streaming_refuses_what_the_reader_refuses(tmp_path: Path) -> None:
    text_file = tmp_path / "x.txt"
    text_file.write_text("x", encoding="utf-8")
    with pytest.raises(ValidationError, match="unsupported format .txt"):
        iter_data_file(text_file)  # refused on the call, before any row is asked for
    with pytest.raises(ValidationError, match="file not found"):
        iter_data_file(tmp_path / "missing.jsonl")

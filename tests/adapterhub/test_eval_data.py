"""Eval files: shape detection, every format, and bad input named by line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub.errors import NotFoundError, ValidationError
from adapterhub.eval.data import EvalKind, load_eval_dataset


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_prompt_completion_rows(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "2+2?", "completion": "4", "extra": 1}, {"prompt": "3+3?", "completion": "6"}])
    dataset = load_eval_dataset(data)
    assert dataset.kind is EvalKind.GENERATION
    assert [r.reference for r in dataset.rows] == ["4", "6"]
    assert dataset.rows[0].messages == ({"role": "user", "content": "2+2?"},)
    assert len(dataset.sha256) == 64 and dataset.num_rows == 2


def test_chat_messages_last_assistant_turn_is_reference(tmp_path: Path) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    dataset = load_eval_dataset(write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}]))
    row = dataset.rows[0]
    assert row.reference == "Paris"
    assert [turn["role"] for turn in row.messages] == ["system", "user"]


def test_classification_and_text_kinds_and_max_examples(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(6)]
    dataset = load_eval_dataset(write_jsonl(tmp_path / "cls.jsonl", rows), max_examples=4)
    assert dataset.kind is EvalKind.CLASSIFICATION
    assert dataset.labels == ("0", "1")
    assert len(dataset.rows) == 4 and dataset.num_rows == 6
    assert [r.line for r in dataset.rows] == [1, 2, 3, 4]  # first rows in file order
    numeric = [{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": "x"}]
    # the trainer's order for an inferred label set: integers numerically, then the rest
    assert load_eval_dataset(write_jsonl(tmp_path / "num.jsonl", numeric)).labels == ("2", "10", "x")
    text = load_eval_dataset(write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}]))
    assert text.kind is EvalKind.TEXT


def test_csv_and_parquet_through_datasets(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame({"text": ["good film", "bad film", "fine film"], "label": ["pos", "neg", "pos"]})
    csv = tmp_path / "cls.csv"
    frame.to_csv(csv, index=False)
    parquet = tmp_path / "cls.parquet"
    frame.to_parquet(parquet)
    for path in (csv, parquet):
        dataset = load_eval_dataset(path)
        assert dataset.kind is EvalKind.CLASSIFICATION
        assert [r.reference for r in dataset.rows] == ["pos", "neg", "pos"]
    assert [r.line for r in load_eval_dataset(csv).rows] == [2, 3, 4]  # header is line 1


def test_csv_bad_row_named_by_file_line(tmp_path: Path) -> None:
    csv = tmp_path / "gen.csv"
    csv.write_text("prompt,completion\nhello,world\nonly a prompt,\n", encoding="utf-8")
    with pytest.raises(ValidationError, match=r"line 3: missing field 'completion'"):
        load_eval_dataset(csv)


def test_csv_integer_labels_with_a_gap_stay_integers(tmp_path: Path) -> None:
    csv = tmp_path / "cls.csv"
    csv.write_text("text,label\ngood,1\nbad,0\nunlabelled,\n", encoding="utf-8")
    with pytest.raises(ValidationError) as info:
        load_eval_dataset(csv)
    # only the row without a label is wrong; the others are not reported as "1.0"
    assert info.value.problems == ["line 4: missing field 'label'"]


def test_json_array_file_numbers_rows(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "b"}, {"text": "c", "label": "y"}]), encoding="utf-8")
    with pytest.raises(ValidationError) as info:
        load_eval_dataset(path)
    assert info.value.problems == ["item 2: missing field 'label'"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="not found"):
        load_eval_dataset(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValidationError, match="holds no rows"):
        load_eval_dataset(path)


def test_every_bad_row_named_by_line_in_one_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join([
            json.dumps({"prompt": "ok", "completion": "fine"}),
            "",  # blank: skipped but counted
            json.dumps({"prompt": "no completion"}),
            json.dumps({"prompt": "", "completion": "x"}),
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}),
        ]) + "\n",
        encoding="utf-8",
    )
    with pytest.raises(ValidationError) as info:
        load_eval_dataset(path)
    problems = info.value.problems
    assert problems == [
        "line 3: missing field 'completion'",
        "line 4: field 'prompt' is empty",
        "line 5: the last turn must be the assistant's reference reply, got role 'user'",
    ]


def test_malformed_json_lines_are_reported_with_every_other_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(
        '{"prompt": "p", "completion": "c"}\n{"prompt": \n["list"]\n{"prompt": "only"}\n{"prompt": "p", "completion": 5}\n',
        encoding="utf-8",
    )
    with pytest.raises(ValidationError) as info:
        load_eval_dataset(path)
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3", "line 4", "line 5"]
    assert problems[0].startswith("line 2: not valid JSON")
    assert problems[1] == 'line 3: expected a JSON object, got array ["list"]'
    assert problems[2] == "line 4: missing field 'completion'"


def test_training_and_evaluation_read_a_file_alike(tmp_path: Path) -> None:
    """One reader: the rows evaluation scores are the rows training reads, at the same locations."""
    from adapterhub.train.data import read_rows

    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n', encoding="utf-8")
    dataset = load_eval_dataset(path)
    assert [row.line for row in dataset.rows] == [row.number for row in read_rows(path)] == [1, 3]


def test_bad_labels_and_unknown_shape(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": True}, {"text": "c", "label": [1]}, {"text": "d", "label": "y"}]
    with pytest.raises(ValidationError) as info:
        load_eval_dataset(write_jsonl(tmp_path / "cls.jsonl", rows))
    assert [p.split(":")[0] for p in info.value.problems] == ["line 2", "line 3"]
    with pytest.raises(ValidationError, match=r"expected rows with 'prompt' and 'completion'.*found fields \['question'\]"):
        load_eval_dataset(write_jsonl(tmp_path / "odd.jsonl", [{"question": "q"}]))
    with pytest.raises(ValidationError, match="at least two labels"):
        load_eval_dataset(write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}]))


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(ValidationError, match=r"unsupported format \.txt"):
        load_eval_dataset(path)

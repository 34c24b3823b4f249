"""Data preparation verbs (adapterhub.data) on small real files: what each writes, its card, bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from adapterhub.data import (
    balance_file,
    clean_file,
    dedup_file,
    inspect_file,
    mix_files,
    parse_source,
    split_file,
)
from adapterhub.data.output import card_paths
from adapterhub.errors import ValidationError


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def labelled(n: int, *, every: int = 3) -> list[dict]:
    return [{"text": f"sample {i} says something different {i * 7}", "label": "neg" if i % every == 0 else "pos"} for i in range(n)]


def test_inspect_counts_and_names_every_bad_line(tmp_path: Path) -> None:
    rows: list[object] = labelled(9)
    rows += [rows[1], "{not json", {"text": "  ", "label": "pos"}, {"prompt": "p", "completion": "c"}, {"foo": 1}]
    report = inspect_file(write_jsonl(tmp_path / "a.jsonl", rows))
    assert report.rows == 14 and report.format == "text/label"
    assert report.bad_rows == 4 and report.empty_rows == 1
    assert [p.split(":")[0] for p in report.problems] == ["line 11", "line 12", "line 13", "line 14"]
    assert "mixed formats" in report.problems[2] and "no trainer columns" in report.problems[3]
    assert report.duplicate_rows == 1
    assert report.labels == {"neg": 3, "pos": 7}
    assert report.length_unit == "characters" and report.length_stats["max"] >= report.length_stats["min"] > 0


def test_inspect_token_lengths_and_truncation_with_a_real_tokenizer(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("a b c d e f g h".split())}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}, {"text": "a b c d e f g h a b"}, {"text": "a"}])
    report = inspect_file(path, tokenizer=tokenizer, max_length=8)
    assert report.length_unit == "tokens"
    assert list(report.lengths) == [3, 10, 1]
    assert report.truncated_rows == 1 and report.max_length == 8


def test_inspect_histogram_png(tmp_path: Path) -> None:
    from adapterhub.data.inspection import write_histogram

    report = inspect_file(write_jsonl(tmp_path / "a.jsonl", labelled(50)))
    png = write_histogram(report, tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clean_normalizes_drops_and_scrubs_with_counts(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Ｈｅｌｌｏ\u00a0  world  \n next", "completion": "ok"},
        {"prompt": "   ", "completion": "\t"},
        {"prompt": "write to ann.lee@mail.example.org", "completion": "call +44 20 7946 0958 from 192.168.1.20"},
        {"prompt": "card 4111-1111-1111-1111 and order 1234-5678-9012-3456", "completion": "x" * 200},
        {"prompt": "short", "completion": "fine"},
    ]
    out = tmp_path / "clean.jsonl"
    result = clean_file(write_jsonl(tmp_path / "a.jsonl", rows), out, scrub=True, max_chars=100)
    cleaned = read_jsonl(out)
    assert cleaned[0]["prompt"] == "Hello world\n next"  # line breaks and indentation stay
    assert cleaned[1] == {"prompt": "write to [EMAIL]", "completion": "call [PHONE] from [IP]"}
    assert cleaned[2]["prompt"] == "short"
    assert result.stats["empty_dropped"] == 1 and result.stats["over_length_dropped"] == 1
    assert result.stats["pii_replaced"] == {"email": 1, "ip": 1, "phone": 1}
    assert json.loads(card_paths(out)[1].read_text())["stats"]["rows_out"] == 3


def test_clean_card_numbers_need_the_luhn_check(tmp_path: Path) -> None:
    out = tmp_path / "c.jsonl"
    rows = [{"text": "pay 4111 1111 1111 1111 ref 1234 5678 9012 3456"}]
    result = clean_file(write_jsonl(tmp_path / "a.jsonl", rows), out, scrub=True)
    assert read_jsonl(out)[0]["text"].startswith("pay [CARD] ref ")
    assert "1234 5678 9012 3456" not in read_jsonl(out)[0]["text"] or result.stats["pii_replaced"].get("card") == 1
    assert result.stats["pii_replaced"]["card"] == 1


@pytest.mark.parametrize("verb", ["clean", "dedup", "balance", "split", "mix"])
def test_a_bad_row_names_its_line_and_writes_nothing(tmp_path: Path, verb: str) -> None:
    rows: list[object] = labelled(30) + ["[1, 2]"] + labelled(3) + [{"text": "x", "label": "pos", "prompt": "mixed"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValidationError) as caught:
        if verb == "clean":
            clean_file(path, out)
        elif verb == "dedup":
            dedup_file(path, out, near=0.8)
        elif verb == "balance":
            balance_file(path, out)
        elif verb == "split":
            split_file(path, tmp_path)
        else:
            mix_files([parse_source(f"{path}:0.5"), parse_source(f"{write_jsonl(tmp_path / 'ok.jsonl', labelled(5))}:0.5")], out)
    message = str(caught.value)
    assert "bad.jsonl" in message and "line 31: expected a JSON object" in message and "line 35: mixed formats" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad.jsonl"] + (["ok.jsonl"] if verb == "mix" else []))


def test_unreadable_and_non_utf8_files_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    with pytest.raises(ValidationError, match="file not found"):
        clean_file(tmp_path / "missing.jsonl", out)
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValidationError, match="line 2: not UTF-8"):
        dedup_file(bad, out)
    with pytest.raises(ValidationError, match="the dataset is empty"):
        dedup_file(write_jsonl(tmp_path / "empty.jsonl", []), out)
    assert not out.exists()


def test_an_output_may_not_overwrite_its_input(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", labelled(5))
    before = path.read_bytes()
    with pytest.raises(ValidationError, match="is one of the input files"):
        clean_file(path, path)
    assert path.read_bytes() == before


def test_dedup_exact_and_near_with_example_pairs(tmp_path: Path) -> None:
    rows = [
        {"text": "the quick brown fox jumps over the lazy dog near the river bank today"},
        {"text": "The  quick brown fox jumps over the lazy dog near the river bank today"},  # exact after normalizing
        {"text": "the quick brown fox jumps over the lazy dog near the river bank tonight"},  # near
        {"text": "completely unrelated sentence about compilers and register allocation"},
    ]
    out = tmp_path / "d.jsonl"
    exact_only = dedup_file(write_jsonl(tmp_path / "a.jsonl", rows), out)
    assert exact_only.stats["exact_removed"] == 1 and exact_only.stats["near_removed"] == 0
    result = dedup_file(tmp_path / "a.jsonl", out, near=0.7)
    assert [r["text"] for r in read_jsonl(out)] == [rows[0]["text"], rows[3]["text"]]
    assert result.stats["exact_removed"] == 1 and result.stats["near_removed"] == 1 and result.stats["clusters"] == 1
    example = result.stats["cluster_examples"][0]
    assert example["size"] == 3 and example["kept"].startswith("line 1: the quick") and example["removed"].startswith("line 2:")


def test_dedup_against_a_test_file_removes_leaks(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", labelled(20))
    test = write_jsonl(tmp_path / "test.jsonl", [labelled(20)[4], {"text": "SAMPLE 7 says something  different 49", "label": "x"}])
    # Near: a test row with one word changed leaks as well.
    near_leak = {"text": "sample 11 says something different 77 indeed", "label": "pos"}
    write_jsonl(tmp_path / "test.jsonl", [labelled(20)[4], {"text": "SAMPLE 7 says something  different 49", "label": "x"}, near_leak])
    out = tmp_path / "clean.jsonl"
    result = dedup_file(train, out, against=test, near=0.6)
    kept = {r["text"] for r in read_jsonl(out)}
    assert result.stats["leaked_removed"] == 3
    assert not kept & {labelled(20)[i]["text"] for i in (4, 7, 11)}
    assert len(kept) == 17


def test_dedup_threshold_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="Jaccard"):
        dedup_file(write_jsonl(tmp_path / "a.jsonl", labelled(3)), tmp_path / "o.jsonl", near=1.5)


def test_balance_down_up_and_target_seeded(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", labelled(30))  # neg 10, pos 20
    down = balance_file(path, tmp_path / "down.jsonl", seed=3)
    assert Counter(r["label"] for r in read_jsonl(tmp_path / "down.jsonl")) == {"neg": 10, "pos": 10}
    assert down.stats["labels_out"] == {"neg": 10, "pos": 10}
    balance_file(path, tmp_path / "up.jsonl", mode="up", seed=3)
    up = read_jsonl(tmp_path / "up.jsonl")
    assert Counter(r["label"] for r in up) == {"neg": 20, "pos": 20}
    assert max(Counter(r["text"] for r in up).values()) == 2  # every neg row exactly twice
    balance_file(path, tmp_path / "t.jsonl", target={"neg": 1, "pos": 3}, rows=20, seed=3)
    assert Counter(r["label"] for r in read_jsonl(tmp_path / "t.jsonl")) == {"neg": 5, "pos": 15}
    balance_file(path, tmp_path / "down2.jsonl", seed=3)
    assert (tmp_path / "down.jsonl").read_bytes() == (tmp_path / "down2.jsonl").read_bytes()
    balance_file(path, tmp_path / "down3.jsonl", seed=4)
    assert (tmp_path / "down.jsonl").read_bytes() != (tmp_path / "down3.jsonl").read_bytes()
    with pytest.raises(ValidationError, match=r"labels \['maybe'\] are not in the file"):
        balance_file(path, tmp_path / "x.jsonl", target={"maybe": 1})


def test_balance_needs_labels(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="needs text/label"):
        balance_file(write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, {"text": "b"}]), tmp_path / "o.jsonl")


def test_split_is_stratified_reproducible_and_partitions_the_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", labelled(100))  # neg 34, pos 66
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir(), second.mkdir()
    result = split_file(path, first, validation=0.1, test=0.2, seed=5)
    split_file(path, second, validation=0.1, test=0.2, seed=5)
    parts = {name: read_jsonl(first / f"a.{name}.jsonl") for name in ("train", "validation", "test")}
    assert sorted(r["text"] for p in parts.values() for r in p) == sorted(r["text"] for r in labelled(100))
    assert Counter(r["label"] for r in parts["test"]) == {"neg": 7, "pos": 13}
    assert Counter(r["label"] for r in parts["validation"]) == {"neg": 3, "pos": 7}
    assert result.stats["rows_out"] == {"train": 70, "validation": 10, "test": 20}
    for name in ("train", "validation", "test"):
        assert (first / f"a.{name}.jsonl").read_bytes() == (second / f"a.{name}.jsonl").read_bytes()
    other = tmp_path / "three"
    other.mkdir()
    split_file(path, other, validation=0.1, test=0.2, seed=6)
    assert (other / "a.test.jsonl").read_bytes() != (first / "a.test.jsonl").read_bytes()


def test_split_refuses_fractions_that_leave_no_training_rows(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="leaves no training rows"):
        split_file(write_jsonl(tmp_path / "a.jsonl", labelled(10)), tmp_path, validation=0.5, test=0.5)


def test_mix_by_weights_tags_sources_and_is_seeded(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(70)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(100)])
    out = tmp_path / "mix.jsonl"
    result = mix_files([parse_source(f"{a}:0.7"), parse_source(f"{b}:0.3")], out, seed=1)
    rows = read_jsonl(out)
    assert Counter(r["source"] for r in rows) == {"a": 70, "b": 30}
    assert len({r["prompt"] for r in rows if r["source"] == "b"}) == 30  # no up-sampling by default
    assert result.stats["sources"][0]["share"] == 0.7
    assert [r["source"] for r in rows[:20]] != ["a"] * 20  # interleaved, not concatenated
    mix_files([parse_source(f"{a}:0.7"), parse_source(f"{b}:0.3")], tmp_path / "again.jsonl", seed=1)
    assert (tmp_path / "again.jsonl").read_bytes() == out.read_bytes()
    sized = mix_files([parse_source(f"{a}:1"), parse_source(f"{b}:1")], tmp_path / "big.jsonl", rows=300)
    assert [s["rows_out"] for s in sized.stats["sources"]] == [150, 150]


def test_mix_temperature_flattens_shares(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(90)])
    proportional = mix_files([parse_source(str(a)), parse_source(str(b))], tmp_path / "t1.jsonl", temperature=1)
    flat = mix_files([parse_source(str(a)), parse_source(str(b))], tmp_path / "t3.jsonl", temperature=3)
    assert [s["share"] for s in proportional.stats["sources"]] == [0.1, 0.9]
    assert proportional.stats["rows_out"] == 100
    assert flat.stats["sources"][0]["share"] > 0.25


@pytest.mark.parametrize("text, problem", [("a.jsonl:abc", "is not a number"), ("a.jsonl:-1", "positive"), ("a.jsonl:nan", "positive")])
def test_bad_weights_are_named(text: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        parse_source(text)


def test_mix_refuses_different_formats_and_half_weighted_lists(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(ValidationError, match="different formats"):
        mix_files([parse_source(str(a)), parse_source(str(b))], tmp_path / "m.jsonl")
    with pytest.raises(ValidationError, match="to every --data"):
        mix_files([parse_source(f"{a}:0.5"), parse_source(str(a))], tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()


def test_csv_rows_are_located_by_line(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("text,label\nhello there,pos\n,neg\nbye now,neg\n", encoding="utf-8")
    report = inspect_file(path)
    assert report.rows == 3 and report.problems == ["line 3: needs a non-empty 'text' and a label; text missing"]

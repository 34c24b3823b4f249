"""Trainer input checks that need no training: config, YAML + flag overlay, data rows, search spaces."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adapterhub.errors import ValidationError
from adapterhub.train import Method, Task, load_config, merge_overrides, read_yaml_config
from adapterhub.train.data import prepare_data, read_rows
from adapterhub.train.methods import environment_problems
from adapterhub.train.tune import ParamRange, SearchSpec

from .conftest import write_jsonl


def test_yaml_values_are_overridden_by_given_flags_only(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    run = tmp_path / "run.yaml"
    run.write_text("data: data/train.jsonl\nmethod: dora\nlora_rank: 4\nlearning_rate: 0.001\nmax_steps: 7\n")
    values = read_yaml_config(run)
    # Relative paths in a run file are relative to the file, not to the working directory.
    assert values["data"] == str((tmp_path / "data" / "train.jsonl").resolve())
    config = load_config(merge_overrides(values, {"lora_rank": 16, "max_steps": None, "method": None}))
    assert config.lora_rank == 16  # the flag wins
    assert config.max_steps == 7  # not given on the command line: the file's value stays
    assert config.method == Method.DORA
    assert config.resolved()["learning_rate"] == 0.001


def test_every_config_problem_in_one_error() -> None:
    with pytest.raises(ValidationError) as caught:
        load_config({"method": "lorra", "lora_rank": 0, "batch_size": -1, "lernrate": 1})
    message = str(caught.value)
    for fragment in ("method", "lora_rank", "batch_size", "lernrate: not a training setting (did you mean 'learning_rate'?)"):
        assert fragment in message
    assert len(caught.value.problems) == 4


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"task": "setfit", "method": "lora"}, "setfit trains the whole sentence encoder"),
        ({"task": "classification", "packing": True}, "packing only applies"),
        ({"method": "prefix_tuning", "packing": True}, "soft prompt is prepended once per row"),
        ({"method": "prompt_tuning", "target_modules": "q_proj"}, "target_modules only applies"),
        ({"method": "ia3", "use_rslora": True}, "use_rslora only applies"),
        ({"labels": ["a", "b"]}, "labels only apply"),
        ({"validation_split": 0.0, "early_stopping_patience": 2}, "early stopping needs validation data"),
    ],
)
def test_nonsense_combinations_are_refused(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        load_config(values)


def test_setfit_alone_means_full_encoder_training() -> None:
    config = load_config({"task": "setfit"})
    assert config.method == Method.FULL and config.produces_full_model
    assert load_config({"target_modules": "q_proj, v_proj"}).target_modules == ["q_proj", "v_proj"]
    assert load_config({}).resolved_learning_rate == 2e-4
    assert load_config({"method": "prompt_tuning"}).resolved_learning_rate == 3e-2


def test_data_errors_name_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt": "a", "completion": "b"}\n'
        '{"prompt": "a"}\n'
        "\n"
        "{not json\n"
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}\n'
        '{"prompt": 5, "completion": ""}\n'
        "[1, 2]\n"
        '{"prompt": "ok", "completion": "fine"}\n'
        + "[" * 100_000 + "\n"
    )
    with pytest.raises(ValidationError) as caught:
        prepare_data(load_config({"data": path}), chat=True)
    # A line that is not JSON no longer hides the other bad rows: every one, in line order.
    assert caught.value.problems == [
        "line 2: needs non-empty 'prompt' and 'completion' strings (or 'messages'); completion missing",
        "line 4: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "line 5: the last message must be the assistant's (it is what the loss is computed on)",
        "line 6: needs non-empty 'prompt' and 'completion' strings (or 'messages'); prompt is a number 5, completion empty",
        "line 7: expected a JSON object, got array [1, 2]",
        "line 9: not valid JSON (nested too deeply)",
    ]


def test_every_bad_row_of_both_files_in_one_error(tmp_path: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": "a"}, {"text": "", "label": "b"}, {"text": "x", "label": True}])
    validation_file = tmp_path / "val.jsonl"
    validation_file.write_text('{"text": "fine", "label": "a"}\n{oops\n{"text": "y"}\n')
    config = load_config({"data": train_file, "validation_data": validation_file, "task": "classification"})
    with pytest.raises(ValidationError) as caught:
        prepare_data(config, chat=False)
    assert caught.value.problems == [
        "train.jsonl line 2: needs a non-empty 'text' and a 'label' (string or integer); text empty",
        "train.jsonl line 3: needs a non-empty 'text' and a 'label' (string or integer); label is a boolean true",
        "val.jsonl line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "val.jsonl line 3: needs a non-empty 'text' and a 'label' (string or integer); label missing",
    ]
    array = tmp_path / "rows.json"
    array.write_text('[{"text": "a b"}, 7, {"text": 3}]')
    with pytest.raises(ValidationError) as caught:
        prepare_data(load_config({"data": array, "task": "causal_lm"}), chat=False)
    assert caught.value.problems == [
        "item 2: expected a JSON object, got number 7",
        "item 3: needs a non-empty 'text' string; text is a number 3",
    ]


def test_label_outside_the_listed_set_names_its_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "cls.jsonl", [{"text": "x", "label": "yes"}, {"text": "y", "label": "no"}, {"text": "z", "label": "maybe"}])
    config = load_config({"data": path, "task": "classification", "labels": "yes,no", "validation_split": 0})
    with pytest.raises(ValidationError, match=r"line 3: label 'maybe' is not one of \['yes', 'no'\]"):
        prepare_data(config, chat=False)


def test_csv_and_parquet_locations(tmp_path: Path) -> None:
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\ngood day,1\n,0\nbad day,0\n")
    with pytest.raises(ValidationError, match="line 3: needs a non-empty 'text'"):
        prepare_data(load_config({"data": csv_path, "task": "classification"}), chat=False)
    import pandas as pd

    parquet_path = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["a b c", "d e f", ""]}).to_parquet(parquet_path)
    with pytest.raises(ValidationError, match="row 3: needs a non-empty 'text'"):
        prepare_data(load_config({"data": parquet_path, "task": "causal_lm"}), chat=False)


@pytest.mark.parametrize(("name", "content", "fragment"), [
    ("missing.jsonl", None, "file not found"), ("empty.jsonl", "\n\n", "empty"), ("d.txt", "x", "unsupported format"),
    ("latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), "not UTF-8 text (invalid continuation byte at byte 13)"),
])
def test_unreadable_files(tmp_path: Path, name: str, content: str | bytes | None, fragment: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValidationError, match=re.escape(fragment)):
        read_rows(path)


def test_rows_are_shaped_for_trl_and_split_deterministically(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(10)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    config = load_config({"data": path, "validation_split": 0.2, "seed": 3})
    prepared = prepare_data(config, chat=True)
    assert len(prepared.train) == 8 and len(prepared.validation) == 2
    example = prepared.train[0]
    assert [m["role"] for m in example["prompt"]] == ["system", "user"]
    assert example["completion"][0]["role"] == "assistant"
    assert prepare_data(config, chat=True).validation == prepared.validation  # same seed, same split
    plain = prepare_data(config, chat=False).train[0]
    assert isinstance(plain["prompt"], str) and isinstance(plain["completion"], str)
    assert prepared.fingerprint == prepare_data(config, chat=True).fingerprint


def test_labels_are_inferred_sorted_numerically(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": f"t{i}", "label": label} for i, label in enumerate([10, 2, 2, 10, 1])])
    prepared = prepare_data(load_config({"data": path, "task": "classification", "validation_split": 0}), chat=False)
    assert prepared.labels == ["1", "2", "10"]
    assert [e["label"] for e in prepared.train] == [2, 1, 1, 2, 0]


def test_environment_checks_before_loading(tiny_base: Path, tmp_path: Path) -> None:
    problems = environment_problems(load_config({"task": "setfit"}), tiny_base)
    assert any("setfit needs a sentence encoder" in p and "LlamaForCausalLM" in p for p in problems)
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    problems = environment_problems(load_config({"task": "sft", "precision": "fp16"}), encoder)
    assert any("needs a causal language model base" in p for p in problems)
    assert any("fp16 needs a CUDA GPU" in p for p in problems)
    assert environment_problems(load_config({"method": "layerwise", "layerwise_top_k": 9}), tiny_base) == [
        "layerwise_top_k 9 exceeds the base's 2 blocks"
    ]
    assert environment_problems(load_config({"method": "qlora"}), tiny_base) == []


def test_search_spec_parsing() -> None:
    spec = SearchSpec.from_mapping({"sampler": "grid", "space": {"lora_rank": [2, 4], "lr_scheduler": ["linear", "cosine"]}})
    assert spec.trials == 4  # the whole grid
    spec = SearchSpec.from_mapping({"space": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "lora_rank": {"low": 2, "high": 8}}}, trials=3)
    assert spec.sampler == "tpe" and spec.trials == 3
    assert spec.space["lora_rank"] == ParamRange(2.0, 8.0, False, True)
    with pytest.raises(ValidationError) as caught:
        SearchSpec.from_mapping({"sampler": "grid", "space": {"lr": [1], "learning_rate": {"low": 1, "high": 0.1}, "seed": {"low": 1, "high": 3}}})
    problems = " | ".join(caught.value.problems)
    assert "space.lr: not a training setting (did you mean 'learning_rate'?)" in problems
    assert "space.learning_rate: needs numbers low < high" in problems
    assert "grid search needs lists of values" in problems


def test_enum_values_round_trip_to_json() -> None:
    resolved = load_config({"task": "causal_lm", "method": "ia3"}).resolved()
    assert resolved["task"] == Task.CAUSAL_LM.value and resolved["method"] == "ia3"
    json.dumps(resolved)

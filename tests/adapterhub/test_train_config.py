"""Trainer input checks that need no training: config, YAML + flag overlay, data rows, search spaces."""

from __future__ import annotations

import json
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
    )
    with pytest.raises(ValidationError) as caught:
        prepare_data(load_config({"data": path}), chat=True)
    # The broken JSON line is reported first (nothing else can be checked in an unparseable file).
    assert caught.value.problems == ["line 4: not valid JSON (Expecting property name enclosed in double quotes)"]
    path.write_text(path.read_text().replace("{not json\n", ""))
    with pytest.raises(ValidationError) as caught:
        prepare_data(load_config({"data": path}), chat=True)
    problems = caught.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("line 2:") and "completion" in problems[0]
    assert problems[1].startswith("line 4:") and "assistant" in problems[1]


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


@pytest.mark.parametrize(("name", "content", "fragment"), [("missing.jsonl", None, "file not found"), ("empty.jsonl", "\n\n", "empty"), ("d.txt", "x", "unsupported format")])
def test_unreadable_files(tmp_path: Path, name: str, content: str | None, fragment: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValidationError, match=fragment):
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

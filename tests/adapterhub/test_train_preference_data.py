"""Preference data (issue 17): rows checked and shaped for TRL's DPO/ORPO/reward and KTO trainers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub.errors import ValidationError
from adapterhub.train.data import read_rows
from adapterhub.train.preference_data import PreferenceShape, normalise_preference_rows

from .conftest import write_jsonl


def _chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def test_pairs_are_shaped_into_trl_explicit_prompt_formats(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {"chosen": _chat("Capital of France?", "Paris"), "rejected": _chat("Capital of France?", "Lyon")},
        ],
    )
    rows = read_rows(path)
    chat = normalise_preference_rows(rows, PreferenceShape.PAIRS, chat=True)
    assert chat[0] == {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    assert chat[1]["prompt"] == [{"role": "user", "content": "Capital of France?"}]
    assert chat[1]["chosen"] == [{"role": "assistant", "content": "Paris"}]
    assert chat[1]["rejected"] == [{"role": "assistant", "content": "Lyon"}]
    plain = normalise_preference_rows(rows, PreferenceShape.PAIRS, chat=False)
    assert plain[0] == {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    assert plain[1] == {"prompt": "Capital of France?\n", "chosen": "Paris", "rejected": "Lyon"}


def test_every_bad_pair_named_by_line_in_one_error(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": "no rejected", "chosen": "a"}),
        json.dumps({"prompt": "same", "chosen": "x ", "rejected": "x"}),
        "{not json",
        json.dumps({"chosen": _chat("p", "a"), "rejected": _chat("other prompt", "b")}),
        json.dumps({"chosen": _chat("p", "a"), "rejected": [{"role": "user", "content": "p"}, {"role": "user", "content": "b"}]}),
        json.dumps({"prompt": "p", "chosen": 3, "rejected": "b"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValidationError) as caught:
        normalise_preference_rows(read_rows(path), PreferenceShape.PAIRS, chat=True)
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3", "line 4", "line 5", "line 6", "line 7"]
    assert "rejected missing" in problems[0]
    assert "identical" in problems[1]
    assert "share every turn but the last" in problems[3]
    assert "assistant" in problems[4]
    assert "chosen is a number 3" in problems[5]


def test_kto_rows_need_a_boolean_label(tmp_path: Path) -> None:
    good = write_jsonl(
        tmp_path / "kto.jsonl",
        [{"prompt": "2+2?", "completion": "4", "label": True}, {"prompt": "2+2?", "completion": "5", "label": "false"}],
    )
    examples = normalise_preference_rows(read_rows(good), PreferenceShape.KTO, chat=False)
    assert [e["label"] for e in examples] == [True, False]
    assert normalise_preference_rows(read_rows(good), PreferenceShape.KTO, chat=True)[0]["completion"] == [
        {"role": "assistant", "content": "4"}
    ]
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "a", "completion": "b", "label": 1},
            {"prompt": "a", "completion": "b", "label": "yes"},
            {"prompt": "a", "completion": "b"},
            {"prompt": "a", "completion": "b", "label": False},
        ],
    )
    with pytest.raises(ValidationError) as caught:
        normalise_preference_rows(read_rows(bad), PreferenceShape.KTO, chat=False)
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == ["line 1", "line 2", "line 3"]
    assert "label is a number 1, not true or false" in problems[0]
    assert "label missing" in problems[2]


def test_kto_with_one_kind_of_label_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": True}] * 2)
    with pytest.raises(ValidationError, match="both desirable"):
        normalise_preference_rows(read_rows(path), PreferenceShape.KTO, chat=False)


def test_csv_pairs_and_chat_cells(tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "pairs.csv"
    pd.DataFrame(
        [
            {"chosen": json.dumps(_chat("p", "good")), "rejected": json.dumps(_chat("p", "bad"))},
            {"chosen": json.dumps(_chat("p", "same")), "rejected": json.dumps(_chat("p", "same"))},
        ]
    ).to_csv(path, index=False)
    with pytest.raises(ValidationError) as caught:
        normalise_preference_rows(read_rows(path), PreferenceShape.PAIRS, chat=True)
    assert caught.value.problems == ["line 3: chosen and rejected answers are identical"]


def test_shaped_pairs_tokenize_with_trl_and_the_chat_template(tiny_base: Path, tmp_path: Path) -> None:
    """The shapes are what TRL consumes: its own chat-template helper renders them, prompt apart from answers."""
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    if not getattr(tokenizer, "chat_template", None):
        pytest.skip("the tiny base has no chat template")
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2?", "chosen": "four", "rejected": "five"}])
    example = normalise_preference_rows(read_rows(path), PreferenceShape.PAIRS, chat=True)[0]
    rendered = apply_chat_template(example, tokenizer)
    assert "2+2?" in rendered["prompt"] and "four" not in rendered["prompt"]
    assert "four" in rendered["chosen"] and "five" in rendered["rejected"]


def test_shaped_pairs_train_with_trl_dpo_on_a_lora_adapter(tiny_base: Path, tmp_path: Path) -> None:
    """The shapes feed TRL's DPOTrainer as they are; with a PEFT model its reference is the base, adapter disabled."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    chat = bool(getattr(tokenizer, "chat_template", None))
    rows = [{"prompt": f"say {w}", "chosen": w, "rejected": f"not {w}"} for w in ("fox", "dog", "cat", "owl")]
    examples = normalise_preference_rows(read_rows(write_jsonl(tmp_path / "p.jsonl", rows)), PreferenceShape.PAIRS, chat=chat)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = DPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, beta=0.1,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, max_length=64,
    )
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(any(k.startswith("rewards/") for k in entry) for entry in logged)

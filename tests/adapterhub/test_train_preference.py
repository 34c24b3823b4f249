"""Preference tuning (issue 17): `train()` with task dpo, orpo, kto and reward on TRL's trainers, on the tiny base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub.errors import ValidationError
from adapterhub.train import load_config
from adapterhub.train.runner import train

from .conftest import interrupt_after, write_jsonl

WORDS = ["fox", "dog", "cat", "owl", "bee", "elk", "ant", "yak", "emu", "cod", "eel", "hen"]


def _pairs(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"say {w}", "chosen": w, "rejected": f"no {w} here"} for w in WORDS])


def _kto(tmp_path: Path) -> Path:
    rows = [{"prompt": f"say {w}", "completion": w if i % 2 else f"no {w} here", "label": bool(i % 2)} for i, w in enumerate(WORDS)]
    return write_jsonl(tmp_path / "kto.jsonl", rows)


def _assert_counts_tokens(metrics: dict[str, object]) -> None:
    # Every trained sequence (prompt + answer) counts: 3 steps of 2 rows hold at least a dozen tokens.
    assert metrics["tokens_seen"] >= 12 and metrics["tokens_per_second"] > 0


def _config(task: str, data: Path, **extra: object):
    values = {"task": task, "data": str(data), "validation_split": 0.25, "max_steps": 3, "batch_size": 2, "max_length": 64,
              "learning_rate": 1e-2, **extra}
    return load_config(values)


def test_dpo_lora_uses_the_base_as_reference_and_stores_preference_figures(tiny_base: Path, tmp_path: Path) -> None:
    result = train(_config("dpo", _pairs(tmp_path), beta=0.2, loss_type="ipo"), base_dir=tiny_base, output_dir=tmp_path / "run", progress=False)
    metrics = result.metrics
    # Before training the policy is the base and the reference is the base: every implicit reward is 0.
    assert metrics["initial_reward_margin"] == 0 and metrics["initial_reward_accuracy"] == 0
    assert metrics["reward_margin"] != 0 and metrics["held_out_pairs"] == 3
    for key in ("preference_accuracy", "initial_preference_accuracy", "reward_accuracy"):
        assert 0 <= metrics[key] <= 1
    # TRL's own batch means are kept next to ours, and the learning curve has the chosen/rejected rewards.
    assert "rewards_margins" in metrics and "initial_rewards_margins" in metrics
    assert metrics["chosen_reward_history"] and metrics["rejected_reward_history"]
    assert result.config["beta"] == 0.2 and result.config["loss_type"] == "ipo"
    files = {p.name for p in result.output_path.iterdir()}
    # One adapter, no copied "ref" adapter saved next to it (TRL wraps the base itself).
    assert {"adapter_model.safetensors", "adapter_config.json", "learning_curve.png"} <= files and "ref" not in files
    assert json.loads((result.output_path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert result.supervision is None
    _assert_counts_tokens(metrics)


def test_dpo_counts_the_tokens_of_its_pairs_without_padding(tiny_base: Path, tmp_path: Path) -> None:
    # Pairs of very different lengths in one batch: padding would be most of it. padding_free is an
    # sft/causal_lm setting; with it on (the default) a dpo run used to count every padded position.
    rows = [{"prompt": f"say {w}", "chosen": w, "rejected": "no " + " ".join([w] * (1 + 12 * (i % 2)))} for i, w in enumerate(WORDS[:4])]
    data = write_jsonl(tmp_path / "uneven.jsonl", rows)
    runs = {
        padding_free: train(_config("dpo", data, validation_split=0, max_steps=2, padding_free=padding_free), base_dir=tiny_base,
                            output_dir=tmp_path / f"run-{padding_free}", progress=False)
        for padding_free in (True, False)
    }
    assert runs[True].metrics["tokens_seen"] == runs[False].metrics["tokens_seen"] > 0


def test_dpo_resume_ends_at_the_same_adapter(tiny_base: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    config = _config("dpo", _pairs(tmp_path), max_steps=6, save_steps=2, lora_dropout=0.1)
    straight = train(config, base_dir=tiny_base, output_dir=tmp_path / "straight", progress=False)

    run_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(config, base_dir=tiny_base, output_dir=run_dir, progress=False, callbacks=[interrupt_after(4)])
    assert not (run_dir / "final").exists() and (run_dir / "checkpoints" / "checkpoint-4").is_dir()
    resumed = train(config, base_dir=tiny_base, output_dir=run_dir, progress=False, resume=True)
    assert resumed.metrics["resumed_from"] == "checkpoint-4" and resumed.metrics["global_step"] == 6
    # Held-out figures before training come from the first start; after, from the same weights as the straight run.
    for key in ("initial_preference_accuracy", "initial_reward_margin"):
        assert resumed.metrics[key] == straight.metrics[key]
    assert resumed.metrics["reward_margin"] == pytest.approx(straight.metrics["reward_margin"], rel=1e-4, abs=1e-6)
    # The whole run's history, the part before the interruption included.
    assert [step for step, _ in resumed.metrics["chosen_reward_history"]] == [step for step, _ in straight.metrics["chosen_reward_history"]]

    expected = load_file(straight.output_path / "adapter_model.safetensors")
    actual = load_file(resumed.output_path / "adapter_model.safetensors")
    assert expected.keys() == actual.keys() and any("lora_B" in key and value.abs().max() > 0 for key, value in expected.items())
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_dpo_full_model_precomputes_the_reference(tiny_base: Path, tmp_path: Path) -> None:
    result = train(_config("dpo", _pairs(tmp_path), method="full", learning_rate=1e-3), base_dir=tiny_base,
                   output_dir=tmp_path / "run", progress=False)
    assert result.is_full_model and (result.output_path / "model.safetensors").is_file()
    assert result.metrics["initial_reward_margin"] == pytest.approx(0, abs=1e-5)
    assert result.metrics["reward_margin"] != pytest.approx(0, abs=1e-5)


def test_orpo_trains_a_lora_adapter_without_reference(tiny_base: Path, tmp_path: Path) -> None:
    result = train(_config("orpo", _pairs(tmp_path)), base_dir=tiny_base, output_dir=tmp_path / "run", progress=False)
    metrics = result.metrics
    assert 0 <= metrics["initial_preference_accuracy"] <= 1 and 0 <= metrics["preference_accuracy"] <= 1
    assert metrics["reward_margin"] != metrics["initial_reward_margin"]
    assert (result.output_path / "adapter_model.safetensors").is_file()
    # TRL's ORPO batches carry chosen_*/rejected_* rows and no input_ids: transformers alone counted 0.
    _assert_counts_tokens(metrics)


def test_kto_trains_on_labelled_completions(tiny_base: Path, tmp_path: Path) -> None:
    result = train(_config("kto", _kto(tmp_path), method="dora"), base_dir=tiny_base, output_dir=tmp_path / "run", progress=False)
    assert result.metrics["initial_reward_margin"] == 0  # adapter off is the reference: no reward before training
    assert "rewards_chosen" in result.metrics and result.config["loss_type"] == "kto"
    assert json.loads((result.output_path / "adapter_config.json").read_text())["use_dora"] is True
    _assert_counts_tokens(result.metrics)


def test_reward_model_is_a_one_score_classifier_that_loads_back(tiny_base: Path, tmp_path: Path) -> None:
    import torch
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    result = train(_config("reward", _pairs(tmp_path), max_steps=6), base_dir=tiny_base, output_dir=tmp_path / "run", progress=False)
    metrics = result.metrics
    assert 0 <= metrics["initial_preference_accuracy"] <= 1 and metrics["reward_margin"] != metrics["initial_reward_margin"]
    adapter_config = json.loads((result.output_path / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in adapter_config["modules_to_save"]
    _assert_counts_tokens(metrics)
    model = AutoPeftModelForSequenceClassification.from_pretrained(result.output_path, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    with torch.no_grad():
        scores = model(**tokenizer(["say fox fox"], return_tensors="pt")).logits
    assert scores.shape == (1, 1)


def test_bad_preference_rows_refused_before_any_weight_is_read(tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adapterhub.train.runner as runner

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded for bad data")

    monkeypatch.setattr(runner, "build_base", no_model)
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "a", "chosen": "b"},
        {"prompt": "a", "chosen": "same", "rejected": "same"},
    ])
    with pytest.raises(ValidationError) as caught:
        train(_config("dpo", data), base_dir=tiny_base, output_dir=tmp_path / "run", progress=False)
    assert [p.split(":")[0] for p in caught.value.problems] == ["line 2", "line 3"]
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": "maybe"}])
    with pytest.raises(ValidationError, match="line 1: .*label is a"):
        train(_config("kto", kto), base_dir=tiny_base, output_dir=tmp_path / "run2", progress=False)
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"task": "dpo", "method": "prompt_tuning"}, "not prompt_tuning"),
        ({"task": "orpo", "packing": True}, "packing only applies"),
        ({"task": "reward", "beta": 0.5}, "beta only applies to dpo, orpo and kto"),
        ({"task": "orpo", "loss_type": "sigmoid"}, "loss_type only applies to dpo and kto"),
        ({"task": "dpo", "loss_type": "kto"}, "not one of TRL's dpo losses"),
        ({"task": "sft", "beta": 0.1}, "beta only applies"),
    ],
)
def test_preference_combinations_refused_with_the_reason(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        load_config(values)

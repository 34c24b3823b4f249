"""Every kind of bad input gets one error naming every problem and changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from adapterhub.errors import AdapterhubError, ValidationError
from adapterhub.registry import Registry
from tests.conftest import build_lora_adapter
from tests.registry.conftest import registry_state


def _copy(lora_dir: Path, tmp_path: Path, name: str = "bad") -> Path:
    return Path(shutil.copytree(lora_dir, tmp_path / name))


def _assert_rejected(registry: Registry, source: Path, match: str, *, name: str = "x") -> ValidationError | AdapterhubError:
    before = registry_state(registry)
    with pytest.raises(AdapterhubError, match=match) as info:
        registry.put_adapter(name=name, source_dir=source, base="tiny")
    assert registry_state(registry) == before
    return info.value


def test_missing_adapter_config(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    (bad / "adapter_config.json").unlink()
    _assert_rejected(registry, bad, "no adapter_config.json")


def test_config_that_does_not_parse(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    _assert_rejected(registry, bad, "does not parse as JSON")


def test_tensor_names_not_matching_target_modules(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = ["k_proj"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    error = _assert_rejected(registry, bad, "target_modules")
    # Every mismatching tensor is listed in the one error (2 layers x q,v x A,B).
    assert isinstance(error, ValidationError) and len(error.problems) == 8


def test_rank_inconsistent_with_config(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = 8
    (bad / "adapter_config.json").write_text(json.dumps(config))
    _assert_rejected(registry, bad, "do not have rank r=8")


def test_shapes_that_do_not_fit_the_base(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = np.zeros((4, 80), dtype=np.float32)
    save_file(tensors, bad / "adapter_model.safetensors")
    _assert_rejected(registry, bad, r"shape \[4, 80\] does not fit")


def test_adapter_of_another_base(registry: Registry, tiny_base_other: Path, tmp_path: Path) -> None:
    foreign = build_lora_adapter(tiny_base_other, tmp_path / "foreign")
    error = _assert_rejected(registry, foreign, "does not fit base model 'tiny'")
    assert isinstance(error, ValidationError) and len(error.problems) == 8  # every tensor named


def test_modules_missing_from_the_base(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    tensors = load_file(bad / "adapter_model.safetensors")
    renamed = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(renamed, bad / "adapter_model.safetensors")
    _assert_rejected(registry, bad, "modules not in the base model")


def test_pickled_bin_weights_are_refused(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    state = {k: torch.from_numpy(v) for k, v in load_file(bad / "adapter_model.safetensors").items()}
    (bad / "adapter_model.safetensors").unlink()
    torch.save(state, bad / "adapter_model.bin")
    _assert_rejected(registry, bad, "pickled weights adapter_model.bin are refused")


def test_empty_and_truncated_safetensors(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    empty = _copy(lora_dir, tmp_path, "empty")
    (empty / "adapter_model.safetensors").write_bytes(b"")
    _assert_rejected(registry, empty, "empty or truncated")
    truncated = _copy(lora_dir, tmp_path, "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) - 100])
    _assert_rejected(registry, truncated, "truncated")
    header_only = _copy(lora_dir, tmp_path, "header")
    (header_only / "adapter_model.safetensors").write_bytes(data[:20])
    _assert_rejected(registry, header_only, "truncated or not safetensors")


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "bad\x07name", "", "..", "-leading"])
def test_bad_names_are_refused(registry: Registry, lora_dir: Path, name: str) -> None:
    _assert_rejected(registry, lora_dir, "name", name=name)


def test_bad_tag_is_refused(registry: Registry, lora_dir: Path) -> None:
    before = registry_state(registry)
    with pytest.raises(ValidationError, match="tag"):
        registry.put_adapter(name="ok", source_dir=lora_dir, base="tiny", tags=("../x",))
    assert registry_state(registry) == before


def test_unknown_base(registry: Registry, lora_dir: Path) -> None:
    with pytest.raises(AdapterhubError, match="no base model named 'tinyy'; did you mean: tiny"):
        registry.put_adapter(name="x", source_dir=lora_dir, base="tinyy")


def test_all_problems_reported_at_once(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = "four"
    config["lora_alpha"] = "big"
    (bad / "adapter_config.json").write_text(json.dumps(config))
    error = _assert_rejected(registry, bad, "2 problems")
    assert isinstance(error, ValidationError)
    assert any("'r' must be a positive integer" in p for p in error.problems)
    assert any("'lora_alpha' must be a number" in p for p in error.problems)


@pytest.mark.parametrize("peft_type", ["ia3", "prompt_tuning", "prefix_tuning"])
def test_other_peft_types_import(registry: Registry, tiny_base: Path, tmp_path: Path, peft_type: str) -> None:
    adapter = build_lora_adapter(tiny_base, tmp_path / peft_type, peft_type=peft_type)
    record = registry.put_adapter(name=peft_type.replace("_", "-"), source_dir=adapter, base="tiny").record
    assert record.peft_type == peft_type.upper()


def test_dora_and_embedding_lora_import(registry: Registry, tiny_base: Path, tmp_path: Path) -> None:
    dora = build_lora_adapter(tiny_base, tmp_path / "dora", use_dora=True)
    assert registry.put_adapter(name="dora", source_dir=dora, base="tiny").record.peft_type == "LORA"
    emb = build_lora_adapter(tiny_base, tmp_path / "emb", target_modules=("embed_tokens", "q_proj"))
    assert registry.put_adapter(name="emb", source_dir=emb, base="tiny").created


def test_prompt_tuning_of_another_width_is_refused(registry: Registry, tiny_base_other: Path, tmp_path: Path) -> None:
    foreign = build_lora_adapter(tiny_base_other, tmp_path / "pt", peft_type="prompt_tuning")
    _assert_rejected(registry, foreign, "token_dim 96 differs")


def _classifier_of(base: Path, dest: Path, num_labels: int = 2) -> Path:
    """The base's body with a sequence-classification head, saved as transformers does."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    model.save_pretrained(dest)
    return dest


def test_sequence_classifier_of_the_base_is_a_full_model(registry: Registry, tiny_base: Path, tmp_path: Path) -> None:
    record = registry.put_adapter(name="cls", source_dir=_classifier_of(tiny_base, tmp_path / "cls", 3), base="tiny").record
    assert record.is_full_model


def test_sequence_classifier_with_a_bad_head_or_body_is_refused(
    registry: Registry, tiny_base: Path, tiny_base_other: Path, tmp_path: Path
) -> None:
    bad_head = _classifier_of(tiny_base, tmp_path / "bad-head")
    tensors = load_file(bad_head / "model.safetensors")
    tensors["score.weight"] = np.zeros((2, 7), dtype=tensors["score.weight"].dtype)
    save_file(tensors, bad_head / "model.safetensors", metadata={"format": "pt"})
    _assert_rejected(registry, bad_head, "classification head 'score.weight' has width 7")
    _assert_rejected(registry, _classifier_of(tiny_base_other, tmp_path / "foreign"), "has shape")

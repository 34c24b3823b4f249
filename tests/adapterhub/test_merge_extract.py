"""LoRA extraction from a full fine-tune on the tiny real model: exact at full rank, loadable
by PEFT, truncated with the reported error, refusing what is not a full model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub.errors import ValidationError
from adapterhub.merge import extract_lora
from tests.conftest import build_lora_adapter

CHANGED_MATRICES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")
CHANGED_NORM = "model.layers.0.post_attention_layernorm.weight"


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


@pytest.fixture(scope="module")
def fine_tuned(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base with two matrices changed by full-rank noise and one norm changed."""
    out = tmp_path_factory.mktemp("extract") / "ft"
    shutil.copytree(tiny_base, out)
    state = _state(tiny_base)
    generator = torch.Generator().manual_seed(3)
    for name in (*CHANGED_MATRICES, CHANGED_NORM):
        state[name] = state[name] + 0.02 * torch.randn(state[name].shape, generator=generator)
    for old in out.glob("*.safetensors"):
        old.unlink()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _lora_delta(adapter_dir: Path, module: str) -> torch.Tensor:
    import json

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    prefix = f"base_model.model.{module.removesuffix('.weight')}"
    scale = config["lora_alpha"] / config["r"]
    return scale * tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]


def test_full_rank_extraction_reproduces_the_task_vector_and_peft_loads_it(
    tiny_base: Path, fine_tuned: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = extract_lora(fine_tuned, base_dir=tiny_base, out_dir=tmp_path / "lora", rank=64)
    base, tuned = _state(tiny_base), _state(fine_tuned)
    assert set(result.module_errors) == {m.removesuffix(".weight") for m in CHANGED_MATRICES}
    assert result.max_relative_error < 1e-5 and set(result.dropped) == {CHANGED_NORM}
    for name in CHANGED_MATRICES:
        torch.testing.assert_close(_lora_delta(tmp_path / "lora", name), tuned[name] - base[name], atol=1e-5, rtol=1e-4)

    # PEFT applies it: base + LoRA gives the fine-tune's logits except for the (dropped) norm.
    without_norm = tmp_path / "ft-matrices-only"
    shutil.copytree(fine_tuned, without_norm)
    tuned[CHANGED_NORM] = base[CHANGED_NORM]
    save_file(tuned, str(without_norm / "model.safetensors"), metadata={"format": "pt"})
    tokens = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 11]])
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "lora")(tokens).logits
        target = AutoModelForCausalLM.from_pretrained(without_norm)(tokens).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_base)(tokens).logits
    assert (target - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(peft_logits, target, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("option", [{"rank": 4}, {"energy": 0.5}])
def test_truncated_extraction_reports_each_modules_true_error(option: dict, tiny_base: Path, fine_tuned: Path, tmp_path: Path) -> None:
    result = extract_lora(fine_tuned, base_dir=tiny_base, out_dir=tmp_path / "lora", **option)
    base, tuned = _state(tiny_base), _state(fine_tuned)
    assert not result.exact
    for name in CHANGED_MATRICES:
        module = name.removesuffix(".weight")
        dense = tuned[name] - base[name]
        actual = float((dense - _lora_delta(tmp_path / "lora", name)).norm() / dense.norm())
        assert 0 < result.module_errors[module] < 1
        assert abs(actual - result.module_errors[module]) < 1e-4
        if "rank" in option:
            assert result.module_ranks[module] == 4
        else:
            assert result.module_errors[module] <= 0.5**0.5 + 1e-6
    assert any("--full-model" in w for w in result.warnings)  # noise is full rank: rank 4 loses most of it


def test_extraction_refuses_an_adapter_and_writes_nothing(tiny_base: Path, tmp_path: Path) -> None:
    adapter = build_lora_adapter(tiny_base, tmp_path / "adapter", seed=1)
    with pytest.raises(ValidationError, match="is an adapter, not a full model"):
        extract_lora(adapter, base_dir=tiny_base, out_dir=tmp_path / "out", rank=4)
    assert not (tmp_path / "out").exists()

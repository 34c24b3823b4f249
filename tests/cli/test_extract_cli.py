"""`adapterhub extract` end to end on the tiny real model: a registered full fine-tune becomes a
registered LoRA with lineage, loadable by PEFT; what is not a full model is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from adapterhub.cli.main import app
from adapterhub.errors import AdapterhubError
from adapterhub.registry import Lineage, Registry
from tests.conftest import build_lora_adapter

runner = CliRunner()
CHANGED = ("model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.gate_proj.weight")


@pytest.fixture()
def registry(adapterhub_home: Path, tiny_base: Path, tmp_path: Path) -> Registry:
    reg = Registry.open(home=adapterhub_home)
    reg.add_base_model(name="tiny", model_dir=tiny_base)
    fine_tuned = tmp_path / "ft"
    shutil.copytree(tiny_base, fine_tuned)
    state: dict[str, torch.Tensor] = {}
    for file in tiny_base.glob("*.safetensors"):
        state.update(load_file(str(file)))
    generator = torch.Generator().manual_seed(5)
    for name in CHANGED:
        state[name] = state[name] + 0.05 * torch.randn(state[name].shape, generator=generator)
    for old in fine_tuned.glob("*.safetensors"):
        old.unlink()
    save_file(state, str(fine_tuned / "model.safetensors"), metadata={"format": "pt"})
    imported = Lineage(kind="imported", parents=(), details={})
    reg.put_adapter(name="ft", source_dir=fine_tuned, base="tiny", lineage=imported)
    reg.put_adapter(name="lora", source_dir=build_lora_adapter(tiny_base, tmp_path / "lora", seed=1), base="tiny", lineage=imported)
    return reg


def test_extract_registers_a_lora_with_lineage_that_peft_loads(registry: Registry, tiny_base: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = runner.invoke(app, ["extract", "ft", "--rank", "64", "--out", "ft-lora", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["ref"] == "ft-lora:1" and payload["source"] == "ft:1" and payload["rank"] == 64
    assert set(payload["module_errors"]) == {n.removesuffix(".weight") for n in CHANGED}
    assert payload["max_relative_error"] < 1e-5

    record = registry.get("ft-lora")
    assert record.peft_type == "LORA" and not record.is_full_model
    assert record.lineage.kind == "extracted" and record.lineage.parents == ("ft:1",)
    details = record.lineage.details
    assert details["operation"] == "extract" and details["recipe"]["models"] == [{"model": "ft:1"}]
    assert details["error_report"]["module_ranks"] == payload["module_ranks"]

    tokens = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), registry.materialize(record))(tokens).logits
        full_logits = AutoModelForCausalLM.from_pretrained(registry.materialize(registry.get("ft")))(tokens).logits
    torch.testing.assert_close(peft_logits, full_logits, atol=1e-4, rtol=1e-4)


def test_extract_with_energy_prints_ranks_and_errors(registry: Registry) -> None:
    result = runner.invoke(app, ["extract", "ft", "--energy", "0.6", "--out", "ft-small"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "extracted ft:1 → ft-small:1" in result.output and "relative error" in result.output
    assert "model.layers.0.self_attn.v_proj: rank" in result.output
    record = registry.get("ft-small")
    assert all(e <= 0.4**0.5 + 1e-6 for e in record.lineage.details["error_report"]["modules"].values())


@pytest.mark.parametrize(("args", "message"), [
    (["lora", "--rank", "4", "--out", "x"], "lora:1 is an adapter (LORA), not a full model"),
    (["ft", "--rank", "4", "--energy", "0.9", "--out", "x"], "give --rank or --energy, not both"),
    (["ft", "--energy", "1.5", "--out", "x"], "--energy must be in (0, 1]"),
    (["ft", "--rank", "4", "--out", "../x"], "--out"),
    (["nope", "--rank", "4", "--out", "x"], "nope"),
])
def test_extract_refuses_bad_input_and_registers_nothing(registry: Registry, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["extract", *args])
    assert result.exit_code != 0
    assert isinstance(result.exception, AdapterhubError) and message in str(result.exception), result.output
    with pytest.raises(AdapterhubError):
        registry.get("x")

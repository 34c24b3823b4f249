"""LoRA slot sizing of the vLLM backend: pure functions, no vllm needed (the module imports it lazily)."""

from __future__ import annotations

import pytest

from adapterhub.errors import AdapterhubError
from adapterhub.serving.backends.vllm_engine import adapter_max_rank, max_lora_rank_for


def test_max_lora_rank_is_the_smallest_vllm_value_covering_the_fleet() -> None:
    assert max_lora_rank_for([]) == 8
    assert max_lora_rank_for([4, 2]) == 8
    assert max_lora_rank_for([4, 9]) == 16
    assert max_lora_rank_for([300]) == 320
    with pytest.raises(AdapterhubError, match="513"):
        max_lora_rank_for([513])


def test_adapter_rank_counts_its_rank_pattern() -> None:
    assert adapter_max_rank({"r": 4, "rank_pattern": {"v_proj": 12}}) == 12
    assert adapter_max_rank({"r": 16}) == 16


def test_importing_the_backend_does_not_import_vllm() -> None:
    import subprocess
    import sys

    code = "import sys, adapterhub.serving.backends.vllm_engine, adapterhub.serving.app; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_adapters_vllm_would_refuse_are_refused_by_name(tiny_vllm_base, tmp_path) -> None:
    """Checked before the engine sees them (constructing the backend starts no engine)."""
    from safetensors.torch import load_file, save_file

    from adapterhub.serving.backends.base import AdapterLoadError
    from adapterhub.serving.backends.vllm_engine import VllmEngine
    from tests.conftest import build_lora_adapter

    backend = VllmEngine(tiny_vllm_base, base_name="tiny-vllm", max_lora_rank=8)
    fine = build_lora_adapter(tiny_vllm_base, tmp_path / "fine", rank=4, target_modules=("q_proj",))
    assert backend._check_adapter("fine", fine) == 4
    wide = build_lora_adapter(tiny_vllm_base, tmp_path / "wide", rank=16, target_modules=("q_proj",))
    with pytest.raises(AdapterLoadError, match="rank 16, above this server's max LoRA rank 8"):
        backend._check_adapter("wide", wide)
    odd = build_lora_adapter(tiny_vllm_base, tmp_path / "odd", rank=4, target_modules=("q_proj",))
    weights = odd / "adapter_model.safetensors"
    save_file({k.replace("q_proj", "rotary_mix"): v for k, v in load_file(weights).items()}, str(weights))
    with pytest.raises(AdapterLoadError, match="targets rotary_mix"):
        backend._check_adapter("odd", odd)
    dora = build_lora_adapter(tiny_vllm_base, tmp_path / "dora", rank=4, target_modules=("q_proj",), use_dora=True)
    with pytest.raises(AdapterLoadError, match="DoRA"):
        backend._check_adapter("dora", dora)

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


def test_engine_arguments_carry_the_tensor_parallel_size_to_vllm(tiny_vllm_base) -> None:
    """`serve --backend vllm --tensor-parallel-size N` reaches vLLM's `AsyncEngineArgs` as N
    (built, not started: sharding over GPUs needs GPUs this machine lacks)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from adapterhub.cli.serve import vllm_engine

    settings = dict(max_resident=2, max_cpu_adapters=4, max_lora_rank=8, max_model_len=None, max_batch_size=4, dtype="fp32")
    for size in (1, 2, 4):
        backend = vllm_engine(tiny_vllm_base, "tiny-vllm", tensor_parallel_size=size, **settings)
        args = AsyncEngineArgs(**backend.engine_arguments())
        assert args.tensor_parallel_size == size and backend.describe()["tensor_parallel_size"] == size
        assert args.enable_lora and args.max_loras == 3 and args.dtype == "float32"


def test_a_tensor_parallel_size_the_heads_cannot_be_split_by_is_refused(tiny_vllm_base) -> None:
    from adapterhub.serving.backends.vllm_engine import VllmEngine

    # The tiny vLLM base has 4 attention heads and 2 key/value heads.
    with pytest.raises(AdapterhubError, match="--tensor-parallel-size 3 does not divide its 4 attention heads or its 2 key/value heads"):
        VllmEngine(tiny_vllm_base, base_name="tiny-vllm", max_lora_rank=8, tensor_parallel_size=3)
    with pytest.raises(AdapterhubError, match="at least 1"):
        VllmEngine(tiny_vllm_base, base_name="tiny-vllm", max_lora_rank=8, tensor_parallel_size=0)

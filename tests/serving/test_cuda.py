"""The torch engine on a CUDA device (skipped where there is none, as on CI's CPU machines).

The rest of the serving suite pins the engine to the CPU in fp32, where its outputs equal
offline PEFT exactly; these tests check the device path itself: tensors, slots, DoRA gains and
sampling living on the GPU, in fp32 against the CPU references and in the GPU's default dtype.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from adapterhub.serving.backends.base import AdapterSpec, SamplingParams
from adapterhub.serving.backends.torch_engine import EngineConfig, TorchEngine
from tests.serving.conftest import AdapterFleet, ReferenceGenerator, build_dora_adapter, build_ia3_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["hello", "the quick brown fox jumps over the lazy dog", "0 1 2"]


def _kinds(fleet: AdapterFleet, tmp_path: Path) -> dict[str, Path]:
    return {
        "task-2": fleet.dirs["task-2"],
        "task-4": fleet.dirs["task-4"],
        "dora": build_dora_adapter(fleet.base_dir, tmp_path / "dora", seed=1),
        "ia3": build_ia3_adapter(fleet.base_dir, tmp_path / "ia3", seed=2),
    }


async def _generate(engine: TorchEngine, ids: list[int], sampling: SamplingParams, spec: AdapterSpec | None) -> str:
    return "".join([chunk.text async for chunk in engine.generate(ids, sampling, spec)])


def test_cuda_fp32_mixed_batch_matches_offline_peft(adapter_fleet: AdapterFleet, reference: ReferenceGenerator, tmp_path: Path) -> None:
    dirs = _kinds(adapter_fleet, tmp_path)
    jobs = [(name, prompt) for name in (None, *dirs) for prompt in PROMPTS]

    async def scenario() -> list[str]:
        engine = TorchEngine(adapter_fleet.base_dir, base_name="tiny", config=EngineConfig(max_resident=4, device="cuda", dtype=torch.float32))
        await engine.start()
        try:
            greedy = SamplingParams(max_tokens=8, temperature=0)
            specs = {name: AdapterSpec(key=name, locate=lambda path=path: path) for name, path in dirs.items()}
            return list(await asyncio.gather(*(
                _generate(engine, reference.prompt_ids(prompt), greedy, specs[name] if name else None) for name, prompt in jobs
            )))
        finally:
            await engine.shutdown()

    outputs = asyncio.run(scenario())
    for (name, prompt), text in zip(jobs, outputs, strict=True):
        assert text == reference.greedy(dirs[name] if name else None, tuple(reference.prompt_ids(prompt)), 8), (name, prompt)


def test_cuda_default_dtype_serves_and_seeded_sampling_repeats(adapter_fleet: AdapterFleet, reference: ReferenceGenerator, tmp_path: Path) -> None:
    dirs = _kinds(adapter_fleet, tmp_path)

    async def scenario() -> tuple[list[str], list[str], dict[str, float]]:
        engine = TorchEngine(adapter_fleet.base_dir, base_name="tiny", config=EngineConfig(max_resident=2, device="cuda"))
        await engine.start()
        try:
            specs = [AdapterSpec(key=name, locate=lambda path=path: path) for name, path in dirs.items()]
            sampled = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
            ids = reference.prompt_ids(PROMPTS[1])
            # Four adapters through two device slots: loads and evictions on the GPU while sampling.
            first = [await _generate(engine, ids, sampled, spec) for spec in specs]
            second = [await _generate(engine, ids, sampled, spec) for spec in specs]
            return first, second, engine.memory_stats()
        finally:
            await engine.shutdown()

    first, second, stats = asyncio.run(scenario())
    assert all(text for text in first)
    assert second == first  # seeded draws repeat (and the adapters came back from the CPU tier)
    assert len(set(first)) > 1  # the adapters really differ
    assert stats["device_allocated_bytes"] > 0

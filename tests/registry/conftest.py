"""Registry fixtures: a registry with the tiny base registered, and fast adapter variants."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adapterhub.registry import Registry


def make_variant(lora_dir: Path, out_dir: Path, seed: int) -> Path:
    """A copy of `lora_dir` with new random weights of the same shapes (distinct content, fast)."""
    shutil.copytree(lora_dir, out_dir)
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    rng = np.random.default_rng(seed)
    save_file({k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in tensors.items()}, out_dir / "adapter_model.safetensors")
    return out_dir


@pytest.fixture()
def registry(adapterhub_home: Path, tiny_base: Path) -> Registry:
    reg = Registry.open(adapterhub_home)
    reg.add_base_model(name="tiny", model_dir=tiny_base)
    return reg


def registry_state(reg: Registry) -> tuple[list[str], list[str], list[str]]:
    """Everything visible: records, blobs, temp files (to check a failed import changed nothing)."""
    return (
        sorted(r.ref for r in reg.list()),
        sorted(sha for sha, _ in reg.blobs.iter_blobs()),
        sorted(p.name for p in reg.blobs.iter_temp_files()),
    )

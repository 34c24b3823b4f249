"""Registry fixtures: a registry with the tiny base registered, and fast adapter variants.

Every registry test runs twice: on the default SQLite file and on a real PostgreSQL (a fresh
database on the session's `pgserver`, named by `ADAPTERHUB_DATABASE_URL`, which subprocesses
the tests start inherit).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
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


@pytest.fixture(params=["sqlite", "postgresql"])
def adapterhub_home(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty ADAPTERHUB_HOME; for `postgresql`, its metadata in a fresh PostgreSQL database."""
    home = tmp_path / "home"
    monkeypatch.setenv("ADAPTERHUB_HOME", str(home))
    monkeypatch.delenv("ADAPTERHUB_BLOB_DIR", raising=False)
    if request.param == "postgresql":
        monkeypatch.setenv("ADAPTERHUB_DATABASE_URL", request.getfixturevalue("postgres_url"))
    else:
        monkeypatch.delenv("ADAPTERHUB_DATABASE_URL", raising=False)
    yield home


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

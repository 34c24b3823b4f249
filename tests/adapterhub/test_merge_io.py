"""The merge engine's own safetensors reader and streaming writer, checked against safetensors itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapterhub.merge.io import SAFETENSORS_INDEX, LazyTensorReader, ShardedWriter, safetensors_dtype


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=generator),
        "b.norm": torch.randn(3, generator=generator).to(torch.bfloat16),
        "c.half": torch.randn(2, 3, generator=generator).to(torch.float16),
        "d.ids": torch.arange(5, dtype=torch.int64),
        "e.flag": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4),
    }


def test_reader_matches_safetensors(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = LazyTensorReader(tmp_path)
    assert set(reader.names()) == set(tensors)
    for name, expected in tensors.items():
        got = reader.get(name)
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert reader.get_float("b.norm").dtype == torch.float32


@pytest.mark.parametrize("max_shard_bytes", [10**9, 64])
def test_streaming_writer_files_load_with_safetensors(tmp_path: Path, max_shard_bytes: int) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "source.safetensors"))
    source = LazyTensorReader(tmp_path, files=[tmp_path / "source.safetensors"])
    out = tmp_path / "out"
    layout = [(name, safetensors_dtype(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    writer = ShardedWriter(out, layout, max_shard_bytes=max_shard_bytes)
    for index, name in enumerate(reversed(list(tensors))):  # any order
        if index % 2:
            writer.copy_from(name, source)
        else:
            writer.write(name, tensors[name])
    files = writer.finish()
    assert (len(files) > 1) == (max_shard_bytes == 64)
    assert (out / SAFETENSORS_INDEX).exists() == (len(files) > 1)
    loaded: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            loaded |= {key: handle.get_tensor(key) for key in handle.keys()}
    assert set(loaded) == set(tensors)
    for name, expected in tensors.items():
        assert loaded[name].dtype == expected.dtype and torch.equal(loaded[name], expected)
    assert not list(out.glob("*.partial"))


def test_streaming_writer_refuses_wrong_or_missing_tensors(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path / "out", [("w", "F32", (2, 2)), ("v", "F32", (2,))])
    with pytest.raises(ValueError, match="planned F32"):
        writer.write("w", torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="not in the planned layout"):
        writer.write("x", torch.zeros(2))
    writer.write("w", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="never written"):
        writer.finish()
    writer.abort()
    assert not list((tmp_path / "out").iterdir())

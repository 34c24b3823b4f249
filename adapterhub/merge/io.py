"""Streaming tensor IO for merges: read one tensor at a time, write shard by shard.

Design decisions:

- Reading goes through `safetensors.safe_open`, opened per read and closed right after.
  safe_open memory-maps the file, and touched pages of a mapping count in the process's
  resident memory for as long as it stays mapped; keeping three 500 MB models mapped for a
  whole merge would make the peak RSS grow with model size. Re-opening costs a header parse
  (tens of microseconds), negligible next to the merge math.
- Writing buffers tensors until `max_shard_bytes`, then writes that shard with
  `safetensors.torch.save_file` and drops it, so a full-model merge holds at most one shard
  of output. Shards get their final `model-0000i-of-0000N` names and the index once the
  count is known; a single shard is named `model.safetensors` as transformers writes it.
  Files are written under a temporary name and renamed, so a crashed merge never leaves a
  directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from adapterhub.formats import TensorInfo, read_safetensors_header, weight_files

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 256 * 1024 * 1024


class LazyTensorReader:
    """Tensors of a safetensors directory (sharded or not), read one at a time on demand."""

    def __init__(self, model_dir: Path, files: list[Path] | None = None) -> None:
        self.model_dir = model_dir
        self._file_of: dict[str, Path] = {}
        self._infos: dict[str, TensorInfo] = {}
        for path in files if files is not None else weight_files(model_dir):
            for name, info in read_safetensors_header(path).items():
                self._file_of[name] = path
                self._infos[name] = info

    def names(self) -> list[str]:
        """Tensor names in file order (the order a streaming writer should follow)."""
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def torch_dtype(self, name: str) -> torch.dtype:
        """The stored dtype of a tensor, without reading it."""
        import torch

        codes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
        return codes.get(self._infos[name].dtype, torch.float32)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a copy owned by the caller; the file mapping is released)."""
        from safetensors import safe_open

        with safe_open(str(self._file_of[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def get_float(self, name: str) -> torch.Tensor:
        """Read one tensor as float32, the dtype every merge computes in."""
        import torch

        tensor = self.get(name)
        return tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)


class ShardedWriter:
    """Write tensors to `model-*.safetensors` shards, holding at most one shard in memory."""

    def __init__(self, out_dir: Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        out_dir.mkdir(parents=True, exist_ok=True)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._partial_files: list[Path] = []
        self._shard_of: dict[str, int] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += size
        self._shard_of[name] = len(self._partial_files)
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".shard-{len(self._partial_files):05d}.safetensors.partial"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._partial_files.append(path)
        self._buffer = {}
        self._buffer_bytes = 0

    def finish(self) -> list[Path]:
        """Write the last shard, give every shard its final name and write the index."""
        if self._buffer or not self._partial_files:
            self._flush()
        count = len(self._partial_files)
        if count == 1:
            final_names = ["model.safetensors"]
        else:
            final_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        final_paths = []
        for partial, final_name in zip(self._partial_files, final_names, strict=True):
            final_path = self.out_dir / final_name
            os.replace(partial, final_path)
            final_paths.append(final_path)
        if count > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: final_names[shard] for name, shard in self._shard_of.items()},
            }
            _write_json_atomic(self.out_dir / SAFETENSORS_INDEX, index)
        return final_paths


def _write_json_atomic(path: Path, data: object) -> None:
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def write_json(path: Path, data: object) -> None:
    """Write JSON via a temporary file and a rename (never a half-written file)."""
    _write_json_atomic(path, data)


def copy_non_weight_files(source_dir: Path, out_dir: Path) -> list[str]:
    """Copy config, generation config, tokenizer and chat template files (not the weights)."""
    copied = []
    for path in sorted(source_dir.iterdir()):
        if not path.is_file() or path.suffix == ".safetensors" or path.name == SAFETENSORS_INDEX:
            continue
        if path.suffix in (".bin", ".pt", ".pth", ".gguf", ".partial"):
            continue
        shutil.copy2(path, out_dir / path.name)
        copied.append(path.name)
    return copied


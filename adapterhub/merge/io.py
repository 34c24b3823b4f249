"""Streaming tensor IO for merges: read one tensor at a time, write each tensor as it is merged.

Design decisions:

- Reading uses positional reads (`os.preadv`) of a tensor's byte range, straight into a
  freshly allocated torch tensor: one copy from the page cache, no file mapping. A
  memory-mapped file (`safetensors.safe_open`) counts its touched pages in the process's
  resident memory for as long as it stays mapped, and re-mapping per read costs page
  faults on every access; a plain read has neither cost and leaves a tensor the caller owns.
  Headers are parsed and validated once per file (`formats.read_safetensors_header`).
- Writing needs no shard buffer: every output tensor's name, dtype and shape are known
  before the merge starts (they are the base model's, in the output dtype), so the shard
  layout (which tensor goes in which file, at which offset) and the safetensors headers are
  computed up front, and each tensor is written at its offset (`os.pwrite`) the moment it
  is merged, then dropped. Memory stays at the tensors of one weight, whatever the shard
  size; a tensor the merge leaves unchanged is copied file to file by the kernel
  (`os.copy_file_range`) without entering the process at all.
- The files are standard safetensors (the layout `safetensors.torch.save_file` produces:
  8-byte little-endian header length, a JSON header padded with spaces to 8 bytes, data
  ordered by element size so every tensor is aligned), so transformers, vLLM and
  safetensors itself read them; the tests check that against `safetensors.safe_open`.
- Shards get their final `model-0000i-of-0000N` names and the index at the end; a single
  shard is named `model.safetensors` as transformers writes it. Files are written under a
  temporary name and renamed, so a crashed merge never leaves a directory that looks
  complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapterhub.formats import TensorInfo, read_safetensors_header, weight_files

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # "5GB", save_pretrained's and mergekit's default; no longer bounds memory

_ELEMENT_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    }


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype (ValueError for one safetensors lacks)."""
    for code, candidate in _torch_dtypes().items():
        if candidate == dtype:
            return code
    raise ValueError(f"safetensors cannot store {dtype}")


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, without a copy (any dtype, including bfloat16)."""
    import torch

    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Location:
    path: Path
    start: int
    end: int


class LazyTensorReader:
    """Tensors of a safetensors directory (sharded or not), read one at a time on demand."""

    def __init__(self, model_dir: Path, files: list[Path] | None = None) -> None:
        self.model_dir = model_dir
        self._infos: dict[str, TensorInfo] = {}
        self._locations: dict[str, _Location] = {}
        for path in files if files is not None else weight_files(model_dir):
            for name, info in read_safetensors_header(path).items():
                self._infos[name] = info
                self._locations[name] = _Location(path, *info.byte_range)

    def names(self) -> list[str]:
        """Tensor names in file order (the order a streaming writer should follow)."""
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def torch_dtype(self, name: str) -> torch.dtype:
        """The stored dtype of a tensor, without reading it."""
        return _torch_dtypes()[self._infos[name].dtype]

    def location(self, name: str) -> tuple[Path, int, int]:
        """File and absolute byte range of a stored tensor (for copies that skip decoding)."""
        where = self._locations[name]
        return where.path, where.start, where.end

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory the caller owns (no file mapping stays behind)."""
        import torch

        info, where = self._infos[name], self._locations[name]
        tensor = torch.empty(info.shape, dtype=self.torch_dtype(name))
        if where.end > where.start:
            view = _byte_view(tensor)
            fd = os.open(where.path, os.O_RDONLY)
            try:
                done = 0
                while done < len(view):
                    count = os.preadv(fd, [view[done:]], where.start + done)
                    if count == 0:
                        raise OSError(f"{where.path} ended before tensor {name!r} was read")
                    done += count
            finally:
                os.close(fd)
        return tensor

    def get_float(self, name: str) -> torch.Tensor:
        """Read one tensor as float32, the dtype every merge computes in."""
        import torch

        tensor = self.get(name)
        return tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)


@dataclass(frozen=True)
class TensorSlot:
    """Where one output tensor goes: its shard, absolute byte offset, dtype and shape."""

    shard: int
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]


class ShardedWriter:
    """Write a planned set of tensors into safetensors shards, each at its offset, in any order.

    `layout` lists every output tensor (name, safetensors dtype, shape) in the order shards
    should be filled; `write`/`copy_from` may then come in any order, and `finish` refuses
    to name the shards while a tensor is missing.
    """

    def __init__(
        self, out_dir: Path, layout: Sequence[tuple[str, str, tuple[int, ...]]], *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        group_bytes = 0
        for name, dtype, shape in layout:
            size = _ELEMENT_BYTES[dtype] * math.prod(shape)
            if groups[-1] and group_bytes + size > max_shard_bytes:
                groups.append([])
                group_bytes = 0
            groups[-1].append((name, dtype, tuple(shape)))
            group_bytes += size
        self.slots: dict[str, TensorSlot] = {}
        self._files: list[tuple[Path, int]] = []  # (partial path, open descriptor)
        self.total_bytes = 0
        self._closed = False
        try:
            for shard, group in enumerate(groups):
                self._files.append(self._create_shard(shard, group))
        except BaseException:
            self._close()
            raise
        self._pending = set(self.slots)

    def _create_shard(self, shard: int, group: list[tuple[str, str, tuple[int, ...]]]) -> tuple[Path, int]:
        # Larger elements first (stable), as safetensors orders them: with an 8-byte aligned
        # header every tensor then starts at a multiple of its element size.
        ordered = sorted(group, key=lambda entry: -_ELEMENT_BYTES[entry[1]])
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        relative: dict[str, tuple[int, int]] = {}
        for name, dtype, shape in ordered:
            size = _ELEMENT_BYTES[dtype] * math.prod(shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            relative[name] = (offset, offset + size)
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        data_start = 8 + len(encoded)
        path = self.out_dir / f".shard-{shard:05d}.safetensors.partial"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, struct.pack("<Q", len(encoded)) + encoded)
        os.ftruncate(fd, data_start + offset)
        for name, dtype, shape in ordered:
            begin, end = relative[name]
            self.slots[name] = TensorSlot(shard, data_start + begin, data_start + end, dtype, shape)
        self.total_bytes += offset
        return path, fd

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (dtype and shape must match the plan)."""
        slot = self._slot(name)
        if safetensors_dtype(tensor.dtype) != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise ValueError(f"{name}: planned {slot.dtype}{list(slot.shape)}, got {tensor.dtype}{list(tensor.shape)}")
        if slot.end > slot.start:
            view = _byte_view(tensor.contiguous())
            fd = self._files[slot.shard][1]
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], slot.start + done)
        self._pending.discard(name)

    def copy_from(self, name: str, reader: LazyTensorReader, source_name: str | None = None) -> None:
        """Copy a stored tensor byte for byte (same dtype and shape), file to file in the kernel."""
        source_name = source_name or name
        slot = self._slot(name)
        info = reader.info(source_name)
        if info.dtype != slot.dtype or tuple(info.shape) != slot.shape:
            raise ValueError(f"{name}: planned {slot.dtype}{list(slot.shape)}, the source holds {info.dtype}{list(info.shape)}")
        path, start, end = reader.location(source_name)
        out_fd = self._files[slot.shard][1]
        in_fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < end - start:
                try:
                    count = os.copy_file_range(in_fd, out_fd, end - start - done, start + done, slot.start + done)
                except OSError:  # a file system or kernel without it: an ordinary read and write
                    count = 0
                if count == 0:
                    self.write(name, reader.get(source_name))
                    return
                done += count
        finally:
            os.close(in_fd)
        self._pending.discard(name)

    def _slot(self, name: str) -> TensorSlot:
        try:
            return self.slots[name]
        except KeyError:
            raise ValueError(f"tensor {name!r} is not in the planned layout") from None

    def _close(self) -> None:
        # Once only: a descriptor number closed twice may by then belong to another file.
        if self._closed:
            return
        self._closed = True
        for _, fd in self._files:
            os.close(fd)

    def finish(self) -> list[Path]:
        """Close the shards, give each its final name and write the index (when sharded)."""
        self._close()
        if self._pending:
            missing = sorted(self._pending)
            raise ValueError(f"{len(missing)} planned tensors were never written, e.g. {', '.join(missing[:3])}")
        count = len(self._files)
        final_names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        final_paths = []
        for (partial, _), final_name in zip(self._files, final_names, strict=True):
            os.replace(partial, self.out_dir / final_name)
            final_paths.append(self.out_dir / final_name)
        if count > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: final_names[slot.shard] for name, slot in self.slots.items()},
            }
            _write_json_atomic(self.out_dir / SAFETENSORS_INDEX, index)
        return final_paths

    def abort(self) -> None:
        """Close and delete the partial shards (the engine removes its staging directory anyway)."""
        self._close()
        for partial, _ in self._files:
            partial.unlink(missing_ok=True)


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


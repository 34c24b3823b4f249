"""Gathered adapters: LoRA, DoRA and (IA)³ applied row by row inside one batched forward pass.

Design decisions:
- Every `nn.Linear` that some resident adapter targets is wrapped by `SlotAdapterLinear`, which
  keeps stacks of per-adapter tensors, one slot per resident adapter (slot 0 stands for "no
  adapter"). A forward pass gathers each row's entries by its slot index:
  - LoRA: `(x @ A[slot]^T) @ B'[slot]` with a `bmm` and a fused `baddbmm` (the punica/S-LoRA
    "BGMV" idea without a custom kernel), B' = (scale * B)^T, pre-multiplied and stored
    transposed (`[rank, out]`) when written, so neither product copies an operand first. This
    replaces PEFT's `adapter_names` mixed batches, which loop over adapters per module in Python
    and ran at 0.44x base throughput here (ENVIRONMENT.md).
  - DoRA (PEFT's formula at inference, dropout off): `y = base(x) + (g - 1) * (base(x) - bias)
    + g * scale * B A x` with `g = magnitude / ||W + scale * B A||` (L2 norm of each output row,
    as `peft.tuners.lora.dora.DoraLinearLayer.get_weight_norm` computes it). `g` is computed once
    when the adapter is read (W is frozen), folded into B' (`B' = g * scale * B`), and `g - 1` is a
    per-slot vector, 0 for every non-DoRA slot.
  - (IA)³: a per-slot vector multiplies the layer's output, or its input for feedforward modules
    (PEFT stores those as `[1, in]` instead of `[out, 1]`); 1 for every other slot.
  A stack exists in a layer only once some adapter needs it, so a LoRA-only fleet pays for no
  DoRA or (IA)³ math.
- Decode steps of one batch use the same rows over and over, so a layer keeps the rows' gathered
  A and B' (`SlotContext.keep_gathers`) until the gathered slots change or a slot is written
  (`SlotContext.gathers_id`): a step then reads each row's adapter once, where gathering it
  again copied it first (the copy was a third of the mixed-adapter overhead on SmolLM2, 16
  distinct rank-16 adapters, profiled). The copies cost the running batch one adapter's size
  per row (like its KV cache, bounded by `max_batch_size`), and go when the batch empties. A
  prefill of other rows in between leaves them be, so the batch's next step still finds them.
- Where the slots a step needs are one ascending run (`SlotContext.gather_range`: every resident
  adapter in flight, the usual case of a busy server), the layers multiply views of their
  stacks and copy nothing at all. Groups are laid out in slot order for that reason.
- Rows that share an adapter are grouped (`RowGroups`, when the batch has fewer distinct slots
  than rows and the groups are even enough): the layer gathers each distinct slot's A and B'
  once and multiplies `[groups, rows of the group, in]`, so 32 rows over 16 adapters read 16
  adapters' weights per step, not 32 copies. Decode at these sizes is bound by those bytes:
  SmolLM2 bf16, 32 rows, 16 adapters, decode step 155 -> 127 ms (base 103-117 ms), measured.
- On a CPU the engine keeps slots, and so the adapter math, in fp32 whatever the model's
  precision, as PEFT's default `autocast_adapter_dtype` keeps adapter weights: the CPU's bf16
  `bmm` at these shapes is ~4x slower than fp32's (42 vs 11 us for a rank-16 down-projection of
  16 rows, measured here), more than the fp32 copies' extra bytes cost. GPUs keep the model's
  dtype, where bf16 `bmm` is fast.
- A row on slot 0 gets `base(x) * 1 + 0`, bit-identical to the base model, so base requests are
  exact under mixed load (the bug vLLM's CPU build has does not arise).
- Ranks differ between adapters: LoRA stacks are padded to the largest rank seen per module; zero
  padding adds exact zeros.
- Slot capacity (shared by every stack) grows one slot at a time while small and by 1/8 of its
  size beyond 8 slots, capped at `--max-resident` + 1: memory follows the adapters held (within
  1/8, plus the all-zero slot 0) instead of doubling, and a hot load rarely pays for copying
  every existing slot.
- Reading is the hot-load path: `read_adapter_dir` memory-maps `adapter_model.safetensors`
  (private copy-on-write mapping of an immutable registry blob) and returns zero-copy views, so
  the only copy is the one into the slot stacks. `SlotTable.write` batches those copies with
  `torch._foreach_*` ops (one C++ call for all layers rather than several Python-level ops per
  layer). Measured on SmolLM2 (rank 16, q/k/v/o, 240 tensors): `safetensors.load_file` took
  15-23 ms and per-layer writes ~11 ms; this path is a few ms for both.
- `read_adapter_dir` is the only function here that touches files; it validates everything
  (PEFT type, module names, shapes) and reports every problem at once. Prompt and prefix tuning
  (virtual tokens, per-request KV prefixes) cannot be expressed as per-row layer deltas and are
  refused with an error naming the kind.
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from adapterhub import kinds
from adapterhub.formats import read_safetensors_header
from adapterhub.serving.backends.base import AdapterLoadError, adapter_kind, kind_label, why_backend_cannot_serve

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}
#: The tensor roles (`adapterhub.kinds.TensorPart.role`) the gathered slots apply.
_SERVED_ROLES = ("lora_A", "lora_B", "lora_magnitude_vector", "ia3_l")
#: A PEFT config is a few KB; parsing more is refused (a huge or deeply nested one costs memory).
MAX_CONFIG_BYTES = 1 << 20
AdapterKind = Literal["LORA", "DORA", "IA3"]


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """`adapter_config.json` of `adapter_dir` as a dict; `AdapterLoadError` naming the file's
    problem (missing, over `MAX_CONFIG_BYTES`, not JSON, not an object)."""
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterLoadError("no adapter_config.json (not a PEFT adapter directory)")
    size = config_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise AdapterLoadError(f"adapter_config.json is {size} bytes; a PEFT config is a few KB (at most {MAX_CONFIG_BYTES})")
    try:
        config = json.loads(config_path.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterLoadError(f"adapter_config.json is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise AdapterLoadError("adapter_config.json is not a JSON object")
    return config


@dataclass(frozen=True)
class ModuleDelta:
    """What one adapter does to one linear layer.

    LoRA/DoRA: `a` [r, in], `b` [out, r] and `b_scale` (alpha/r, or for DoRA the vector
    g * alpha/r of shape [out, 1]) by which B is multiplied when written; `dora_offset` = g - 1 [out].
    (IA)³: `in_scale` [in] (feedforward modules) or `out_scale` [out].
    """

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    b_scale: float | torch.Tensor = 1.0
    dora_offset: torch.Tensor | None = None
    in_scale: torch.Tensor | None = None
    out_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.a is None else int(self.a.shape[0])


@dataclass(frozen=True)
class AdapterWeights:
    """An adapter as tensors keyed by the base model's module names (the CPU-tier form).

    The tensors are views over `source` (the file's memory map), so holding an adapter costs its
    file size in (shared, reclaimable) page cache and nothing more.
    """

    kind: AdapterKind
    modules: Mapping[str, ModuleDelta]
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int
    source: Any = field(default=None, compare=False, repr=False)


def _finite_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}, not a finite number")
    return float(value)


def map_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], mmap.mmap]:
    """Every tensor of a safetensors file as a zero-copy view over a private memory map.

    The format is an 8-byte little-endian header length, a JSON header of
    `{name: {dtype, shape, data_offsets}}`, then the data. A tensor whose offset is not aligned
    to its element size (legal, though safetensors' writer never produces it) is copied.
    """
    try:
        infos = read_safetensors_header(path)  # validated: offsets inside the file, sizes matching shapes
    except ValueError as exc:
        raise AdapterLoadError(str(exc)) from None
    with path.open("rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    raw = torch.frombuffer(mapped, dtype=torch.uint8)
    tensors: dict[str, torch.Tensor] = {}
    for name, info in infos.items():
        dtype = _SAFETENSORS_DTYPES.get(info.dtype)
        if dtype is None:
            raise AdapterLoadError(f"{path.name}: tensor {name!r} has dtype {info.dtype}, not a float type")
        chunk = raw[info.byte_range[0] : info.byte_range[1]]
        try:
            tensor = chunk.view(dtype)
        except RuntimeError:  # unaligned
            tensor = chunk.clone().view(dtype)
        tensors[name] = tensor.view(info.shape)
    return tensors, mapped


def read_adapter_dir(
    adapter_dir: Path, base_layers: Mapping[str, nn.Linear], config: Mapping[str, Any] | None = None
) -> AdapterWeights:
    """Read a PEFT LoRA, DoRA or (IA)³ directory into `AdapterWeights`, checked against the base.

    `base_layers` maps module names of the base model to its linear layers (DoRA needs their
    weights for the norm of W + scale * B A); `config` is the directory's parsed
    `adapter_config.json` when the caller has read it already. Raises `AdapterLoadError` listing
    every problem found; messages name files by their role, never by the directory they lie in
    (a registry cache path means nothing to a client): the caller says which adapter it is.
    """
    if config is None:
        config = read_adapter_config(adapter_dir)
    peft_type, task_type = config.get("peft_type"), config.get("task_type")
    reason = why_backend_cannot_serve("torch", peft_type, task_type, config)
    if reason is not None:
        raise AdapterLoadError(f"{kind_label(peft_type, task_type, config)} adapters cannot be served by the torch backend: {reason}")
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise AdapterLoadError("no adapter_model.safetensors (pickled .bin weights are not loaded)")
    problems: list[str] = []

    tensors, mapped = map_safetensors(weights_path)
    # Traits the config does not state but the tensors show (stored LoRA biases) refuse it too.
    reason = why_backend_cannot_serve("torch", peft_type, task_type, config, tuple(tensors))
    if reason is not None:
        raise AdapterLoadError(f"{kind_label(peft_type, task_type, config)} adapters cannot be served by the torch backend: {reason}")
    table_kind = adapter_kind(peft_type, config)
    naming = table_kind.naming
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = naming.parse(key)
        if parsed is None or parsed[1].role not in _SERVED_ROLES:
            problems.append(f"unsupported tensor {key!r} (only {naming.part_names} of linear layers are served)")
            continue
        module, part = parsed
        parts.setdefault(module, {})[part.role] = tensor
    if table_kind.peft_type == "IA3":
        modules = _ia3_modules(parts, base_layers, problems)
        kind: AdapterKind = "IA3"
    else:
        modules = _lora_modules(parts, base_layers, config, problems)
        kind = "DORA" if config.get("use_dora") else "LORA"
    if not modules and not problems:
        problems.append("no adapter weights found")
    if problems:
        raise AdapterLoadError("; ".join(problems))
    short_names = sorted({name.rsplit(".", 1)[-1] for name in modules})
    return AdapterWeights(
        kind=kind,
        modules=modules,
        rank=max(m.rank for m in modules.values()),
        target_modules=tuple(short_names),
        size_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        source=mapped,
    )


def _lora_modules(
    parts: Mapping[str, Mapping[str, torch.Tensor]], base_layers: Mapping[str, nn.Linear],
    config: Mapping[str, Any], problems: list[str],
) -> dict[str, ModuleDelta]:
    use_dora = bool(config.get("use_dora"))
    expected_parts = {"lora_A", "lora_B", "lora_magnitude_vector"} if use_dora else {"lora_A", "lora_B"}
    modules: dict[str, ModuleDelta] = {}
    try:  # the registry validated these at import; a directory loaded by path was checked by no one
        _finite_number(config.get("lora_alpha", 8), "lora_alpha")
        _finite_number(config.get("r", 8), "r")
        if not all(isinstance(config.get(key) or {}, Mapping) for key in ("alpha_pattern", "rank_pattern")):
            raise ValueError("alpha_pattern and rank_pattern must be JSON objects")
    except ValueError as exc:
        problems.append(str(exc))
        return modules
    for module, found in sorted(parts.items()):
        if set(found) != expected_parts:
            problems.append(f"{module}: has {sorted(found)} but a {'DoRA' if use_dora else 'LoRA'} module needs {sorted(expected_parts)}")
            continue
        layer = base_layers.get(module)
        if layer is None:
            problems.append(f"{module}: no linear layer of that name in the base model")
            continue
        a, b = found["lora_A"], found["lora_B"]
        out_features, in_features = layer.out_features, layer.in_features
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] < 1 or a.shape[1] != in_features or b.shape != (out_features, a.shape[0]):
            problems.append(
                f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a "
                f"{in_features}->{out_features} layer"
            )
            continue
        rank = a.shape[0]
        try:  # PEFT's pattern lookup, from the table of kinds
            expected_rank = _finite_number(kinds.lora_rank(config, module), f"the rank_pattern value for {module}")
            _finite_number(kinds.lora_alpha(config, module), f"the alpha_pattern value for {module}")
            scale = kinds.lora_scaling(config, module, rank)
        except ValueError as exc:  # kinds.PatternError is one
            problems.append(f"{module}: {exc}")
            continue
        if expected_rank != rank:
            problems.append(f"{module}: rank {rank} in the weights but {expected_rank:g} in the config")
            continue
        if not use_dora:
            modules[module] = ModuleDelta(a=a, b=b, b_scale=scale)
            continue
        magnitude = found["lora_magnitude_vector"].reshape(-1)
        if magnitude.shape[0] != out_features:
            problems.append(f"{module}: lora_magnitude_vector has {magnitude.shape[0]} entries for {out_features} outputs")
            continue
        gain = _dora_gain(layer.weight, a, b, scale, magnitude)
        modules[module] = ModuleDelta(a=a, b=b, b_scale=(gain * scale).unsqueeze(1), dora_offset=gain - 1)
    return modules


_HALF_DTYPES = (torch.bfloat16, torch.float16)

# Bytes of fp32 scratch per chunk of output rows while computing a DoRA gain on the weight's device.
_DORA_CHUNK_BYTES = 64 << 20


@torch.no_grad()
def _dora_gain(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's g = magnitude / ||W + scale * B A|| per output row, in fp32, returned on the CPU.

    The base weight is frozen, so PEFT's per-forward norm is a constant that can be computed once.
    It is computed where the weight lives, a chunk of rows at a time: this runs off the engine
    thread while the device also holds the KV cache, so the fp32 scratch stays bounded instead
    of two full `[out, in]` copies per module. The gain joins the adapter's host-side tensors.
    """
    device = weight.device
    a32 = a.to(device, torch.float32)
    rows_per_chunk = max(1, _DORA_CHUNK_BYTES // (4 * weight.shape[1]))
    norms = []
    for start in range(0, weight.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        lora_rows = b[rows].to(device, torch.float32) @ a32
        norms.append(torch.linalg.norm(weight[rows].float() + scale * lora_rows, dim=1).cpu())
    return magnitude.float().cpu() / torch.cat(norms)


def _ia3_modules(
    parts: Mapping[str, Mapping[str, torch.Tensor]], base_layers: Mapping[str, nn.Linear], problems: list[str]
) -> dict[str, ModuleDelta]:
    modules: dict[str, ModuleDelta] = {}
    for module, found in sorted(parts.items()):
        if set(found) != {"ia3_l"}:
            problems.append(f"{module}: has {sorted(found)} but an (IA)3 module needs only ia3_l")
            continue
        layer = base_layers.get(module)
        if layer is None:
            problems.append(f"{module}: no linear layer of that name in the base model")
            continue
        vector = found["ia3_l"]
        # PEFT builds the vector [1, in] for feedforward modules (scales the input), else [out, 1].
        if tuple(vector.shape) == (layer.out_features, 1):
            modules[module] = ModuleDelta(out_scale=vector.reshape(-1))
        elif tuple(vector.shape) == (1, layer.in_features):
            modules[module] = ModuleDelta(in_scale=vector.reshape(-1))
        else:
            problems.append(
                f"{module}: ia3_l {tuple(vector.shape)} fits neither the output ({layer.out_features}, 1) nor the "
                f"input (1, {layer.in_features}) of the layer"
            )
    return modules


@dataclass(frozen=True)
class RowGroups:
    """The batch's rows grouped by slot, so a layer reads each adapter's A and B' once.

    Row i's input goes to position `positions[i]` of a `[groups, width]` layout (`width` the
    largest group's row count; a shorter group's spare positions repeat its first row, computed
    and never read), and `members` is the inverse: the row at each position. `in_order` says
    the rows already are that layout (one adapter for the whole batch, or rows sorted by slot in
    equal groups): the layer then reshapes instead of reordering.
    """

    slots: torch.Tensor  # int64 [groups]: the distinct slots
    members: torch.Tensor  # int64 [groups * width]: the row each position computes
    positions: torch.Tensor  # int64 [batch]: each row's position
    count: int
    width: int
    in_order: bool = False

    @classmethod
    def of(cls, row_slots: list[int], device: torch.device | str) -> RowGroups | None:
        """The grouping of `row_slots` (groups in slot order), or None where the groups are so
        uneven that the padded layout would compute over 1.5x the batch's rows, or where every
        row has its own slot and the slots are not one contiguous run (grouping then shares
        nothing; a contiguous run is still grouped, since its A and B' are then views of the
        stacks, see `SlotContext.gather_range`)."""
        by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(row_slots):
            by_slot.setdefault(slot, []).append(row)
        slots = sorted(by_slot)
        count, width = len(slots), max(len(rows) for rows in by_slot.values())
        if count == len(row_slots) and slots[-1] - slots[0] != count - 1:
            return None
        if count * width * 2 > len(row_slots) * 3:
            return None
        members: list[int] = []
        positions = [0] * len(row_slots)
        for group, slot in enumerate(slots):
            rows = by_slot[slot]
            members += rows + [rows[0]] * (width - len(rows))
            for offset, row in enumerate(rows):
                positions[row] = group * width + offset
        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)
        in_order = members == list(range(len(row_slots)))
        return cls(as_tensor(slots), as_tensor(members), as_tensor(positions), count, width, in_order)


class SlotContext:
    """Per-step state shared by all wrapped layers: which slot each batch row uses.

    A layer's A and B' for a step are those of `gather_slots`: the groups' slots where rows are
    grouped (`groups`, `RowGroups`), else each row's slot. Where those slots are one ascending
    run (`gather_range`), the layers use views of their stacks and copy nothing. Otherwise a
    layer gathers them, and keeps the copy for later steps (`keep_gathers`: decode steps) under
    `gathers_id`, which names the gathered slots and the stacks' contents: a slot write changes
    it (`invalidate`), a prefill of other rows in between does not, so the running batch's next
    decode step still finds its copy.
    """

    #: Distinct slot tuples remembered with their ids; beyond this the ids start afresh.
    MAX_REMEMBERED = 16

    def __init__(self) -> None:
        self.row_slots: torch.Tensor | None = None  # int64 [batch] on the compute device
        self.groups: RowGroups | None = None
        self.gather_slots: torch.Tensor | None = None  # int64 [n]: whose A and B' the layers use
        self.gather_range: tuple[int, int] | None = None  # (start, stop) when that is one run
        self.gathers_id = 0
        self.keep_gathers = False
        self._next_id = 0
        self._ids: dict[tuple[int, ...], int] = {}  # gathered slots -> gathers_id, until invalidated
        # The last layer input prepared for the adapter math (`lora_input`): (input, its version,
        # dtype, prepared tensor).
        self._input: tuple[torch.Tensor, int, torch.dtype, torch.Tensor] | None = None
        # The last rows seen, with what `set_rows` derived from them:
        self._last: tuple[tuple[int, ...], torch.Tensor, RowGroups | None, torch.Tensor, tuple[int, int] | None, int] | None = None

    def set_rows(self, row_slots: list[int] | None, device: torch.device | str = "cpu", *, keep_gathers: bool = False) -> None:
        # None (or all zeros) means "every row is the base model": wrapped layers skip adapter math.
        # Checked on the host list, so a GPU step needs no device sync for it.
        self.keep_gathers = keep_gathers
        self._input = None
        if row_slots is None or not any(row_slots):
            self.row_slots, self.groups, self.gather_slots, self.gather_range = None, None, None, None
            return
        rows = tuple(row_slots)
        if self._last is None or self._last[0] != rows:
            tensor = torch.tensor(row_slots, dtype=torch.long, device=device)
            groups = RowGroups.of(row_slots, device)
            gathered = rows if groups is None else tuple(groups.slots.tolist())
            ascending = all(later == earlier + 1 for earlier, later in zip(gathered, gathered[1:]))
            run = (gathered[0], gathered[-1] + 1) if ascending else None
            if gathered not in self._ids:
                if len(self._ids) >= self.MAX_REMEMBERED:
                    self._ids.clear()
                self._next_id += 1
                self._ids[gathered] = self._next_id
            slots = tensor if groups is None else groups.slots
            self._last = (rows, tensor, groups, slots, run, self._ids[gathered])
        _, self.row_slots, self.groups, self.gather_slots, self.gather_range, self.gathers_id = self._last

    def lora_input(self, x: torch.Tensor, flat: torch.Tensor, dtype: torch.dtype, groups: RowGroups | None) -> torch.Tensor:
        """`flat` (the layer's input `x` as `[batch, tokens, in]`) in the slots' `dtype`, its rows
        in `groups`' layout where rows are grouped. Layers fed the same tensor (q, k and v read
        one normed hidden state; gate and up another) share one conversion and reordering: the
        last is kept while `x` is the same, unmodified tensor, within one forward pass."""
        kept = self._input
        if kept is not None and kept[0] is x and kept[1] == x._version and kept[2] == dtype:
            return kept[3]
        prepared = flat if flat.dtype == dtype else flat.to(dtype)
        if groups is not None and not groups.in_order:
            prepared = prepared.index_select(0, groups.members)
        self._input = (x, x._version, dtype, prepared)
        return prepared

    def invalidate(self) -> None:
        """A slot was written or the stacks changed: nothing gathered before holds."""
        self._ids.clear()
        self._last = None
        self._next_id += 1
        self.gathers_id = self._next_id


@dataclass
class _WritePlan:
    """The tensor ops of one slot write, collected over all layers and run as a few foreach calls."""

    zeros: list[torch.Tensor] = field(default_factory=list)
    ones: list[torch.Tensor] = field(default_factory=list)
    copy_dst: list[torch.Tensor] = field(default_factory=list)
    copy_src: list[torch.Tensor] = field(default_factory=list)
    scalar_dst: list[torch.Tensor] = field(default_factory=list)
    scalars: list[float] = field(default_factory=list)
    tensor_dst: list[torch.Tensor] = field(default_factory=list)
    tensor_factors: list[torch.Tensor] = field(default_factory=list)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.copy_dst.append(dst)
        self.copy_src.append(src)

    def scale(self, dst: torch.Tensor, factor: float | torch.Tensor) -> None:
        if isinstance(factor, torch.Tensor):
            self.tensor_dst.append(dst)
            self.tensor_factors.append(factor.to(dst.device, dst.dtype))
        elif factor != 1.0:
            self.scalar_dst.append(dst)
            self.scalars.append(factor)

    def run(self) -> None:
        # Order matters: zero/one resets, then copies into (sub-)views, then in-place scaling.
        if self.zeros:
            torch._foreach_zero_(self.zeros)
        if self.ones:
            torch._foreach_zero_(self.ones)
            torch._foreach_add_(self.ones, 1.0)
        if self.copy_dst:
            torch._foreach_copy_(self.copy_dst, self.copy_src)
        if self.scalar_dst:
            torch._foreach_mul_(self.scalar_dst, self.scalars)
        if self.tensor_dst:
            torch._foreach_mul_(self.tensor_dst, self.tensor_factors)


class SlotAdapterLinear(nn.Module):
    """An `nn.Linear` plus per-row adapter effects gathered from slot stacks."""

    def __init__(self, base_layer: nn.Linear, context: SlotContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        # Allocated when an adapter first needs them, each with `capacity` slots:
        self.stack_a: torch.Tensor | None = None  # [slots, rank, in]
        self.stack_b: torch.Tensor | None = None  # [slots, rank, out]: B' transposed, pre-scaled (and DoRA-gained)
        self.stack_dora: torch.Tensor | None = None  # [slots, out]: g - 1 (0: not DoRA)
        self.stack_in: torch.Tensor | None = None  # [slots, in]: (IA)3 input scale (1: none)
        self.stack_out: torch.Tensor | None = None  # [slots, out]: (IA)3 output scale (1: none)
        self._gathers: tuple[torch.Tensor, torch.Tensor] | None = None  # rows' A and B' (see `_gathered`)
        self._gathers_id = -1

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        row_slots = self.context.row_slots
        if row_slots is None:
            return self.base_layer(x)
        # Every allocated stack has `SlotTable.capacity` slots, so any row's slot is in range.
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, tokens, in]
        base_input = flat
        if self.stack_in is not None:
            base_input = flat * self.stack_in.index_select(0, row_slots).unsqueeze(1).to(flat.dtype)
        result = self.base_layer(base_input)
        if self.stack_out is not None:
            result = result * self.stack_out.index_select(0, row_slots).unsqueeze(1).to(result.dtype)
        if self.stack_dora is not None:
            bias = self.base_layer.bias
            without_bias = result if bias is None else result - bias
            result = torch.addcmul(result, self.stack_dora.index_select(0, row_slots).unsqueeze(1).to(result.dtype), without_bias)
        if self.stack_a is not None and self.context.groups is not None:
            result = self._grouped_lora(x, flat, result, self.context.groups)
        elif self.stack_a is not None:
            assert self.stack_b is not None
            a, b = self._gathered()  # [batch, rank, in], [batch, rank, out]
            down = torch.bmm(self.context.lora_input(x, flat, a.dtype, None), a.transpose(1, 2))
            if result.dtype == b.dtype:
                # result + (x A^T) B'^T in one fused op; few tensor ops per layer keep the per-step
                # overhead small when a batch holds many adapters.
                result = torch.baddbmm(result, down, b)
            else:  # slots in another precision than the layer (fp32 slots of a bf16 model on a CPU)
                result.add_(torch.bmm(down, b))  # rounded once, as PEFT's fp32 adapter output is
        return result.reshape(*x.shape[:-1], result.shape[-1])

    def _grouped_lora(self, x: torch.Tensor, flat: torch.Tensor, result: torch.Tensor, groups: RowGroups) -> torch.Tensor:
        """`result + (x A^T) B'` (`[batch, tokens, out]`), each group's A and B' read once: the rows
        are laid out `[groups, width * tokens, in]`, multiplied per group, and put back in row
        order. Rows on slot 0 form a group whose A and B' are zeros: exact zeros added.

        Rows already in that layout (`in_order`) skip both reorderings and, in one precision, use
        the fused `baddbmm`: at SmolLM2's sizes a layer's adapter work is a handful of small ops,
        and each op's fixed cost is what one adapter for the whole batch pays most."""
        a, b = self._gathered()  # [groups, rank, in], [groups, rank, out]
        tokens = flat.shape[1]
        grouped = (groups.count, groups.width * tokens)
        lora_input = self.context.lora_input(x, flat, a.dtype, groups)
        down = torch.bmm(lora_input.reshape(*grouped, lora_input.shape[-1]), a.transpose(1, 2))  # a view when contiguous
        if groups.in_order:
            if result.dtype == b.dtype:
                return torch.baddbmm(result.view(*grouped, result.shape[-1]), down, b).view_as(result)
            return result.add_(torch.bmm(down, b).view_as(result))
        up = torch.bmm(down, b)
        return result.add_(up.view(groups.count * groups.width, tokens, up.shape[-1]).index_select(0, groups.positions))

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The A and B' of the context's `gather_slots` (`[n, rank, in]`, `[n, rank, out]`): views
        of the stacks for one ascending run of slots, else copies, kept for later steps under the
        context's `gathers_id` when it says so."""
        context = self.context
        assert self.stack_a is not None and self.stack_b is not None and context.gather_slots is not None
        if context.gather_range is not None:
            start, stop = context.gather_range
            return self.stack_a[start:stop], self.stack_b[start:stop]
        if self._gathers is not None and self._gathers_id == context.gathers_id:
            return self._gathers
        gathers = (self.stack_a.index_select(0, context.gather_slots), self.stack_b.index_select(0, context.gather_slots))
        if context.keep_gathers:
            self._gathers, self._gathers_id = gathers, context.gathers_id
        return gathers

    def forget_gathers(self) -> None:
        self._gathers = None

    def gather_bytes(self) -> int:
        gathers = self._gathers
        return sum(t.numel() * t.element_size() for t in gathers) if gathers is not None else 0

    # -------------------------------------------------------------- stacks (engine thread)

    def _new_stack(self, capacity: int, *shape: int, fill: float, dtype: torch.dtype) -> torch.Tensor:
        device = self.base_layer.weight.device
        return torch.full((capacity, *shape), fill, device=device, dtype=dtype)

    def grow(self, capacity: int) -> None:
        """Give every allocated stack `capacity` slots (new slots: no adapter)."""
        for name, fill in (("stack_a", 0.0), ("stack_b", 0.0), ("stack_dora", 0.0), ("stack_in", 1.0), ("stack_out", 1.0)):
            stack = getattr(self, name)
            if stack is None or stack.shape[0] >= capacity:
                continue
            grown = stack.new_full((capacity, *stack.shape[1:]), fill)
            grown[: stack.shape[0]] = stack
            setattr(self, name, grown)

    def _ensure_lora(self, rank: int, capacity: int, dtype: torch.dtype) -> None:
        if self.stack_a is None:
            self.stack_a = self._new_stack(capacity, rank, self.in_features, fill=0.0, dtype=dtype)
            self.stack_b = self._new_stack(capacity, rank, self.out_features, fill=0.0, dtype=dtype)
            return
        assert self.stack_b is not None
        stack_rank = self.stack_a.shape[1]
        if rank > stack_rank:  # zero padding of the other slots adds exact zeros
            grown_a = self.stack_a.new_zeros(self.stack_a.shape[0], rank, self.in_features)
            grown_b = self.stack_b.new_zeros(self.stack_b.shape[0], rank, self.out_features)
            grown_a[:, :stack_rank] = self.stack_a
            grown_b[:, :stack_rank] = self.stack_b
            self.stack_a, self.stack_b = grown_a, grown_b

    def plan_write(self, slot: int, delta: ModuleDelta | None, capacity: int, dtype: torch.dtype, plan: _WritePlan) -> None:
        """Add the ops that put `delta` (None: no adapter) into `slot` of every stack to `plan`."""
        if delta is not None and delta.a is not None:
            assert delta.b is not None
            self._ensure_lora(delta.rank, capacity, dtype)
        if delta is not None and delta.dora_offset is not None and self.stack_dora is None:
            self.stack_dora = self._new_stack(capacity, self.out_features, fill=0.0, dtype=dtype)
        if delta is not None and delta.in_scale is not None and self.stack_in is None:
            self.stack_in = self._new_stack(capacity, self.in_features, fill=1.0, dtype=dtype)
        if delta is not None and delta.out_scale is not None and self.stack_out is None:
            self.stack_out = self._new_stack(capacity, self.out_features, fill=1.0, dtype=dtype)

        if self.stack_a is not None:
            assert self.stack_b is not None
            if delta is None or delta.a is None:
                plan.zeros += [self.stack_a[slot], self.stack_b[slot]]
            else:
                assert delta.b is not None
                rank = delta.rank
                if rank == self.stack_a.shape[1]:
                    dst_a, dst_b = self.stack_a[slot], self.stack_b[slot]
                else:
                    plan.zeros += [self.stack_a[slot], self.stack_b[slot]]
                    dst_a, dst_b = self.stack_a[slot, :rank], self.stack_b[slot, :rank]
                plan.copy(dst_a, delta.a)
                # B is stored transposed ([rank, out]); a DoRA gain ([out, 1]) scales its columns.
                b_scale = delta.b_scale.t() if isinstance(delta.b_scale, torch.Tensor) else delta.b_scale
                if dst_b.dtype in _HALF_DTYPES and delta.b.dtype == torch.float32:
                    # B * scale in fp32, then one rounding to 16 bits (PEFT keeps the delta in fp32;
                    # copying first and scaling in bf16 would round twice).
                    plan.copy(dst_b, delta.b.t() * b_scale)
                else:
                    plan.copy(dst_b, delta.b.t())
                    plan.scale(dst_b, b_scale)
        for stack, value, neutral in (
            (self.stack_dora, None if delta is None else delta.dora_offset, plan.zeros),
            (self.stack_in, None if delta is None else delta.in_scale, plan.ones),
            (self.stack_out, None if delta is None else delta.out_scale, plan.ones),
        ):
            if stack is None:
                continue
            if value is None:
                neutral.append(stack[slot])
            else:
                plan.copy(stack[slot], value)

    def stack_bytes(self) -> int:
        stacks = (self.stack_a, self.stack_b, self.stack_dora, self.stack_in, self.stack_out)
        return sum(t.numel() * t.element_size() for t in stacks if t is not None)


class SlotTable:
    """Owns the wrapped layers of one model and writes adapters into numbered slots."""

    def __init__(self, model: nn.Module, max_slots: int = 0, dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.max_slots = max_slots  # capacity cap (max resident adapters + 1); 0: no cap
        self.dtype = dtype or next((p.dtype for p in model.parameters()), torch.float32)
        self.context = SlotContext()
        self.layers: dict[str, SlotAdapterLinear] = {}
        self.capacity = 1  # slots in every allocated stack (slot 0 = no adapter)
        # The base model's linear layers by module name, taken before any wrapping.
        self.base_layers: dict[str, nn.Linear] = {
            name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)
        }

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """`module -> (out_features, in_features)` of every linear layer of the base."""
        return {name: (layer.out_features, layer.in_features) for name, layer in self.base_layers.items()}

    def _wrap(self, module_name: str) -> SlotAdapterLinear:
        layer = self.layers.get(module_name)
        if layer is not None:
            return layer
        parent_name, _, child_name = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = SlotAdapterLinear(getattr(parent, child_name), self.context)
        setattr(parent, child_name, layer)
        self.layers[module_name] = layer
        return layer

    def _ensure_capacity(self, slots: int) -> None:
        if slots <= self.capacity:
            return
        # One slot at a time up to 8, then by 1/8: memory tracks the resident adapters closely
        # while the copies that growth costs stay amortized O(1) per load.
        grown = max(slots, self.capacity + self.capacity // 8)
        if self.max_slots:
            if slots > self.max_slots:
                raise ValueError(f"slot {slots - 1} is beyond the {self.max_slots - 1} adapter slots")
            grown = min(grown, self.max_slots)
        for layer in self.layers.values():
            layer.grow(grown)
        self.capacity = grown

    def write(self, slot: int, weights: AdapterWeights) -> None:
        """Install `weights` in `slot` of every layer (no effect where the adapter has none)."""
        if slot < 1:
            raise ValueError("slot 0 is reserved for the base model")
        self.forget_gathers()
        self._ensure_capacity(slot + 1)
        for module_name in weights.modules:
            self._wrap(module_name)
        plan = _WritePlan()
        with torch.no_grad():
            for module_name, layer in self.layers.items():
                layer.plan_write(slot, weights.modules.get(module_name), self.capacity, self.dtype, plan)
            plan.run()

    def clear(self, slot: int) -> None:
        """Reset `slot` to "no adapter" in every stack."""
        if slot >= self.capacity:
            return
        self.forget_gathers()
        plan = _WritePlan()
        with torch.no_grad():
            for layer in self.layers.values():
                layer.plan_write(slot, None, self.capacity, self.dtype, plan)
            plan.run()

    def forget_gathers(self) -> None:
        """Drop every layer's gathered rows (the batch changed for good, or a slot is written)."""
        self.context.invalidate()
        for layer in self.layers.values():
            layer.forget_gathers()

    def gather_bytes(self) -> int:
        """Bytes of the rows' A and B' the layers keep for the running batch."""
        return sum(layer.gather_bytes() for layer in self.layers.values())

    def stack_bytes(self) -> int:
        return sum(layer.stack_bytes() for layer in self.layers.values())

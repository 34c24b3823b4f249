"""Gathered LoRA: many adapters applied row by row inside one batched forward pass.

Design decisions:
- Every `nn.Linear` that some resident adapter targets is wrapped by `SlotLoraLinear`, which
  keeps a stack of LoRA factors, one slot per resident adapter (slot 0 is all zeros and stands
  for "no adapter"). A forward pass gathers each row's factors by its slot index and adds
  `(x @ A[slot]^T) @ (scale * B[slot])^T` with a `bmm` and a fused `baddbmm` — the punica/S-LoRA "BGMV" idea
  without a custom kernel. This replaces PEFT's `adapter_names` mixed batches, which loop over
  adapters per module in Python and ran at 0.44x base throughput here (ENVIRONMENT.md).
- A row on slot 0 gets `base(x) + 0`, bit-identical to the base model, so base requests are
  exact under mixed load (the bug vLLM's CPU build has does not arise).
- Ranks differ between adapters: stacks are padded to the largest rank seen per module; zero
  padding adds exact zeros. Stacks grow with the number of resident adapters (capacity doubling,
  capped at `--max-resident`), so device memory follows the adapters held rather than being
  reserved up front.
- `read_lora_dir` is the only function here that touches files; it validates everything
  (PEFT type, DoRA, module names and shapes) and reports every problem at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adapterhub.serving.backends.base import AdapterLoadError

_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraModuleWeights:
    """One module's LoRA factors: `a` [r, in], `b` [out, r], and the scale alpha/r."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA adapter as tensors keyed by the base model's module names (CPU tier form)."""

    modules: Mapping[str, LoraModuleWeights]
    rank: int
    target_modules: tuple[str, ...]

    @property
    def size_bytes(self) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size() for m in self.modules.values())


def _pattern_value(module_name: str, patterns: Mapping[str, float], default: float) -> float:
    """PEFT's `rank_pattern`/`alpha_pattern` lookup: a key matches a module-name suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return float(value)
    return default


def read_lora_dir(
    adapter_dir: Path, linear_shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype
) -> LoraWeights:
    """Read a PEFT LoRA directory into `LoraWeights`, checked against the base's linear layers.

    `linear_shapes` maps module names of the base model to `(out_features, in_features)`.
    Raises `AdapterLoadError` listing every problem found.
    """
    from safetensors.torch import load_file

    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file():
        raise AdapterLoadError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)")
    config = json.loads(config_path.read_text())
    problems: list[str] = []
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterLoadError(
            f"{adapter_dir.name}: the torch backend serves LoRA adapters only, this one is {peft_type or 'unknown'}"
        )
    if config.get("use_dora"):
        problems.append("DoRA adapters are not supported by the batched engine (merge it or serve it on vLLM)")
    if config.get("lora_bias"):
        problems.append("LoRA bias terms are not supported")
    if not weights_path.is_file():
        problems.append("no adapter_model.safetensors (pickled .bin weights are not loaded)")
    if problems:
        raise AdapterLoadError(f"{adapter_dir.name}: " + "; ".join(problems))

    tensors = load_file(str(weights_path))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            problems.append(f"unsupported tensor {key!r} (only lora_A/lora_B of linear layers are served)")
            continue
        module = match["module"].removeprefix(_PEFT_PREFIX)
        factors.setdefault(module, {})[match["which"]] = tensor

    alpha = float(config.get("lora_alpha", 8))
    rank_default = int(config.get("r", 8))
    alpha_pattern = config.get("alpha_pattern") or {}
    rank_pattern = config.get("rank_pattern") or {}
    use_rslora = bool(config.get("use_rslora"))
    modules: dict[str, LoraModuleWeights] = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            problems.append(f"{module}: has {sorted(pair)} but needs both lora_A and lora_B")
            continue
        if module not in linear_shapes:
            problems.append(f"{module}: no linear layer of that name in the base model")
            continue
        a, b = pair["A"], pair["B"]
        out_features, in_features = linear_shapes[module]
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_features or b.shape != (out_features, rank):
            problems.append(
                f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a "
                f"{in_features}->{out_features} layer"
            )
            continue
        expected_rank = int(_pattern_value(module, rank_pattern, rank_default))
        if expected_rank != rank:
            problems.append(f"{module}: rank {rank} in the weights but {expected_rank} in the config")
            continue
        module_alpha = _pattern_value(module, alpha_pattern, alpha)
        scale = module_alpha / (rank**0.5 if use_rslora else rank)
        modules[module] = LoraModuleWeights(a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous(), scale=scale)
    if not modules and not problems:
        problems.append("no LoRA weights found")
    if problems:
        raise AdapterLoadError(f"{adapter_dir.name}: " + "; ".join(problems))
    short_names = sorted({name.rsplit(".", 1)[-1] for name in modules})
    return LoraWeights(modules=modules, rank=max(m.a.shape[0] for m in modules.values()), target_modules=tuple(short_names))


class SlotContext:
    """Per-step state shared by all wrapped layers: which slot each batch row uses."""

    def __init__(self) -> None:
        self.row_slots: torch.Tensor | None = None  # int64 [batch] on the compute device

    def set_rows(self, row_slots: list[int] | None, device: torch.device | str = "cpu") -> None:
        # None (or all zeros) means "every row is the base model": wrapped layers skip LoRA math.
        # Checked on the host list, so a GPU step needs no device sync for it.
        if row_slots is None or not any(row_slots):
            self.row_slots = None
        else:
            self.row_slots = torch.tensor(row_slots, dtype=torch.long, device=device)


class SlotLoraLinear(nn.Module):
    """An `nn.Linear` plus per-row LoRA deltas gathered from slot stacks."""

    def __init__(self, base_layer: nn.Linear, context: SlotContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        # [slots, rank, in] and [slots, out, rank] (B pre-scaled); allocated when an adapter first targets us.
        self.stack_a: torch.Tensor | None = None
        self.stack_b: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        row_slots = self.context.row_slots
        if row_slots is None or self.stack_a is None:
            return result
        # Every allocated stack has at least `SlotTable.slot_count` slots, so any row's slot is in range.
        a = self.stack_a.index_select(0, row_slots)  # [batch, rank, in]
        b = self.stack_b.index_select(0, row_slots)  # [batch, out, rank], pre-scaled by alpha/r
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        if flat.dtype != a.dtype:
            flat = flat.to(a.dtype)
        # result + (x A^T) (s B)^T in one fused op; four tensor ops per layer keep the per-step
        # overhead small when a batch holds many adapters.
        delta_base = result.reshape(result.shape[0], -1, result.shape[-1])
        return torch.baddbmm(delta_base, torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2)).reshape(result.shape)

    def write_slot(self, slot: int, weights: LoraModuleWeights | None, slot_count: int, max_slots: int = 0) -> None:
        """Put one adapter's factors into `slot` (None zeroes it); keep at least `slot_count` slots.

        B is stored pre-multiplied by the adapter's scale, so forward needs no per-row scale.
        """
        rank = weights.a.shape[0] if weights is not None else 0
        if self.stack_a is None:
            if weights is None:
                return  # never targeted: no stack, no LoRA math in forward
            device, dtype = self.base_layer.weight.device, weights.a.dtype
            capacity = max(slot_count, min(2, max_slots))
            self.stack_a = torch.zeros(capacity, rank, self.in_features, device=device, dtype=dtype)
            self.stack_b = torch.zeros(capacity, self.out_features, rank, device=device, dtype=dtype)
        assert self.stack_b is not None
        slots, stack_rank = self.stack_a.shape[0], self.stack_a.shape[1]
        if slot_count > slots or rank > stack_rank:
            # Capacity grows geometrically up to `max_slots`: a hot load rarely pays for copying
            # every existing slot, and memory stays within 2x of what resident adapters use.
            new_slots = max(slot_count, min(2 * slots, max_slots)) if slot_count > slots else slots
            new_rank = max(stack_rank, rank)
            grown_a = self.stack_a.new_zeros(new_slots, new_rank, self.in_features)
            grown_b = self.stack_b.new_zeros(new_slots, self.out_features, new_rank)
            grown_a[:slots, :stack_rank] = self.stack_a
            grown_b[:slots, :, :stack_rank] = self.stack_b
            self.stack_a, self.stack_b = grown_a, grown_b
        self.stack_a[slot].zero_()
        self.stack_b[slot].zero_()
        if weights is not None:
            self.stack_a[slot, :rank].copy_(weights.a)
            self.stack_b[slot, :, :rank].copy_(weights.b * weights.scale)

    def stack_bytes(self) -> int:
        if self.stack_a is None:
            return 0
        assert self.stack_b is not None
        return sum(t.numel() * t.element_size() for t in (self.stack_a, self.stack_b))


class SlotTable:
    """Owns the wrapped layers of one model and writes adapters into numbered slots."""

    def __init__(self, model: nn.Module, max_slots: int = 0) -> None:
        self.model = model
        self.max_slots = max_slots  # capacity cap of the stacks (max resident adapters + 1); 0: exact growth
        self.context = SlotContext()
        self.layers: dict[str, SlotLoraLinear] = {}
        self.slot_count = 1  # slots in every allocated stack (slot 0 = no adapter)
        self.linear_shapes: dict[str, tuple[int, int]] = {
            name: (module.out_features, module.in_features)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
        }

    def _wrap(self, module_name: str) -> SlotLoraLinear:
        layer = self.layers.get(module_name)
        if layer is not None:
            return layer
        parent_name, _, child_name = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        base_layer = getattr(parent, child_name)
        layer = SlotLoraLinear(base_layer, self.context)
        setattr(parent, child_name, layer)
        self.layers[module_name] = layer
        return layer

    def write(self, slot: int, weights: LoraWeights) -> None:
        """Install `weights` in `slot` of every layer (zeros where the adapter has no factors)."""
        if slot < 1:
            raise ValueError("slot 0 is reserved for the base model")
        for module_name in weights.modules:
            self._wrap(module_name)
        self.slot_count = max(self.slot_count, slot + 1)
        for module_name, layer in self.layers.items():
            layer.write_slot(slot, weights.modules.get(module_name), self.slot_count, self.max_slots)

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.write_slot(slot, None, self.slot_count, self.max_slots)

    def stack_bytes(self) -> int:
        return sum(layer.stack_bytes() for layer in self.layers.values())

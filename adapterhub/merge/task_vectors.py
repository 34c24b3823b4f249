"""Exact task vectors τ = W_merged_input − W_base, one base weight at a time.

Design decisions:

- A LoRA's task vector is the dense ΔW = scale·B·A of each module, with PEFT's own scale
  (α/r, or α/√r with rsLoRA; α and r per module through `alpha_pattern`/`rank_pattern`).
  A and B are never averaged separately: (ΣBᵢ)(ΣAᵢ) ≠ ΣBᵢAᵢ, which is why PEFT's non-SVD
  `add_weighted_adapter` types lose tasks. The rank of a module is read from lora_A's
  shape, so a pattern and the stored tensors can never disagree.
- (IA)³ and DoRA adapters are also weight deltas, but depend on the base weight:
  IA³: W·l − W; DoRA: m/‖W + sBA‖_row · (W + sBA) − W. They are computed exactly, reading
  the base weight lazily. Prompt/prefix tuning and other kinds that are not a change of
  the base weights are refused up front with a clear error.
- Which formula applies, how tensor names map to modules, and what cannot be merged come from
  the kinds table (`adapterhub.kinds`): an input's kind names its `MergeRule`, looked up in
  `_TASK_VECTORS`, and its traits (`modules_to_save`, LoRA biases, a classification head) are
  the table's, so the engine, validation and the CLI refuse the same things in the same words.
  PEFT's scale (`kinds.lora_scaling`) is computed in that one place too.
- A full fine-tuned model's task vector is W_ft − W_base for every stored tensor.
- A module an input does not touch has a zero task vector; `task_vector` returns None so
  the engine can skip work (and knows which modules to write).
- Pure functions (`lora_delta`, `ia3_delta`, `dora_delta`) do the math; `InputModel` only
  maps tensor names and reads files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapterhub.errors import ValidationError
from adapterhub.formats import ADAPTER_WEIGHTS, AdapterManifest, read_adapter_dir
from adapterhub.kinds import lora_scaling, merge_problems
from adapterhub.merge.io import LazyTensorReader

if TYPE_CHECKING:
    import torch


# ---------------------------------------------------------------------------------------------
# Pure math


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *, transpose: bool = False) -> torch.Tensor:
    """ΔW = scale·B·A in the layout of the base weight (transposed for fan_in_fan_out and embeddings)."""
    delta = (lora_b.float() @ lora_a.float()) * scale
    return delta.T.contiguous() if transpose else delta


def ia3_delta(base: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """(IA)³ rescales rows (attention) or columns (feed-forward): W·l − W = W·(l − 1)."""
    return base.float() * (vector.float() - 1.0)


def dora_delta(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight minus the base: m/‖W + sBA‖ (per output row) · (W + sBA) − W."""
    import torch

    combined = base.float() + lora_delta(lora_a, lora_b, scale)
    norm = torch.linalg.norm(combined, dim=1)
    return (magnitude.float() / norm).view(-1, 1) * combined - base.float()


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class LoraFactors:
    """One module of a LoRA as (B·scale, A), in the orientation ΔW = B·A (before any transpose)."""

    scaled_b: torch.Tensor
    a: torch.Tensor
    transpose: bool  # True for embeddings and fan_in_fan_out layers: ΔW = (B·A)ᵀ

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


BaseWeightLoader = Callable[[str], "torch.Tensor"]


class InputModel:
    """One merge input (LoRA, IA³, DoRA or full model) read lazily from its directory."""

    def __init__(self, manifest: AdapterManifest, *, label: str) -> None:
        self.manifest = manifest
        self.label = label
        self.kind = manifest.adapter_kind
        self.peft_type = manifest.peft_type
        self.config = manifest.config
        self._reader = (
            LazyTensorReader(manifest.path)
            if manifest.is_full_model
            else LazyTensorReader(manifest.path, files=[manifest.path / ADAPTER_WEIGHTS])
        )
        self._parts: dict[str, dict[str, str]] = {}  # base weight name -> part role -> stored key
        if self.kind.naming.per_module:
            for key in self._reader.names():
                parsed = self.kind.naming.parse(key)
                if parsed is not None:
                    module, part = parsed
                    self._parts.setdefault(f"{module}.weight", {})[part.role] = key

    @classmethod
    def open(cls, path: Path, *, label: str | None = None) -> InputModel:
        """Read and check an input directory; kinds that are not weight deltas are refused."""
        manifest = read_adapter_dir(path)
        model = cls(manifest, label=label or str(path))
        problems = model.problems()
        if problems:
            raise ValidationError(f"merge input {model.label}", problems)
        return model

    def problems(self) -> list[str]:
        """Why this input cannot be merged as a weight delta (empty when it can): the kinds table's reasons."""
        problems = merge_problems(self.kind, self.config, self._reader.names())
        if self.kind.merge is not None and self.kind.naming.factored and not self._parts:
            problems.append(f"no {self.kind.naming.part_names} tensors found")
        return problems

    @property
    def is_full_model(self) -> bool:
        return self.manifest.is_full_model

    @property
    def is_plain_lora(self) -> bool:
        """A LoRA without DoRA: its task vectors are exactly B·A products (rank-concatenable)."""
        return self.kind.merge is not None and self.kind.merge.low_rank

    @property
    def is_lora_family(self) -> bool:
        """Stores low-rank A/B factors (LoRA, rsLoRA, DoRA): its config describes a LoRA output."""
        return self.kind.naming.factored

    def touched_weights(self) -> set[str]:
        """Base weight names this input changes (full models: every stored tensor)."""
        return set(self._reader.names()) if self.is_full_model else set(self._parts)

    def is_embedding(self, weight_name: str) -> bool:
        return "lora_embedding_A" in self._parts.get(weight_name, {})

    def lora_factors(self, weight_name: str) -> LoraFactors | None:
        """(B·scale, A) of one module of a LoRA input; None when the input lacks the module."""
        parts = self._parts.get(weight_name)
        if parts is None or not self.is_plain_lora:
            return None
        module = weight_name.removesuffix(".weight")
        if "lora_embedding_A" in parts:
            a, b, transpose = self._reader.get(parts["lora_embedding_A"]), self._reader.get(parts["lora_embedding_B"]), True
        else:
            a, b = self._reader.get(parts["lora_A"]), self._reader.get(parts["lora_B"])
            transpose = bool(self.config.get("fan_in_fan_out"))
        scale = lora_scaling(self.config, module, int(a.shape[0]))
        return LoraFactors(scaled_b=b.float() * scale, a=a.float(), transpose=transpose)

    def task_vector(self, weight_name: str, base_weight: BaseWeightLoader) -> torch.Tensor | None:
        """τ of one base weight in float32; None when this input leaves it unchanged.

        The formula is the one the input's kind names (`MergeRule`), looked up in `_TASK_VECTORS`.
        """
        if self.kind.merge is None:
            raise ValidationError(f"merge input {self.label}", self.problems())
        return _TASK_VECTORS[self.kind.merge.name](self, weight_name, base_weight)

    def _full_difference(self, weight_name: str, base_weight: BaseWeightLoader) -> torch.Tensor | None:
        if weight_name not in self._reader:
            return None
        # The freshly read tensor is ours: subtract in place (bit-equal to W_ft − W_base).
        return self._reader.get_float(weight_name).sub_(base_weight(weight_name))

    def _ia3_scale(self, weight_name: str, base_weight: BaseWeightLoader) -> torch.Tensor | None:
        parts = self._parts.get(weight_name)
        if parts is None:
            return None
        return ia3_delta(base_weight(weight_name), self._reader.get(parts["ia3_l"]))

    def _lora_product(self, weight_name: str, base_weight: BaseWeightLoader) -> torch.Tensor | None:
        factors = self.lora_factors(weight_name)
        if factors is None:
            return None
        return lora_delta(factors.a, factors.scaled_b, 1.0, transpose=factors.transpose)

    def _dora(self, weight_name: str, base_weight: BaseWeightLoader) -> torch.Tensor | None:
        parts = self._parts.get(weight_name)
        if parts is None:
            return None
        module = weight_name.removesuffix(".weight")
        a, b = self._reader.get(parts["lora_A"]), self._reader.get(parts["lora_B"])
        magnitude = self._reader.get(parts["lora_magnitude_vector"])
        return dora_delta(base_weight(weight_name), a, b, lora_scaling(self.config, module, int(a.shape[0])), magnitude)

    def rank_of(self, weight_name: str) -> int | None:
        """Stored LoRA rank of a module (None for non-LoRA inputs or untouched modules)."""
        parts = self._parts.get(weight_name)
        if parts is None or not self.is_lora_family:
            return None
        key = parts.get("lora_A") or parts.get("lora_embedding_A")
        return int(self._reader.info(key).shape[0]) if key else None


# τ of one base weight for each `kinds.MergeRule`, by its name.
_TASK_VECTORS: dict[str, Callable[[InputModel, str, BaseWeightLoader], torch.Tensor | None]] = {
    "lora_product": InputModel._lora_product,
    "dora": InputModel._dora,
    "ia3_scale": InputModel._ia3_scale,
    "full_difference": InputModel._full_difference,
}

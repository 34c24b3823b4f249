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
- A full fine-tuned model's task vector is W_ft − W_base for every stored tensor.
- A module an input does not touch has a zero task vector; `task_vector` returns None so
  the engine can skip work (and knows which modules to write).
- Pure functions (`lora_delta`, `ia3_delta`, `dora_delta`) do the math; `InputModel` only
  maps tensor names and reads files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import ValidationError
from adapterhub.formats import ADAPTER_WEIGHTS, PEFT_MODEL_PREFIX, AdapterManifest, read_adapter_dir
from adapterhub.merge.io import LazyTensorReader

if TYPE_CHECKING:
    import torch

MERGEABLE_PEFT_TYPES = ("LORA", "IA3", "FULL")
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$"
)
_IA3_KEY = re.compile(r"^(?P<module>.+)\.ia3_l(?:\.weight)?$")


# ---------------------------------------------------------------------------------------------
# Pure math


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's `rank_pattern`/`alpha_pattern` lookup: the first key that matches a suffix of the module."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling of one module: α/r, or α/√r with rsLoRA."""
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


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
        self.peft_type = manifest.peft_type
        self.config = manifest.config
        self._reader = (
            LazyTensorReader(manifest.path)
            if manifest.is_full_model
            else LazyTensorReader(manifest.path, files=[manifest.path / ADAPTER_WEIGHTS])
        )
        self._parts: dict[str, dict[str, str]] = {}  # base weight name -> part -> stored key
        if not manifest.is_full_model:
            pattern = _LORA_KEY if self.peft_type == "LORA" else _IA3_KEY
            for key in self._reader.names():
                match = pattern.match(key.removeprefix(PEFT_MODEL_PREFIX))
                if match:
                    part = match.group("part") if self.peft_type == "LORA" else "ia3_l"
                    self._parts.setdefault(f"{match['module']}.weight", {})[part.removesuffix(".weight")] = key

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
        """Why this input cannot be merged as a weight delta (empty when it can)."""
        if self.peft_type not in MERGEABLE_PEFT_TYPES:
            return [
                f"a {self.peft_type} adapter is not a change of the base weights and cannot be merged "
                f"(mergeable kinds: LoRA, DoRA, (IA)³ and full fine-tuned models)"
            ]
        problems = []
        architecture = (self.config.get("architectures") or [""])[0] if self.manifest.is_full_model else ""
        if architecture.endswith("ForSequenceClassification"):
            # Its head is new weights, not a change of the base's: there is no task vector to take.
            problems.append(f"a sequence classifier ({architecture}) has a classification head the base lacks and cannot be merged")
        if self.config.get("modules_to_save"):
            problems.append(f"modules_to_save {self.config['modules_to_save']} (fully trained copies of layers) are not supported in merges")
        stored = set(self._reader.names())
        if any(k.endswith((".lora_A.bias", ".lora_B.bias")) for k in stored):
            problems.append("LoRA biases (lora_bias=True) are not supported in merges")
        if self.peft_type == "LORA" and not self._parts:
            problems.append("no lora_A/lora_B tensors found")
        return problems

    @property
    def is_full_model(self) -> bool:
        return self.manifest.is_full_model

    @property
    def is_plain_lora(self) -> bool:
        """A LoRA without DoRA: its task vectors are exactly B·A products (rank-concatenable)."""
        return self.peft_type == "LORA" and not self.config.get("use_dora")

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
        scale = lora_scale(self.config, module, int(a.shape[0]))
        return LoraFactors(scaled_b=b.float() * scale, a=a.float(), transpose=transpose)

    def task_vector(self, weight_name: str, base_weight: BaseWeightLoader) -> torch.Tensor | None:
        """τ of one base weight in float32; None when this input leaves it unchanged."""
        if self.is_full_model:
            if weight_name not in self._reader:
                return None
            # The freshly read tensor is ours: subtract in place (bit-equal to W_ft − W_base).
            return self._reader.get_float(weight_name).sub_(base_weight(weight_name))
        parts = self._parts.get(weight_name)
        if parts is None:
            return None
        if self.peft_type == "IA3":
            return ia3_delta(base_weight(weight_name), self._reader.get(parts["ia3_l"]))
        if self.is_plain_lora:
            factors = self.lora_factors(weight_name)
            assert factors is not None
            return lora_delta(factors.a, factors.scaled_b, 1.0, transpose=factors.transpose)
        # DoRA
        module = weight_name.removesuffix(".weight")
        a, b = self._reader.get(parts["lora_A"]), self._reader.get(parts["lora_B"])
        magnitude = self._reader.get(parts["lora_magnitude_vector"])
        return dora_delta(base_weight(weight_name), a, b, lora_scale(self.config, module, int(a.shape[0])), magnitude)

    def rank_of(self, weight_name: str) -> int | None:
        """Stored LoRA rank of a module (None for non-LoRA inputs or untouched modules)."""
        parts = self._parts.get(weight_name)
        if parts is None or self.peft_type != "LORA":
            return None
        key = parts.get("lora_A") or parts.get("lora_embedding_A")
        return int(self._reader.info(key).shape[0]) if key else None

"""LoRA extraction: the task vector of a full fine-tune (or a merged full model) as a LoRA.

Why it is a merge: W_ft − W_base is exactly the task vector the merge engine already builds
for a full-model input, and "task arithmetic of one input, weight 1, written as a LoRA" is
precisely a truncated SVD of that task vector per module. Reusing the engine gives extraction
the same streaming (one module at a time, a few tensors of the largest module in memory),
the same per-module rank/energy choice and error report, the same refusal of inputs on
another base, and the same atomic write (a staging directory renamed into place).
Weights a LoRA cannot express (norms, biases) are listed in the result's `dropped`.
"""

from __future__ import annotations

from pathlib import Path

from adapterhub.errors import ValidationError
from adapterhub.merge.engine import MergeResult, ProgressCallback, merge
from adapterhub.merge.recipe import MergeRecipe
from adapterhub.merge.task_vectors import InputModel


def extract_lora(
    model_dir: Path,
    *,
    base_dir: Path,
    out_dir: Path,
    rank: int | None = None,
    energy: float | None = None,
    dtype: str | None = None,
    progress: ProgressCallback | None = None,
) -> MergeResult:
    """Write `model_dir − base_dir` as a PEFT LoRA in `out_dir` (rank `rank`, or per module
    the smallest keeping `energy`; the engine's default energy when neither is given).

    Raises `ValidationError` before writing anything when `model_dir` is not a full model (an
    adapter is already low-rank: merge it instead) or does not fit the base.
    """
    label = str(model_dir)
    if not InputModel.open(model_dir, label=label).is_full_model:
        raise ValidationError(
            f"extract {model_dir}", ["is an adapter, not a full model; extraction turns a full model's difference from its base into a LoRA"],
        )
    data: dict[str, object] = {"merge_method": "task_arithmetic", "models": [{"model": label}]}
    if dtype is not None:
        data["dtype"] = dtype
    recipe = MergeRecipe.from_dict(data, source="extract")
    return merge(
        recipe, out_dir=out_dir, base_dir=base_dir, input_dirs={label: model_dir}, rank=rank, energy=energy, progress=progress,
    )

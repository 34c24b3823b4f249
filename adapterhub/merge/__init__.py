"""Merging adapters and fine-tuned models: exact task vectors, streamed, seeded.

Public API:

- `merge(recipe, out_dir=..., base_dir=..., input_dirs=..., full_model=False, rank=None,
  energy=None) -> MergeResult` (`engine`): the whole merge, from local directories.
- `extract_lora(model_dir, base_dir=..., out_dir=..., rank=None, energy=None) -> MergeResult`
  (`extract`): a full model's difference from its base as a LoRA, truncated SVD per module.
- `MergeRecipe` (`recipe`): the validated, mergekit-like recipe (`from_yaml`, `from_dict`).
- `method_names()`, `get_method(name)`, `register_merge_method(...)` (`methods`): the
  registry of merge methods, typed pure functions over task vectors.

The core never touches the registry: the CLI (`adapterhub merge`) resolves references to
directories, checks the inputs share one base, and registers the result with its lineage.
"""

from adapterhub.merge.engine import MERGE_REPORT, MergeResult, merge
from adapterhub.merge.extract import extract_lora
from adapterhub.merge.methods import (
    GlobalParams,
    InputParams,
    MergeMethod,
    get_method,
    method_names,
    register_merge_method,
)
from adapterhub.merge.recipe import MergeRecipe

__all__ = [
    "MERGE_REPORT",
    "GlobalParams",
    "InputParams",
    "MergeMethod",
    "MergeRecipe",
    "MergeResult",
    "extract_lora",
    "get_method",
    "merge",
    "method_names",
    "register_merge_method",
]

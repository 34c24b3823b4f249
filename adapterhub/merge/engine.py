"""The merge engine: stream over the base model's weights, merge task vectors, write the result.

Design decisions:

- The core API takes local directories (a base model, input adapters or models) and never
  the registry; the CLI resolves references and registers the output. `model` strings of
  the recipe are mapped to directories by `input_dirs` (the CLI passes registry refs there,
  which then become the lineage parents), or are directories themselves.
- One base weight at a time: read it (lazily, only when a method or an input needs it), ask
  every input for its task vector of that weight, merge, write. Memory stays at a few
  tensors of the largest module plus one output shard, whatever the model size.
- Weights no input changes are copied through untouched (for a full-model output), and a
  weight whose task vectors are all exactly zero is the base weight for every method, so
  neither is merged: full fine-tuned inputs often differ from the base in few tensors.
- Randomness (DARE, DELLA) uses a generator seeded from (seed, weight name), so the result
  does not depend on the order weights are visited, and a seed reproduces a merge exactly.
- LoRA output: exact rank concatenation when the method is linear and every input is a
  plain LoRA, otherwise truncated SVD per module to `rank`, or to an `energy` share. With
  neither given, each module gets the smallest rank keeping `DEFAULT_ENERGY` (0.99) of its
  squared singular values: a fixed rank silently lost most of a TIES or TSV ΔW (whose rank
  is far above its inputs'), while an energy bounds every module's error at √(1 − energy).
  Every module's rank and relative Frobenius error go into the result and the lineage, with
  `warnings` when the LoRA is a poor (error above `WARN_RELATIVE_ERROR`) or pointless (as many
  parameters as the full matrices) stand-in for a `--full-model` output, which is exact.
  Weights a LoRA cannot express (norms, biases changed by full-model inputs) are listed in
  `dropped` with their merged change relative to the base weight, never silently lost.
- Output is built in a temporary sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from adapterhub import __version__
from adapterhub.errors import AdapterhubError, ValidationError
from adapterhub.formats import (
    ADAPTER_WEIGHTS,
    PEFT_MODEL_PREFIX,
    BaseModelSpec,
    base_model_spec,
    check_adapter_against_base,
)
from adapterhub.merge.io import (
    DEFAULT_MAX_SHARD_BYTES,
    LazyTensorReader,
    ShardedWriter,
    copy_non_weight_files,
    safetensors_dtype,
    write_json,
)
from adapterhub.merge.lowrank import LowRank, concatenate_ranks, pad_to_rank, truncated_svd
from adapterhub.merge.methods import GlobalParams, InputParams, MergeMethod, get_method
from adapterhub.merge.recipe import MergeRecipe
from adapterhub.merge.task_vectors import InputModel, LoraFactors

if TYPE_CHECKING:
    import torch

MERGE_REPORT = "merge_report.json"
DEFAULT_ENERGY = 0.99
WARN_RELATIVE_ERROR = 0.2  # a module's ΔW error above this: the LoRA misses a fifth of the merge there
WARN_PARAMETER_SHARE = 0.5  # LoRA factors holding at least half the parameters of the matrices they replace

ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class MergeResult:
    """What a merge produced, and how faithful a LoRA output is to the merged deltas."""

    out_dir: Path
    output: Literal["lora", "full"]
    method: str
    parents: tuple[str, ...]
    recipe: Mapping[str, Any]
    modules_merged: int
    wall_seconds: float
    exact: bool = True
    rank: int | None = None
    module_errors: Mapping[str, float] = field(default_factory=dict)
    dropped: Mapping[str, float] = field(default_factory=dict)
    module_ranks: Mapping[str, int] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def max_relative_error(self) -> float:
        return max(self.module_errors.values(), default=0.0)

    def error_report(self) -> dict[str, Any]:
        """Per-module relative Frobenius errors of the LoRA factoring (all 0 when exact)."""
        errors = list(self.module_errors.values())
        return {
            "exact": self.exact,
            "rank": self.rank,
            "max_relative_error": max(errors, default=0.0),
            "mean_relative_error": statistics.fmean(errors) if errors else 0.0,
            "modules": dict(self.module_errors),
            "module_ranks": dict(self.module_ranks),
            "dropped": dict(self.dropped),
            "warnings": list(self.warnings),
        }

    def lineage_details(self) -> dict[str, Any]:
        """What the registry stores in `Lineage(kind="merged").details`."""
        return {
            "method": self.method,
            "recipe": dict(self.recipe),
            "output": self.output,
            "error_report": self.error_report(),
            "modules_merged": self.modules_merged,
            "wall_seconds": round(self.wall_seconds, 3),
            "adapterhub_version": __version__,
        }


def lora_output_warnings(errors: Mapping[str, float], shapes: Mapping[str, tuple[int, ...]], rank: int) -> tuple[str, ...]:
    """Why this LoRA output may be the wrong choice next to an exact `--full-model` output.

    Two cases: modules whose ΔW the factors miss by more than `WARN_RELATIVE_ERROR` (the
    merge the user asked for is not the one written), and an output rank so high that the
    zero-padded factors hold `WARN_PARAMETER_SHARE` of the full matrices' parameters (a LoRA
    then saves nothing and still carries the SVD's error).
    """
    warnings = []
    worse = sorted(((e, m) for m, e in errors.items() if e > WARN_RELATIVE_ERROR), reverse=True)
    if worse:
        shown = ", ".join(f"{m} {e:.2f}" for e, m in worse[:3]) + (f" and {len(worse) - 3} more" if len(worse) > 3 else "")
        warnings.append(
            f"{len(worse)} of {len(errors)} modules lose more than {WARN_RELATIVE_ERROR:.0%} of their merged ΔW "
            f"as a LoRA (relative error {shown}); write a full model (--full-model) or raise --rank/--energy"
        )
    full = sum(shape[0] * shape[1] for shape in shapes.values())
    factors = sum(rank * (shape[0] + shape[1]) for shape in shapes.values())
    if full and factors >= WARN_PARAMETER_SHARE * full:
        warnings.append(
            f"the LoRA output (rank {rank}) holds {factors / full:.0%} of the parameters of the matrices it "
            "replaces; a full model (--full-model) is exact for little more"
        )
    return tuple(warnings)


def module_seed(seed: int, weight_name: str) -> int:
    """A 63-bit seed from the merge seed and the weight name (stable across runs and orders)."""
    digest = hashlib.sha256(f"{seed}:{weight_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _is_embedding_name(weight_name: str) -> bool:
    leaf = weight_name.removesuffix(".weight").rsplit(".", 1)[-1]
    return "embed" in leaf or leaf in ("wte", "wpe")


class _Plan:
    """Inputs opened and checked against the base; every problem collected before any work."""

    def __init__(self, recipe: MergeRecipe, base_dir: Path, input_dirs: Sequence[Path], labels: Sequence[str]) -> None:
        problems: list[str] = []
        self.method: MergeMethod = get_method(recipe.merge_method)
        self.spec: BaseModelSpec | None = None
        try:
            self.spec = base_model_spec(base_dir)
        except ValidationError as exc:
            problems.extend(f"base model {base_dir}: {p}" for p in exc.problems)
        self.inputs: list[InputModel] = []
        for directory, label in zip(input_dirs, labels, strict=True):
            try:
                model = InputModel.open(directory, label=label)
            except ValidationError as exc:
                problems.extend(f"input {label}: {p}" for p in exc.problems)
                continue
            if self.spec is not None:
                problems.extend(f"input {label}: {p}" for p in check_adapter_against_base(model.manifest, self.spec))
            self.inputs.append(model)
        if problems:
            raise ValidationError("merge", problems)


def merge(
    recipe: MergeRecipe,
    *,
    out_dir: Path,
    base_dir: Path | None = None,
    input_dirs: Mapping[str, Path] | None = None,
    full_model: bool = False,
    rank: int | None = None,
    energy: float | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: ProgressCallback | None = None,
) -> MergeResult:
    """Merge the recipe's inputs onto the base and write a LoRA adapter or a full model.

    `input_dirs` maps each recipe `model` string to its directory (default: the strings are
    directories); `base_dir` defaults to `recipe.base_model` as a directory. `rank`/`energy`
    override the recipe's `output`. Raises `ValidationError` (every problem at once) before
    writing anything when the inputs do not fit.
    """
    started = time.perf_counter()
    problems: list[str] = []
    base_path = base_dir if base_dir is not None else (Path(recipe.base_model) if recipe.base_model else None)
    if base_path is None:
        problems.append("no base model: give base_dir or the recipe's base_model")
    labels = [entry.model for entry in recipe.inputs]
    resolved_dirs: list[Path] = []
    for label in labels:
        directory = input_dirs.get(label) if input_dirs is not None else Path(label)
        if directory is None:
            problems.append(f"input {label!r} has no directory in input_dirs")
        else:
            resolved_dirs.append(Path(directory))
    rank = rank if rank is not None else recipe.output.rank
    energy = energy if energy is not None else recipe.output.energy
    if rank is not None and energy is not None:
        problems.append("give a rank or an energy threshold for the LoRA output, not both")
    if rank is not None and rank < 1:
        problems.append(f"rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        problems.append(f"energy must be in (0, 1], got {energy}")
    if out_dir.exists() and any(out_dir.iterdir()):
        problems.append(f"output directory {out_dir} exists and is not empty")
    if problems:
        raise ValidationError("merge", problems)
    assert base_path is not None
    plan = _Plan(recipe, base_path, resolved_dirs, labels)

    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        merger = _Merger(plan, recipe, LazyTensorReader(base_path), rank=rank, energy=energy, progress=progress)
        with _retained_heap():
            if full_model:
                fields = merger.write_full_model(staging, base_path, max_shard_bytes=max_shard_bytes, dtype=recipe.dtype)
            else:
                fields = merger.write_lora(staging, dtype=recipe.dtype)
        result = MergeResult(
            out_dir=out_dir, output="full" if full_model else "lora", method=recipe.merge_method,
            parents=tuple(labels), recipe=recipe.to_json(), wall_seconds=time.perf_counter() - started, **fields,
        )
        write_json(staging / MERGE_REPORT, result.lineage_details() | {"parents": list(result.parents)})
        if out_dir.exists():
            out_dir.rmdir()
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


class _Merger:
    """The streaming loop over base weights, shared by both output kinds."""

    def __init__(
        self, plan: _Plan, recipe: MergeRecipe, base: LazyTensorReader, *,
        rank: int | None, energy: float | None, progress: ProgressCallback | None,
    ) -> None:
        self.plan = plan
        self.method = plan.method
        self.inputs = plan.inputs
        self.base = base
        self.params: list[InputParams] = recipe.input_params()
        self.global_params: GlobalParams = recipe.global_params()
        self.rank = rank
        self.energy = energy
        self.progress = progress
        self.touched = [model.touched_weights() for model in self.inputs]

    def _touching(self, name: str) -> list[int]:
        return [i for i, touched in enumerate(self.touched) if name in touched]

    def merged_delta(self, name: str, base_loader: Callable[[str], torch.Tensor]) -> torch.Tensor | None:
        """The merged task vector of one weight; None when every input leaves it unchanged."""
        import torch

        vectors: list[torch.Tensor | None] = [model.task_vector(name, base_loader) for model in self.inputs]
        if all(v is None or _all_zero(v) for v in vectors):
            return None
        shape = next(v for v in vectors if v is not None).shape
        dense = [v if v is not None else torch.zeros(shape) for v in vectors]
        generator = torch.Generator().manual_seed(module_seed(self.global_params.seed, name))
        base = base_loader(name) if self.method.needs_base else None
        merged = self.method.function(dense, base, params=self.params, global_params=self.global_params, generator=generator)
        if not _all_finite(merged):
            raise AdapterhubError(f"merge of {name} produced non-finite values (check weights and lambda)")
        return merged

    def _base_loader(self) -> Callable[[str], torch.Tensor]:
        """Reads a base weight at most once per weight (inputs and methods share it)."""
        cache: dict[str, torch.Tensor] = {}

        def load(name: str) -> torch.Tensor:
            if name not in cache:
                cache.clear()
                cache[name] = self.base.get_float(name)
            return cache[name]

        return load

    # -- full model ---------------------------------------------------------------------

    def write_full_model(self, out_dir: Path, base_dir: Path, *, max_shard_bytes: int, dtype: str | None) -> dict[str, Any]:
        import torch

        out_dtype = getattr(torch, dtype) if dtype else None
        names = self.base.names()
        extra = sorted(set().union(*self.touched) - set(names)) if self.touched else []
        if extra:
            raise ValidationError("merge", [f"inputs change weights the base model does not have: {', '.join(extra[:5])}"])
        layout = [(name, self._output_dtype_code(name, out_dtype), self.base.info(name).shape) for name in names]
        writer = ShardedWriter(out_dir, layout, max_shard_bytes=max_shard_bytes)
        load = self._base_loader()
        merged_count = 0
        try:
            for index, name in enumerate(names):
                merged = self.merged_delta(name, load) if self._touching(name) else None
                if merged is None and self.base.info(name).dtype == writer.slots[name].dtype:
                    writer.copy_from(name, self.base)  # unchanged and same dtype: bytes, file to file
                else:
                    if merged is None:
                        tensor = self.base.get(name)
                    else:
                        # In place: base + τ is exactly τ + base, without a third weight-sized tensor.
                        tensor = merged.add_(load(name)).to(self.base.torch_dtype(name))
                        merged_count += 1
                    if out_dtype is not None and tensor.is_floating_point() and tensor.dtype != out_dtype:
                        tensor = tensor.to(out_dtype)
                    writer.write(name, tensor)
                    del tensor
                merged = None
                if self.progress:
                    self.progress(index + 1, len(names), name)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        copy_non_weight_files(base_dir, out_dir)
        if dtype:
            _set_config_dtype(out_dir / "config.json", dtype)
        return {"modules_merged": merged_count}

    def _output_dtype_code(self, name: str, out_dtype: torch.dtype | None) -> str:
        """The safetensors dtype a weight is written in: the recipe's dtype for floats, else as stored."""
        stored = self.base.torch_dtype(name)
        if out_dtype is not None and stored.is_floating_point and stored != out_dtype:
            return safetensors_dtype(out_dtype)
        return self.base.info(name).dtype

    # -- LoRA adapter -------------------------------------------------------------------

    def write_lora(self, out_dir: Path, *, dtype: str | None) -> dict[str, Any]:
        import torch

        spec = self.plan.spec
        assert spec is not None
        names = [n for n in self.base.names() if self._touching(n)]
        exact_possible = self.method.linear and all(m.is_plain_lora for m in self.inputs) and self.energy is None
        coefficients = self.method.linear_coefficients(self.params, self.global_params) if exact_possible else []
        load = self._base_loader()
        factored: dict[str, tuple[LowRank, bool]] = {}
        errors: dict[str, float] = {}
        ranks: dict[str, int] = {}
        dropped: dict[str, float] = {}
        for index, name in enumerate(names):
            touching = self._touching(name)
            is_matrix = len(self.base.info(name).shape) == 2
            transpose = self._transposed(name, touching)
            if exact_possible and is_matrix:
                low_rank = self._concatenated(name, touching, coefficients)
                if low_rank is not None and self.rank is not None and low_rank.rank > self.rank:
                    low_rank = truncated_svd(low_rank.b @ low_rank.a, rank=self.rank, seed=module_seed(self.global_params.seed, name))
            else:
                merged = self.merged_delta(name, load)
                if merged is None:
                    low_rank = None
                elif not is_matrix:
                    dropped[name] = float(merged.norm() / load(name).norm().clamp_min(1e-12))
                    low_rank = None
                else:
                    oriented = merged.T if transpose else merged
                    if self.rank is not None:
                        low_rank = truncated_svd(oriented, rank=self.rank, seed=module_seed(self.global_params.seed, name))
                    else:
                        low_rank = truncated_svd(oriented, energy=self.energy if self.energy is not None else DEFAULT_ENERGY)
            if low_rank is not None:
                factored[name] = (low_rank, transpose)
                errors[name.removesuffix(".weight")] = low_rank.relative_error
                ranks[name.removesuffix(".weight")] = low_rank.rank
            if self.progress:
                self.progress(index + 1, len(names), name)
        if not factored:
            raise AdapterhubError("the merge changes no weight a LoRA can express (all merged deltas are zero)")
        out_rank = max(low_rank.rank for low_rank, _ in factored.values())
        out_dtype = getattr(torch, dtype) if dtype else torch.float32
        tensors: dict[str, torch.Tensor] = {}
        for name, (low_rank, transpose) in factored.items():
            b, a = pad_to_rank(low_rank, out_rank)
            module = PEFT_MODEL_PREFIX + name.removesuffix(".weight")
            if self._any_embedding(name) or _is_embedding_name(name):
                tensors[f"{module}.lora_embedding_A"] = a.to(out_dtype).contiguous()
                tensors[f"{module}.lora_embedding_B"] = b.to(out_dtype).contiguous()
            else:
                tensors[f"{module}.lora_A.weight"] = a.to(out_dtype).contiguous()
                tensors[f"{module}.lora_B.weight"] = b.to(out_dtype).contiguous()
        self._write_lora_files(out_dir, tensors, sorted(factored), spec, out_rank)
        exact = all(low_rank.exact or low_rank.relative_error == 0.0 for low_rank, _ in factored.values())
        shapes = {name.removesuffix(".weight"): tuple(self.base.info(name).shape) for name in factored}
        return {
            "modules_merged": len(factored), "exact": exact, "rank": out_rank, "module_errors": errors,
            "dropped": dropped, "module_ranks": ranks, "warnings": lora_output_warnings(errors, shapes, out_rank),
        }

    def _any_embedding(self, name: str) -> bool:
        return any(model.is_embedding(name) for model in self.inputs)

    def _transposed(self, name: str, touching: list[int]) -> bool:
        """Whether ΔW = (B·A)ᵀ for this module (embeddings, fan_in_fan_out layers)."""
        if self._any_embedding(name) or _is_embedding_name(name):
            return True
        return any(self.inputs[i].is_plain_lora and self.inputs[i].config.get("fan_in_fan_out") for i in touching)

    def _concatenated(self, name: str, touching: list[int], coefficients: list[float]) -> LowRank | None:
        factors: list[LoraFactors] = []
        kept: list[float] = []
        for i in touching:
            f = self.inputs[i].lora_factors(name)
            if f is not None and coefficients[i] != 0:
                factors.append(f)
                kept.append(coefficients[i])
        return concatenate_ranks(factors, kept) if factors else None

    def _write_lora_files(
        self, out_dir: Path, tensors: dict[str, torch.Tensor], weight_names: list[str], spec: BaseModelSpec, rank: int
    ) -> None:
        from peft import LoraConfig
        from safetensors.torch import save_file

        modules = [n.removesuffix(".weight") for n in weight_names]
        leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
        # Suffixes when every base module with that suffix is covered (the usual PEFT config),
        # else the exact module names so PEFT adds no LoRA where the merge has none.
        complete = all(
            set(modules) >= {m for m in spec.module_shapes if m.rsplit(".", 1)[-1] == leaf and len(spec.module_shapes[m]) == 2}
            for leaf in leaves
        )
        lora_inputs = [m for m in self.inputs if m.is_lora_family]
        task_type = next((m.config.get("task_type") for m in lora_inputs if m.config.get("task_type")), "CAUSAL_LM")
        base_name = next((m.config.get("base_model_name_or_path") for m in lora_inputs if m.config.get("base_model_name_or_path")), None)
        fan_in_fan_out = any(m.config.get("fan_in_fan_out") for m in lora_inputs if m.is_plain_lora)
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=leaves if complete else modules, lora_dropout=0.0,
            bias="none", task_type=task_type, fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=base_name,
        )
        config.save_pretrained(str(out_dir))
        save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def _all_zero(tensor: torch.Tensor) -> bool:
    """Every entry exactly 0 (NaN is not); one reduction pass, no boolean tensor the size of the weight."""
    import torch

    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(low == 0) and bool(high == 0)


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or ±inf: aminmax propagates NaN, and an infinity is an extreme (one pass, no mask)."""
    import math

    import torch

    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


@contextlib.contextmanager
def _retained_heap() -> Iterator[None]:
    """Keep freed memory in the process heap for the duration of a merge (glibc only).

    A merge allocates and frees weight-sized tensors hundreds of times; by default glibc
    serves each from a fresh `mmap` and returns it on free, so every allocation page-faults
    its whole size again (a third of a full-model merge's time on a 2-core VM). With mmap allocation off
    and trimming deferred, freed tensors are reused from the heap; peak RSS does not grow,
    because the live set is the same. Restored, and the heap trimmed, afterwards.
    """
    libc = None
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if libc is None or not hasattr(libc, "mallopt"):  # glibc has it; musl and macOS do not
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # an int in C: the largest it takes
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


# glibc's mallopt parameters (malloc.h) and their defaults.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _set_config_dtype(config_path: Path, dtype: str) -> None:
    import json

    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["torch_dtype"] = dtype
    if "dtype" in config:
        config["dtype"] = dtype
    write_json(config_path, config)

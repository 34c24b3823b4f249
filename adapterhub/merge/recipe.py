"""Merge recipes: a validated, frozen description of one merge, close to mergekit's YAML.

```yaml
merge_method: ties            # any name in adapterhub.merge.method_names()
base_model: smollm2           # registered base name (CLI) or a model directory (Python API)
models:
  - model: math-lora:2        # registry reference (CLI) or a directory (Python API)
    parameters: {weight: 0.6, density: 0.5}
  - model: chat-lora
    parameters: {weight: 0.4}
parameters:                   # global; weight/density/gamma/epsilon here are per-input defaults
  normalize: true
  lambda: 1.0
  seed: 0
dtype: float32                # dtype of the written weights (compute is always float32)
output: {rank: 16}            # adapterhub extension: LoRA output rank, or {energy: 0.99}
```

Differences from mergekit, on purpose:
- `weight` defaults to 1.0 (mergekit requires it for task-arithmetic methods).
- An entry whose `model` equals `base_model` is skipped, as mergekit treats the base.
- `slerp` takes its two inputs from `models` (first = t 0, second = t 1) and `t` from
  `parameters`; mergekit's `slices`, per-layer gradients (lists) and `filter` rules are not
  supported and are refused with a message, not silently ignored.
- `dtype` is only the output dtype; the math always runs in float32.
- `int8_mask` is accepted and has no effect (masks here are booleans).
- `output` (rank or energy of the LoRA output) does not exist in mergekit.

Validation collects every problem (types, ranges, unknown keys, unknown method, input
count for the method, DELLA's ε) into one `ValidationError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from adapterhub.errors import ValidationError
from adapterhub.merge.methods import GlobalParams, InputParams, get_method, method_names, parameter_problems

_FROZEN = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class InputParameters(BaseModel):
    """Per-input parameters; None falls back to the global `parameters`, then the default."""

    model_config = _FROZEN

    weight: float | None = None
    density: float | None = Field(default=None, gt=0, le=1)
    gamma: float | None = Field(default=None, ge=0, lt=1)
    epsilon: float | None = Field(default=None, ge=0, lt=1)


class MergeParameters(InputParameters):
    """Global parameters of the merge (and defaults for every input's parameters)."""

    normalize: bool | None = None
    rescale: bool | None = None
    lambda_: float = Field(default=1.0, alias="lambda")
    t: float = Field(default=0.5, ge=0, le=1)
    consensus: Literal["sum", "count"] | None = None
    seed: int = 0
    int8_mask: bool = False
    rank_share: float | None = Field(default=None, gt=0, le=1)
    common_share: float = Field(default=0.8, ge=0, lt=1)


class ModelEntry(BaseModel):
    """One input: a reference or directory and its parameters."""

    model_config = _FROZEN

    model: str = Field(min_length=1)
    parameters: InputParameters = InputParameters()


class OutputSpec(BaseModel):
    """How a LoRA output is factored when the merge is not exactly representable."""

    model_config = _FROZEN

    rank: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0, le=1)


class MergeRecipe(BaseModel):
    """A whole merge; build with `from_dict`/`from_yaml` to get every problem in one error."""

    model_config = _FROZEN

    merge_method: str
    base_model: str | None = None
    models: tuple[ModelEntry, ...]
    parameters: MergeParameters = MergeParameters()
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    output: OutputSpec = OutputSpec()

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "merge recipe") -> MergeRecipe:
        """Validate a parsed recipe; raises one ValidationError listing every problem."""
        if not isinstance(data, dict):
            raise ValidationError(source, [f"a recipe is a mapping with merge_method and models, got {type(data).__name__}"])
        problems = _unsupported_mergekit_features(data)
        recipe: MergeRecipe | None = None
        try:
            recipe = cls.model_validate(data)
        except PydanticValidationError as exc:
            problems.extend(_format_pydantic_error(exc))
        problems.extend(_method_problems(data, recipe))
        if problems:
            raise ValidationError(source, problems)
        assert recipe is not None
        return recipe

    @classmethod
    def from_yaml(cls, path: Path) -> MergeRecipe:
        """Read a YAML recipe file."""
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValidationError(f"merge recipe {path}", ["the file does not exist"]) from None
        except yaml.YAMLError as exc:
            raise ValidationError(f"merge recipe {path}", [f"not valid YAML: {exc}"]) from None
        return cls.from_dict(data, source=f"merge recipe {path}")

    # -- resolved views -----------------------------------------------------------------

    @property
    def inputs(self) -> tuple[ModelEntry, ...]:
        """The models that are merged (entries naming the base model are the base, not inputs)."""
        return tuple(m for m in self.models if m.model != self.base_model)

    def input_params(self) -> list[InputParams]:
        """Per-input parameters with the global defaults applied."""
        defaults = InputParams()
        resolved = []
        for entry in self.inputs:
            values = {}
            for name in ("weight", "density", "gamma", "epsilon"):
                own = getattr(entry.parameters, name)
                shared = getattr(self.parameters, name)
                values[name] = own if own is not None else shared if shared is not None else getattr(defaults, name)
            resolved.append(InputParams(**values))
        return resolved

    def global_params(self) -> GlobalParams:
        p = self.parameters
        return GlobalParams(
            normalize=p.normalize, rescale=p.rescale, lambda_=p.lambda_, t=p.t, consensus=p.consensus, seed=p.seed,
            rank_share=p.rank_share, common_share=p.common_share,
        )

    def to_json(self) -> dict[str, Any]:
        """Plain JSON of the recipe as given (`lambda` under its YAML name), for lineage."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _format_pydantic_error(exc: PydanticValidationError) -> list[str]:
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "recipe"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        value = error.get("input")
        shown = f" (got {value!r})" if error["type"] != "missing" and not isinstance(value, dict) else ""
        problems.append(f"{location}: {message}{shown}")
    return problems


def _unsupported_mergekit_features(data: dict[str, Any]) -> list[str]:
    problems = []
    if "slices" in data:
        problems.append("'slices' (mergekit layer slicing) is not supported; list the inputs under 'models'")
    for section, params in _parameter_sections(data):
        for key, value in params.items():
            if isinstance(value, (list, dict)):
                problems.append(f"{section}.{key}: per-layer gradients and filters are not supported; give one number")
    return problems


def _parameter_sections(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    sections = []
    if isinstance(data.get("parameters"), dict):
        sections.append(("parameters", data["parameters"]))
    for index, entry in enumerate(data.get("models") or []):
        if isinstance(entry, dict) and isinstance(entry.get("parameters"), dict):
            sections.append((f"models.{index}.parameters", entry["parameters"]))
    return sections


def _method_problems(data: dict[str, Any], recipe: MergeRecipe | None) -> list[str]:
    """Problems that need the method: unknown name, input count, method-specific ranges."""
    name = data.get("merge_method")
    if not isinstance(name, str):
        return [] if recipe is None else ["merge_method: give a method name"]
    if name not in method_names():
        return [f"merge_method: unknown method {name!r}; valid methods: {', '.join(method_names())}"]
    method = get_method(name)
    models = data.get("models")
    if not isinstance(models, (list, tuple)):
        return []
    base = data.get("base_model")
    count = sum(1 for m in models if not (isinstance(m, dict) and base is not None and m.get("model") == base))
    problems = []
    if count == 0:
        problems.append("models: the recipe has no inputs to merge")
    elif count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
        wanted = str(method.min_inputs) if method.max_inputs == method.min_inputs else f"at least {method.min_inputs}"
        problems.append(f"models: {name} takes {wanted} inputs, the recipe has {count}")
    if recipe is not None:
        problems.extend(parameter_problems(method, recipe.input_params()))
    return problems

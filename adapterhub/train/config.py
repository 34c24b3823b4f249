"""The training configuration: one validated pydantic model for YAML files and CLI flags alike.

Design decisions:
- Every knob of a run lives in `TrainConfig`, so the resolved config stored in an adapter's
  lineage is enough to repeat the run exactly. The CLI builds it from `--config run.yaml`
  first and then overlays the flags that were given (`merge_overrides`): flags win.
- Unknown keys are refused (`extra="forbid"`): a misspelt YAML key silently ignored would make
  a run differ from what its author believes it is. The error says which setting the key most
  likely means (a flag spelling such as `learning-rate`, a former flag name such as `lr`, a typo)
  or, when none is close, lists them all.
- One name per setting: a field's name is its YAML key, and its `train`/`tune` flag is the same
  name with dashes; the CLI generates those options from the fields (type, default, description).
- Every problem in a config is reported at once (`load_config` turns pydantic's error list
  into one `ValidationError`), and checks that need no model or data (method/task
  combinations, ranges) run here, before anything is loaded.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapterhub.errors import ValidationError


class Method(str, Enum):
    """How the base model is adapted."""

    LORA = "lora"
    QLORA = "qlora"
    DORA = "dora"
    IA3 = "ia3"
    PROMPT_TUNING = "prompt_tuning"
    PREFIX_TUNING = "prefix_tuning"
    FULL = "full"
    LAYERWISE = "layerwise"


class Task(str, Enum):
    """What the data teaches."""

    SFT = "sft"
    CAUSAL_LM = "causal_lm"
    CLASSIFICATION = "classification"
    SETFIT = "setfit"
    DPO = "dpo"
    ORPO = "orpo"
    KTO = "kto"
    REWARD = "reward"


# Tasks that learn from preferences (TRL's DPO/ORPO/KTO/Reward trainers on adapterhub.train.preference_data rows).
PREFERENCE_TASKS = frozenset({Task.DPO, Task.ORPO, Task.KTO, Task.REWARD})
# Preference tasks whose rows are prompt/chosen/rejected pairs (KTO reads labelled single completions).
PAIR_TASKS = frozenset({Task.DPO, Task.ORPO, Task.REWARD})
# The loss variants TRL 1.16 offers, per task (DPOConfig/KTOConfig `loss_type`); the first is TRL's default.
LOSS_TYPES: dict[Task, tuple[str, ...]] = {
    Task.DPO: (
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
        "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    ),
    Task.KTO: ("kto", "apo_zero_unpaired"),
}
DEFAULT_BETA = 0.1


# Methods whose result is a whole model directory instead of a PEFT adapter.
FULL_MODEL_METHODS = frozenset({Method.FULL, Method.LAYERWISE})
# Methods that put trainable tensors inside the base's linear layers (take target_modules).
TARGETED_METHODS = frozenset({Method.LORA, Method.QLORA, Method.DORA, Method.IA3})
# Soft prompts are prepended to every row of a batch, so a row must hold exactly one example.
SOFT_PROMPT_METHODS = frozenset({Method.PROMPT_TUNING, Method.PREFIX_TUNING})

# Learning rates that work out of the box for each method on small models; a config that sets
# `learning_rate` overrides them. Soft prompts need a much larger step than weight updates.
DEFAULT_LEARNING_RATES: dict[Method, float] = {
    Method.LORA: 2e-4,
    Method.QLORA: 2e-4,
    Method.DORA: 2e-4,
    Method.IA3: 3e-3,
    Method.PROMPT_TUNING: 3e-2,
    Method.PREFIX_TUNING: 1e-2,
    Method.FULL: 2e-5,
    Method.LAYERWISE: 5e-5,
}

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Scheduler = Literal["constant", "linear", "cosine"]
Optimizer = Literal["adamw", "adafactor", "sgd"]


def short_number(value: float) -> str:
    """A float as people write learning rates: 2e-4, 0.1, 3."""
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
        mantissa, exponent = f"{value:e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{value:g}"


def _default_rates_text() -> str:
    # Methods sharing a rate are named together: "2e-4 for lora, qlora and dora; 3e-3 for ia3; ...".
    by_rate: dict[float, list[str]] = {}
    for method, rate in DEFAULT_LEARNING_RATES.items():
        by_rate.setdefault(rate, []).append(method.value)
    parts = []
    for rate, methods in by_rate.items():
        names = methods[0] if len(methods) == 1 else ", ".join(methods[:-1]) + " and " + methods[-1]
        parts.append(f"{short_number(rate)} for {names}")
    return "; ".join(parts)


# What `target_modules: null` (the default) means. PEFT's own default, as `LoraConfig()` without
# target_modules has it: what PEFT users expect an adapter to cover when they name no modules,
# and the smallest adapter (the quickest to train and serve on CPU). `all-linear` (the QLoRA
# paper's choice, every linear layer but the output) is one word away; tests keep the modules
# named here equal to PEFT's table for Llama.
DEFAULT_TARGET_MODULES_TEXT = (
    "PEFT's default for the base's architecture: q_proj,v_proj on Llama-family bases such as SmolLM2 "
    "(ia3: k_proj,v_proj,down_proj)"
)


class TrainConfig(BaseModel):
    """Everything that defines one training run (data, method, task and every hyperparameter).

    Each field is one setting with one name: the YAML key, and the `adapterhub train` / `tune`
    flag with dashes (`learning_rate` is `--learning-rate`). The CLI generates its options from
    these fields (type, default, description), so a setting is declared here only.
    """

    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_assignment=True)

    # What to train on and what to call it. `base` and `name` are resolved by the CLI against
    # the registry; the core trainer takes the base directory directly.
    base: str | None = Field(None, description="registered base model (setfit: the embedded all-MiniLM-L6-v2 when not given)")
    name: str | None = Field(None, description="name to register the result under")
    data: Path | None = Field(None, description="training data: .jsonl, .json, .csv or .parquet")
    validation_data: Path | None = Field(None, description="separate validation file (same format); else validation_split of data")
    validation_split: float = Field(0.1, ge=0.0, lt=1.0, description="share of data held out for validation when no validation_data")
    method: Method = Field(Method.LORA, description="how the base is adapted (task setfit: full)")
    task: Task = Field(Task.SFT, description="what the data teaches")

    # Sequence handling.
    max_length: int = Field(512, ge=8, description="tokens per example; longer ones are truncated (and counted)")
    packing: bool = Field(False, description="pack several examples into one sequence (TRL best-fit packing)")
    padding_free: bool = Field(
        True,
        description="sft/causal_lm batches without pad tokens: the batch's examples are laid end to end in one row, each "
        "with its own positions and attention (packing is padding-free already; soft-prompt methods keep padded rows)",
    )

    # LoRA family.
    lora_rank: int = Field(8, ge=1, description="lora/qlora/dora: rank r of the update B·A")
    lora_alpha: float = Field(16.0, gt=0, description="lora/qlora/dora: scaling alpha (the update is scaled by alpha/r)")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="lora/qlora/dora: dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description=f"comma-separated module names, or all-linear; when not given, {DEFAULT_TARGET_MODULES_TEXT}"
    )
    use_rslora: bool = Field(False, description="lora/qlora/dora: rank-stabilised scaling alpha/sqrt(r)")
    quant_bits: Literal[4, 8] = Field(4, description="qlora: 4 (NF4, double quantization) or 8 bits")

    # Soft prompts.
    num_virtual_tokens: int = Field(8, ge=1, description="prompt_tuning/prefix_tuning: virtual tokens")
    prompt_init_text: str | None = Field(None, description="prompt_tuning: initialise the soft prompt from this text")

    # Layer-wise fine-tuning: train only the top-k transformer blocks.
    layerwise_top_k: int = Field(2, ge=1, description="layerwise: train the top K transformer blocks")
    unfreeze_every: int | None = Field(
        None, ge=1, description="layerwise: gradual unfreezing, one more block from the top trains every N steps (starting from the top K)"
    )

    # Preference tasks.
    beta: float | None = Field(
        None, gt=0, description=f"dpo/orpo/kto: strength of the pull towards the reference (orpo: weight of the odds-ratio term); "
        f"when not given, TRL's {DEFAULT_BETA:g}"
    )
    loss_type: str | None = Field(
        None, description="dpo/kto: TRL's loss variant (dpo: sigmoid, ipo, hinge, robust, apo_zero, ...; kto: kto, apo_zero_unpaired); "
        "when not given, TRL's default (sigmoid, kto)"
    )

    # Classification.
    labels: list[str] | None = Field(None, description="classification/setfit: comma-separated label set (else inferred from the data, sorted)")

    # SetFit.
    setfit_iterations: int = Field(20, ge=1, description="setfit: contrastive pairs generated per example")
    setfit_body_epochs: int = Field(1, ge=1, description="setfit: epochs of contrastive encoder training")

    # Optimisation.
    learning_rate: float | None = Field(None, gt=0, description=f"peak learning rate; when not given, {_default_rates_text()}")
    lr_scheduler: Scheduler = Field("linear", description="learning-rate schedule after the warmup")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="warmup as a share of the steps (or warmup_steps)")
    warmup_steps: int = Field(0, ge=0, description="warmup steps (or warmup_ratio)")
    epochs: float = Field(3.0, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    batch_size: int = Field(8, ge=1, description="examples per device per step")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping; 0 disables it")
    weight_decay: float = Field(0.0, ge=0.0, description="weight decay")
    optimizer: Optimizer = Field("adamw", description="optimizer")
    gradient_checkpointing: bool = Field(
        True, description="recompute activations in the backward pass (TRL's default): about 20% less memory for about 10% "
        "more time on small models, the difference between fitting and not on large ones")
    precision: Precision = Field("auto", description="compute precision; auto is bf16 on CUDA GPUs that have it, fp16 on older ones, fp32 on CPU")
    seed: int = Field(42, description="random seed (initialisation, data order, validation split)")

    # Evaluation, early stopping, checkpoints.
    eval_steps: int | None = Field(None, ge=1, description="validate every N steps (default: ~10 times per run)")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after N validations without improvement (default: no early stopping)")
    early_stopping_threshold: float = Field(0.0, ge=0.0, description="how much the validation loss must fall to count as an improvement")
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N steps (needed for resuming; default: no checkpoints)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept")
    logging_steps: int | None = Field(None, ge=1, description="log losses every N steps (default: ~100 times per run)")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_target_modules(cls, value: Any) -> Any:
        # The CLI passes "q_proj,v_proj"; YAML may pass either form.
        if isinstance(value, str) and value != "all-linear":
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("data", "validation_data")
    @classmethod
    def _absolute_path(cls, value: Path | None) -> Path | None:
        # Stored in the lineage: an absolute path says which file was used wherever it is read.
        return value.expanduser().resolve() if value is not None else None

    @field_validator("labels", mode="before")
    @classmethod
    def _split_labels(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            return [str(v) for v in value]
        return value

    @model_validator(mode="before")
    @classmethod
    def _setfit_defaults_to_full(cls, data: Any) -> Any:
        # SetFit always fine-tunes the whole encoder, so `--task setfit` alone means method full.
        if isinstance(data, dict) and data.get("task") == Task.SETFIT.value and data.get("method") is None:
            return {**data, "method": Method.FULL}
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        problems = combination_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def resolved_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.method]

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA

    @property
    def produces_full_model(self) -> bool:
        return self.method in FULL_MODEL_METHODS or self.task == Task.SETFIT

    def resolved(self) -> dict[str, Any]:
        """The config as JSON-able data with defaults filled in (stored in the lineage)."""
        data = self.model_dump(mode="json")
        data["learning_rate"] = self.resolved_learning_rate
        if self.task in (Task.DPO, Task.ORPO, Task.KTO):
            data["beta"] = self.resolved_beta
        if self.task in LOSS_TYPES and self.loss_type is None:
            data["loss_type"] = LOSS_TYPES[self.task][0]
        return data


def combination_problems(config: TrainConfig) -> list[str]:
    """Method/task/option combinations that make no sense, found without loading anything."""
    problems: list[str] = []
    method, task = config.method, config.task
    if task == Task.SETFIT and method != Method.FULL:
        # SetFit fine-tunes the whole sentence encoder contrastively; the PEFT kinds have no meaning there.
        problems.append(f"task setfit trains the whole sentence encoder: use method 'full' (got '{method.value}')")
    if task in (Task.CLASSIFICATION, Task.SETFIT) and config.packing:
        problems.append(f"packing only applies to sft and causal_lm, not {task.value}")
    if method in SOFT_PROMPT_METHODS and config.packing:
        # A packed row holds several examples, but PEFT prepends the soft prompt once per row.
        problems.append(f"packing cannot be used with {method.value}: the soft prompt is prepended once per row, not per example")
    if config.target_modules is not None and method not in TARGETED_METHODS:
        problems.append(f"target_modules only applies to lora, qlora, dora and ia3, not {method.value}")
    if isinstance(config.target_modules, list) and "lm_head" in config.target_modules:
        # TRL computes log-probabilities from lm_head.weight directly: an adapter there never trains.
        problems.append("target_modules: 'lm_head' cannot carry an adapter in SFT training (TRL reads its weight directly)")
    if config.use_rslora and method not in (Method.LORA, Method.QLORA, Method.DORA):
        problems.append(f"use_rslora only applies to the LoRA methods, not {method.value}")
    if config.prompt_init_text is not None and method != Method.PROMPT_TUNING:
        problems.append("prompt_init_text only applies to prompt_tuning")
    if config.labels is not None and task not in (Task.CLASSIFICATION, Task.SETFIT):
        problems.append(f"labels only apply to classification and setfit, not {task.value}")
    if config.labels is not None and len(set(config.labels)) != len(config.labels):
        problems.append(f"labels repeat a value: {config.labels}")
    if config.labels is not None and len(config.labels) < 2:
        problems.append(f"classification needs at least two labels, got {config.labels}")
    if config.early_stopping_patience is not None and config.validation_data is None and config.validation_split == 0:
        problems.append("early stopping needs validation data: set validation_split > 0 or validation_data")
    if config.unfreeze_every is not None and method != Method.LAYERWISE:
        problems.append(f"unfreeze_every only applies to layerwise, not {method.value}")
    if task in PREFERENCE_TASKS:
        if config.packing:
            problems.append(f"packing only applies to sft and causal_lm, not {task.value} (a preference pair is scored as a whole)")
        if method in SOFT_PROMPT_METHODS:
            problems.append(
                f"task {task.value} trains with lora, qlora, dora, ia3, full or layerwise, not {method.value} "
                "(TRL's preference trainers score completion tokens by position, which virtual tokens shift)"
            )
    if config.beta is not None and task not in (Task.DPO, Task.ORPO, Task.KTO):
        problems.append(f"beta only applies to dpo, orpo and kto, not {task.value}")
    if config.loss_type is not None:
        if task not in LOSS_TYPES:
            problems.append(f"loss_type only applies to dpo and kto, not {task.value}")
        elif config.loss_type not in LOSS_TYPES[task]:
            problems.append(f"loss_type {config.loss_type!r} is not one of TRL's {task.value} losses: {', '.join(LOSS_TYPES[task])}")
    if config.warmup_ratio and config.warmup_steps:
        problems.append("set warmup_ratio or warmup_steps, not both")
    return problems


# Names the `train` flags had before each flag became its setting's name: a run file (or a
# command line) written with them is told the setting's name.
FORMER_FLAG_NAMES = {
    "lr": "learning_rate", "rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout", "rslora": "use_rslora",
    "scheduler": "lr_scheduler", "early_stopping": "early_stopping_patience", "top_k": "layerwise_top_k",
}


def suggest_setting(key: object) -> str | None:
    """The setting an unknown key most likely means (a flag spelling, a former flag name, a typo), or None."""
    fields = list(TrainConfig.model_fields)
    normal = str(key).strip().lstrip("-").replace("-", "_").lower()
    if normal in fields:
        return normal
    if normal in FORMER_FLAG_NAMES:
        return FORMER_FLAG_NAMES[normal]
    close = difflib.get_close_matches(normal, fields, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_setting_problem(key: object, where: str | None = None) -> str:
    """'<where>: unknown setting ...' with a did-you-mean, or the valid names when nothing is close."""
    suggestion = suggest_setting(key)
    hint = f"did you mean {suggestion!r}?" if suggestion else f"the settings are {', '.join(TrainConfig.model_fields)}"
    return f"{where or key}: not a training setting ({hint})"


def _format_pydantic_errors(exc: pydantic.ValidationError) -> list[str]:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
            problems.append(unknown_setting_problem(error["loc"][0]))
        elif where:
            problems.append(f"{where}: {message} (got {error.get('input')!r})")
        else:
            problems.extend(message.split("; "))
    return problems


def load_config(data: Mapping[str, Any], *, source: str = "training config") -> TrainConfig:
    """Validate a mapping into a `TrainConfig`; every problem in one `ValidationError`."""
    try:
        return TrainConfig.model_validate(dict(data))
    except pydantic.ValidationError as exc:
        raise ValidationError(source, _format_pydantic_errors(exc)) from None


def read_yaml_config(path: Path) -> dict[str, Any]:
    """The mapping in a YAML run file (not yet validated: flags are overlaid first)."""
    import yaml

    if not path.is_file():
        raise ValidationError(f"config {path}", ["file not found"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValidationError(f"config {path}", [f"not valid YAML: {exc}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValidationError(f"config {path}", ["the top level must be a mapping of option: value"])
    # Relative data paths in a run file are relative to the file, so a run dir can be moved.
    for key in ("data", "validation_data"):
        if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
            data[key] = str((path.parent / data[key]).resolve())
    return data


def merge_overrides(file_values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """YAML values overlaid by the flags that were given (None means 'not given')."""
    merged = dict(file_values)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return merged

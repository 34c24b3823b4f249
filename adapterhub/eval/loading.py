"""Load what is being evaluated: a base or full model, optionally with a PEFT adapter on it.

Design decisions:

- Any adapter PEFT's `PeftModel.from_pretrained` loads is accepted (LoRA, DoRA, (IA)³,
  prompt/prefix tuning, ...): PEFT reads the adapter's own config, nothing is re-implemented.
- An adapter whose `task_type` is `SEQ_CLS` (trained with a classification head) is loaded on
  `AutoModelForSequenceClassification`, as is a full model whose architecture is a
  `...ForSequenceClassification`; everything else is loaded as a causal LM.
- The tokenizer comes from the adapter or full-model directory when it carries one (a full
  fine-tune may have added tokens), else from the model directory.
- A SetFit classifier (a sentence encoder with `setfit_head.json`, as adapterhub's trainer
  writes it: no pickle) is run through the trainer's own `predict_setfit`, so training and
  evaluation cannot disagree on how the head is rebuilt.
- A classification head's label names are read from the full model's `config.json`
  (`id2label`), or from the `labels` an adapterhub-trained adapter keeps in its
  `training_metrics.json` (PEFT's format has no place for them). When none is there the trainer's documented
  default applies (integer labels in numeric order, then the rest alphabetically): the data's
  label set in that order is used if it has exactly as many labels as the head has outputs,
  which is recorded in the report's details.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub.errors import AdapterhubError, NotFoundError, ValidationError
from adapterhub.eval.data import label_sort_key
from adapterhub.formats import ADAPTER_CONFIG, read_adapter_dir


@dataclass(frozen=True)
class LoadOptions:
    """Where and how to load: pinned for exact comparisons, else chosen from the hardware."""

    device: str | None = None  # "cpu", "cuda", "cuda:1"; None: the best available
    dtype: str | None = None  # "fp32", "bf16", "fp16"; None: bf16/fp16 on GPUs, fp32 on CPU
    # Used when neither the adapter nor the model directory carries a tokenizer (a merged
    # full model written without one): normally the base model's directory.
    tokenizer_dir: Path | None = None


@dataclass
class LoadedModel:
    """A model ready for scoring, and what it can do."""

    model: Any
    tokenizer: Any
    is_classifier: bool
    # Classifier heads: output index -> label name.
    id2label: dict[int, str] = field(default_factory=dict)
    label_source: str | None = None


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_task_type(adapter_dir: Path) -> str | None:
    """The `task_type` an adapter was trained for (`CAUSAL_LM`, `SEQ_CLS`, ...), from its config."""
    try:
        config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterhubError(f"cannot read {ADAPTER_CONFIG} in {adapter_dir}: {exc}") from None
    task_type = config.get("task_type")
    return str(task_type) if task_type else None


# Written by adapterhub's SetFit trainer next to the fine-tuned sentence encoder.
SETFIT_HEAD_FILE = "setfit_head.json"


def is_setfit_dir(model_dir: Path) -> bool:
    """A SetFit classifier trained by adapterhub (encoder + JSON logistic-regression head)."""
    return (Path(model_dir) / SETFIT_HEAD_FILE).is_file()


def setfit_labels(model_dir: Path) -> list[str]:
    try:
        labels = json.loads((Path(model_dir) / SETFIT_HEAD_FILE).read_text(encoding="utf-8")).get("labels")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise AdapterhubError(f"cannot read {SETFIT_HEAD_FILE} in {model_dir}: {exc}") from None
    if not isinstance(labels, list) or not labels:
        raise AdapterhubError(f"{SETFIT_HEAD_FILE} in {model_dir} names no labels")
    return [str(label) for label in labels]


def is_classifier_model_dir(model_dir: Path) -> bool:
    """A full model directory whose architecture has a sequence-classification head."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return any(str(arch).endswith("ForSequenceClassification") for arch in config.get("architectures") or [])


def wants_classifier(model_dir: Path, adapter_dir: Path | None) -> bool:
    """Whether the evaluated thing has a classification head (and so classifies, not generates)."""
    if adapter_dir is not None:
        return adapter_task_type(adapter_dir) == "SEQ_CLS"
    return is_classifier_model_dir(model_dir) or is_setfit_dir(model_dir)


def check_paths(model_dir: Path, adapter_dir: Path | None) -> None:
    problems = []
    if not (Path(model_dir) / "config.json").is_file():
        problems.append(f"model directory {model_dir} has no config.json")
    if adapter_dir is not None and not is_adapter_dir(adapter_dir):
        problems.append(f"adapter directory {adapter_dir} has no {ADAPTER_CONFIG}")
    if problems:
        raise NotFoundError("; ".join(problems))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(directory: Path) -> bool:
    return any((Path(directory) / name).is_file() for name in _TOKENIZER_FILES)


def _tokenizer_dir(model_dir: Path, adapter_dir: Path | None, fallback: Path | None) -> Path:
    for candidate in (adapter_dir, model_dir, fallback):
        if candidate is not None and has_tokenizer(candidate):
            return Path(candidate)
    raise AdapterhubError(
        f"no tokenizer in {model_dir}" + (f" or {adapter_dir}" if adapter_dir else "")
        + " (pass the base model's directory as tokenizer_dir)"
    )


def load_causal(model_dir: Path, adapter_dir: Path | None = None, options: LoadOptions = LoadOptions()) -> LoadedModel:
    """A causal LM (with the adapter applied when given) and its tokenizer, in eval mode."""
    from adapterhub.models import load_causal_lm, load_tokenizer

    check_paths(model_dir, adapter_dir)
    tokenizer = load_tokenizer(_tokenizer_dir(model_dir, adapter_dir, options.tokenizer_dir))
    model = load_causal_lm(Path(model_dir), dtype=options.dtype, device=options.device)
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir)
    return LoadedModel(model=model, tokenizer=tokenizer, is_classifier=False)


def attach_adapter(model: Any, adapter_dir: Path) -> Any:
    """Wrap a loaded base in `PeftModel` with the adapter at `adapter_dir` (eval mode)."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise AdapterhubError(f"the adapter in {adapter_dir} does not load on this base model: {exc}") from None
    return peft_model.eval()


def detach_adapter(model: Any) -> Any:
    """The base model back from `attach_adapter`: the adapter's layers removed, nothing merged."""
    if getattr(model, "peft_config", None) is None:
        return model
    if model.active_peft_config.is_prompt_learning:  # a soft prompt never touched the base's modules
        return model.get_base_model()
    return model.unload()


def load_classifier(
    model_dir: Path, adapter_dir: Path | None, data_labels: Sequence[str], options: LoadOptions = LoadOptions()
) -> LoadedModel:
    """A sequence-classification model (full model, or base + SEQ_CLS adapter) and its labels."""
    from transformers import AutoModelForSequenceClassification

    from adapterhub.models import default_device, load_tokenizer, resolve_dtype

    check_paths(model_dir, adapter_dir)
    tokenizer = load_tokenizer(_tokenizer_dir(model_dir, adapter_dir, options.tokenizer_dir), padding_side="right")
    device = options.device or default_device()
    dtype = resolve_dtype(options.dtype, device)
    if adapter_dir is None:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype)
        names = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
        id2label, source = _resolve_labels(names, model.config.num_labels, data_labels, "config.json id2label")
    else:
        num_labels = _head_outputs(adapter_dir)
        stored = _stored_adapter_labels(adapter_dir)
        id2label, source = _resolve_labels(stored[0], num_labels, data_labels, stored[1])
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=dtype, num_labels=num_labels,
            id2label=id2label, label2id={v: k for k, v in id2label.items()},
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        model = attach_adapter(model, adapter_dir)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model.to(device).eval(), tokenizer=tokenizer, is_classifier=True, id2label=id2label, label_source=source)


def _head_outputs(adapter_dir: Path) -> int:
    """Rows of the classification head saved with a SEQ_CLS adapter (`modules_to_save`)."""
    manifest = read_adapter_dir(Path(adapter_dir))
    heads = [info.shape[0] for name, info in manifest.tensors.items()
             if name.endswith((".score.weight", ".classifier.weight", ".classifier.out_proj.weight")) and len(info.shape) == 2]
    if not heads:
        raise AdapterhubError(f"the SEQ_CLS adapter in {adapter_dir} carries no classification head weights (score/classifier)")
    return int(heads[0])


def _stored_adapter_labels(adapter_dir: Path) -> tuple[dict[int, str], str | None]:
    """Label names the trainer stored with a classifier adapter (`training_metrics.json`)."""
    metrics_file = Path(adapter_dir) / "training_metrics.json"
    if metrics_file.is_file():
        try:
            labels = json.loads(metrics_file.read_text(encoding="utf-8")).get("labels")
        except (json.JSONDecodeError, AttributeError):
            labels = None
        if isinstance(labels, list) and labels:
            return {i: str(v) for i, v in enumerate(labels)}, "training_metrics.json labels"
    return {}, None


def _resolve_labels(
    stored: dict[int, str], num_labels: int, data_labels: Sequence[str], source: str | None
) -> tuple[dict[int, str], str]:
    # transformers fills id2label with LABEL_0.. when none was given: those are not names
    generic = all(name == f"LABEL_{index}" for index, name in stored.items())
    if stored and not generic:
        if len(stored) != num_labels:
            raise AdapterhubError(f"{source} names {len(stored)} labels but the head has {num_labels} outputs")
        return stored, str(source)
    if len(data_labels) == num_labels:
        ordered = sorted(data_labels, key=label_sort_key)
        return dict(enumerate(ordered)), "data labels in the trainer's order (none stored with the model)"
    raise ValidationError(
        "classification labels",
        [f"the model stores no label names and its head has {num_labels} outputs, "
         f"but the data has {len(data_labels)} labels ({', '.join(data_labels)})"],
    )

"""The model card a push writes: Hub metadata that validates, and a body that says what the files are.

Design decisions:
- Built with the client's own types: `ModelCardData` for the metadata (its `EvalResult`s become
  the `model-index` the Hub reads), `ModelCard.from_template` for the body, so the YAML is what
  the Hub expects and `ModelCard.load` reads it back. The card is written by adapterhub itself:
  `PeftModel.push_to_hub` ends with transformers' generic card (`library_name: transformers`, no
  tags), which says nothing about the adapter.
- `base_model` is always a Hub id. An adapter names its base model (`base_model_relation:
  adapter`); a merge names every parent's Hub repo (`merge`) when each parent has one, and
  otherwise the base model, as an adapter (`finetune` for a full model), with the unpublished
  parents named in the body; a full fine-tune names its base (`finetune`). The machine-readable facts the Hub has no field for (the
  registry ref, the content hash, the base's Hub id and fingerprint, the parents) go in one
  `adapterhub:` block, which a pull reads to find the base model even when `base_model` lists
  merged parents.
- The card depends only on the record, never on when it was pushed: pushing the same record
  twice writes the same bytes, so the Hub sees unchanged files and no commit is made.
- Local paths in the lineage (a training file, an import's source directory) are shown by file
  name: the card is public, the layout of the author's disk is not its business.
- Evaluations: the latest value of each (metric, dataset, split), in the order first measured.
- The usage snippets follow the kinds table: vLLM's `--lora-modules` line appears only when
  `kinds.why_not_served` says vLLM serves the adapter, else the card gives the table's reason.

This module is pure (text in, text out) and imports no registry: `adapterhub.cli.hub` fills
`CardInputs` from a record.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from adapterhub.kinds import describe_kind, get_kind, why_not_served

CARD_FILE = "README.md"
CARD_TAG = "adapterhub"
# vLLM's --max-lora-rank takes one of these (vllm/config/lora.py).
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# PEFT task types -> the Hub's pipeline tags.
_PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_CLS": "text-classification",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
# Keys of a training config or lineage that hold local paths (shown by file name).
_PATH_KEYS = frozenset({"data", "validation_data", "output_dir", "source", "path", "resume_from"})


PEFT_CONFIG_FILE = "adapter_config.json"


def point_config_at_hub_base(folder: Path, base_hub_id: str) -> bool:
    """Make the adapter config in `folder` name its base by Hub id, as `PeftModel.push_to_hub` does.

    A registry adapter's `base_model_name_or_path` is where its base lay on the author's disk:
    published, it leaks that layout and makes `AutoPeftModelForCausalLM.from_pretrained(repo)`
    look for a directory nobody else has. Returns whether the file was changed (a folder
    without an adapter config, a full model, is left alone). The weights are never touched.
    """
    config_file = Path(folder) / PEFT_CONFIG_FILE
    if not config_file.is_file():
        return False
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("base_model_name_or_path") == base_hub_id:
        return False
    config["base_model_name_or_path"] = base_hub_id
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


@dataclass(frozen=True)
class EvaluationRow:
    """One stored evaluation: `dataset` is the registry's label (`heldout.jsonl@sha256:ab12…`)."""

    metric: str
    value: float
    dataset: str
    split: str | None = None


@dataclass(frozen=True)
class ParentInfo:
    """A merge input: its registry ref (`name:version`) and the Hub repo it is published in, if any."""

    ref: str
    hub_id: str | None = None


@dataclass(frozen=True)
class CardInputs:
    """Everything a card says, as plain data (see `adapterhub.cli.hub` for how a record fills it).

    `config` is the record's `adapter_config.json` (a full model's `config.json`); `lineage`
    is the registry's lineage document (`kind`, `parents`, `details`) or None.
    """

    repo_id: str
    ref: str
    sha256: str
    kind: str
    peft_type: str
    task_type: str | None
    config: Mapping[str, Any]
    base_name: str
    base_hub_id: str
    base_fingerprint: str
    files: Sequence[str] = ()
    lineage_kind: str | None = None
    lineage_details: Mapping[str, Any] = field(default_factory=dict)
    parents: Sequence[ParentInfo] = ()
    evaluations: Sequence[EvaluationRow] = ()
    tags: Sequence[str] = ()

    @property
    def is_full_model(self) -> bool:
        return get_kind(self.kind).is_full_model

    @property
    def repo_name(self) -> str:
        return self.repo_id.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class CardInfo:
    """What a pulled card says about where the files belong.

    `base_models` are the Hub ids to look for among the registered bases, most specific first:
    the `adapterhub:` block's base, then `base_model` (a merge's parents come after it).
    """

    base_models: tuple[str, ...]
    relation: str | None
    library_name: str | None
    tags: tuple[str, ...]
    adapterhub: Mapping[str, Any]
    eval_results: tuple[EvalResult, ...]


def pipeline_tag(inputs: CardInputs) -> str:
    """The Hub's pipeline tag: from the PEFT task type, or a full model's architecture."""
    if inputs.is_full_model:
        architectures = inputs.config.get("architectures") or []
        return "text-classification" if any(str(a).endswith("ForSequenceClassification") for a in architectures) else "text-generation"
    return _PIPELINE_TAGS.get(inputs.task_type or "CAUSAL_LM", "text-generation")


def base_model_metadata(inputs: CardInputs) -> tuple[str | list[str], str]:
    """(`base_model`, `base_model_relation`) for the card (see the module docstring)."""
    if inputs.lineage_kind == "merged" and inputs.parents and all(p.hub_id for p in inputs.parents):
        return sorted({p.hub_id for p in inputs.parents if p.hub_id}), "merge"
    if inputs.is_full_model:
        return inputs.base_hub_id, "finetune"  # the base's weights, changed (trained, or merged with unpublished parents)
    return inputs.base_hub_id, "adapter"


def latest_evaluations(evaluations: Sequence[EvaluationRow]) -> list[EvaluationRow]:
    """The last value of each (metric, dataset, split), in the order each was first measured."""
    latest: dict[tuple[str, str, str | None], EvaluationRow] = {}
    for row in evaluations:
        latest[(row.metric, row.dataset, row.split)] = row  # a dict keeps a key where it was first put
    return list(latest.values())


def card_data(inputs: CardInputs) -> ModelCardData:
    """The card's metadata block (see the module docstring for each field)."""
    base_model, relation = base_model_metadata(inputs)
    kind = get_kind(inputs.kind)
    tags = [CARD_TAG]
    if not inputs.is_full_model:
        tags += [inputs.peft_type.lower(), kind.name]
    relation_targets = base_model if isinstance(base_model, list) else [base_model]
    tags += [f"base_model:{relation}:{target}" for target in relation_targets]
    tags += list(inputs.tags)
    task = pipeline_tag(inputs)
    eval_results = [
        EvalResult(
            task_type=task, dataset_type=_dataset_type(row.dataset), dataset_name=row.dataset,
            dataset_split=row.split, metric_type=row.metric, metric_value=row.value,
        )
        for row in latest_evaluations(inputs.evaluations)
    ]
    meta: dict[str, Any] = {
        "ref": inputs.ref,
        "sha256": inputs.sha256,
        "kind": inputs.kind,
        "base_model": inputs.base_hub_id,
        "base_fingerprint": inputs.base_fingerprint,
        "origin": inputs.lineage_kind,
    }
    if inputs.parents:
        meta["parents"] = [{"ref": p.ref, "hub_id": p.hub_id} for p in inputs.parents]
    return ModelCardData(
        base_model=base_model,
        base_model_relation=relation,
        library_name="transformers" if inputs.is_full_model else "peft",
        pipeline_tag=task,
        tags=tags,
        model_name=inputs.repo_name if eval_results else None,
        eval_results=eval_results or None,
        adapterhub=meta,
    )


def build_card(inputs: CardInputs) -> ModelCard:
    """The model card for `inputs`: the metadata above and a body with purpose, lineage, evaluations and usage."""
    card = ModelCard.from_template(card_data(inputs), template_str=_TEMPLATE, **_body_values(inputs))
    card.text = re.sub(r"\n{3,}", "\n\n", card.text)  # the template's optional sections leave blank runs
    return card


def read_card(path: Path) -> CardInfo:
    """What the card at `path` (a pulled README.md) says; a card that does not parse is a ValueError.

    Anyone can write a card: values of the wrong type are left out rather than trusted.
    """
    try:
        card = ModelCard.load(path, ignore_metadata_errors=True)
    except yaml.YAMLError as exc:
        raise ValueError(f"its metadata is not YAML: {' '.join(str(exc).split())[:160]}") from None
    data = card.data
    meta = data.get("adapterhub") or {}
    meta = meta if isinstance(meta, Mapping) else {}
    declared = data.base_model if isinstance(data.base_model, list) else [data.base_model] if data.base_model else []
    candidates = [meta.get("base_model")] if isinstance(meta.get("base_model"), str) else []
    candidates += [b for b in declared if isinstance(b, str)]
    return CardInfo(
        base_models=tuple(dict.fromkeys(candidates)),
        relation=data.get("base_model_relation") if isinstance(data.get("base_model_relation"), str) else None,
        library_name=data.library_name if isinstance(data.library_name, str) else None,
        tags=tuple(t for t in (data.tags if isinstance(data.tags, list) else []) if isinstance(t, str)),
        adapterhub=dict(meta),
        eval_results=tuple(data.eval_results or ()),
    )


# ------------------------------------------------------------------ the body


def _dataset_type(label: str) -> str:
    """The dataset part of a registry label (`heldout.jsonl@sha256:…` -> `heldout.jsonl`)."""
    return label.partition("@")[0] or label


def _public(value: Any, key: str = "") -> Any:
    """A lineage value with local paths reduced to their file names (see the module docstring)."""
    if isinstance(value, Mapping):
        return {k: _public(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_public(v, key) for v in value]
    if isinstance(value, str) and key in _PATH_KEYS and ("/" in value or "\\" in value):
        return PurePath(value).name
    return value


def _yaml(value: Any) -> str:
    return yaml.safe_dump(json.loads(json.dumps(_public(value), default=str)), sort_keys=True, allow_unicode=True).rstrip()


def _purpose(inputs: CardInputs) -> str:
    kind = get_kind(inputs.kind)
    what = describe_kind(kind, {"task_type": inputs.task_type, **inputs.config})
    shape = ""
    if kind.naming.factored and inputs.config.get("r"):
        targets = inputs.config.get("target_modules")
        targets = ", ".join(targets) if isinstance(targets, list) else targets
        shape = f" (rank {inputs.config['r']}, alpha {inputs.config.get('lora_alpha')}, on {targets})"
    article = "An" if what[:1].lower() in "aeio(" else "A"
    subject = f"{article} {what} adapter{shape} for [{inputs.base_hub_id}](https://huggingface.co/{inputs.base_hub_id})"
    if inputs.is_full_model:
        subject = f"A full model derived from [{inputs.base_hub_id}](https://huggingface.co/{inputs.base_hub_id})"
    config = inputs.lineage_details.get("config") or {}
    if inputs.lineage_kind == "trained":
        task = {"sft": "instruction following (supervised fine-tuning on prompt/completion or chat rows)",
                "causal_lm": "the language of its training text (causal language modelling)",
                "classification": "text classification", "setfit": "few-shot text classification (SetFit)"}.get(
                    str(config.get("task")), str(config.get("task") or "its training data"))
        data = _public(config.get("data"), "data")
        return f"{subject}, trained with adapterhub for {task}" + (f" on `{data}`." if data else ".")
    if inputs.lineage_kind == "merged":
        method = inputs.lineage_details.get("method", "a merge")
        return f"{subject}, made by adapterhub by merging {len(inputs.parents)} adapters with `{method}`."
    if inputs.lineage_kind == "imported":
        return f"{subject}, imported into adapterhub."
    return f"{subject}."


def _lineage_lines(inputs: CardInputs) -> list[str]:
    details = inputs.lineage_details
    lines: list[str] = []
    if inputs.lineage_kind == "trained":
        if details.get("dataset_fingerprint"):
            lines.append(f"- Training data fingerprint: `{details['dataset_fingerprint']}`")
        config = details.get("config") or {}
        for key, label in (("method", "Method"), ("task", "Task")):
            if config.get(key):
                lines.append(f"- {label}: `{config[key]}`")
        metrics = details.get("metrics") or {}
        if metrics:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in sorted(metrics.items()))
            lines.append(f"- Training metrics: {shown}")
    elif inputs.lineage_kind == "merged":
        lines.append(f"- Merge method: `{details.get('method', 'unknown')}`")
        if details.get("output"):
            lines.append(f"- Output: {details['output']}")
    elif inputs.lineage_kind == "imported" and details.get("source"):
        lines.append(f"- Source: `{_public(details['source'], 'source')}`")
        for key in ("repo", "revision", "commit"):
            if details.get(key):
                lines.append(f"- {key.capitalize()}: `{details[key]}`")
    lines.append(f"- Base model: `{inputs.base_hub_id}` (registered as `{inputs.base_name}`, fingerprint `{inputs.base_fingerprint[:16]}`)")
    lines.append(f"- Registry record: `{inputs.ref}`, content sha256 `{inputs.sha256}`")
    return lines


def _vllm_rank(config: Mapping[str, Any]) -> tuple[int, int | None]:
    """The adapter's largest rank, and the smallest `--max-lora-rank` vLLM accepts for it (None: none does)."""
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    needed = max((r for r in ranks if isinstance(r, int) and not isinstance(r, bool)), default=1)
    return needed, next((r for r in _VLLM_LORA_RANKS if r >= needed), None)


def _body_values(inputs: CardInputs) -> dict[str, Any]:
    kind = get_kind(inputs.kind)
    config = {"task_type": inputs.task_type, **inputs.config}
    vllm_reason = why_not_served(kind, "vllm", config)
    needed, rank = _vllm_rank(inputs.config)
    if vllm_reason is None and not inputs.is_full_model and rank is None:
        vllm_reason = f"its rank {needed} is above vLLM's largest --max-lora-rank ({_VLLM_LORA_RANKS[-1]})"
    auto_class = "AutoModelForSequenceClassification" if pipeline_tag(inputs) == "text-classification" else "AutoModelForCausalLM"
    return {
        "title": inputs.repo_name,
        "purpose": _purpose(inputs),
        "registry_tags": ", ".join(f"`{t}`" for t in inputs.tags),
        "lineage_lines": _lineage_lines(inputs),
        "lineage_kind": inputs.lineage_kind,
        "training_config": _yaml(inputs.lineage_details.get("config")) if inputs.lineage_details.get("config") else "",
        "recipe": _yaml(inputs.lineage_details.get("recipe")) if inputs.lineage_details.get("recipe") else "",
        "parents": list(inputs.parents),
        "evaluations": latest_evaluations(inputs.evaluations),
        "has_curve": "learning_curve.png" in inputs.files,
        "files": sorted(f for f in inputs.files if f != CARD_FILE),
        "repo_id": inputs.repo_id,
        "base_id": inputs.base_hub_id,
        "base_name": inputs.base_name,
        "name": inputs.ref.partition(":")[0],
        "is_full_model": inputs.is_full_model,
        "auto_class": auto_class,
        "vllm_reason": vllm_reason,
        "vllm_rank": rank,
        "fmt": lambda value: f"{value:.4g}" if isinstance(value, float) else str(value),
    }


_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ purpose }}
{%- if registry_tags %}

Registry tags: {{ registry_tags }}.
{%- endif %}

## Lineage

{% for line in lineage_lines -%}
{{ line }}
{% endfor -%}
{%- if lineage_kind == "merged" and parents %}
| parent (registry ref) | version | Hub repo |
|---|---|---|
{% for p in parents -%}
| `{{ p.ref.partition(":")[0] }}` | {{ p.ref.partition(":")[2] }} | {% if p.hub_id %}[{{ p.hub_id }}](https://huggingface.co/{{ p.hub_id }}){% else %}not published{% endif %} |
{% endfor -%}
{%- endif %}
{%- if recipe %}

Recipe, as resolved (refs with their versions):

```yaml
{{ recipe }}
```
{%- endif %}
{%- if training_config %}

Training configuration, as resolved (paths by file name):

```yaml
{{ training_config }}
```
{%- endif %}
{%- if has_curve %}

![learning curve](learning_curve.png)
{%- endif %}

## Evaluation
{% if evaluations %}
| metric | value | dataset | split |
|---|---|---|---|
{% for e in evaluations -%}
| {{ e.metric }} | {{ fmt(e.value) }} | `{{ e.dataset }}` | {{ e.split or "all rows" }} |
{% endfor -%}
{%- else %}
No evaluations are recorded for this version.
{%- endif %}

## Usage
{% if is_full_model %}
With transformers:

```python
from transformers import {{ auto_class }}, AutoTokenizer

model = {{ auto_class }}.from_pretrained("{{ repo_id }}")
tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}")
```

With vLLM:

```bash
vllm serve {{ repo_id }}
```

With adapterhub:

```bash
adapterhub pull {{ repo_id }} --name {{ name }} --base {{ base_name }}
adapterhub export {{ name }} ./{{ name }}   # a transformers directory
```
{%- else %}
With PEFT:

```python
from peft import PeftModel
from transformers import {{ auto_class }}, AutoTokenizer

base = {{ auto_class }}.from_pretrained("{{ base_id }}")
model = PeftModel.from_pretrained(base, "{{ repo_id }}")
tokenizer = AutoTokenizer.from_pretrained("{{ base_id }}")
```

With vLLM:
{% if vllm_reason %}
vLLM cannot serve this adapter: {{ vllm_reason }}.
{%- else %}
```bash
vllm serve {{ base_id }} --enable-lora --max-lora-rank {{ vllm_rank }} --lora-modules {{ name }}={{ repo_id }}
```
{%- endif %}

With adapterhub (the base registered with `--hub-id {{ base_id }}`):

```bash
adapterhub pull {{ repo_id }} --name {{ name }}
adapterhub serve --base {{ base_name }}   # then request model "{{ name }}"
```
{%- endif %}

## Files

{% for f in files -%}
- `{{ f }}`
{% endfor %}
Published with adapterhub (`adapterhub push`).
"""

"""Training data: read JSONL/CSV/Parquet, check every row before training, shape rows per task.

Design decisions:
- Every row is checked before any model is loaded, and every bad row is reported at once with
  its location (`line 7` of a JSONL or CSV file, `row 7` of a Parquet file, `item 7` of a JSON
  array), so a user fixes a file in one pass instead of one crash per bad row after minutes of
  model loading. A line that is not JSON (or not an object) is one bad row among the others: it
  is read as a `Row` carrying its problem, and reported in line order with the rows whose
  fields are missing or of the wrong type, rather than hiding them.
- Files are read by `adapterhub.datafiles`, the one reader evaluation shares.
- Rows are normalised into the shapes TRL and transformers consume natively:
  * sft: conversational prompt/completion (`prompt=[user turns]`, `completion=[assistant]`), so
    SFTTrainer applies the base's chat template and masks the prompt out of the loss
    (completion-only loss). Chat `messages` become prompt = every turn but the last, completion
    = the last (assistant) turn. Without a chat template, plain-text prompt/completion.
  * causal_lm: `text`.
  * classification/setfit: `text` + integer `label`, with the label set listed in the config or
    inferred (sorted; integers numerically).
- The dataset fingerprint is the sha256 of the files' bytes, stored in the lineage. With the
  resolved config next to it, it lets `training_split` name again, later, exactly the rows a
  run trained and validated on (`adapterhub eval REF --split validation`).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub.datafiles import Row, describe_value, file_fingerprint, read_data_file
from adapterhub.errors import NotFoundError, ValidationError
from adapterhub.train.config import PAIR_TASKS, PREFERENCE_TASKS, Task, TrainConfig

_MAX_REPORTED = 20


@dataclass
class PreparedData:
    """Validated, normalised examples of one run, ready to become `datasets.Dataset`s."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    fingerprint: str
    labels: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def to_datasets(self) -> tuple[Any, Any | None]:
        from datasets import Dataset

        train = Dataset.from_list(self.train)
        validation = Dataset.from_list(self.validation) if self.validation else None
        return train, validation


def read_rows(path: Path) -> list[Row]:
    """Rows of a data file with their locations (`adapterhub.datafiles`); an empty file is refused.

    Rows that cannot be parsed are returned with their `problem`, for `normalise_rows` to
    report with every other bad row.
    """
    rows = read_data_file(path)
    if not rows:
        raise ValidationError(f"data {path}", ["the dataset is empty"])
    return rows


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= _MAX_REPORTED:
        return problems
    return problems[:_MAX_REPORTED] + [f"... and {len(problems) - _MAX_REPORTED} more"]


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _text_fields_problem(values: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    """'prompt missing, completion a number 5' for the keys that are not non-empty strings, or None."""
    bad = []
    for key in keys:
        if key not in values or values[key] is None:
            bad.append(f"{key} missing")
        elif not isinstance(values[key], str):
            bad.append(f"{key} is a {describe_value(values[key])}")
        elif not values[key].strip():
            bad.append(f"{key} empty")
    return ", ".join(bad) or None


def _normalise_sft(row: Row, problems: list[str], *, chat: bool) -> dict[str, Any] | None:
    values = row.values
    if "messages" in values and values["messages"] is not None:
        messages = values["messages"]
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)  # CSV cells hold JSON text
            except json.JSONDecodeError:
                problems.append(f"{row.where}: 'messages' is not a list of {{role, content}} objects")
                return None
        if not isinstance(messages, list) or len(messages) < 2:
            problems.append(f"{row.where}: 'messages' needs at least two turns (a prompt and the assistant's answer)")
            return None
        bad = [
            i for i, m in enumerate(messages)
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str)
        ]
        if bad:
            problems.append(f"{row.where}: messages {bad} lack a role (system/user/assistant) or a string content")
            return None
        if messages[-1]["role"] != "assistant":
            problems.append(f"{row.where}: the last message must be the assistant's (it is what the loss is computed on)")
            return None
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        if chat:
            return {"prompt": turns[:-1], "completion": turns[-1:]}
        prompt = "\n".join(m["content"] for m in turns[:-1]) + "\n"
        return {"prompt": prompt, "completion": turns[-1]["content"]}
    bad = _text_fields_problem(values, ("prompt", "completion"))
    if bad:
        problems.append(f"{row.where}: needs non-empty 'prompt' and 'completion' strings (or 'messages'); {bad}")
        return None
    if chat:
        return {
            "prompt": [{"role": "user", "content": values["prompt"]}],
            "completion": [{"role": "assistant", "content": values["completion"]}],
        }
    return {"prompt": values["prompt"], "completion": values["completion"]}


def _label_text(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, str)) and str(value).strip():
        return str(value).strip()
    return None


def normalise_rows(rows: list[Row], config: TrainConfig, *, chat: bool, labels: list[str] | None) -> tuple[list[dict[str, Any]], list[str] | None]:
    """Check and reshape rows for the task; raises one `ValidationError` naming every bad row, in file order."""
    examples, labels, problems = _check_rows(rows, config, chat=chat, labels=labels)
    if problems:
        raise ValidationError("training data", _capped(problems))
    return examples, labels


def _check_rows(
    rows: list[Row], config: TrainConfig, *, chat: bool, labels: list[str] | None
) -> tuple[list[dict[str, Any]], list[str] | None, list[str]]:
    """The task's examples, the label set, and one problem per bad row in file order."""
    if config.task in PREFERENCE_TASKS:
        from adapterhub.train.preference_data import PreferenceShape, check_preference_rows

        shape = PreferenceShape.PAIRS if config.task in PAIR_TASKS else PreferenceShape.KTO
        pairs, pair_problems = check_preference_rows(rows, shape, chat=chat)
        return pairs, None, pair_problems
    # (position in the file, message): rows are checked in more than one pass for classification.
    found: list[tuple[int, str]] = []
    examples: list[dict[str, Any]] = []
    task = config.task
    readable: list[tuple[int, Row]] = []
    for position, row in enumerate(rows):
        if row.problem is not None:  # not JSON, not an object: a bad row like the others
            found.append((position, f"{row.where}: {row.problem}"))
        else:
            readable.append((position, row))
    if task == Task.SFT:
        for position, row in readable:
            problems: list[str] = []
            example = _normalise_sft(row, problems, chat=chat)
            found.extend((position, problem) for problem in problems)
            if example is not None:
                examples.append(example)
    elif task == Task.CAUSAL_LM:
        for position, row in readable:
            bad = _text_fields_problem(row.values, ("text",))
            if bad:
                found.append((position, f"{row.where}: needs a non-empty 'text' string; {bad}"))
            else:
                examples.append({"text": row.values["text"]})
    else:
        raw: list[tuple[int, Row, str]] = []
        for position, row in readable:
            label = _label_text(row.values.get("label"))
            bad_text = _text_fields_problem(row.values, ("text",))
            if bad_text or label is None:
                bad = [bad_text] if bad_text else []
                if label is None:
                    value = row.values.get("label")
                    bad.append("label missing" if value is None else f"label is a {describe_value(value)}")
                found.append((position, f"{row.where}: needs a non-empty 'text' and a 'label' (string or integer); {', '.join(bad)}"))
                continue
            raw.append((position, row, label))
        if labels is None:
            labels = _labels_in([row for _, row, _ in raw])
        index = {label: i for i, label in enumerate(labels)}
        for position, row, label in raw:
            if label not in index:
                found.append((position, f"{row.where}: label {label!r} is not one of {labels}"))
            else:
                examples.append({"text": row.values["text"], "label": index[label]})
    return examples, labels, [problem for _, problem in sorted(found, key=lambda item: item[0])]


def _labels_in(rows: Sequence[Row]) -> list[str]:
    """The label set of readable rows, sorted (integers numerically), as a run infers it."""
    seen = {label for row in rows if row.problem is None and (label := _label_text(row.values.get("label"))) is not None}
    return sorted(seen, key=lambda v: (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v))


def prepare_data(config: TrainConfig, *, chat: bool) -> PreparedData:
    """Read, validate and split the run's data (no model needed)."""
    if config.data is None:
        raise ValidationError("training config", ["no training data given (--data or `data:` in the config)"])
    files = [config.data] + ([config.validation_data] if config.validation_data else [])
    train_rows = read_rows(config.data)
    validation_rows = read_rows(config.validation_data) if config.validation_data else None
    labels = list(config.labels) if config.labels else None
    if config.task in (Task.CLASSIFICATION, Task.SETFIT) and labels is None and validation_rows is not None:
        # Infer the label set from both files, so a label seen only in validation is not an error.
        labels = _labels_in(train_rows + validation_rows)
    train, labels, problems = _check_rows(train_rows, config, chat=chat, labels=labels)
    notes: list[str] = []
    if validation_rows is not None:
        validation, _, validation_problems = _check_rows(validation_rows, config, chat=chat, labels=labels)
        if problems or validation_problems:
            # Both files' bad rows in one error; each location then says which file it is in.
            problems = [f"{files[0].name} {p}" for p in problems] + [f"{files[1].name} {p}" for p in validation_problems]
    if problems:
        raise ValidationError("training data", _capped(problems))
    if validation_rows is None:
        if config.validation_split > 0 and math.floor(len(train) * config.validation_split) == 0:
            notes.append(
                f"validation_split {config.validation_split} of {len(train)} examples is less than one example: no validation"
            )
        held = held_out_indices(len(train), config.validation_split, config.seed)
        validation = [train[i] for i in sorted(held)]
        train = [example for i, example in enumerate(train) if i not in held]
    if config.task in (Task.CLASSIFICATION, Task.SETFIT) and labels is not None and len(labels) < 2:
        raise ValidationError("training data", [f"classification needs at least two labels, found {labels}"])
    if config.early_stopping_patience is not None and not validation:
        raise ValidationError("training config", ["early stopping needs validation examples, and there are none"])
    return PreparedData(train=train, validation=validation, fingerprint=file_fingerprint(files), labels=labels, notes=notes)


def held_out_indices(count: int, fraction: float, seed: int) -> frozenset[int]:
    """Positions of the rows a run holds out for validation: a seeded shuffle's first floor(count * fraction)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return frozenset(order[: int(math.floor(count * fraction))])


SPLITS = ("train", "validation")


@dataclass(frozen=True)
class TrainingSplit:
    """The rows of one split of a past training run: a file, and which of its rows (None: all)."""

    path: Path
    indices: frozenset[int] | None


def training_split(details: Mapping[str, Any], split: str) -> TrainingSplit:
    """Where the rows a training run used for `split` ("train" or "validation") are, from its lineage.

    The data files must still hold the bytes the run saw (their fingerprint is checked): a
    file edited since would split differently, and the scores would silently mix training
    and held-out rows.
    """
    if split not in SPLITS:
        raise ValidationError("split", [f"{split!r} is not one of {', '.join(SPLITS)}"])
    config = details.get("config")
    fingerprint = details.get("dataset_fingerprint")
    if not isinstance(config, Mapping) or not fingerprint or not config.get("data"):
        raise ValidationError("split", ["the lineage holds no training run with its data (merged or imported models have none)"])
    files = [Path(config["data"])] + ([Path(config["validation_data"])] if config.get("validation_data") else [])
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise NotFoundError(f"training data {', '.join(missing)} not found (the split is taken from the files the run used)")
    if file_fingerprint(files) != fingerprint:
        raise ValidationError(
            "split", [f"{', '.join(p.name for p in files)} changed since the run (sha256 differs): its {split} rows are unknown"]
        )
    if config.get("validation_data"):
        return TrainingSplit(files[1] if split == "validation" else files[0], None)
    count = len(read_rows(files[0]))
    defaults = TrainConfig.model_fields
    fraction = float(config.get("validation_split", defaults["validation_split"].default))
    held = held_out_indices(count, fraction, int(config.get("seed", defaults["seed"].default)))
    if split == "validation" and not held:
        raise ValidationError("split", [f"the run held out no validation rows (validation_split {fraction})"])
    indices = held if split == "validation" else frozenset(range(count)) - held
    return TrainingSplit(files[0], indices)

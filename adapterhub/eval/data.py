"""Eval files: loading (JSONL, CSV, Parquet), shape detection and row validation.

The shape of a file decides what can be measured on it (`EvalKind`):

- `generation`: rows with `prompt` + `completion`, or chat `messages` whose last turn is the
  assistant's reference reply. Scored by generating a reply to the prompt.
- `classification`: rows with `text` + `label` (a string or an integer).
- `text`: rows with `text` only. Scored by perplexity.

Design decisions:

- Files are read by `adapterhub.datafiles`, the reader training shares, so a malformed line,
  a missing field or a bad label is reported by its location in the file (`line 7` of a JSONL
  or CSV file, `row 7` of a Parquet file, `item 7` of a JSON array), and a line that is not
  JSON is reported together with every other bad row.
- A whole file is validated before any model is loaded, and every bad row is named in one
  `ValidationError`, so a user fixes the file in one pass and no compute is wasted.
- The fingerprint is the sha256 of the file's bytes: two scores are comparable exactly when
  they were measured on the same bytes (and `--max-examples`, recorded next to it).
- `max_examples` takes the first N rows in file order, never a random sample, so a score is
  reproducible from the file alone.
- A `RowSubset` keeps only some rows (say, the validation rows a training run held out of the
  same file), by position among the file's rows; the whole file is still validated, and the
  subset's name travels with the scores (the registry's `split` column).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub.datafiles import file_fingerprint, read_data_file
from adapterhub.errors import NotFoundError, ValidationError

_ROLES = ("system", "user", "assistant", "tool")
# Shown when a file's columns fit no shape, so the user sees every accepted layout at once.
_SHAPES_HELP = (
    "expected rows with 'prompt' and 'completion', chat 'messages' (last turn from the assistant), "
    "'text' and 'label' (classification), 'text' alone (perplexity), or 'prompt', 'chosen' and 'rejected' (preference pairs)"
)


class EvalKind(str, enum.Enum):
    """What a file's rows hold, and so how they are scored."""

    GENERATION = "generation"
    CLASSIFICATION = "classification"
    TEXT = "text"
    PREFERENCE = "preference"


@dataclass(frozen=True)
class EvalRow:
    """One validated row.

    `messages` is the conversation to continue (for `prompt`/`completion` rows, one user turn
    holding the prompt); `prompt` is the raw prompt text for models without a chat template.
    `reference` is the completion, the last assistant turn, the label or the text itself.
    """

    line: int
    reference: str
    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] = ()
    text: str | None = None
    # Preference rows: `reference` is the chosen answer, this the rejected one.
    rejected: str | None = None


@dataclass(frozen=True)
class RowSubset:
    """Rows of a file to keep, by 0-based position among its rows, and what they are called."""

    name: str  # e.g. "validation": stored as the evaluation's split
    indices: frozenset[int] | None = None  # None: every row (a file that is the split as a whole)


@dataclass(frozen=True)
class EvalDataset:
    """A validated eval file (or the rows of it a `RowSubset` keeps)."""

    path: Path
    sha256: str
    kind: EvalKind
    rows: tuple[EvalRow, ...]
    num_rows: int  # valid rows in the file (or in the subset), before max_examples
    # Classification: the label set (sorted, as strings). Generation: empty.
    labels: tuple[str, ...] = ()
    location: str = "line"  # how `EvalRow.line` numbers rows: "line" (JSONL, CSV), "row" (Parquet), "item" (JSON array)
    split: str | None = None  # the `RowSubset`'s name; None for the whole file

    @property
    def references(self) -> list[str]:
        return [row.reference for row in self.rows]


def label_sort_key(label: str) -> tuple[int, int, str]:
    """Integer labels in numeric order ("2" before "10"), then the rest alphabetically.

    The same order the trainer gives an inferred label set, so a head trained without stored
    label names maps its outputs to the same labels here.
    """
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def load_eval_dataset(path: Path, *, max_examples: int | None = None, subset: RowSubset | None = None) -> EvalDataset:
    """Read, shape-detect and validate an eval file; raise one error naming every bad row.

    The label set and the shape come from the whole file, so a subset is scored against the
    same labels as the file it was taken from.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"data file {path} not found")
    if max_examples is not None and max_examples < 1:
        raise ValidationError("--max-examples", [f"must be at least 1, got {max_examples}"])
    read = read_data_file(path)
    if not read:
        raise ValidationError(f"data file {path.name}", ["it holds no rows"])
    location = read[0].unit
    records = [(row, _drop_missing(row.values)) for row in read]
    kind = detect_kind([record for row, record in records if row.problem is None], path.name)
    rows: list[EvalRow] = []
    problems: list[str] = []
    for read_row, record in records:  # in file order: unreadable lines among the other bad rows
        if read_row.problem is not None:
            problems.append(f"{read_row.where}: {read_row.problem}")
            continue
        row, row_problems = _parse_row(kind, read_row.number, record)
        problems.extend(f"{read_row.where}: {p}" for p in row_problems)
        if row is not None:
            rows.append(row)
    if problems:
        raise ValidationError(f"data file {path.name}", problems)
    labels = tuple(sorted({row.reference for row in rows}, key=label_sort_key)) if kind is EvalKind.CLASSIFICATION else ()
    if kind is EvalKind.CLASSIFICATION and len(labels) < 2:
        raise ValidationError(f"data file {path.name}", [f"classification needs at least two labels, found {list(labels)}"])
    if subset is not None:
        rows = _subset_rows(path, rows, subset)
    selected = rows[:max_examples] if max_examples is not None else rows
    return EvalDataset(
        path=path, sha256=file_fingerprint([path]), kind=kind, rows=tuple(selected), num_rows=len(rows), labels=labels,
        location=location, split=subset.name if subset is not None else None,
    )


def _subset_rows(path: Path, rows: list[EvalRow], subset: RowSubset) -> list[EvalRow]:
    if subset.indices is None:
        return rows
    outside = sorted(i for i in subset.indices if not 0 <= i < len(rows))
    if outside:
        raise ValidationError(
            f"{subset.name} rows of {path.name}",
            [f"the file has {len(rows)} rows, but the {subset.name} split names row {outside[0] + 1}"],
        )
    if not subset.indices:
        raise ValidationError(f"{subset.name} rows of {path.name}", [f"the {subset.name} split holds no rows"])
    return [row for i, row in enumerate(rows) if i in subset.indices]


def detect_kind(records: Sequence[Mapping[str, Any]], subject: str) -> EvalKind:
    """The shape of a file, from the fields its rows use (the first layout that fits wins)."""
    fields: set[str] = set()
    for record in records:
        fields.update(key for key, value in record.items() if value is not None)
    if "chosen" in fields or "rejected" in fields:
        return EvalKind.PREFERENCE
    if "messages" in fields:
        return EvalKind.GENERATION
    if "prompt" in fields or "completion" in fields:
        return EvalKind.GENERATION
    if "text" in fields and "label" in fields:
        return EvalKind.CLASSIFICATION
    if "text" in fields:
        return EvalKind.TEXT
    raise ValidationError(f"data file {subject}", [f"{_SHAPES_HELP}; found fields {sorted(fields)}"])


def _drop_missing(record: Mapping[str, Any]) -> dict[str, Any]:
    """CSV cells left empty arrive as None or NaN; treat them as absent fields."""
    return {key: value for key, value in record.items() if value is not None and value == value}


def _nonempty_string(record: Mapping[str, Any], field: str, problems: list[str]) -> str | None:
    if field not in record:
        problems.append(f"missing field '{field}'")
        return None
    value = record[field]
    if not isinstance(value, str):
        problems.append(f"field '{field}' must be a string, got {type(value).__name__}")
        return None
    if not value.strip():
        problems.append(f"field '{field}' is empty")
        return None
    return value


def _parse_row(kind: EvalKind, number: int, record: Mapping[str, Any]) -> tuple[EvalRow | None, list[str]]:
    problems: list[str] = []
    if kind is EvalKind.TEXT:
        text = _nonempty_string(record, "text", problems)
        return (EvalRow(line=number, reference=text, text=text) if text is not None else None), problems
    if kind is EvalKind.CLASSIFICATION:
        text = _nonempty_string(record, "text", problems)
        label = _label(record, problems)
        if text is None or label is None:
            return None, problems
        return EvalRow(line=number, reference=label, text=text), problems
    if kind is EvalKind.PREFERENCE:
        prompt = _nonempty_string(record, "prompt", problems)
        chosen = _nonempty_string(record, "chosen", problems)
        rejected = _nonempty_string(record, "rejected", problems)
        if prompt is None or chosen is None or rejected is None:
            return None, problems
        if chosen.strip() == rejected.strip():
            return None, ["chosen and rejected answers are identical"]
        messages = ({"role": "user", "content": prompt},)
        return EvalRow(line=number, reference=chosen, prompt=prompt, messages=messages, rejected=rejected), []
    if "messages" in record:
        return _parse_messages(number, record["messages"])
    prompt = _nonempty_string(record, "prompt", problems)
    completion = _nonempty_string(record, "completion", problems)
    if prompt is None or completion is None:
        return None, problems
    return EvalRow(line=number, reference=completion, prompt=prompt, messages=({"role": "user", "content": prompt},)), []


def _label(record: Mapping[str, Any], problems: list[str]) -> str | None:
    if "label" not in record:
        problems.append("missing field 'label'")
        return None
    value = record["label"]
    if isinstance(value, float) and value.is_integer():
        # pandas turns an integer CSV column with an empty cell into floats (1 -> 1.0)
        value = int(value)
    # bool is an int subclass; a true/false label is almost always a mistake in the file
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        problems.append(f"field 'label' must be a string or an integer, got {value!r}")
        return None
    label = str(value).strip()
    if not label:
        problems.append("field 'label' is empty")
        return None
    return label


def _parse_messages(number: int, messages: Any) -> tuple[EvalRow | None, list[str]]:
    problems: list[str] = []
    if not isinstance(messages, list) or len(messages) < 2:
        return None, ["'messages' must be a list of at least two turns (a prompt and the assistant's reply)"]
    turns: list[dict[str, str]] = []
    for index, turn in enumerate(messages):
        if not isinstance(turn, Mapping):
            problems.append(f"messages[{index}] is not an object with 'role' and 'content'")
            continue
        role, content = turn.get("role"), turn.get("content")
        if role not in _ROLES:
            problems.append(f"messages[{index}] has role {role!r}; expected one of {', '.join(_ROLES)}")
        if not isinstance(content, str):
            problems.append(f"messages[{index}] has no string 'content'")
            continue
        turns.append({"role": str(role), "content": content})
    if problems:
        return None, problems
    if turns[-1]["role"] != "assistant":
        return None, [f"the last turn must be the assistant's reference reply, got role {turns[-1]['role']!r}"]
    if not turns[-1]["content"].strip():
        return None, ["the last (assistant) turn is empty"]
    context = tuple(turns[:-1])
    plain_prompt = "\n".join(turn["content"] for turn in context)
    return EvalRow(line=number, reference=turns[-1]["content"], prompt=plain_prompt, messages=context), []

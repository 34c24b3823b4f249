"""Which trainer format a row is in, whether it is well-formed, and its text for hashing and lengths.

Design decisions:
- The formats are the trainer's (`adapterhub.train.data`): chat `messages`, `prompt`/`completion`,
  `text`/`label`, `text`. A file's format is its first readable row's; a later row in another
  format is a bad row ("mixed formats"), because the trainer would reject the file.
- Field checks reuse the trainer's own helpers, so "bad" means the same thing in both places.
- `row_key` is the normalized text (NFKC, casefolded, whitespace collapsed) that exact dedup
  hashes and MinHash shingles: two rows differing only in spacing or case are duplicates.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator, Mapping
from typing import Any

from adapterhub.datafiles import Row, iter_data_file
from adapterhub.errors import ValidationError
from adapterhub.train.data import _label_text, _text_fields_problem

CHAT, PROMPT_COMPLETION, TEXT_LABEL, TEXT = "messages", "prompt/completion", "text/label", "text"
FORMATS = (CHAT, PROMPT_COMPLETION, TEXT_LABEL, TEXT)
MAX_REPORTED = 20
_SPACES = re.compile(r"\s+")


def detect_format(values: Mapping[str, Any]) -> str | None:
    """The trainer format a row's columns name, or None when they name none."""
    if "messages" in values:
        return CHAT
    if "prompt" in values or "completion" in values:
        return PROMPT_COMPLETION
    if "text" in values and "label" in values:
        return TEXT_LABEL
    if "text" in values:
        return TEXT
    return None


def messages_of(values: Mapping[str, Any]) -> Any:
    """The `messages` value, parsed from JSON text when a CSV cell holds it."""
    messages = values.get("messages")
    if isinstance(messages, str):
        try:
            return json.loads(messages)
        except json.JSONDecodeError:
            return None
    return messages


def row_problem(values: Mapping[str, Any], fmt: str) -> str | None:
    """Why the trainer would refuse this row in format `fmt`, or None."""
    if fmt == CHAT:
        messages = messages_of(values)
        if not isinstance(messages, list) or len(messages) < 2:
            return "'messages' needs a list of at least two {role, content} turns"
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                return f"message {i} lacks a role (system/user/assistant)"
            if not isinstance(message.get("content"), str) or not message["content"].strip():
                return f"message {i} has no non-empty string content"
        if messages[-1]["role"] != "assistant":
            return "the last message must be the assistant's"
        return None
    if fmt == PROMPT_COMPLETION:
        bad = _text_fields_problem(values, ("prompt", "completion"))
        return f"needs non-empty 'prompt' and 'completion' strings; {bad}" if bad else None
    bad = _text_fields_problem(values, ("text",))
    if fmt == TEXT_LABEL and _label_text(values.get("label")) is None:
        bad = ", ".join(filter(None, [bad, "label missing or not a string/integer"]))
    return f"needs a non-empty 'text'{' and a label' if fmt == TEXT_LABEL else ''}; {bad}" if bad else None


def is_empty(values: Mapping[str, Any], fmt: str) -> bool:
    """Whether every text field is empty or blank (an empty row, counted apart from other bad rows)."""
    return not any(text.strip() for text in texts_of(values, fmt))


def texts_of(values: Mapping[str, Any], fmt: str) -> list[str]:
    """The row's text fields in a fixed order (message contents for chat)."""
    if fmt == CHAT:
        messages = messages_of(values)
        if not isinstance(messages, list):
            return []
        return [m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)]
    keys = ("prompt", "completion") if fmt == PROMPT_COMPLETION else ("text",)
    return [values[key] for key in keys if isinstance(values.get(key), str)]


def label_of(values: Mapping[str, Any], fmt: str) -> str | None:
    """The row's label as text (classification rows), else None."""
    return _label_text(values.get("label")) if fmt == TEXT_LABEL else None


def normalize_key(text: str) -> str:
    """Text as duplicates are compared: NFKC, casefolded, whitespace runs collapsed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def row_key(values: Mapping[str, Any], fmt: str) -> str:
    """The normalized text of a row (its fields joined by a separator no text holds)."""
    return "\x1f".join(normalize_key(text) for text in texts_of(values, fmt))


def classify(row: Row, fmt: str | None) -> tuple[str | None, str | None]:
    """(the file's format so far, this row's problem or None); the first good row fixes the format."""
    if row.problem is not None:
        return fmt, row.problem
    found = detect_format(row.values)
    if found is None:
        return fmt, f"no trainer columns (messages, prompt/completion, text/label or text); has {sorted(row.values)}"
    if fmt is not None and found != fmt:
        return fmt, f"mixed formats: this row is {found}, the file's first row is {fmt}"
    problem = row_problem(row.values, found)
    return (fmt if problem is not None else found), problem


def checked_rows(path: Any, *, fmt: str | None = None) -> Iterator[tuple[Row, str]]:
    """Every row of a file with its format, raising one `ValidationError` for bad rows.

    Rows are yielded as they are read (streaming); the error is raised when the reading ends,
    listing every bad row's line (capped at MAX_REPORTED, with the total), so a caller that
    writes to a temp file discards it. An empty file, or one with no format, is refused.
    """
    problems: list[str] = []
    bad = 0
    seen = False
    for row in iter_data_file(path):
        seen = True
        fmt, problem = classify(row, fmt)
        if problem is not None:
            bad += 1
            if len(problems) < MAX_REPORTED:
                problems.append(f"{row.where}: {problem}")
            continue
        yield row, fmt  # type: ignore[misc]
    if not seen:
        raise ValidationError(f"data {path}", ["the dataset is empty"])
    if bad:
        if bad > len(problems):
            problems.append(f"... and {bad - len(problems)} more bad rows ({bad} in all)")
        raise ValidationError(f"data {path}", problems)

"""Reading dataset files (JSONL, JSON, CSV, Parquet) into located rows: one reader for every verb.

Training, evaluation and (later) data preparation all read the same files, so they read them
here, and a file that one accepts the others accept with the same row numbers and messages.

Design decisions:
- Every row keeps its location as the user sees it (`line 7` of a JSONL or CSV file, where
  the CSV header is line 1; `row 7` of a Parquet file; `item 7` of a JSON array), so every
  message about a row can name it.
- A line that is not JSON, or not a JSON object, does not stop the reading: it becomes a
  `Row` carrying its `problem`, and the caller reports it in line order together with the
  rows whose fields are wrong. One bad line never hides the others.
- JSONL is parsed line by line with the standard library (the only way to name the line of a
  broken object; `datasets`' JSON loader reports an Arrow error without one). CSV and Parquet
  go through `datasets.load_dataset`, whose row order matches the file.
- A file that is not UTF-8 is refused rather than decoded with replacement characters: a
  model would otherwise be trained or scored on text the file does not hold.
- No torch here, and `datasets` is imported only for CSV and Parquet.
- `iter_data_file` is the streaming twin of `read_data_file` (same rows, same locations, same
  messages) for data preparation on files larger than memory: JSONL is read line by line from
  the open file, CSV and Parquet through `datasets`' streaming mode, so memory stays flat.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub.errors import ValidationError

# File suffix -> how it is read.
SUPPORTED_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Row:
    """One raw example and where it came from (for error messages).

    `problem` is set for a row that could not be read at all (not JSON, not an object); its
    `values` are then empty.
    """

    unit: str  # what numbers rows in this file: "line" (JSONL, CSV), "row" (Parquet), "item" (JSON array)
    number: int
    values: dict[str, Any]
    problem: str | None = None
    # The JSONL line as read (streaming reader only), so a verb that keeps a row unchanged can
    # write it back without re-serializing it.
    raw: str | None = field(default=None, compare=False, repr=False)

    @property
    def where(self) -> str:
        """The row's location as messages name it: `line 7`."""
        return f"{self.unit} {self.number}"


def file_fingerprint(paths: Sequence[Path]) -> str:
    """sha256 over the bytes of the files, in order (a dataset's identity)."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _checked_kind(path: Path) -> str:
    """The reader a data file needs ("json", or a `datasets` builder); refuses a missing path,
    a directory or an unsupported suffix before anything is read."""
    subject = f"data {path}"
    if not path.exists():
        raise ValidationError(subject, ["file not found"])
    if not path.is_file():
        raise ValidationError(subject, ["not a file"])
    kind = SUPPORTED_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        shown = path.suffix or "(no suffix)"
        raise ValidationError(subject, [f"unsupported format {shown}: use {', '.join(SUPPORTED_SUFFIXES)}"])
    return kind


def read_data_file(path: Path) -> list[Row]:
    """Every row of a data file with its location, unreadable ones with their problem.

    Raises `ValidationError` only for what makes the whole file unreadable: missing, not a
    file, an unsupported suffix, not UTF-8, a JSON array that does not parse, or a CSV/Parquet
    file `datasets` cannot read. An empty file gives no rows; the caller says what that means.
    """
    path = Path(path)
    kind = _checked_kind(path)
    if kind == "json":
        return _read_json(path)
    if path.stat().st_size == 0:
        return []
    return _read_with_datasets(path, kind)


def iter_data_file(path: Path) -> Iterator[Row]:
    """The rows of `read_data_file`, one at a time, in file order, without holding the file.

    Whole-file problems (missing, unsupported suffix, unreadable CSV/Parquet) are raised before
    the first row; a JSONL line that is not UTF-8 raises `ValidationError` naming its line when
    the reading reaches it (callers write to a temp file, so nothing half-done is left).
    """
    path = Path(path)
    kind = _checked_kind(path)
    if kind == "json":
        if path.suffix.lower() == ".json" and _starts_with_bracket(path):
            return iter(_read_json(path))  # a JSON array is one document: it parses whole
        return _iter_jsonl(path)
    if path.stat().st_size == 0:
        return iter(())
    return _iter_with_datasets(path, kind)


def _starts_with_bracket(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4096).lstrip().startswith(b"[")


def _iter_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValidationError(f"data {path}", [f"line {number}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Row("line", number, {}, f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            except RecursionError:
                yield Row("line", number, {}, "not valid JSON (nested too deeply)")
                continue
            row = _object_row("line", number, value)
            yield Row("line", number, row.values, raw=line.rstrip("\r\n")) if row.problem is None else row


def _iter_with_datasets(path: Path, kind: str) -> Iterator[Row]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(kind, data_files=str(path), split="train", streaming=True)
        rows = iter(dataset)
        first = next(rows, None)
    except Exception as exc:  # pandas/pyarrow raise many types for unreadable files; the message is what matters
        raise ValidationError(f"data {path}", [f"cannot read as {kind}: {type(exc).__name__}: {exc}"]) from None
    if first is None:
        return
    unit, offset = ("line", 2) if kind == "csv" else ("row", 1)  # CSV line 1 is the header
    yield Row(unit, offset, dict(first))
    for i, row in enumerate(rows, 1):
        yield Row(unit, i + offset, dict(row))


def describe_value(value: Any) -> str:
    """A value's JSON type and a short excerpt, for messages about wrongly typed fields."""
    kinds = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    kind = "null" if value is None else kinds.get(type(value), type(value).__name__)
    excerpt = json.dumps(value, default=str)
    return kind if value is None else f"{kind} {excerpt if len(excerpt) <= 40 else excerpt[:37] + '...'}"


def _read_json(path: Path) -> list[Row]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"data {path}", [f"not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        # A JSON array of objects: locations are item numbers.
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"data {path}", [f"not valid JSON: {exc}"]) from None
        except RecursionError:
            raise ValidationError(f"data {path}", ["not valid JSON: nested too deeply"]) from None
        return [_object_row("item", i, item) for i, item in enumerate(items, 1)]
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # blank lines are skipped but still counted
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append(Row("line", number, {}, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        except RecursionError:
            rows.append(Row("line", number, {}, "not valid JSON (nested too deeply)"))
            continue
        rows.append(_object_row("line", number, value))
    return rows


def _object_row(unit: str, number: int, value: Any) -> Row:
    if isinstance(value, dict):
        return Row(unit, number, value)
    return Row(unit, number, {}, f"expected a JSON object, got {describe_value(value)}")


def _read_with_datasets(path: Path, kind: str) -> list[Row]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(kind, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as exc:  # pandas/pyarrow raise many types for unreadable files; the message is what matters
        raise ValidationError(f"data {path}", [f"cannot read as {kind}: {type(exc).__name__}: {exc}"]) from None
    if kind == "csv":
        return [Row("line", i + 2, dict(row)) for i, row in enumerate(dataset)]  # line 1 is the header
    return [Row("row", i + 1, dict(row)) for i, row in enumerate(dataset)]

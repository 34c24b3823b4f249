"""`data inspect`: what a file holds and what is wrong with it, in one streaming pass.

Design decisions:
- One pass, rows in bounded batches: per-row lengths go into a compact `array` (4 bytes a
  row), duplicate detection keeps one slot of a compact hash index per distinct row
  (`hashes.HashIndex`, 24-48 bytes). Nothing else grows with the file.
- Lengths are in tokens when a tokenizer is given (the base model's, batched through the fast
  tokenizer), else in characters; with tokens, the report counts how many rows the trainer's
  `max_length` would truncate.
- Bad rows are all counted, the first MAX_REPORTED listed with their line; the CLI exits 1.
"""

from __future__ import annotations

import statistics
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub.data.hashes import HashIndex, hash64
from adapterhub.data.schema import MAX_REPORTED, classify, detect_format, is_empty, label_of, row_key, texts_of
from adapterhub.datafiles import iter_data_file

BATCH_ROWS = 1024


@dataclass
class InspectReport:
    """What `inspect_file` found."""

    path: Path
    format: str | None
    rows: int
    bad_rows: int
    problems: list[str]
    empty_rows: int
    duplicate_rows: int
    labels: dict[str, int]
    length_unit: str
    length_stats: dict[str, float]
    max_length: int | None = None
    truncated_rows: int | None = None
    lengths: array = field(default_factory=lambda: array("I"), repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The JSON the CLI prints with --json (and a data card's statistics)."""
        return {
            "file": str(self.path),
            "format": self.format,
            "rows": self.rows,
            "bad_rows": self.bad_rows,
            "problems": self.problems,
            "empty_rows": self.empty_rows,
            "duplicate_rows": self.duplicate_rows,
            "labels": self.labels,
            "length_unit": self.length_unit,
            "length": self.length_stats,
            "max_length": self.max_length,
            "truncated_rows": self.truncated_rows,
        }


def inspect_file(path: Path, *, tokenizer: Any = None, max_length: int = 512) -> InspectReport:
    """Check every row of `path` and gather its statistics (see the module docstring)."""
    path = Path(path)
    fmt: str | None = None
    rows = bad = empty = duplicates = 0
    problems: list[str] = []
    labels: Counter[str] = Counter()
    seen = HashIndex()
    lengths = array("I")
    pending: list[str] = []

    def flush() -> None:
        if tokenizer is None:
            lengths.extend(len(text) for text in pending)
        else:
            encoded = tokenizer(pending, add_special_tokens=True)["input_ids"]
            lengths.extend(len(ids) for ids in encoded)
        pending.clear()

    for row in iter_data_file(path):
        rows += 1
        fmt, problem = classify(row, fmt)
        if problem is not None:
            bad += 1
            shape = detect_format(row.values)
            if row.problem is None and shape is not None and is_empty(row.values, shape):
                empty += 1
            if len(problems) < MAX_REPORTED:
                problems.append(f"{row.where}: {problem}")
            continue
        assert fmt is not None
        key = hash64(row_key(row.values, fmt))
        if key in seen:
            duplicates += 1
        else:
            seen.setdefault(key, row.number)
        label = label_of(row.values, fmt)
        if label is not None:
            labels[label] += 1
        pending.append("\n".join(texts_of(row.values, fmt)))
        if len(pending) >= BATCH_ROWS:
            flush()
    if pending:
        flush()
    if bad > len(problems):
        problems.append(f"... and {bad - len(problems)} more bad rows ({bad} in all)")
    if rows == 0:
        problems.append("the dataset is empty")
    stats: dict[str, float] = {}
    if lengths:
        ordered = sorted(lengths)
        stats = {
            "min": ordered[0],
            "mean": round(statistics.fmean(ordered), 2),
            "p50": ordered[len(ordered) // 2],
            "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
            "max": ordered[-1],
        }
    truncated = sum(1 for n in lengths if n > max_length) if tokenizer is not None else None
    return InspectReport(
        path=path,
        format=fmt,
        rows=rows,
        bad_rows=bad,
        problems=problems,
        empty_rows=empty,
        duplicate_rows=duplicates,
        labels=dict(sorted(labels.items())),
        length_unit="tokens" if tokenizer is not None else "characters",
        length_stats=stats,
        max_length=max_length if tokenizer is not None else None,
        truncated_rows=truncated,
        lengths=lengths,
    )


def write_histogram(report: InspectReport, destination: Path) -> Path:
    """A PNG histogram of the row lengths (with the trainer's limit marked when in tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.hist(report.lengths, bins=50, color="#4c72b0")
    if report.max_length is not None:
        axes.axvline(report.max_length, color="#c44e52", linestyle="--", label=f"max_length {report.max_length}")
        axes.legend()
    axes.set_xlabel(f"row length ({report.length_unit})")
    axes.set_ylabel("rows")
    axes.set_title(report.path.name)
    figure.tight_layout()
    figure.savefig(destination, dpi=100)
    plt.close(figure)
    return Path(destination)

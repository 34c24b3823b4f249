"""Writing a verb's outputs: JSONL files and their data cards, all visible at once or not at all.

Design decisions:
- Every output (the JSONL and its `.card.md` / `.card.json`) is written to a temp file beside
  its destination and renamed only when the whole verb succeeded; a failure removes the temps.
  So a bad row found on line 900,000 leaves no half-written file and no stale card.
- The card JSON holds what the registry stores for a dataset record: the verb, its parameters,
  the parents (path + sha256), row counts and the verb's statistics; the markdown card says the
  same for a reader.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from adapterhub.datafiles import file_fingerprint
from adapterhub.errors import ValidationError


@dataclass
class VerbResult:
    """What a verb wrote: output files (path -> row count), its statistics and its card."""

    verb: str
    outputs: dict[Path, int]
    stats: dict[str, Any]
    parameters: dict[str, Any]
    parents: list[dict[str, Any]] = field(default_factory=list)

    def card(self, output: Path) -> dict[str, Any]:
        """The data card of one output file (what `data show` and the registry record hold)."""
        return {
            "file": output.name,
            "rows": self.outputs[output],
            "verb": self.verb,
            "parameters": self.parameters,
            "parents": self.parents,
            "stats": self.stats,
        }


def card_paths(output: Path) -> tuple[Path, Path]:
    """Where an output's markdown and JSON cards go: `F.card.md`, `F.card.json` beside `F`."""
    return output.with_name(output.name + ".card.md"), output.with_name(output.name + ".card.json")


def parents_of(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Parent datasets as cards name them: path and content sha256."""
    return [{"path": str(Path(p).resolve()), "sha256": file_fingerprint([Path(p)])} for p in paths]


def check_output(path: Path, inputs: Iterable[Path]) -> Path:
    """Refuse an output that would overwrite an input (the verb reads it while writing) or a non-.jsonl name."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise ValidationError(f"output {path}", ["outputs are JSONL: name the file *.jsonl"])
    if path.exists() and path.is_dir():
        raise ValidationError(f"output {path}", ["is a directory"])
    resolved = path.resolve()
    for source in inputs:
        if Path(source).resolve() == resolved:
            raise ValidationError(f"output {path}", ["is one of the input files; write to another file"])
    if not path.parent.is_dir():
        raise ValidationError(f"output {path}", [f"directory {path.parent} does not exist"])
    return path


class StagedOutputs:
    """Temp files beside their destinations; `commit()` renames them all, leaving them removes them.

    Used as a context manager: an exception inside the block removes every temp file.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path, TextIO]] = []

    def open(self, destination: Path) -> TextIO:
        """A text handle writing to a temp file that becomes `destination` on commit."""
        destination = Path(destination)
        fd, temp = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
        handle = os.fdopen(fd, "w", encoding="utf-8")
        self._staged.append((destination, Path(temp), handle))
        return handle

    def write_cards(self, result: VerbResult) -> None:
        """Stage both cards of every output of `result`."""
        for output in result.outputs:
            markdown_path, json_path = card_paths(output)
            card = result.card(output)
            self.open(json_path).write(json.dumps(card, indent=2, default=str) + "\n")
            self.open(markdown_path).write(render_markdown(card))

    def commit(self) -> None:
        for _, _, handle in self._staged:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        for destination, temp, _ in self._staged:
            os.replace(temp, destination)
        self._staged.clear()

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        for _, temp, handle in self._staged:
            handle.close()
            temp.unlink(missing_ok=True)
        self._staged.clear()


def write_row(handle: TextIO, values: Mapping[str, Any], raw: str | None = None) -> None:
    """One JSONL line (UTF-8 kept as is, not \\u-escaped); `raw`, the row's line as read, is written as it is."""
    handle.write(raw if raw is not None else json.dumps(values, ensure_ascii=False, default=str))
    handle.write("\n")


def render_markdown(card: Mapping[str, Any]) -> str:
    """A short human-readable data card."""
    lines = [f"# Data card: {card['file']}", "", f"- rows: {card['rows']}", f"- made by: `data {card['verb']}`"]
    if card["parameters"]:
        lines.append("- parameters: " + ", ".join(f"{k}={v}" for k, v in card["parameters"].items()))
    for parent in card["parents"]:
        lines.append(f"- parent: {parent['path']} (sha256 {parent['sha256'][:12]})")
    lines += ["", "## Statistics", ""]
    for key, value in card["stats"].items():
        shown = json.dumps(value, default=str) if isinstance(value, (dict, list)) else value
        lines.append(f"- {key}: {shown}")
    return "\n".join(lines) + "\n"

"""Fixtures for the trainer tests: small real data files in every supported shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

WORDS = ["fox", "dog", "cat", "sun", "red", "blue", "green", "tree", "rain", "moon", "star", "fish"]


def reverse_rows(count: int = 24) -> list[dict[str, str]]:
    """'reverse the words' prompt/completion rows (deterministic)."""
    rows = []
    for i in range(count):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 5 + 3) % len(WORDS)]
        rows.append({"prompt": f"reverse: {a} {b}", "completion": f"{b} {a}"})
    return rows


def interrupt_after(step: int) -> Any:
    """A trainer callback that simulates Ctrl-C right after optimizer step `step` (its checkpoint already written)."""
    from transformers import TrainerCallback

    class InterruptAfter(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == step:
                raise KeyboardInterrupt

    return InterruptAfter()


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture()
def sft_jsonl(tmp_path: Path) -> Path:
    """24 prompt/completion rows."""
    return write_jsonl(tmp_path / "sft.jsonl", reverse_rows())


@pytest.fixture()
def text_jsonl(tmp_path: Path) -> Path:
    """16 raw-text rows for causal LM training."""
    return write_jsonl(tmp_path / "text.jsonl", [{"text": f"the {w} and the {v} went home"} for w in WORDS[:4] for v in WORDS[4:8]])


@pytest.fixture()
def classification_jsonl(tmp_path: Path) -> Path:
    """16 two-label rows (positive/negative)."""
    rows = [{"text": f"the {w} is great and good", "label": "positive"} for w in WORDS[:8]]
    rows += [{"text": f"the {w} is awful and bad", "label": "negative"} for w in WORDS[:8]]
    return write_jsonl(tmp_path / "cls.jsonl", rows)

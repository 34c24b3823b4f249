"""The main job's two toy tasks and its report (tables + PNG plots).

The tasks are string transformations SmolLM2-135M cannot do zero-shot (exact match near 0)
but learns from a few hundred examples in a few minutes of CPU, so "before/after" and "what a
merge keeps of each task" show up clearly:

- `reverse`: reverse the order of three words;
- `spell`: spell out three digits as English words.

Data is generated deterministically from a seed, as prompt/completion JSONL (the format the
trainer and evaluator read), with disjoint train and held-out rows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_WORDS = (
    "apple river stone cloud tiger lamp garden window silver honey bridge forest candle rocket pepper "
    "mirror violin island castle shadow winter planet rabbit button dragon copper meadow pillow ticket "
    "orange marble harbor jungle wagon pencil thunder saddle lemon falcon velvet anchor"
).split()
_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TASKS = ("reverse", "spell")


def _example(task: str, rng: random.Random) -> dict[str, str]:
    if task == "reverse":
        words = rng.sample(_WORDS, 3)
        return {"prompt": f"Reverse the order of these words: {' '.join(words)}", "completion": " ".join(reversed(words))}
    if task == "spell":
        digits = [rng.randrange(10) for _ in range(3)]
        return {"prompt": f"Spell out these digits: {' '.join(map(str, digits))}", "completion": " ".join(_DIGITS[d] for d in digits)}
    raise ValueError(f"unknown demo task {task!r}; choose from {', '.join(TASKS)}")


def write_task_data(task: str, out_dir: Path, *, train_rows: int = 240, heldout_rows: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """Write `<task>-train.jsonl` and `<task>-heldout.jsonl` (no prompt in both); returns their paths."""
    rng = random.Random(f"{task}-{seed}")
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < train_rows + heldout_rows:
        example = _example(task, rng)
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            rows.append(example)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / f"{task}-train.jsonl", out_dir / f"{task}-heldout.jsonl"
    for path, part in zip(paths, (rows[:train_rows], rows[train_rows:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return paths


def plot_quality(scores: Mapping[str, Mapping[str, float]], out: Path, *, metric: str = "exact match") -> Path:
    """Grouped bars: one group per model, one bar per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(scores)
    tasks = sorted({t for per_task in scores.values() for t in per_task})
    width = 0.8 / max(len(tasks), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(models)), 4))
    for i, task in enumerate(tasks):
        xs = [m + (i - (len(tasks) - 1) / 2) * width for m in range(len(models))]
        values = [100 * scores[model].get(task, float("nan")) for model in models]
        bars = ax.bar(xs, values, width, label=task)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(models)), models, rotation=20, ha="right")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Held-out quality per task")
    ax.legend(title="task")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_latency(latencies: Mapping[str, Sequence[float]], out: Path) -> Path:
    """Median and p90 request latency per served model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(latencies)
    medians = [float(np.median(latencies[m])) * 1000 for m in models]
    p90 = [float(np.percentile(latencies[m], 90)) * 1000 for m in models]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(models)), 4))
    xs = np.arange(len(models))
    ax.bar(xs - 0.2, medians, 0.4, label="median")
    ax.bar(xs + 0.2, p90, 0.4, label="p90")
    ax.set_xticks(xs, models, rotation=20, ha="right")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Served request latency (OpenAI client, loopback)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)

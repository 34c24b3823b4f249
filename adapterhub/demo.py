"""The main job's two toy tasks and its report (tables + PNG plots).

The tasks are string transformations SmolLM2-135M cannot do zero-shot (exact match near 0)
but learns from a few hundred examples in a few minutes of CPU, so "before/after" and "what a
merge keeps of each task" show up clearly:

- `reverse`: reverse the order of three words;
- `spell`: spell out three digits as English words.

Six more tasks of the same kind (`SYNTHETIC_TASKS`) serve the merge benchmark, which needs
eight adapters with distinct skills: `letters` (spell a made-up word letter by letter), `first` and
`last` (pick a word), `count` (how many words, as a digit), `sort` (alphabetical order) and
`repeat` (say the words twice). None of them depends on letter case, because exact match
compares case-folded text.

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


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(_WORDS, rng.randint(low, high))


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 3)
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _spell(rng: random.Random) -> tuple[str, str]:
    digits = [rng.randrange(10) for _ in range(3)]
    return f"Spell out these digits: {' '.join(map(str, digits))}", " ".join(_DIGITS[d] for d in digits)


def _letters(rng: random.Random) -> tuple[str, str]:
    # Made-up words of two or three syllables: enough distinct prompts, and no memorised spellings.
    word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))
    return f"Spell this word letter by letter: {word}", " ".join(word)


def _first(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 5)
    return f"Give the first of these words: {' '.join(words)}", words[0]


def _last(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 5)
    return f"Give the last of these words: {' '.join(words)}", words[-1]


def _count(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 7)
    return f"How many words are in this list: {' '.join(words)}", str(len(words))


def _sort(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 3)
    return f"Sort these words alphabetically: {' '.join(words)}", " ".join(sorted(words))


def _repeat(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 3)
    return f"Repeat these words twice: {' '.join(words)}", " ".join(words + words)


_GENERATORS = {
    "reverse": _reverse, "spell": _spell, "letters": _letters, "first": _first,
    "last": _last, "count": _count, "sort": _sort, "repeat": _repeat,
}
SYNTHETIC_TASKS = tuple(_GENERATORS)


def _example(task: str, rng: random.Random) -> dict[str, str]:
    try:
        generate = _GENERATORS[task]
    except KeyError:
        raise ValueError(f"unknown demo task {task!r}; choose from {', '.join(SYNTHETIC_TASKS)}") from None
    prompt, completion = generate(rng)
    return {"prompt": prompt, "completion": completion}


def _unique_rows(task: str, count: int, seed: int) -> list[dict[str, str]]:
    """The first `count` examples of a task with distinct prompts, always in the same order."""
    rng = random.Random(f"{task}-{seed}")
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < count:
        example = _example(task, rng)
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            rows.append(example)
    return rows


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_task_data(task: str, out_dir: Path, *, train_rows: int = 240, heldout_rows: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """Write `<task>-train.jsonl` and `<task>-heldout.jsonl` (no prompt in both); returns their paths."""
    rows = _unique_rows(task, train_rows + heldout_rows, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    return (_write_jsonl(out_dir / f"{task}-train.jsonl", rows[:train_rows]),
            _write_jsonl(out_dir / f"{task}-heldout.jsonl", rows[train_rows:]))


def write_search_rows(
    task: str, out_dir: Path, *, rows: int, train_rows: int = 240, heldout_rows: int = 40, seed: int = 0,
) -> Path:
    """Write `<task>-search.jsonl`: rows for a merge search to score, in neither the training nor the held-out file.

    Why a third file: a search that picks its merge on the held-out rows would report a score
    it was selected on. These rows continue the same sequence `write_task_data` draws from,
    so they share no prompt with either of its files (same `train_rows`, `heldout_rows`, `seed`).
    """
    drawn = _unique_rows(task, train_rows + heldout_rows + rows, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _write_jsonl(out_dir / f"{task}-search.jsonl", drawn[train_rows + heldout_rows:])


def gain_retention(
    scores: Mapping[str, Mapping[str, float]], *, base: str, adapter_for_task: Mapping[str, str], merges: Sequence[str],
) -> dict[str, dict[str, float]]:
    """Per merge and task, the share of the task's adapter gain the merge keeps.

    retention = (merged − base) / (adapter − base): 1 keeps all of what the adapter learned,
    0 is back at the base, below 0 worse than the base. A task whose adapter gained nothing
    has no gain to share and is left out rather than divided by zero.
    """
    retention: dict[str, dict[str, float]] = {}
    for merge in merges:
        per_task = {}
        for task, adapter in adapter_for_task.items():
            gain = scores[adapter][task] - scores[base][task]
            if gain > 0:
                per_task[task] = (scores[merge][task] - scores[base][task]) / gain
        retention[merge] = per_task
    return retention


def retention_verdict(retention: Mapping[str, Mapping[str, float]], *, threshold: float = 0.9) -> str:
    """One plain sentence: which merges keep `threshold` of every task's gain, or that none does."""
    reaching = [m for m, per_task in retention.items() if per_task and min(per_task.values()) >= threshold]
    if reaching:
        return f"Merges keeping at least {threshold:.0%} of every task's gain: {', '.join(reaching)}."
    best = max(retention, key=lambda m: min(retention[m].values(), default=float("-inf")), default=None)
    if best is None or not retention[best]:
        return "No adapter improved on the base, so no merge has a gain to keep."
    worst_task = min(retention[best], key=retention[best].__getitem__)
    return (
        f"No merge keeps {threshold:.0%} of every task's gain; the best, {best}, keeps "
        f"{retention[best][worst_task]:.0%} of {worst_task}'s."
    )


def retention_of(retention: Mapping[str, Mapping[str, float]], merges: Sequence[str]) -> str:
    """What each named merge keeps, worst task first: the figure a reader compares a new method against.

    Why a sentence beside the verdict: "none reaches 90%" alone hides how far the usual
    methods (task arithmetic, TIES) fall short; this states it. Names missing from
    `retention` are skipped, so a reduced run that left a method out still reads.
    """
    parts = []
    for merge in merges:
        per_task = retention.get(merge)
        if not per_task:
            continue
        worst = min(per_task, key=per_task.__getitem__)
        each = ", ".join(f"{task} {share:.0%}" for task, share in per_task.items())
        parts.append(f"{merge} keeps {per_task[worst]:.0%} of {worst}'s gain at worst ({each})")
    return "; ".join(parts) + "." if parts else ""


def plot_quality(
    scores: Mapping[str, Mapping[str, float]], out: Path, *, metric: str = "exact match", title: str = "Held-out quality per task",
) -> Path:
    """Grouped bars: one group per model, one bar per task (values are shares, drawn as %)."""
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
    drawn = [100 * v for per_task in scores.values() for v in per_task.values()]
    ax.set_ylim(min(0.0, *drawn) - 5 if drawn else 0, max(105.0, *drawn) + 5 if drawn else 105)
    ax.set_title(title)
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

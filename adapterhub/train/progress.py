"""Training feedback: a rich progress bar with the running loss, the learning curve and metrics file.

Design decisions:
- The bar is a `transformers.TrainerCallback`, so it works with every trainer we build on
  (SFTTrainer, Trainer, SetFit's) and under `accelerate launch` (only the main process draws).
  transformers' own tqdm bars are switched off (`disable_tqdm=True`) so there is one bar.
- Human feedback goes to stderr, always: the bar, and without it (`--no-progress`, tuning
  trials, CI logs) one short line per logging step (`LogLines`) instead of transformers'
  `PrinterCallback`, which prints the raw log dict of every step to stdout. stdout is left to
  what a command outputs (`--json` must parse).
- The learning curve and `training_metrics.json` are derived from `TrainerState.log_history`
  after training, rather than recorded by a second callback, so a resumed run (whose state is
  restored from the checkpoint) plots its whole history, not just the part after the resume.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from adapterhub.errors import AdapterhubError

METRICS_FILE = "training_metrics.json"
CURVE_FILE = "learning_curve.png"


class RichProgressBar(TrainerCallback):
    """A rich bar over optimizer steps showing the latest train and validation loss."""

    def __init__(self, description: str = "training") -> None:
        self.description = description
        self._progress: Any = None
        self._task: Any = None
        self._loss: float | None = None
        self._eval_loss: float | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[losses]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
            console=Console(stderr=True),
        )
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=state.max_steps, completed=state.global_step, losses="")

    def _refresh(self, state: TrainerState) -> None:
        if self._progress is None:
            return
        parts = []
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4f}")
        if self._eval_loss is not None:
            parts.append(f"val {self._eval_loss:.4f}")
        self._progress.update(self._task, completed=state.global_step, losses="  ".join(parts))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._refresh(state)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs:
            self._loss = logs.get("loss", self._loss)
            self._eval_loss = logs.get("eval_loss", self._eval_loss)
        self._refresh(state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._progress is not None:
            self._refresh(state)
            self._progress.stop()
            self._progress = None


class LogLines(TrainerCallback):
    """One short human line per logging step on stderr (where no bar is drawn)."""

    # (log key, how the line names it), in the order shown.
    _SHOWN = (
        ("loss", "loss"), ("embedding_loss", "loss"), ("eval_loss", "eval_loss"), ("eval_accuracy", "eval_accuracy"),
        ("learning_rate", "lr"), ("grad_norm", "grad_norm"),
    )

    def __init__(self, description: str = "training") -> None:
        self.description = description

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        parts = [f"{label} {logs[key]:.4g}" for key, label in self._SHOWN if isinstance(logs.get(key), (int, float))]
        if parts:  # the end-of-run summary dict (runtime, samples/s) has none of these: the CLI reports it
            print(f"{self.description} step {state.global_step}/{state.max_steps}: {', '.join(parts)}", file=sys.stderr, flush=True)


def loss_history(log_history: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """Train/validation loss and learning rate as [step, value] pairs from a trainer's log history."""
    train = [[entry["step"], entry["loss"]] for entry in log_history if "loss" in entry and "step" in entry]
    validation = [[entry["step"], entry["eval_loss"]] for entry in log_history if "eval_loss" in entry and "step" in entry]
    rates = [[entry["step"], entry["learning_rate"]] for entry in log_history if "learning_rate" in entry and "step" in entry]
    history = {"train_loss": train, "eval_loss": validation, "learning_rate": rates}
    # Preference trainers (TRL's DPO, ORPO, KTO) log the mean reward of chosen and rejected answers.
    for key in ("rewards/chosen", "rewards/rejected"):
        points = [[entry["step"], entry[key]] for entry in log_history if key in entry and "step" in entry]
        if points:
            history[key] = points
    return history


def plot_learning_curve(history: dict[str, list[list[float]]], path: Path, *, title: str) -> Path:
    """Write the learning curve (train and validation loss against the step) as a PNG.

    A preference run's chosen and rejected rewards get a second panel below the loss: their
    drifting apart is what preference tuning is for, and a loss alone does not show it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = [key for key in ("rewards/chosen", "rewards/rejected") if history.get(key)]
    if rewards:
        figure, (axis, reward_axis) = plt.subplots(2, 1, figsize=(7, 6.4), dpi=110, sharex=True)
        for key in rewards:
            points = [(s, v) for s, v in history[key] if v is not None and math.isfinite(v)]
            if points:
                steps, values = zip(*points)
                reward_axis.plot(steps, values, "-", label=key.split("/")[1])
        reward_axis.set_xlabel("optimizer step")
        reward_axis.set_ylabel("reward (train)")
        reward_axis.grid(alpha=0.3)
        reward_axis.legend()
    else:
        figure, axis = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, label, style in (("train_loss", "train", "-"), ("eval_loss", "validation", "o-")):
        points = [(s, v) for s, v in history.get(key, []) if v is not None and math.isfinite(v)]
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, style, label=label, markersize=4)
    if not rewards:
        axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_metrics(metrics: dict[str, Any], directory: Path) -> Path:
    """Write `training_metrics.json` (sorted keys, so two runs diff cleanly)."""
    path = directory / METRICS_FILE
    try:
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    except OSError as exc:
        raise AdapterhubError(f"cannot write {path}: {exc}") from None
    return path

"""Evaluate a model directory (plus an optional PEFT adapter) on an eval file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from adapterhub.eval.report import Comparison, EvalReport, ForgettingReport

GENERAL_HELDOUT_PATH = Path(__file__).with_name("data") / "general_heldout.jsonl"


def evaluate_model(
    *,
    model_dir: Path,
    adapter_dir: Path | None = None,
    data: Path,
    metrics: Sequence[str] | None = None,
    max_examples: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> EvalReport:
    """Score `model_dir` (a base or full model), with `adapter_dir` applied if given, on `data`."""
    raise NotImplementedError("being written (issue 3)")


def compare(
    *,
    model_dir: Path,
    adapter_dir: Path,
    data: Path,
    metrics: Sequence[str] | None = None,
    max_examples: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    forgetting: bool = False,
    heldout: Path | None = None,
) -> Comparison:
    """The base alone and the base + adapter on the same rows, with adapter − base deltas."""
    raise NotImplementedError("being written (issue 3)")


def forgetting_check(
    *, model_dir: Path, adapter_dir: Path, heldout: Path | None = None, batch_size: int = 8
) -> ForgettingReport:
    """Perplexity on general held-out text with and without the adapter."""
    raise NotImplementedError("being written (issue 3)")

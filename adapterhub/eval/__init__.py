"""Evaluation of base models, adapters and full (merged or fine-tuned) models.

Public API (the CLI, the merge engine and the demo build on these):

- `evaluate_model(model_dir=, adapter_dir=, data=, ...) -> EvalReport`: one model on one file.
- `compare(model_dir=, adapter_dir=, data=, ..., forgetting=True) -> Comparison`: the base and
  the adapter on the same rows, with differences and an optional forgetting check.
- `evaluate_adapters(base_dir=, adapter_dirs=[...], data=, include_base=True)`: many adapters of
  one base on the same rows, the base loaded once.
- `TaskScorer(base_dir=, tasks={task: (file, subset)})`: the base and many LoRA candidates on
  several tasks' rows, one metric per task, the base loaded once (the merge search's judge).
- `forgetting_check(model_dir=, adapter_dir=, heldout=None) -> ForgettingReport`: perplexity on
  general held-out text (shipped in `adapterhub/eval/data/`) before and after.
- `adapterhub.eval.metrics`: the metric functions on fixed strings (no model), by name.
- `adapterhub.eval.data`: loading and validating eval files (JSONL, CSV, Parquet).

Design: metrics are pure functions over predictions and references, separate from
generation, so every number can be checked by hand; generation is batched, greedy and
deterministic; the metric set defaults from the data's shape (see `data.EvalKind`). This
package never imports the registry: the CLI resolves references to directories and stores
the results.
"""

from __future__ import annotations

from adapterhub.eval.data import RowSubset
from adapterhub.eval.report import Comparison, DatasetInfo, EvalReport, ExampleResult, ForgettingReport
from adapterhub.eval.runner import (
    GENERAL_HELDOUT_PATH,
    TaskScorer,
    compare,
    evaluate_adapters,
    evaluate_model,
    forgetting_check,
)

__all__ = [
    "GENERAL_HELDOUT_PATH",
    "Comparison",
    "DatasetInfo",
    "EvalReport",
    "ExampleResult",
    "ForgettingReport",
    "RowSubset",
    "TaskScorer",
    "compare",
    "evaluate_adapters",
    "evaluate_model",
    "forgetting_check",
]

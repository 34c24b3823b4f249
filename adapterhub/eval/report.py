"""Result types of an evaluation: plain, JSON-ready dataclasses with no torch inside.

They are what the CLI prints and what the registry stores (`record_evaluation` takes one
metric at a time, so a report flattens to `metric -> value` pairs plus shared details), and
what the merge engine and the demo read back. Keeping them free of tensors and models means a
report can be pickled, logged or written to JSON without dragging a model along.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DatasetInfo:
    """Which data a score was measured on: the file, its content hash and what was used of it.

    `label` (`name.jsonl@sha256:ab12cd34ef56`) is what goes into the registry's `dataset`
    column, so two evaluations are comparable exactly when their labels are equal.
    """

    path: str
    sha256: str
    kind: str  # "generation", "text" or "classification" (see adapterhub.eval.data)
    num_rows: int  # valid rows in the file (or in the split)
    num_evaluated: int  # rows used (after --max-examples)
    split: str | None = None  # which rows of the file, when not all of them (e.g. "validation")

    @property
    def label(self) -> str:
        return f"{Path(self.path).name}@sha256:{self.sha256[:12]}"


@dataclass(frozen=True)
class ExampleResult:
    """One evaluated row, kept for the report so a reader can see what the numbers mean."""

    line: int
    prompt: str
    reference: str
    prediction: str


@dataclass(frozen=True)
class EvalReport:
    """Scores of one model (base, adapter or full model) on one data set."""

    model_dir: str
    adapter_dir: str | None
    dataset: DatasetInfo
    metrics: Mapping[str, float]
    # How the scores were obtained (generation settings, label set, truncation counts,
    # confusion matrix, timing): stored with each metric in the registry.
    details: Mapping[str, Any] = field(default_factory=dict)
    examples: tuple[ExampleResult, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["dataset"]["label"] = self.dataset.label
        return data


@dataclass(frozen=True)
class ForgettingReport:
    """Perplexity on general held-out text before (base) and after (adapter).

    A ratio above 1 means the adapter made general text less likely: some of what the base
    knew was forgotten. `ratio` rather than a difference, because perplexities of different
    models and texts are on multiplicative scales.
    """

    dataset: DatasetInfo
    base_perplexity: float
    adapter_perplexity: float

    @property
    def ratio(self) -> float:
        return self.adapter_perplexity / self.base_perplexity

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": {**asdict(self.dataset), "label": self.dataset.label},
            "base_perplexity": self.base_perplexity,
            "adapter_perplexity": self.adapter_perplexity,
            "ratio": self.ratio,
        }


@dataclass(frozen=True)
class Comparison:
    """The base and the adapter on the same data; `deltas` is adapter minus base per metric."""

    base: EvalReport
    adapter: EvalReport
    forgetting: ForgettingReport | None = None

    @property
    def deltas(self) -> dict[str, float]:
        return {
            name: value - self.base.metrics[name]
            for name, value in self.adapter.metrics.items()
            if name in self.base.metrics
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base.to_json(),
            "adapter": self.adapter.to_json(),
            "deltas": self.deltas,
            "forgetting": self.forgetting.to_json() if self.forgetting else None,
        }

"""Metric functions over fixed strings: no model here, so every number can be checked by hand.

Each metric is computed by the library the field trusts for it: scikit-learn for accuracy,
precision, recall and F1; `rouge-score` (Google's reference implementation) for ROUGE;
`sacrebleu` for BLEU. Only text normalisation, label matching and perplexity from summed
log-likelihoods are written here.

Scales follow the libraries, so a number here equals what a user gets by calling them:
accuracy, precision, recall, F1, exact match and ROUGE are fractions in [0, 1]; BLEU is
sacrebleu's 0-100; perplexity is exp(mean negative log-likelihood per token), >= 1.

Precision, recall and F1 are macro averages over the label set: every class counts the same,
so a model that always answers the majority label does not look good on skewed data.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from adapterhub.errors import ValidationError

# A generated answer that matches no label: scored as wrong, never as any real class.
NO_LABEL = "<no label>"


@dataclass(frozen=True)
class MetricSpec:
    """A metric name users can ask for, the values it reports, and the data it applies to."""

    name: str
    reports: tuple[str, ...]
    kinds: tuple[str, ...]  # EvalKind values it can be computed on
    higher_is_better: bool
    description: str


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("accuracy", ("accuracy",), ("classification", "generation"), True,
                   "share of rows whose (generated) label equals the reference label"),
        MetricSpec("precision", ("precision",), ("classification", "generation"), True,
                   "macro-averaged precision over the label set (scikit-learn)"),
        MetricSpec("recall", ("recall",), ("classification", "generation"), True,
                   "macro-averaged recall over the label set (scikit-learn)"),
        MetricSpec("f1", ("f1",), ("classification", "generation"), True,
                   "macro-averaged F1 over the label set (scikit-learn)"),
        MetricSpec("exact_match", ("exact_match",), ("generation",), True,
                   "share of generations equal to the reference after normalisation"),
        MetricSpec("rouge", ("rouge1", "rouge2", "rougeL"), ("generation",), True,
                   "mean ROUGE-1/2/L F-measure (rouge-score, stemmed)"),
        MetricSpec("bleu", ("bleu",), ("generation",), True, "corpus BLEU, 0-100 (sacrebleu)"),
        MetricSpec("perplexity", ("perplexity",), ("text", "generation"), False,
                   "exp(mean token NLL); on generation data, of the reference given the prompt"),
        MetricSpec("preference_accuracy", ("preference_accuracy",), ("preference",), True,
                   "share of pairs whose chosen answer the model finds more likely than the rejected one"),
        MetricSpec("preference_margin", ("preference_margin",), ("preference",), True,
                   "mean log-probability of the chosen answer minus the rejected one's (nats)"),
    )
}

# What a higher or lower value means, by reported name (for deltas and tables).
HIGHER_IS_BETTER: dict[str, bool] = {
    reported: spec.higher_is_better for spec in METRICS.values() for reported in spec.reports
}

CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1")


def resolve_metrics(requested: Sequence[str] | None, kind: str, *, default: Sequence[str]) -> tuple[str, ...]:
    """Validate metric names against the data's kind; `None` means `default`.

    One error lists every unknown or inapplicable name together with the valid ones.
    """
    if requested is None:
        return tuple(default)
    names = [name.strip().lower() for name in requested if name.strip()]
    problems: list[str] = []
    if not names:
        problems.append(f"no metric given; valid metrics: {', '.join(METRICS)}")
    for name in names:
        spec = METRICS.get(name)
        if spec is None:
            problems.append(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}")
        elif kind not in spec.kinds:
            usable = [n for n, s in METRICS.items() if kind in s.kinds]
            problems.append(f"metric {name!r} does not apply to {kind} data; usable here: {', '.join(usable)}")
    if problems:
        raise ValidationError("--metrics", problems)
    return tuple(dict.fromkeys(names))


def preference_scores(chosen_nll: Sequence[float], rejected_nll: Sequence[float]) -> dict[str, float]:
    """Preference accuracy and margin of pairs from the summed NLL of each answer given its prompt.

    A lower NLL is a higher log-probability: the chosen answer wins a pair when its NLL is lower
    (a tie is no win). The margin is log p(chosen) - log p(rejected), averaged over the pairs.
    """
    if len(chosen_nll) != len(rejected_nll) or not chosen_nll:
        raise ValueError("preference scores need as many chosen as rejected answers, at least one")
    wins = sum(1 for c, r in zip(chosen_nll, rejected_nll) if c < r)
    margin = sum(r - c for c, r in zip(chosen_nll, rejected_nll)) / len(chosen_nll)
    return {"preference_accuracy": wins / len(chosen_nll), "preference_margin": margin}


def normalize_text(text: str) -> str:
    """Compatibility-normalise, case-fold, and collapse whitespace.

    Deliberately light (no punctuation or article stripping as in SQuAD): for tasks whose
    answer is a word sequence (reversal, translation, labels) punctuation can be the task.
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after `normalize_text`."""
    _check_lengths(predictions, references)
    hits = sum(normalize_text(p) == normalize_text(r) for p, r in zip(predictions, references))
    return hits / len(references)


_EDGE_PUNCTUATION = re.compile(r"^[\W_]+|[\W_]+$")


def match_label(generated: str, labels: Sequence[str]) -> str:
    """The label a generated answer names, or `NO_LABEL`.

    Rule, in order: the normalised answer (edge punctuation stripped) equals a label; else
    its first line equals one; else the answer starts with a label as whole words
    ("positive, because ..."; the longest such label). Anything else (a paraphrase, a label
    in mid-sentence) is `NO_LABEL`: a guess must not be counted as an answer.
    """
    by_normal = {normalize_text(label): label for label in labels}
    answer = _EDGE_PUNCTUATION.sub("", normalize_text(generated))
    if answer in by_normal:
        return by_normal[answer]
    first_line = _EDGE_PUNCTUATION.sub("", normalize_text(generated.strip().split("\n", 1)[0]))
    if first_line in by_normal:
        return by_normal[first_line]
    leading = [
        normal for normal in by_normal
        if answer.startswith(normal) and not answer[len(normal):len(normal) + 1].isalnum()
    ]
    if leading:
        # "very positive" and "very" both lead "very positive!": the longest label is the one named
        return by_normal[max(leading, key=len)]
    return NO_LABEL


def classification_scores(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]
) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 over `labels` (scikit-learn).

    A prediction outside `labels` (e.g. `NO_LABEL`) counts against accuracy and against the
    recall of its true class, but is not a class of its own in the macro average.
    A class never predicted has precision 0 (scikit-learn's `zero_division=0`).
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    _check_lengths(predictions, references)
    precision, recall, f1, _ = precision_recall_fscore_support(
        list(references), list(predictions), labels=list(labels), average="macro", zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(list(references), list(predictions))),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


def confusion(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> dict[str, dict[str, int]]:
    """reference label -> predicted label -> count (predictions outside `labels` kept by name)."""
    table: dict[str, dict[str, int]] = {label: {} for label in labels}
    for predicted, reference in zip(predictions, references):
        row = table.setdefault(reference, {})
        row[predicted] = row.get(predicted, 0) + 1
    return table


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references):
        # rouge-score takes (target, prediction)
        for name, score in scorer.score(reference, prediction).items():
            totals[name] += score.fmeasure
    return {name: total / len(references) for name, total in totals.items()}


def bleu_score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing), 0-100."""
    import sacrebleu

    _check_lengths(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def perplexity(total_nll: float, token_count: int) -> float:
    """exp(total negative log-likelihood / scored tokens): a per-token average over the corpus.

    Averaging over tokens rather than over rows keeps long and short rows weighted by how
    much text they hold, as language-modelling perplexity is usually reported.
    """
    if token_count <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(total_nll / token_count)


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references to score")

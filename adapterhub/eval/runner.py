"""Evaluate a model directory (plus an optional PEFT adapter) on an eval file.

Flow of every entry point: read and validate the file, resolve the metric names against its
shape, check the directories, and only then load a model, so bad input fails in
milliseconds with one error and no model is ever loaded for nothing.

Design decisions:

- Default metrics follow the data's shape: perplexity for raw text; accuracy, precision,
  recall and F1 for `text`/`label` rows; exact match, ROUGE and BLEU for generation, plus the
  classification metrics when the references look like labels (a few distinct short answers,
  each repeated; see `_looks_like_labels`).
- A causal LM on `text`/`label` rows is asked for the label in words (the prompt names the
  label set) and its reply matched to a label (`metrics.match_label`); a model with a
  classification head answers with its arg-max class. Both give the same four metrics, so a
  base model can be compared with a classifier adapter on the same rows.
- `compare` loads the base once and attaches the adapter to it afterwards (PEFT wraps the
  loaded model in place), so a comparison costs one model in memory, not two.
- The forgetting check scores perplexity on general English text shipped with the package
  (`resources/general_heldout.jsonl`: varied sentences written for this purpose, not taken
  from any training set), before and after; it is only defined for causal LMs.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from adapterhub.errors import AdapterhubError, ValidationError
from adapterhub.eval import metrics as metric_fns
from adapterhub.eval.data import EvalDataset, EvalKind, EvalRow, RowSubset, load_eval_dataset
from adapterhub.eval.generation import BatchCallback, generate_greedy, has_chat_template, render_prompt, sequence_nll
from adapterhub.eval.loading import (
    LoadedModel,
    LoadOptions,
    attach_adapter,
    check_paths,
    detach_adapter,
    has_tokenizer,
    is_setfit_dir,
    load_causal,
    load_classifier,
    setfit_labels,
    wants_classifier,
)
from adapterhub.eval.report import Comparison, DatasetInfo, EvalReport, ExampleResult, ForgettingReport

GENERAL_HELDOUT_PATH = Path(__file__).with_name("resources") / "general_heldout.jsonl"

# A progress reporter: called once per phase with its description and row count, it returns
# the callback that phase calls after each batch with the rows done (the CLI draws bars).
ProgressFactory = Callable[[str, int], BatchCallback]

# Label-like references: at most this many distinct answers of at most this many words.
_MAX_LABELS = 20
_MAX_LABEL_WORDS = 3


def evaluate_model(
    *,
    model_dir: Path,
    adapter_dir: Path | None = None,
    data: Path,
    metrics: Sequence[str] | None = None,
    max_examples: int | None = None,
    subset: RowSubset | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    tokenizer_dir: Path | None = None,
    progress: ProgressFactory | None = None,
) -> EvalReport:
    """Score `model_dir` (a base or full model), with `adapter_dir` applied if given, on `data`.

    `metrics=None` picks the metrics from the data's shape; `subset` keeps only some rows of the
    file (e.g. the validation rows of a training run). `device`/`dtype` pin where and in
    what precision the model runs (default: from the hardware); `tokenizer_dir` is the
    tokenizer to use when the model directory has none (a merged full model). Raises `AdapterhubError` (a
    `ValidationError` listing every problem) for a bad file, metric list or directory,
    before any model is loaded.
    """
    _check_settings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    dataset = load_eval_dataset(Path(data), max_examples=max_examples, subset=subset)
    classifier = _wants_classifier_checked(Path(model_dir), adapter_dir)
    selected = plan_metrics(dataset, metrics, classifier=classifier)
    if adapter_dir is None and is_setfit_dir(Path(model_dir)):
        return _evaluate_setfit(Path(model_dir), dataset, selected, progress=progress)
    options = LoadOptions(device=device, dtype=dtype, tokenizer_dir=tokenizer_dir)
    loaded = _load(Path(model_dir), adapter_dir, dataset, classifier=classifier, options=options)
    return score_loaded(
        loaded, dataset, selected, model_dir=Path(model_dir), adapter_dir=adapter_dir,
        max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
    )


def compare(
    *,
    model_dir: Path,
    adapter_dir: Path | None = None,
    base_dir: Path | None = None,
    data: Path,
    metrics: Sequence[str] | None = None,
    max_examples: int | None = None,
    subset: RowSubset | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    forgetting: bool = False,
    heldout: Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: ProgressFactory | None = None,
) -> Comparison:
    """The base alone and the candidate on the same rows, with candidate − base deltas.

    The candidate is `model_dir` + `adapter_dir` (the base is then `model_dir`, unless
    `base_dir` says otherwise), or a full model `model_dir` compared with `base_dir`.
    `forgetting=True` adds perplexity on `heldout` (default: the shipped general text).
    Both sides run on the same `device` and `dtype`; a candidate without a tokenizer of its
    own uses the base's.
    """
    _check_settings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    model_dir = Path(model_dir)
    base = Path(base_dir) if base_dir is not None else model_dir
    if adapter_dir is None and base_dir is None:
        raise AdapterhubError("compare needs an adapter, or a base model to compare a full model with")
    if adapter_dir is None and base.resolve() == model_dir.resolve():
        raise AdapterhubError("compare: the model and its base are the same directory")
    dataset = load_eval_dataset(Path(data), max_examples=max_examples, subset=subset)
    heldout_set = _load_heldout(heldout) if forgetting else None
    candidate_classifier = _wants_classifier_checked(model_dir, adapter_dir)
    check_paths(base, None)
    if adapter_dir is None and is_setfit_dir(model_dir):
        raise AdapterhubError(
            "a SetFit model cannot be compared with its base: the base is a sentence encoder with no classifier"
        )
    if forgetting and candidate_classifier:
        raise AdapterhubError("the forgetting check measures language-model perplexity; a classification model has none")
    selected = plan_metrics(dataset, metrics, classifier=candidate_classifier)
    settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}

    options = LoadOptions(device=device, dtype=dtype, tokenizer_dir=base)
    base_loaded = load_causal(base, options=options)
    base_report = score_loaded(base_loaded, dataset, selected, model_dir=base, adapter_dir=None,
                               progress=_labelled(progress, "base"), **settings)
    base_ppl = (_heldout_perplexity(base_loaded, heldout_set, batch_size, _labelled(progress, "base"))
                if heldout_set else None)

    if adapter_dir is not None and _can_reuse_base(adapter_dir, base, model_dir) and not candidate_classifier:
        candidate = _wrap_loaded_base(base_loaded, Path(adapter_dir))
    else:
        del base_loaded
        gc.collect()
        candidate = _load(model_dir, adapter_dir, dataset, classifier=candidate_classifier, options=options)
    candidate_report = score_loaded(candidate, dataset, selected, model_dir=model_dir, adapter_dir=adapter_dir,
                                    progress=_labelled(progress, "candidate"), **settings)
    forgetting_report = None
    if heldout_set is not None and base_ppl is not None:
        forgetting_report = ForgettingReport(
            dataset=_dataset_info(heldout_set), base_perplexity=base_ppl,
            adapter_perplexity=_heldout_perplexity(candidate, heldout_set, batch_size, _labelled(progress, "candidate")),
        )
    return Comparison(base=base_report, adapter=candidate_report, forgetting=forgetting_report)


def evaluate_adapters(
    *,
    base_dir: Path,
    adapter_dirs: Sequence[Path],
    names: Sequence[str] | None = None,
    data: Path,
    metrics: Sequence[str] | None = None,
    max_examples: int | None = None,
    subset: RowSubset | None = None,
    include_base: bool = False,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    progress: ProgressFactory | None = None,
) -> tuple[EvalReport | None, list[EvalReport]]:
    """Several adapters of one base on the same rows, the base loaded once for all of them.

    Each adapter is attached to the loaded base (PEFT injects its layers in place), scored and
    detached again (nothing merged), so N adapters cost one base load instead of N. An adapter
    with its own tokenizer or a classification head is loaded on its own. `include_base` also
    scores the base alone (first, as `compare` does); `names` label the adapters' progress
    phases (default: their directory names). Returns the base's report (or None) and
    one report per adapter, in order. Every file, metric and directory is checked before any
    model loads.
    """
    _check_settings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    base_dir = Path(base_dir)
    adapter_dirs = [Path(a) for a in adapter_dirs]
    if not adapter_dirs:
        raise AdapterhubError("evaluate_adapters needs at least one adapter")
    labels = list(names) if names is not None else [adapter_dir.name for adapter_dir in adapter_dirs]
    if len(labels) != len(adapter_dirs):
        raise AdapterhubError(f"{len(labels)} names for {len(adapter_dirs)} adapters")
    dataset = load_eval_dataset(Path(data), max_examples=max_examples, subset=subset)
    kinds = [_wants_classifier_checked(base_dir, adapter_dir) for adapter_dir in adapter_dirs]
    if len(set(kinds)) > 1:
        raise AdapterhubError("these adapters mix classification heads and language-model adapters: score them separately")
    classifier = kinds[0]
    if include_base and classifier:
        raise AdapterhubError("a classifier adapter cannot be compared with its base here: the base has no classification head")
    selected = plan_metrics(dataset, metrics, classifier=classifier)
    for adapter_dir in adapter_dirs:
        check_paths(base_dir, adapter_dir)
    settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    options = LoadOptions(device=device, dtype=dtype, tokenizer_dir=base_dir)

    base_loaded: LoadedModel | None = None
    base_report = None
    if include_base:
        base_loaded = load_causal(base_dir, options=options)
        base_report = score_loaded(base_loaded, dataset, selected, model_dir=base_dir, adapter_dir=None,
                                   progress=_labelled(progress, "base"), **settings)
    reports: list[EvalReport] = []
    for adapter_dir, name in zip(adapter_dirs, labels, strict=True):
        label = _labelled(progress, name)
        if classifier or not _can_reuse_base(adapter_dir, base_dir, base_dir):
            candidate = _load(base_dir, adapter_dir, dataset, classifier=classifier, options=options)
            reports.append(score_loaded(candidate, dataset, selected, model_dir=base_dir, adapter_dir=adapter_dir,
                                        progress=label, **settings))
            del candidate
            gc.collect()
            continue
        if base_loaded is None:
            base_loaded = load_causal(base_dir, options=options)
        candidate = _wrap_loaded_base(base_loaded, adapter_dir)
        try:
            reports.append(score_loaded(candidate, dataset, selected, model_dir=base_dir, adapter_dir=adapter_dir,
                                        progress=label, **settings))
        finally:
            base_loaded.model = detach_adapter(candidate.model)
    return base_report, reports


def forgetting_check(
    *,
    model_dir: Path,
    adapter_dir: Path | None = None,
    base_dir: Path | None = None,
    heldout: Path | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    progress: ProgressFactory | None = None,
) -> ForgettingReport:
    """Perplexity on general held-out text of the base, then of the candidate (as in `compare`)."""
    _check_settings(max_new_tokens=1, batch_size=batch_size)
    model_dir = Path(model_dir)
    base = Path(base_dir) if base_dir is not None else model_dir
    if adapter_dir is None and base_dir is None:
        raise AdapterhubError("the forgetting check needs an adapter, or a base model to compare a full model with")
    heldout_set = _load_heldout(heldout)
    if _wants_classifier_checked(model_dir, adapter_dir):
        raise AdapterhubError("the forgetting check measures language-model perplexity; a classification model has none")
    check_paths(base, None)
    options = LoadOptions(device=device, dtype=dtype, tokenizer_dir=base)
    base_loaded = load_causal(base, options=options)
    base_ppl = _heldout_perplexity(base_loaded, heldout_set, batch_size, _labelled(progress, "base"))
    if adapter_dir is not None and _can_reuse_base(adapter_dir, base, model_dir):
        candidate = _wrap_loaded_base(base_loaded, Path(adapter_dir))
    else:
        del base_loaded
        gc.collect()
        candidate = load_causal(model_dir, adapter_dir, options)
    return ForgettingReport(
        dataset=_dataset_info(heldout_set), base_perplexity=base_ppl,
        adapter_perplexity=_heldout_perplexity(candidate, heldout_set, batch_size, _labelled(progress, "candidate")),
    )


# ---------------------------------------------------------------------------------------------
# Planning


def default_metrics(dataset: EvalDataset) -> tuple[str, ...]:
    """The metrics measured when none are asked for, from the data's shape."""
    if dataset.kind is EvalKind.TEXT:
        return ("perplexity",)
    if dataset.kind is EvalKind.PREFERENCE:
        return ("preference_accuracy", "preference_margin")
    if dataset.kind is EvalKind.CLASSIFICATION:
        return metric_fns.CLASSIFICATION_METRICS
    generation = ("exact_match", "rouge", "bleu")
    if _looks_like_labels(dataset.references):
        return generation + metric_fns.CLASSIFICATION_METRICS
    return generation


def _looks_like_labels(references: Sequence[str]) -> bool:
    """A few distinct short answers, each seen at least twice on average: a label set."""
    distinct = {metric_fns.normalize_text(reference) for reference in references}
    return (
        1 < len(distinct) <= _MAX_LABELS
        and len(distinct) * 2 <= len(references)
        and all(len(reference.split()) <= _MAX_LABEL_WORDS for reference in distinct)
    )


def plan_metrics(dataset: EvalDataset, requested: Sequence[str] | None, *, classifier: bool) -> tuple[str, ...]:
    """Validated metric names for this data and model (defaults when `requested` is None)."""
    if classifier and dataset.kind is not EvalKind.CLASSIFICATION:
        raise ValidationError(
            f"data file {dataset.path.name}",
            [f"a classification model needs rows with 'text' and 'label'; this file holds {dataset.kind.value} rows"],
        )
    return metric_fns.resolve_metrics(requested, dataset.kind.value, default=default_metrics(dataset))


def _check_settings(*, max_new_tokens: int, batch_size: int) -> None:
    problems = []
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        problems.append(f"batch_size must be at least 1, got {batch_size}")
    if problems:
        raise ValidationError("evaluation settings", problems)


def _wants_classifier_checked(model_dir: Path, adapter_dir: Path | None) -> bool:
    check_paths(model_dir, adapter_dir)
    return wants_classifier(model_dir, adapter_dir)


def _load(
    model_dir: Path, adapter_dir: Path | None, dataset: EvalDataset, *, classifier: bool, options: LoadOptions
) -> LoadedModel:
    if classifier:
        loaded = load_classifier(model_dir, adapter_dir, dataset.labels, options)
        _check_labels_known(dataset, set(loaded.id2label.values()))
        return loaded
    return load_causal(model_dir, adapter_dir, options)


def _evaluate_setfit(
    model_dir: Path, dataset: EvalDataset, metric_names: Sequence[str], *, progress: ProgressFactory | None
) -> EvalReport:
    """A SetFit classifier scored through the trainer's own prediction path (one call, no batching here)."""
    from adapterhub.train.setfit_task import predict_setfit

    started = time.perf_counter()
    labels = setfit_labels(model_dir)
    _check_labels_known(dataset, set(labels))
    texts = [str(row.text) for row in dataset.rows]
    on_batch = _phase(progress, "classifying", len(texts))
    predictions = [str(label) for label in predict_setfit(model_dir, texts)]
    if on_batch is not None:
        on_batch(len(texts))
    results: dict[str, float] = {}
    details: dict[str, Any] = {"kind": dataset.kind.value, "metrics": list(metric_names), "model": "setfit",
                               "label_source": "setfit_head.json labels"}
    _score_labels(predictions, dataset.references, labels, metric_names, results, details)
    details["seconds"] = round(time.perf_counter() - started, 3)
    examples = tuple(ExampleResult(row.line, str(row.text), row.reference, p) for row, p in zip(dataset.rows, predictions))
    return EvalReport(model_dir=str(model_dir), adapter_dir=None, dataset=_dataset_info(dataset), metrics=results,
                      details=details, examples=examples)


def _check_labels_known(dataset: EvalDataset, known: set[str]) -> None:
    problems = [
        f"{dataset.location} {row.line}: label {row.reference!r} is not one of the model's labels ({', '.join(sorted(known))})"
        for row in dataset.rows if row.reference not in known
    ]
    if problems:
        raise ValidationError(f"data file {dataset.path.name}", problems)


def _can_reuse_base(adapter_dir: Path, base: Path, model_dir: Path) -> bool:
    """Whether the candidate is the loaded base plus an adapter that brings no tokenizer of its own."""
    return base.resolve() == model_dir.resolve() and not has_tokenizer(adapter_dir)


def _wrap_loaded_base(base_loaded: LoadedModel, adapter_dir: Path) -> LoadedModel:
    """The base already in memory with the adapter attached: the same weights are not loaded twice.

    PEFT injects the adapter into the loaded modules in place, so the base side must be fully
    scored before this is called.
    """
    return LoadedModel(model=attach_adapter(base_loaded.model, adapter_dir), tokenizer=base_loaded.tokenizer, is_classifier=False)


def _load_heldout(path: Path | None) -> EvalDataset:
    heldout = load_eval_dataset(Path(path) if path is not None else GENERAL_HELDOUT_PATH)
    if heldout.kind is not EvalKind.TEXT:
        raise ValidationError(f"held-out file {heldout.path.name}", ["needs rows with 'text' only (it is scored by perplexity)"])
    return heldout


# ---------------------------------------------------------------------------------------------
# Scoring


def classification_prompt(text: str, labels: Sequence[str]) -> str:
    """How a causal LM is asked to classify: the label set named, the label alone requested."""
    return f"Classify the text as one of: {', '.join(labels)}.\nText: {text}\nAnswer with the label only."


def _prompts(loaded: LoadedModel, dataset: EvalDataset) -> tuple[list[str], list[str]]:
    """(rendered prompts, plain prompts for the report) of a dataset's rows."""
    rendered, plain = [], []
    for row in dataset.rows:
        if dataset.kind is EvalKind.CLASSIFICATION:
            question = classification_prompt(str(row.text), dataset.labels)
            messages: tuple[Any, ...] = ({"role": "user", "content": question},)
        else:
            question, messages = str(row.prompt), row.messages
        rendered.append(render_prompt(loaded.tokenizer, messages, question))
        plain.append(question)
    return rendered, plain


def score_loaded(
    loaded: LoadedModel,
    dataset: EvalDataset,
    metric_names: Sequence[str],
    *,
    model_dir: Path,
    adapter_dir: Path | None,
    max_new_tokens: int,
    batch_size: int,
    progress: ProgressFactory | None = None,
) -> EvalReport:
    """Run the model over the rows once per need (generation, likelihood, logits) and score."""
    started = time.perf_counter()
    references = dataset.references
    results: dict[str, float] = {}
    details: dict[str, Any] = {
        "kind": dataset.kind.value,
        "metrics": list(metric_names),
        "batch_size": batch_size,
        "device": str(next(loaded.model.parameters()).device),
    }
    examples: list[ExampleResult] = []
    needs_answers = any(name != "perplexity" for name in metric_names)

    if dataset.kind is EvalKind.PREFERENCE:
        chosen_nll, rejected_nll = _pair_likelihoods(loaded, dataset.rows, batch_size, _phase(progress, "scoring pairs", 2 * len(dataset.rows)))
        scores = metric_fns.preference_scores(chosen_nll, rejected_nll)
        results.update({name: value for name, value in scores.items() if name in metric_names})
        details["pairs"] = len(chosen_nll)
        examples = [
            ExampleResult(row.line, str(row.prompt), row.reference, "chosen" if c < r else "rejected")
            for row, c, r in zip(dataset.rows, chosen_nll, rejected_nll)
        ]
        needs_answers = False

    if needs_answers and loaded.is_classifier:
        from adapterhub.eval.generation import classify

        texts = [str(row.text) for row in dataset.rows]
        indices = classify(loaded.model, loaded.tokenizer, texts, batch_size=batch_size,
                           on_batch=_phase(progress, "classifying", len(texts)))
        predictions = [loaded.id2label[index] for index in indices]
        details["label_source"] = loaded.label_source
        examples = [ExampleResult(row.line, str(row.text), row.reference, p) for row, p in zip(dataset.rows, predictions)]
        _score_labels(predictions, references, list(dataset.labels), metric_names, results, details)
    elif needs_answers:
        rendered, plain = _prompts(loaded, dataset)
        chat = has_chat_template(loaded.tokenizer)
        generated = generate_greedy(
            loaded.model, loaded.tokenizer, rendered, max_new_tokens=max_new_tokens, batch_size=batch_size,
            chat_formatted=chat, on_batch=_phase(progress, "generating", len(rendered)),
        )
        details.update(decoding="greedy", max_new_tokens=max_new_tokens, chat_template=chat,
                       truncated_prompts=generated.truncated, generated_tokens=generated.new_tokens)
        predictions = generated.texts
        examples = [ExampleResult(row.line, q, row.reference, p) for row, q, p in zip(dataset.rows, plain, predictions)]
        if "exact_match" in metric_names:
            results["exact_match"] = metric_fns.exact_match(predictions, references)
        if "rouge" in metric_names:
            results.update(metric_fns.rouge_scores(predictions, references))
        if "bleu" in metric_names:
            results["bleu"] = metric_fns.bleu_score(predictions, references)
        if any(name in metric_fns.CLASSIFICATION_METRICS for name in metric_names):
            labels = list(dataset.labels) or sorted(set(references))
            matched = [metric_fns.match_label(p, labels) for p in predictions]
            details["unmatched_answers"] = sum(m == metric_fns.NO_LABEL for m in matched)
            _score_labels(matched, references, labels, metric_names, results, details)

    if "perplexity" in metric_names:
        likelihood = _likelihood(loaded, dataset.rows, batch_size, _phase(progress, "perplexity", len(dataset.rows)))
        results["perplexity"] = metric_fns.perplexity(likelihood.total_nll, likelihood.token_count)
        details.update(perplexity_tokens=likelihood.token_count, truncated_texts=likelihood.truncated)

    seconds = time.perf_counter() - started
    details["seconds"] = round(seconds, 3)
    if "generated_tokens" in details and seconds > 0:
        details["generated_tokens_per_second"] = round(details["generated_tokens"] / seconds, 2)
    return EvalReport(
        model_dir=str(model_dir), adapter_dir=str(adapter_dir) if adapter_dir is not None else None,
        dataset=_dataset_info(dataset), metrics=results, details=details, examples=tuple(examples),
    )


def _score_labels(
    predictions: list[str], references: list[str], labels: list[str], metric_names: Sequence[str],
    results: dict[str, float], details: dict[str, Any],
) -> None:
    scores = metric_fns.classification_scores(predictions, references, labels)
    results.update({name: value for name, value in scores.items() if name in metric_names})
    details["labels"] = labels
    details["confusion"] = metric_fns.confusion(predictions, references, labels)


def _phase(progress: ProgressFactory | None, description: str, total: int) -> BatchCallback | None:
    return progress(description, total) if progress is not None else None


def _labelled(progress: ProgressFactory | None, who: str) -> ProgressFactory | None:
    """The same reporter with phases named after the side being scored ("base: generating")."""
    if progress is None:
        return None
    return lambda description, total: progress(f"{who}: {description}", total)


def _likelihood(
    loaded: LoadedModel, rows: Sequence[EvalRow], batch_size: int, on_batch: BatchCallback | None = None
) -> Any:
    """Token NLL of each row's text, or of its reference reply given its rendered prompt."""
    chat = has_chat_template(loaded.tokenizer)
    pairs = [
        ("", str(row.text)) if row.prompt is None else
        (render_prompt(loaded.tokenizer, row.messages, row.prompt), row.reference)
        for row in rows
    ]
    return sequence_nll(loaded.model, loaded.tokenizer, pairs, batch_size=batch_size, chat_formatted=chat, on_batch=on_batch)


def _pair_likelihoods(
    loaded: LoadedModel, rows: Sequence[EvalRow], batch_size: int, on_batch: BatchCallback | None = None
) -> tuple[list[float], list[float]]:
    """Summed NLL of each pair's chosen and of its rejected answer given the rendered prompt.

    Scored as `perplexity` scores a reference reply (`sequence_nll`: the answer followed by the
    eos token), so the log-probabilities compared are those the model gives whole answers.
    """
    chat = has_chat_template(loaded.tokenizer)
    prompts = [render_prompt(loaded.tokenizer, row.messages, str(row.prompt)) for row in rows]
    pairs = [(p, row.reference) for p, row in zip(prompts, rows)] + [(p, str(row.rejected)) for p, row in zip(prompts, rows)]
    likelihood = sequence_nll(loaded.model, loaded.tokenizer, pairs, batch_size=batch_size, chat_formatted=chat, on_batch=on_batch)
    scored = [value if value is not None else 0.0 for value in likelihood.per_sequence]
    return scored[:len(rows)], scored[len(rows):]


def _heldout_perplexity(
    loaded: LoadedModel, heldout: EvalDataset, batch_size: int, progress: ProgressFactory | None = None
) -> float:
    likelihood = _likelihood(loaded, heldout.rows, batch_size, _phase(progress, "held-out perplexity", len(heldout.rows)))
    return metric_fns.perplexity(likelihood.total_nll, likelihood.token_count)


def _dataset_info(dataset: EvalDataset) -> DatasetInfo:
    return DatasetInfo(
        path=str(dataset.path), sha256=dataset.sha256, kind=dataset.kind.value,
        num_rows=dataset.num_rows, num_evaluated=len(dataset.rows), split=dataset.split,
    )


# ---------------------------------------------------------------------------------------------
# Many candidates, several tasks, one base load


# The one figure a task's retention is computed from: higher is better on both shapes.
TASK_METRIC = {EvalKind.GENERATION: "exact_match", EvalKind.CLASSIFICATION: "accuracy"}


class TaskScorer:
    """Scores the base and any number of LoRA candidates on several tasks' rows, loading the base once.

    Why: a merge search judges tens of candidates; reloading the base for each would cost more
    than the merges themselves. The base is loaded on first use and kept; each candidate is
    attached (PEFT injects its layers in place), scored on every task and detached again, so
    the base's weights are never touched. Each task is scored by one metric (`TASK_METRIC`: exact
    match for generation rows, accuracy for text/label rows asked of the causal LM, as
    `evaluate_model` scores them), so retention = (merged − base) / (adapter − base) reads the
    same for every task. Every file is validated in the constructor, before any model loads.
    """

    def __init__(
        self,
        *,
        base_dir: Path,
        tasks: Mapping[str, tuple[Path, RowSubset | None]],
        max_examples: int | None = None,
        max_new_tokens: int = 32,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        _check_settings(max_new_tokens=max_new_tokens, batch_size=batch_size)
        if not tasks:
            raise AdapterhubError("a task scorer needs at least one task")
        self.base_dir = Path(base_dir)
        check_paths(self.base_dir, None)
        self.datasets: dict[str, EvalDataset] = {}
        problems: list[str] = []
        for task, (path, subset) in tasks.items():
            try:
                dataset = load_eval_dataset(Path(path), max_examples=max_examples, subset=subset)
            except AdapterhubError as exc:
                problems.append(f"task {task}: {exc}")
                continue
            if dataset.kind not in TASK_METRIC:
                problems.append(f"task {task}: {Path(path).name} holds {dataset.kind.value} rows (perplexity); a task needs "
                                "prompt/completion, messages or text/label rows to score")
                continue
            self.datasets[task] = dataset
        if problems:
            raise ValidationError("task evaluation", problems)
        self.metrics = {task: TASK_METRIC[dataset.kind] for task, dataset in self.datasets.items()}
        self._settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
        self._options = LoadOptions(device=device, dtype=dtype, tokenizer_dir=self.base_dir)
        self._base: LoadedModel | None = None
        self.calls = 0  # models scored (the base alone counts as one)
        self.base_loads = 0  # how often the base was read from disk: 1 however many calls

    def _loaded_base(self) -> LoadedModel:
        if self._base is None:
            self._base = load_causal(self.base_dir, options=self._options)
            self.base_loads += 1
        return self._base

    def score(self, adapter_dir: Path | None = None, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """{task: metric} of the base (`adapter_dir=None`) or the base with this LoRA attached."""
        names = list(tasks) if tasks is not None else list(self.datasets)
        unknown = [t for t in names if t not in self.datasets]
        if unknown:
            raise AdapterhubError(f"unknown task(s): {', '.join(unknown)}; known: {', '.join(self.datasets)}")
        if adapter_dir is not None:
            check_paths(self.base_dir, Path(adapter_dir))
            if wants_classifier(self.base_dir, Path(adapter_dir)) or has_tokenizer(Path(adapter_dir)):
                raise AdapterhubError(f"{adapter_dir}: a task scorer attaches language-model LoRAs without their own tokenizer")
        base = self._loaded_base()
        self.calls += 1
        candidate = base if adapter_dir is None else _wrap_loaded_base(base, Path(adapter_dir))
        try:
            scores = {}
            for task in names:
                report = score_loaded(candidate, self.datasets[task], (self.metrics[task],), model_dir=self.base_dir,
                                      adapter_dir=adapter_dir, **self._settings)
                scores[task] = report.metrics[self.metrics[task]]
            return scores
        finally:
            if adapter_dir is not None:
                base.model = detach_adapter(candidate.model)

    def dataset_info(self) -> dict[str, dict[str, Any]]:
        """Per task: the file, its sha256, the rows scored and the metric (for a lineage)."""
        return {
            task: {"data": str(d.path), "sha256": d.sha256, "rows": len(d.rows), "split": d.split, "metric": self.metrics[task]}
            for task, d in self.datasets.items()
        }

"""`adapterhub eval`: score a registered adapter, full model or base model on an eval file.

The command resolves the reference to directories (an adapter ref first, then a base-model
name: a name shared by both means the adapter, as everywhere else in the CLI), runs
`adapterhub.eval`, prints a table and stores every metric in the registry with the file's
name and content hash as its dataset, so `adapterhub show` lists comparable numbers.

Under `--compare` the base is scored on the same rows: its numbers are stored on the base
model's record and the adapter's on the adapter's, each with the other side and the delta in
its details. `--forgetting` scores perplexity on general held-out text on both sides and
stores it as `heldout_perplexity` (details: the base value and the ratio).

Several refs of one base (`adapterhub eval a b c --data F [--compare]`) are scored on the same
rows in one process, the base loaded once and each adapter attached and detached in turn; one
table shows them side by side, the best value of each metric in bold.

`--split validation` (or `train`) scores a trained adapter on exactly the rows its training
run held out (or trained on), found again from its lineage: the data file, its fingerprint,
the validation share and the seed. The split goes into the registry's `split` column.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from adapterhub.cli.common import JsonOption, console, err_console, open_registry, print_json
from adapterhub.errors import AdapterhubError, NotFoundError
from adapterhub.eval.data import RowSubset
from adapterhub.registry import Lineage, Registry

# How many evaluated rows go into the stored details: enough to see what a score means,
# not so many that a registry row balloons.
_STORED_EXAMPLES = 3


@dataclass(frozen=True)
class EvalTarget:
    """What a REF names, resolved to directories."""

    ref: str  # the stored owner: "name:version" of an adapter, or the base model's name
    is_base_model: bool
    model_dir: Path
    adapter_dir: Path | None
    base_name: str
    base_dir: Path
    lineage: Lineage | None = None  # of an adapter or full-model record (None for a base model)


def resolve_target(registry: Registry, ref: str) -> EvalTarget:
    """An adapter or full-model record, else a base model; one error naming both misses."""
    record = registry.resolve(ref)
    if record is not None:
        base = registry.get_base_model(record.base_name)
        materialized = registry.materialize(record)
        if record.is_full_model:
            return EvalTarget(record.ref, False, materialized, None, base.name, Path(base.path), record.lineage)
        return EvalTarget(record.ref, False, Path(base.path), materialized, base.name, Path(base.path), record.lineage)
    try:
        base = registry.get_base_model(ref)
    except NotFoundError as exc:
        raise NotFoundError(f"{ref!r} is neither a registered adapter nor a base model ({exc})") from None
    return EvalTarget(base.name, True, Path(base.path), None, base.name, Path(base.path))


@contextmanager
def _progress_bars() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """A rich progress bar per phase (generation, perplexity, ...) on stderr, rows as units."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console) as progress:

        def phase(description: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(description, total=total)
            return lambda rows: progress.advance(task, rows)

        yield phase


def _split_metrics(metrics: str | None) -> list[str] | None:
    return None if metrics is None else [name for name in metrics.split(",")]


def _stored_details(report: Any, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    details = dict(report.details)
    details["num_evaluated"] = report.dataset.num_evaluated
    details["num_rows"] = report.dataset.num_rows
    details["examples"] = [
        {"line": e.line, "reference": e.reference, "prediction": e.prediction} for e in report.examples[:_STORED_EXAMPLES]
    ]
    details.update(extra or {})
    return details


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if metric in ("bleu", "perplexity") else f"{value:.4f}"


def _fmt_delta(delta: float, metric: str) -> str:
    from adapterhub.eval.metrics import HIGHER_IS_BETTER

    better = delta > 0 if HIGHER_IS_BETTER.get(metric, True) else delta < 0
    colour = "green" if better and delta != 0 else ("red" if delta != 0 else "white")
    return f"[{colour}]{delta:+.4f}[/]" if metric not in ("bleu", "perplexity") else f"[{colour}]{delta:+.2f}[/]"


def _training_subset(target: EvalTarget, split: str) -> tuple[Path, RowSubset]:
    """The file and rows of `split` of the run that trained `target` (from its lineage)."""
    from adapterhub.train.data import training_split

    if target.lineage is None or target.lineage.kind != "trained":
        raise AdapterhubError(f"--split needs an adapter or model trained by adapterhub; {target.ref!r} was not")
    found = training_split(target.lineage.details, split)
    return found.path, RowSubset(split, found.indices)


def evaluate(
    refs: Annotated[list[str], typer.Argument(
        help="Adapter ref (name, name:version, name@sha) or a base model name; several refs of one base are scored side by side.",
        metavar="REF...",
    )],
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Eval file: JSONL, CSV or Parquet (prompt/completion, messages, text/label or text).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Instead of --data: the 'validation' (or 'train') rows of the adapter's own training run.")] = None,
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="Comma-separated: accuracy,precision,recall,f1,exact_match,perplexity,rouge,bleu (default: from the data's shape).")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Also score the base model on the same rows and show the difference.")] = False,
    forgetting: Annotated[bool, typer.Option("--forgetting", help="Perplexity on general held-out text, base vs adapter.")] = False,
    heldout: Annotated[Optional[Path], typer.Option("--heldout", help="Held-out text file (rows with 'text') for --forgetting; default: the one shipped with adapterhub.")] = None,
    max_examples: Annotated[Optional[int], typer.Option("--max-examples", help="Score only the first N rows.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Generation length limit.")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per forward pass.")] = 8,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N (default: the best available).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="fp32, bf16 or fp16 (default: from the hardware).")] = None,
    show_examples: Annotated[int, typer.Option("--show-examples", help="Print the first N rows with reference and prediction.")] = 0,
    record: Annotated[bool, typer.Option("--record/--no-record", help="Store the results in the registry.")] = True,
    json_output: JsonOption = False,
) -> None:
    """Evaluate an adapter, a full model or a base model; results go to the registry."""
    from adapterhub.eval import compare as compare_models
    from adapterhub.eval import evaluate_model, forgetting_check

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own bars say what is happening; its weight-loading bars are noise
    registry = open_registry()
    if len(refs) > 1:
        if split is not None or forgetting or show_examples:
            raise AdapterhubError("--split, --forgetting and --show-examples take one REF; several refs are scored on --data")
        if data is None:
            raise AdapterhubError("give the rows to score with --data FILE")
        _evaluate_many(
            registry, refs, data=data, compare=compare, record=record, json_output=json_output,
            settings={"metrics": _split_metrics(metrics), "max_examples": max_examples, "max_new_tokens": max_new_tokens,
                      "batch_size": batch_size, "device": device, "dtype": dtype},
        )
        return
    ref = refs[0]
    target = resolve_target(registry, ref)
    if target.is_base_model and (compare or forgetting):
        raise AdapterhubError(f"{ref!r} is a base model: --compare and --forgetting need an adapter or a fine-tuned model")
    if (data is None) == (split is None):
        raise AdapterhubError("give the rows to score: --data FILE or --split validation|train (not both)")
    subset = None
    if split is not None:
        data, subset = _training_subset(target, split)
    metric_list = _split_metrics(metrics)
    settings: dict[str, Any] = {"metrics": metric_list, "max_examples": max_examples, "subset": subset,
                                "max_new_tokens": max_new_tokens, "batch_size": batch_size, "device": device, "dtype": dtype}
    base_dir = None if target.adapter_dir is not None else target.base_dir
    comparison = forgetting_report = report = None
    with _progress_bars() as progress:
        if compare:
            comparison = compare_models(
                model_dir=target.model_dir, adapter_dir=target.adapter_dir, base_dir=base_dir, data=data,
                forgetting=forgetting, heldout=heldout, progress=progress, **settings,
            )
            report, forgetting_report = comparison.adapter, comparison.forgetting
        else:
            report = evaluate_model(
                model_dir=target.model_dir, adapter_dir=target.adapter_dir, data=data, progress=progress,
                tokenizer_dir=target.base_dir, **settings,
            )
            if forgetting:
                forgetting_report = forgetting_check(
                    model_dir=target.model_dir, adapter_dir=target.adapter_dir, base_dir=base_dir,
                    heldout=heldout, batch_size=batch_size, device=device, dtype=dtype, progress=progress,
                )

    if record:
        _store(registry, target, report, comparison, forgetting_report, max_examples=max_examples, split=split)

    if json_output:
        payload: dict[str, Any] = {"ref": target.ref, "base": target.base_name, "recorded": record}
        if comparison is not None:
            payload.update(comparison.to_json())
        else:
            payload["report"] = report.to_json()
            payload["forgetting"] = forgetting_report.to_json() if forgetting_report else None
        print_json(payload)
        return
    _print_tables(target, report, comparison, forgetting_report, recorded=record)
    if show_examples > 0:
        _print_examples(report, comparison, show_examples)


def _evaluate_many(
    registry: Registry, refs: list[str], *, data: Path, compare: bool, record: bool, json_output: bool, settings: dict[str, Any],
) -> None:
    """Several adapters (or full models) of one base on the same rows: one table, the base loaded once."""
    from adapterhub.eval import evaluate_adapters, evaluate_model
    from adapterhub.eval.report import Comparison

    targets = [resolve_target(registry, ref) for ref in refs]
    bases = [t.ref for t in targets if t.is_base_model]
    if bases:
        raise AdapterhubError(f"{', '.join(repr(b) for b in bases)} named a base model: add --compare to score the base next to its adapters")
    if len({t.base_name for t in targets}) > 1:
        listed = ", ".join(f"{t.ref} ({t.base_name})" for t in targets)
        raise AdapterhubError(f"several refs must share one base model to be compared; got {listed}")
    duplicates = sorted(ref for ref, count in Counter(t.ref for t in targets).items() if count > 1)
    if duplicates:
        raise AdapterhubError(f"{', '.join(duplicates)} named more than once")
    base_name, base_dir = targets[0].base_name, targets[0].base_dir
    adapters = [t for t in targets if t.adapter_dir is not None]
    reports: dict[str, Any] = {}
    base_report = None
    with _progress_bars() as progress:
        if adapters:
            base_report, adapter_reports = evaluate_adapters(
                base_dir=base_dir, adapter_dirs=[t.adapter_dir for t in adapters], names=[t.ref for t in adapters],
                data=data, include_base=compare, progress=progress, **settings,
            )
            reports.update({t.ref: r for t, r in zip(adapters, adapter_reports, strict=True)})
        for target in targets:
            if target.adapter_dir is None:  # a full model: its own weights, loaded on their own
                reports[target.ref] = evaluate_model(model_dir=target.model_dir, data=data, tokenizer_dir=base_dir,
                                                     progress=progress, **settings)
        if compare and base_report is None:
            base_report = evaluate_model(model_dir=base_dir, data=data, progress=progress, **settings)
    ordered = {t.ref: reports[t.ref] for t in targets}
    if record:
        for target in targets:
            comparison = Comparison(base=base_report, adapter=ordered[target.ref]) if base_report is not None else None
            _store(registry, target, ordered[target.ref], comparison, None, max_examples=settings["max_examples"],
                   split=None, store_base=False)
        if base_report is not None:
            _store_base(registry, base_name, base_report, compared_with=list(ordered), max_examples=settings["max_examples"], split=None)
    if json_output:
        print_json({
            "base": base_name, "recorded": record,
            "base_report": base_report.to_json() if base_report is not None else None,
            "reports": {ref: report.to_json() for ref, report in ordered.items()},
        })
        return
    _print_many(base_name, base_report, ordered, recorded=record)


def _print_many(base_name: str, base_report: Any, reports: dict[str, Any], *, recorded: bool) -> None:
    """One row per model (the base first), one column per metric; the best value of each in bold."""
    from adapterhub.eval.metrics import HIGHER_IS_BETTER

    info = next(iter(reports.values())).dataset
    console.print(f"{len(reports)} models on {info.label} ({info.num_evaluated} of {info.num_rows} rows, {info.kind})")
    rows = ({f"{base_name} (base)": base_report} if base_report is not None else {}) | reports
    metrics = list(next(iter(reports.values())).metrics)
    best = {}
    for metric in metrics:
        present = [r.metrics[metric] for r in rows.values() if r.metrics.get(metric) is not None]
        if len(present) > 1:
            best[metric] = (max if HIGHER_IS_BETTER.get(metric, True) else min)(present)
    table = Table("MODEL", *metrics)
    for name, report in rows.items():
        cells = []
        for metric in metrics:
            value = report.metrics.get(metric)
            cells.append(f"[bold]{_fmt(value, metric)}[/]" if value is not None and value == best.get(metric) else _fmt(value, metric))
        table.add_row(name, *cells)
    console.print(table)
    if recorded:
        console.print(f"stored the metrics on {', '.join(reports)}" + (f" and the base's on {base_name}" if base_report is not None else ""))


def _store(
    registry: Registry, target: EvalTarget, report: Any, comparison: Any, forgetting_report: Any, *,
    max_examples: int | None, split: str | None, store_base: bool = True,
) -> None:
    """Every metric on the target's record; with a comparison, the base's side too (unless `store_base` is off)."""
    dataset = report.dataset.label
    common = {"max_examples": max_examples}
    deltas = comparison.deltas if comparison is not None else {}
    for metric, value in report.metrics.items():
        extra = dict(common)
        if comparison is not None:
            extra.update(base=target.base_name, base_value=comparison.base.metrics.get(metric), delta=deltas.get(metric))
        registry.record_evaluation(
            target.ref, metric=metric, value=value, dataset=dataset, split=split,
            details=_stored_details(report, extra=extra), base_model=target.is_base_model,
        )
    if comparison is not None and store_base:
        _store_base(registry, target.base_name, comparison.base, compared_with=target.ref, max_examples=max_examples, split=split)
    if forgetting_report is not None:
        heldout = forgetting_report.dataset.label
        registry.record_evaluation(
            target.ref, metric="heldout_perplexity", value=forgetting_report.adapter_perplexity, dataset=heldout,
            details={"base": target.base_name, "base_value": forgetting_report.base_perplexity,
                     "ratio": forgetting_report.ratio},
        )
        registry.record_evaluation(
            target.base_name, metric="heldout_perplexity", value=forgetting_report.base_perplexity, dataset=heldout,
            base_model=True, details={"compared_with": target.ref},
        )


def _store_base(
    registry: Registry, base_name: str, report: Any, *, compared_with: str | list[str], max_examples: int | None, split: str | None
) -> None:
    for metric, value in report.metrics.items():
        registry.record_evaluation(
            base_name, metric=metric, value=value, dataset=report.dataset.label, split=split, base_model=True,
            details=_stored_details(report, extra={"max_examples": max_examples, "compared_with": compared_with}),
        )


def _print_tables(target: EvalTarget, report: Any, comparison: Any, forgetting_report: Any, *, recorded: bool) -> None:
    info = report.dataset
    rows = f"{info.num_evaluated} of {info.num_rows} {info.split} rows" if info.split else f"{info.num_evaluated} of {info.num_rows} rows"
    title = f"{target.ref} on {info.label} ({rows}, {info.kind})"
    if comparison is not None:
        table = Table("METRIC", f"BASE ({target.base_name})", target.ref, "DELTA")
        deltas = comparison.deltas
        for metric, value in report.metrics.items():
            base_value = comparison.base.metrics.get(metric)
            delta = _fmt_delta(deltas[metric], metric) if metric in deltas else "-"
            table.add_row(metric, _fmt(base_value, metric), _fmt(value, metric), delta)
    else:
        table = Table("METRIC", "VALUE")
        for metric, value in report.metrics.items():
            table.add_row(metric, _fmt(value, metric))
    console.print(title)
    console.print(table)
    if forgetting_report is not None:
        console.print(
            f"forgetting check on {forgetting_report.dataset.label}: perplexity {forgetting_report.base_perplexity:.2f} "
            f"(base) → {forgetting_report.adapter_perplexity:.2f} (×{forgetting_report.ratio:.3f})"
        )
    _print_confusion(report.details)
    unmatched = report.details.get("unmatched_answers")
    if unmatched:
        console.print(f"[yellow]{unmatched} generated answers named no label (scored as wrong)[/]")
    if report.details.get("truncated_prompts"):
        console.print(f"[yellow]{report.details['truncated_prompts']} prompts were longer than the context and kept their end[/]")
    if recorded:
        owner = "base model " + target.ref if target.is_base_model else target.ref
        console.print(f"stored {len(report.metrics)} metrics on {owner}" + (" and the base's on " + target.base_name if comparison else ""))


def _print_confusion(details: dict[str, Any]) -> None:
    """Reference labels down, predicted across (answers naming no label in their own column)."""
    confusion, labels = details.get("confusion"), details.get("labels")
    if not confusion or not labels or len(labels) > 12:
        return
    predicted = list(labels) + sorted({p for row in confusion.values() for p in row} - set(labels))
    table = Table("REFERENCE / PREDICTED", *predicted, title="confusion")
    for reference in labels:
        row = confusion.get(reference, {})
        table.add_row(reference, *(str(row.get(p, 0)) for p in predicted))
    console.print(table)


def _print_examples(report: Any, comparison: Any, count: int) -> None:
    """Rows side by side, so a reader sees what a score is made of."""
    columns = ["LINE", "PROMPT", "REFERENCE"] + (["BASE"] if comparison is not None else []) + ["PREDICTION"]
    table = Table(*columns, show_lines=True)
    base_examples = comparison.base.examples if comparison is not None else ()
    for index, example in enumerate(report.examples[:count]):
        cells = [str(example.line), example.prompt, example.reference]
        if comparison is not None:
            cells.append(base_examples[index].prediction if index < len(base_examples) else "")
        table.add_row(*cells, example.prediction)
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add `eval` to the CLI."""
    app.command("eval")(evaluate)

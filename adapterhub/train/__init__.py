"""The built-in trainer: every fine-tuning method of the field on transformers/TRL + PEFT.

Public API:
    TrainConfig, Method, Task          the validated run configuration (config.py)
    load_config, read_yaml_config, merge_overrides
    train(config, base_dir=, output_dir=) -> TrainResult        (runner.py)
    tune(config, SearchSpec, base_dir=, runs_dir=) -> TuneOutcome (tune.py, Optuna)
    setfit_task.load_setfit_model(dir), predict_setfit(dir, texts)  (SetFit, pickle-free head)

Heavy libraries (torch, transformers, TRL) are imported inside the functions that use them, so
importing this package is cheap and the CLI's `--help` stays fast. The package never imports
the registry: callers register `TrainResult.output_path` themselves, last.
"""

from adapterhub.train.config import (
    DEFAULT_LEARNING_RATES,
    Method,
    Task,
    TrainConfig,
    load_config,
    merge_overrides,
    read_yaml_config,
)
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapterhub.train.runner import TrainResult, train


def __getattr__(name: str) -> Any:
    # `train` and `TrainResult` pull in torch and transformers (seconds); the config types do not,
    # so the CLI can build and validate a config, and print --help, without paying for them.
    if name in ("train", "TrainResult"):
        from adapterhub.train import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'adapterhub.train' has no attribute {name!r}")

__all__ = [
    "DEFAULT_LEARNING_RATES",
    "Method",
    "Task",
    "TrainConfig",
    "TrainResult",
    "load_config",
    "merge_overrides",
    "read_yaml_config",
    "train",
]

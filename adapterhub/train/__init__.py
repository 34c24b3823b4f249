"""The built-in trainer: every fine-tuning method of the field on transformers/TRL + PEFT.

Public API:
    TrainConfig, Method, Task          the validated run configuration (config.py)
    load_config, read_yaml_config, merge_overrides
    train(config, base_dir=, output_dir=) -> TrainResult        (runner.py)
    tune(space, base_config, ...) -> TuneResult                  (tune.py)

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
from adapterhub.train.runner import TrainResult, train

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

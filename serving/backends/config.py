"""Sizing of the embedded torch engine: `EngineConfig`, the one place its defaults live.

Design decisions:
- `adapterhub serve` takes the default of each engine option from here (its `--help` shows
  them), and the README names the options without repeating numbers, so the three can no
  longer disagree (they once said 8/64, 4/32 and 4/64 device/host adapters).
- Torch-free at import (the dtype is only a type hint here), so the CLI can read the defaults
  without paying for importing torch, and `--help` stays fast.
- The defaults: 8 device slots hold the adapters a busy server mixes in one batch (a rank-16
  q/k/v/o LoRA on SmolLM2 is ~7 MB in fp32), 64 parsed adapters in host memory cost page cache
  only (they are memory maps of the registry's files); 32 rows per step and 4096 prefill tokens
  per step bound a step's time on a CPU; 512 queued requests before 429.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class EngineConfig:
    """Sizing of the torch engine; every field maps to a `serve` option."""

    max_resident: int = 8  # adapters in device slots at once (--max-resident)
    max_cpu_adapters: int = 64  # parsed adapters kept in host memory, device ones included (--max-cpu-adapters)
    max_batch_size: int = 32  # rows decoded together in one step (--max-batch-size)
    max_prefill_tokens: int = 4096  # prompt tokens prefilled in one step (bounds step time)
    max_waiting: int = 512  # queued requests beyond which new ones get 429 (--max-waiting)
    scheduler_delay_factor: float = 0.0  # new prefills wait this many latest-prefill durations while rows run (--scheduler-delay-factor)
    max_model_len: int | None = None  # default: the model's max_position_embeddings (--max-model-len)
    device: str | None = None  # default: CUDA when present, else CPU (--device)
    dtype: torch.dtype | None = None  # default: bf16 (fp16 on older GPUs) on CUDA, fp32 on CPU (--dtype)


DEFAULTS = EngineConfig()

__all__ = ["DEFAULTS", "EngineConfig"]

"""Which process of a multi-process launch this is, for the few things only one process may do.

Design decisions:
- accelerate's `PartialState` answers, the singleton the Trainer itself reads (its world size,
  rank and barrier), never a home-made reading of `RANK`. It is initialised one way everywhere
  (`process_state`): `cpu=True` on a machine without CUDA, so a multi-process launch there runs
  DDP over gloo instead of N separate jobs; the first call decides the backend for the process.
- A process no launcher started (`WORLD_SIZE` unset or 1) initialises nothing: the helpers
  answer without importing torch or accelerate, so a plain `adapterhub train` pays nothing.
- What only the main process does under `accelerate launch`: every registry write (a mixed
  data file and its dataset records, the trained record, an embedded base's first
  registration), deleting a run directory, and the summary. The other ranks wait at a barrier
  (`wait_for_everyone`) instead: they never read a file the main process is still writing, and
  every rank leaves the command when the main process is done with it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


def is_distributed() -> bool:
    """Whether a distributed launcher (`accelerate launch`, torchrun) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state() -> Any:
    """accelerate's `PartialState` for this process (initialising the process group on first use)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """True in a single process, and in the main process (rank 0) of a multi-process launch."""
    return not is_distributed() or bool(process_state().is_main_process)


def wait_for_everyone() -> None:
    """A barrier over every process of the launch (nothing in a single process)."""
    if is_distributed():
        process_state().wait_for_everyone()


@contextlib.contextmanager
def main_process_only() -> Iterator[bool]:
    """Run the block's work on the main process while the others wait for it to finish.

    Yields whether this process is the main one (the block does its work only then); every
    process passes the barrier at the end, also when the main process's block raised, so no
    rank is left waiting for a main process that has failed.
    """
    main = is_main_process()
    try:
        yield main
    finally:
        wait_for_everyone()


__all__ = ["is_distributed", "is_main_process", "main_process_only", "process_state", "wait_for_everyone"]

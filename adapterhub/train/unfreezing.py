"""Gradual unfreezing (issue 17, step 3): one more transformer block trains, from the top, every N steps.

Design decisions:
- A `transformers.TrainerCallback`, so it works with every trainer built on `Trainer`
  (SFTTrainer, DPOTrainer, ...), not a custom training loop.
- Every block that will ever train is trainable when the trainer builds its optimizer
  (transformers puts only `requires_grad` parameters into it); the callback freezes the ones
  whose turn has not come in `on_step_begin`, which runs after the optimizer exists and before
  each step's forward pass. A frozen parameter gets no gradient (`None`), and torch's AdamW
  skips such parameters entirely — no update, no weight decay — so a block not yet unfrozen
  keeps its weights bit for bit.
- The number of trainable blocks is a function of the global step only
  (`start + step // every`, capped), so a resumed run resumes the same schedule, and the
  schedule actually applied is recorded (`schedule`) for the lineage.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


def blocks_trainable_at(step: int, *, start: int, every: int, total: int) -> int:
    """How many top blocks train during step `step` (0-based): `start`, plus one every `every` steps."""
    if every < 1 or start < 1:
        raise ValueError("unfreezing needs start >= 1 and every >= 1")
    return min(total, start + step // every)


class GradualUnfreezing(TrainerCallback):
    """Train the top `start` blocks first, then one more block from the top every `every` steps."""

    def __init__(self, blocks: Any, *, start: int, every: int) -> None:
        self.blocks = list(blocks)
        if not self.blocks:
            raise ValueError("gradual unfreezing needs the model's transformer blocks")
        blocks_trainable_at(0, start=start, every=every, total=len(self.blocks))  # validates start/every
        self.start = start
        self.every = every
        self.current: int | None = None
        # [step, trainable top blocks] each time the count changed, for the lineage.
        self.schedule: list[list[int]] = []
        for block in self.blocks:  # all in the optimizer; on_step_begin freezes those not yet due
            block.requires_grad_(True)

    def _apply(self, step: int) -> None:
        count = blocks_trainable_at(step, start=self.start, every=self.every, total=len(self.blocks))
        if count == self.current:
            return
        first_trainable = len(self.blocks) - count
        for index, block in enumerate(self.blocks):
            block.requires_grad_(index >= first_trainable)
        self.current = count
        self.schedule.append([step, count])

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._apply(state.global_step)

    def record(self) -> dict[str, Any]:
        """What the lineage keeps: the rule and the schedule applied."""
        return {"start_blocks": self.start, "unfreeze_every": self.every, "total_blocks": len(self.blocks), "schedule": self.schedule}

"""Gradual unfreezing: the top blocks become trainable one by one at the right steps; frozen ones never move."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub.train.methods import transformer_blocks
from adapterhub.train.unfreezing import GradualUnfreezing, blocks_trainable_at
from tests.conftest import build_tiny_llama


def test_schedule_rule() -> None:
    assert [blocks_trainable_at(s, start=1, every=2, total=3) for s in range(7)] == [1, 1, 2, 2, 3, 3, 3]
    with pytest.raises(ValueError):
        blocks_trainable_at(0, start=1, every=0, total=3)


def test_blocks_unfreeze_from_the_top_and_frozen_weights_do_not_change(tmp_path: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    base = build_tiny_llama(tmp_path / "base", num_layers=4)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.requires_grad_(False)
    blocks = list(transformer_blocks(model))
    unfreezing = GradualUnfreezing(blocks, start=1, every=2)
    before = [{n: p.detach().clone() for n, p in block.named_parameters()} for block in blocks]

    seen: dict[int, list[bool]] = {}
    changed_by_step: dict[int, list[bool]] = {}

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            step = state.global_step - 1  # the step that just ran
            seen[step] = [all(p.requires_grad for p in block.parameters()) for block in blocks]
            changed_by_step[step] = [
                any(not torch.equal(p, before[i][n]) for n, p in block.named_parameters()) for i, block in enumerate(blocks)
            ]

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (16, 12), generator=generator).tolist()
    data = Dataset.from_list([{"input_ids": row, "labels": row} for row in ids])
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2,
        weight_decay=0.1, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[unfreezing, Watch()]).train()

    # Steps 0-1: the top block; 2-3: the top two; 4: the top three. The bottom block never.
    assert seen == {
        0: [False, False, False, True],
        1: [False, False, False, True],
        2: [False, False, True, True],
        3: [False, False, True, True],
        4: [False, True, True, True],
    }
    # A block's weights stay bit for bit until its turn (despite weight decay), then move.
    assert changed_by_step[1] == [False, False, False, True]
    assert changed_by_step[3] == [False, False, True, True]
    assert changed_by_step[4] == [False, True, True, True]
    assert unfreezing.record() == {"start_blocks": 1, "unfreeze_every": 2, "total_blocks": 4, "schedule": [[0, 1], [2, 2], [4, 3]]}

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


def test_layerwise_run_unfreezes_and_records_the_schedule(tiny_base: Path, sft_jsonl: Path, tmp_path: Path) -> None:
    """`--method layerwise --unfreeze-every N` through the trainer: the bottom block moves only after its turn."""
    from safetensors.torch import load_file

    from adapterhub.errors import ValidationError
    from adapterhub.train import load_config, train

    with pytest.raises(ValidationError, match="unfreeze_every only applies to layerwise, not lora"):
        load_config({"data": sft_jsonl, "method": "lora", "unfreeze_every": 2})
    config = load_config(
        {"data": sft_jsonl, "method": "layerwise", "layerwise_top_k": 1, "unfreeze_every": 2, "max_steps": 3,
         "batch_size": 4, "validation_split": 0.2, "eval_steps": 3, "learning_rate": 1e-2}
    )
    result = train(config, base_dir=tiny_base, output_dir=tmp_path / "run", progress=False)
    details = result.lineage_details()
    assert details["unfreezing"] == {"start_blocks": 1, "unfreeze_every": 2, "total_blocks": 2, "schedule": [[0, 1], [2, 2]]}
    assert details["config"]["unfreeze_every"] == 2
    before = load_file(tiny_base / "model.safetensors")
    after = load_file(result.output_path / "model.safetensors")
    for block in (0, 1):  # both blocks trained by the end (block 0 from step 2 on)
        name = f"model.layers.{block}.mlp.down_proj.weight"
        assert not torch_equal(before[name], after[name]), name
    assert torch_equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def torch_equal(a: object, b: object) -> bool:
    import torch

    return bool(torch.equal(a, b))  # type: ignore[arg-type]

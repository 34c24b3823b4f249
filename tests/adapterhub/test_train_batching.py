"""Packed rows under dense-mask attention: the same losses and gradients as each example alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from adapterhub.train.batching import PackedRowsCollator, keeps_packed_rows
from adapterhub.train.config import load_config

# Three packed rows as TRL's best-fit packing leaves them: whole examples end to end, their
# lengths in `seq_lengths`, the last row shorter (it gets padded). Prompt labels are -100.
EXAMPLES = [[5, 9, 11, 12, 13, 14], [20, 21, 22], [30, 31, 32, 33, 34], [40, 41, 42, 43], [50, 51]]
PROMPT_LENGTHS = [2, 1, 0, 3, 1]
ROWS = [[0, 1], [2, 3], [4]]


def _packed_row(indices: list[int]) -> dict[str, list]:
    input_ids = [token for i in indices for token in EXAMPLES[i]]
    labels = [(-100 if j < PROMPT_LENGTHS[i] else token) for i in indices for j, token in enumerate(EXAMPLES[i])]
    return {"input_ids": input_ids, "labels": labels, "seq_lengths": [len(EXAMPLES[i]) for i in indices]}


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    # As SFTTrainer.compute_loss does: with a cache, transformers skips the packed-sequence mask.
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_packed_rows_equal_examples_alone_and_trl_flattened_batch(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa", dtype=torch.float32)
    rows = [_packed_row(indices) for indices in ROWS]
    batch = PackedRowsCollator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (3, 9)
    # Every pad and every example's first token restarts the positions; their labels are -100.
    assert batch["position_ids"][2].tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert (batch["labels"][batch["position_ids"] == 0] == -100).all()

    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    separate = DataCollatorForLanguageModeling(pad_token_id=0)(
        [_packed_row([i]) for i in range(len(EXAMPLES))]
    )
    separate.pop("attention_mask")  # right padding, labels -100: pads change nothing before them

    rows_loss, rows_grads = _loss_and_grads(model, batch)
    flat_loss, flat_grads = _loss_and_grads(model, flat)
    alone_loss, alone_grads = _loss_and_grads(model, separate)
    # Same tokens and label positions in all three layouts; only the dense layout differs.
    assert rows_loss == pytest.approx(alone_loss.item(), rel=1e-5)
    assert rows_loss == pytest.approx(flat_loss.item(), rel=1e-5)
    for row_grad, flat_grad, alone_grad in zip(rows_grads, flat_grads, alone_grads, strict=True):
        torch.testing.assert_close(row_grad, alone_grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(row_grad, flat_grad, rtol=1e-4, atol=1e-6)


def test_packed_rows_only_without_varlen_attention(tmp_path: Path) -> None:
    packing = load_config({"data": tmp_path / "d.jsonl", "packing": True})
    assert keeps_packed_rows(packing, "sdpa") and keeps_packed_rows(packing, "eager")
    assert not keeps_packed_rows(packing, "flash_attention_2")
    assert not keeps_packed_rows(load_config({"data": tmp_path / "d.jsonl"}), "sdpa")

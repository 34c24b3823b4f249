"""How SFT / causal-LM examples become batches: padded, padding-free, or packed rows.

Design decisions:
- Every collator is TRL's own `DataCollatorForLanguageModeling`, configured or thinly
  wrapped, so tokenization, completion-only labels and truncation stay TRL's.
- Padding-free batches lay the batch's examples end to end in one row. transformers derives a
  block-diagonal causal mask from the restarting `position_ids` for every attention
  implementation, so each example attends only to itself and no pad token is computed.
- Packed rows (TRL's best-fit packing, each row up to `max_length` tokens of whole examples)
  stay separate rows unless the attention kernel is a varlen one (FlashAttention). TRL always
  flattens them into one row of `batch_size * max_length` tokens; SDPA and eager attention
  then compute and keep a dense `(batch * max_length)^2` score matrix per head and layer, 
  `batch_size` times the work and memory of separate rows, for the same block-diagonal result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from adapterhub.train.config import SOFT_PROMPT_METHODS, Task, TrainConfig

# Attention implementations with variable-length kernels, which take a flattened batch's
# sequence boundaries (`cu_seq_lens`) instead of a dense mask.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def uses_padding_free_batches(config: TrainConfig) -> bool:
    """Whether SFT batches are laid end to end without padding (packing does that by itself).

    Only sft and causal_lm runs have such batches; every other task's collator pads (TRL's
    preference collators, the classifier's), and the trainer counts their tokens without the pads.
    """
    return (
        config.task in (Task.SFT, Task.CAUSAL_LM)
        and config.padding_free
        and not config.packing
        and config.method not in SOFT_PROMPT_METHODS
    )


def padding_free_collator(config: TrainConfig, tokenizer: Any) -> DataCollatorForLanguageModeling | None:
    """TRL's own collator in padding-free mode, or None for TRL's default (padded) collator.

    TRL only offers `padding_free` for FlashAttention and refuses it together with `max_length`
    unless packing. Passing the collator explicitly keeps TRL's truncation to `max_length`
    during dataset preparation and skips the pad tokens, which cost compute and activation
    memory on batches of mixed lengths.
    """
    if not uses_padding_free_batches(config):
        return None
    return DataCollatorForLanguageModeling(pad_token_id=_pad_id(tokenizer), padding_free=True)


def keeps_packed_rows(config: TrainConfig, attn_implementation: str | None) -> bool:
    """Whether packed rows are batched as rows (dense-mask attention) rather than flattened."""
    return config.packing and not any(kernel in (attn_implementation or "") for kernel in VARLEN_ATTENTION)


@dataclass
class PackedRowsCollator(DataCollatorForLanguageModeling):
    """Packed examples batched as `(batch, max_length)` rows, each example attending only to itself.

    Positions restart at every packed example (from TRL's `seq_lengths`) and no attention mask
    is passed, so transformers builds the block-diagonal mask per row from `position_ids`.
    Right padding gets position 0, which makes every pad token a one-token sequence of its own
    that no real token attends to; its label is -100. The first label of each example is
    masked as in TRL's padding-free batches: it would be predicted from the previous example.
    """

    return_position_ids: bool = True

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        batch.pop("attention_mask")
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


def packed_rows_collator(tokenizer: Any) -> PackedRowsCollator:
    """The collator for packed rows under dense-mask attention (see `keeps_packed_rows`)."""
    return PackedRowsCollator(pad_token_id=_pad_id(tokenizer))


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

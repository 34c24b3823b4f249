"""Model-facing scoring: greedy generation, token log-likelihoods, classification logits.

These take a loaded model and tokenizer (a transformers model or a PEFT model around one)
and return plain Python values; the metrics are computed elsewhere on those values.

Design decisions:

- Greedy decoding (`do_sample=False`, one beam) with an explicit `GenerationConfig` built
  here, so a model's shipped sampling defaults (temperature, top_p) never leak in: the same
  model on the same file gives the same text every run.
- Prompts are rendered with the tokenizer's chat template (`add_generation_prompt=True`)
  when it has one, the way the trainer formats instruction data, so an adapter is asked in
  the format it was trained on; without a template the raw prompt text is used.
- Batches are padded on the left (a decoder continues from the last position) and formed
  from prompts sorted by length, which wastes the least compute on padding; results come back
  in the caller's order. Prompts longer than the context window keep their *end* (the
  question and the generation prompt) and are counted in `truncated`.
- Perplexity is computed from the logits with `cross_entropy` per token rather than from
  the model's mean `loss`, so padded batches, prompt masking and prompt-learning adapters
  (whose logits carry extra virtual positions at the front) are all scored exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Called after each batch with the number of rows it finished (for progress bars).
BatchCallback = Callable[[int], None]

# Context cap when a model declares none (or an absurd one, as some tokenizers do).
_FALLBACK_CONTEXT = 2048


@dataclass(frozen=True)
class GenerationResult:
    """Generated replies (in input order) and how many prompts had to be shortened."""

    texts: list[str]
    truncated: int
    new_tokens: int


@dataclass(frozen=True)
class LikelihoodResult:
    """Summed negative log-likelihood over the scored tokens of a set of sequences."""

    total_nll: float
    token_count: int
    truncated: int
    # Each sequence's own summed NLL, in the order given (None where nothing could be scored).
    per_sequence: tuple[float | None, ...] = ()


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]], plain_prompt: str) -> str:
    """The text a model continues: its chat template with a generation prompt, else `plain_prompt`."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return plain_prompt


def context_length(model: Any, tokenizer: Any) -> int:
    """How many tokens the model can attend to (its config, capped by the tokenizer's limit)."""
    config = getattr(model, "config", None)
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    usable = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
    return min(usable) if usable else _FALLBACK_CONTEXT


def _batches(order: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), batch_size):
        yield list(order[start:start + batch_size])


def _pad_token_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("the tokenizer has neither a pad nor an eos token")


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a reply: the tokenizer's eos and the model's generation eos ids."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    for value in (configured if isinstance(configured, list) else [configured]) + [tokenizer.eos_token_id]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def _model_device(model: Any) -> Any:
    return next(model.parameters()).device


def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    chat_formatted: bool,
    on_batch: BatchCallback | None = None,
) -> GenerationResult:
    """Greedy replies to already-rendered `prompts`, decoded without special tokens, stripped.

    `chat_formatted` says the prompts came from a chat template, which places its own special
    tokens; the tokenizer must then not add a BOS a second time.
    """
    import torch
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    pad_id = _pad_token_id(tokenizer)
    eos_ids = _eos_token_ids(model, tokenizer)
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
    )
    max_prompt = max(1, context_length(model, tokenizer) - max_new_tokens)
    encoded = [tokenizer(prompt, add_special_tokens=not chat_formatted)["input_ids"] for prompt in prompts]
    truncated = sum(len(ids) > max_prompt for ids in encoded)
    encoded = [ids[-max_prompt:] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    device = _model_device(model)
    texts: list[str] = [""] * len(encoded)
    new_tokens = 0
    model.eval()
    for batch in _batches(order, batch_size):
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids = encoded[index]
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                generation_config=generation_config,
            )
        # The returned sequences start with the (padded) prompt, also for PEFT prompt learning.
        continuations = output[:, width:].cpu()
        for row, index in enumerate(batch):
            tokens = continuations[row].tolist()
            for position, token in enumerate(tokens):
                if token in eos_ids or token == pad_id:
                    tokens = tokens[:position]
                    break
            new_tokens += len(tokens)
            texts[index] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch(len(batch))
    return GenerationResult(texts=texts, truncated=truncated, new_tokens=new_tokens)


def sequence_nll(
    model: Any,
    tokenizer: Any,
    sequences: Sequence[tuple[str, str]],
    *,
    batch_size: int,
    chat_formatted: bool,
    on_batch: BatchCallback | None = None,
) -> LikelihoodResult:
    """Summed NLL of each `(context, target)` pair's target tokens given its context.

    With an empty context the target is scored as plain text (the tokenizer's special tokens
    added, the first token unscored: nothing predicts it). With a context the target is
    tokenized separately and followed by the eos token, so "stop here" is part of the answer,
    as it is in instruction training.
    """
    import torch
    import torch.nn.functional as F

    pad_id = _pad_token_id(tokenizer)
    limit = context_length(model, tokenizer)
    items: list[tuple[list[int], int]] = []  # token ids, index of the first scored token
    positions: list[int] = []  # where each item is in `sequences`
    truncated = 0
    for position, (context, target) in enumerate(sequences):
        if context:
            context_ids = tokenizer(context, add_special_tokens=not chat_formatted)["input_ids"]
            target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                target_ids = target_ids + [tokenizer.eos_token_id]
            ids, first = context_ids + target_ids, max(len(context_ids), 1)
        else:
            ids, first = tokenizer(target)["input_ids"], 1
        if len(ids) > limit:
            truncated += 1
            ids = ids[:limit]
        if first < len(ids):
            items.append((ids, first))
            positions.append(position)
    if on_batch is not None and len(items) < len(sequences):
        on_batch(len(sequences) - len(items))  # rows with nothing to score count as done
    device = _model_device(model)
    total_nll, token_count = 0.0, 0
    per_sequence: list[float | None] = [None] * len(sequences)
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]), reverse=True)
    for batch in _batches(order, batch_size):
        width = max(len(items[i][0]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        score_mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, index in enumerate(batch):
            ids, first = items[index]
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
            score_mask[row, first:len(ids)] = True
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        # Prompt-learning adapters prepend virtual positions; the last `width` belong to the input.
        logits = logits[:, -width:, :].float().cpu()
        token_nll = F.cross_entropy(
            logits[:, :-1, :].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
        ).view(len(batch), width - 1)
        scored = score_mask[:, 1:]
        total_nll += float(token_nll[scored].sum())
        for row, index in enumerate(batch):
            per_sequence[positions[index]] = float(token_nll[row][scored[row]].sum())
        token_count += int(scored.sum())
        if on_batch is not None:
            on_batch(len(batch))
    return LikelihoodResult(total_nll=total_nll, token_count=token_count, truncated=truncated, per_sequence=tuple(per_sequence))


def classify(
    model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int, on_batch: BatchCallback | None = None
) -> list[int]:
    """Arg-max class index of a sequence-classification model for each text (input order)."""
    import torch

    limit = context_length(model, tokenizer)
    device = _model_device(model)
    predictions: list[int] = [0] * len(texts)
    model.eval()
    order = list(range(len(texts)))
    for batch in _batches(order, batch_size):
        # Right padding: the classification head reads the last non-pad token of each row.
        encoded = tokenizer(
            [texts[i] for i in batch], padding=True, padding_side="right", truncation=True, max_length=limit,
            return_tensors="pt",
        )
        with torch.inference_mode():
            logits = model(
                input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device)
            ).logits
        for row, index in enumerate(batch):
            predictions[index] = int(logits[row].argmax())
        if on_batch is not None:
            on_batch(len(batch))
    return predictions

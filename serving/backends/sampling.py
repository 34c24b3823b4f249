"""Next-token choice for the torch engine: penalties, temperature, min-p/top-k/top-p, logprobs.

Design decisions:
- vLLM's semantics (documented on `SamplingParams`), so a request means the same on either
  backend.
- Only rows that need the extra work pay for it. A batch of plain rows costs one arg-max and one
  host copy per step. Biases and penalties are applied on the device to an fp32 copy of the
  logits, bias first, as vLLM does.
- Draws happen on the host, with each request's own CPU generator, so seeded output is the same
  on any device and whatever else shares the batch.
- Logprobs are taken from the raw logits (log-softmax before penalties and temperature). They
  are gathered on the device; only the chosen tokens' values and the top-k come to the host.
  Prompt logprobs are computed in chunks of positions, so a long prompt never holds an fp32
  `[tokens, vocab]` log-softmax at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapterhub.serving.backends.base import SamplingParams, TokenLogprob

#: Positions per log-softmax chunk are chosen so one chunk holds at most this many fp32 values
#: (64 MB).
_LOGPROB_CHUNK_VALUES = 1 << 24


def adjust_logits(
    logits: torch.Tensor, row: int, sampling: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> None:
    """Apply `sampling`'s logit bias and penalties to row `row` of fp32 `logits`, in place."""
    values = logits[row]
    vocab = values.shape[0]
    device = values.device
    if sampling.logit_bias:
        ids, biases = zip(*sampling.logit_bias)
        values.index_add_(0, torch.tensor(ids, device=device), torch.tensor(biases, dtype=values.dtype, device=device))
    if output_ids and (sampling.presence_penalty or sampling.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=device), minlength=vocab)[:vocab].to(values.dtype)
        values -= sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0).to(values.dtype)
    if sampling.repetition_penalty != 1.0:
        seen_ids = torch.tensor([*prompt_ids, *output_ids], device=device)
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        seen[seen_ids[seen_ids < vocab]] = True
        penalty = sampling.repetition_penalty
        values.copy_(torch.where(seen, torch.where(values > 0, values / penalty, values * penalty), values))


def draw(probs: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from host `probs` (softmax of the temperature-scaled logits).

    min-p, then top-k, then top-p (on the renormalized rest) narrow the candidates, in vLLM's
    order. The most likely token always survives.
    """
    if not sampling.truncated:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_probs, sorted_ids = torch.sort(probs, descending=True)
    narrowed = False
    if sampling.min_p > 0.0:
        sorted_probs = torch.where(sorted_probs >= sampling.min_p * sorted_probs[0], sorted_probs, 0.0)
        narrowed = True
    if 0 < sampling.top_k < sorted_probs.shape[0]:
        sorted_probs[sampling.top_k :] = 0.0
        narrowed = True
    if sampling.top_p < 1.0:
        shares = sorted_probs / sorted_probs.sum() if narrowed else sorted_probs
        cumulative = torch.cumsum(shares, dim=-1)
        keep = cumulative - shares < sampling.top_p
        sorted_probs = torch.where(keep, sorted_probs, 0.0)
    pick = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(sorted_ids[pick])


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
    """Log-probabilities of `token_ids[i]` under the distribution of `logits[i]`, each with the
    `top[i]` most likely tokens. `logits` is raw, `[n, vocab]`, on any device."""
    if len(token_ids) == 0:
        return []
    chunk = max(1, _LOGPROB_CHUNK_VALUES // logits.shape[-1])
    most = max(top)
    chosen: list[float] = []
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    for start in range(0, len(token_ids), chunk):
        logprobs = torch.log_softmax(logits[start : start + chunk].float(), dim=-1)
        ids = torch.tensor(token_ids[start : start + chunk], device=logprobs.device).unsqueeze(1)
        chosen += logprobs.gather(1, ids).squeeze(1).tolist()
        if most > 0:
            values, indices = logprobs.topk(min(most, logprobs.shape[-1]), dim=-1)
            top_values += values.tolist()
            top_ids += indices.tolist()
    return [
        TokenLogprob(
            token_id=int(token_id),
            logprob=chosen[i],
            top=tuple(zip(top_ids[i][: top[i]], top_values[i][: top[i]])) if most > 0 else (),
        )
        for i, token_id in enumerate(token_ids)
    ]

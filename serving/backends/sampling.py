"""Next-token choice for the torch engine: penalties, temperature, min-p/top-k/top-p, logprobs.

Design decisions:
- vLLM's semantics (documented on `SamplingParams`), so a request means the same on either
  backend.
- Only rows that need the extra work pay for it. A batch of plain rows costs one arg-max and one
  host copy per step. Biases and penalties are applied on the device to an fp32 copy of the
  logits, bias first, as vLLM does.
- Draws happen on the host, with each request's own CPU generator, so seeded output is the same
  on any device and whatever else shares the batch. A draw inverts the CDF (an fp64 cumulative
  sum and one uniform number): the distribution of `torch.multinomial(p, 1)` at about a 17th of
  its CPU time for a 49k vocabulary (1.9 ms -> 0.11 ms per row, measured here).
- Whatever the work for one row raises (its bias, masking or draw) ends that row's request and
  nothing else: a request's settings must never be able to stop the engine.
- Logprobs are taken from the raw logits (log-softmax before penalties and temperature). They
  are gathered on the device; only the chosen tokens' values and the top-k come to the host.
  Prompt logprobs are computed in chunks of positions, so a long prompt never holds an fp32
  `[tokens, vocab]` log-softmax at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from adapterhub.serving.backends.base import GenerationError, SamplingParams, SamplingSettingsError, TokenLogprob

#: Positions per log-softmax chunk are chosen so one chunk holds at most this many fp32 values
#: (64 MB).
_LOGPROB_CHUNK_VALUES = 1 << 24
#: Tokens first taken for top-p: nuclei of real next-token distributions are far smaller.
_NUCLEUS_HEAD = 1024


class SamplingRow(Protocol):
    """What choosing a row's next token reads: its settings, generator and tokens so far."""

    @property
    def sampling(self) -> SamplingParams: ...

    @property
    def generator(self) -> torch.Generator | None: ...

    @property
    def prompt_ids(self) -> Sequence[int]: ...

    @property
    def output_ids(self) -> Sequence[int]: ...

    @property
    def end_token_ids(self) -> Sequence[int]:
        """Tokens that end the row (end-of-sequence unless ignored, `stop_token_ids`)."""
        ...


@dataclass(frozen=True)
class StepTokens:
    """One step's choice for every row: the token and the logprob when asked for. Rows in
    `failed` (index -> the error to end that request with) had no usable distribution: the model
    overflowed (`GenerationError`), the request's own settings did (`SamplingSettingsError`), or
    working on that row raised (any other exception, e.g. a token id beyond the vocabulary
    given to the engine directly); their token is meaningless."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    failed: dict[int, Exception]


def choose_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> StepTokens:
    """The next token of every row of `logits` (`[rows, vocab]`, raw, any device).

    Greedy rows take the arg-max; the others draw from the temperature-scaled softmax, narrowed
    by min-p/top-k/top-p, with their own generator. Rows with a bias or penalty get it on an fp32
    copy first. Logprobs are of the raw logits.
    """
    raw = logits
    # Work done for one row runs under its own `try`: whatever it raises ends that row's request
    # alone, never the step (and with it the engine thread and every other request).
    failed: dict[int, Exception] = {}
    adjusted = [index for index, row in enumerate(rows) if row.sampling.adjusts_logits]
    if adjusted:
        logits = logits.to(torch.float32, copy=True)
        for index in adjusted:
            row = rows[index]
            try:
                adjust_logits(logits, index, row.sampling, row.prompt_ids, row.output_ids, row.end_token_ids)
            except Exception as exc:  # noqa: BLE001 - this row's request fails with it
                failed[index] = exc
    # One device-to-host transfer for the arg-max and the finiteness checks of every row. A row's
    # fp32 sum is non-finite exactly when the row holds an inf or NaN (overflowing the sum would
    # take logits near 1e34), and costs a 15th of `isfinite(...).all()` on the CPU.
    # `max(...).indices` is `argmax` (first maximum on ties), faster on the CPU.
    best = logits.max(dim=-1)
    checks = [best.indices, torch.isfinite(raw.sum(dim=-1, dtype=torch.float32)).long()]
    if adjusted:
        # -inf is how `min_tokens` masks tokens, but a huge bias or penalty can make +inf or NaN,
        # or mask everything: the row's best logit must be finite.
        checks.append(torch.isfinite(best.values).long())
    greedy_ids, model_finite, *adjusted_finite = torch.stack(checks).tolist()
    for index, row in enumerate(rows):
        if index in failed:
            continue
        if not model_finite[index]:
            failed[index] = GenerationError(f"the model produced non-finite logits {_where(row)}")
        elif adjusted_finite and not adjusted_finite[0][index]:
            failed[index] = _settings_error(row)
    sampled = [index for index, row in enumerate(rows) if not row.sampling.greedy and index not in failed]
    host_probs: dict[int, torch.Tensor] = {}
    if sampled:
        # Softmax on the device for every sampled row at once, then one copy to the host, where
        # each row's own generator draws (seeded output is the same on any device).
        temperatures = torch.tensor([rows[i].sampling.temperature for i in sampled], device=logits.device)
        probs = torch.softmax(logits[sampled].float() / temperatures.unsqueeze(1), dim=-1).cpu()
        for index, row_probs, probs_finite in zip(sampled, probs, torch.isfinite(probs.sum(dim=-1)).tolist(), strict=True):
            if probs_finite:
                host_probs[index] = row_probs
            else:
                failed[index] = SamplingSettingsError(
                    f"temperature {rows[index].sampling.temperature} made the probabilities non-finite {_where(rows[index])}",
                    param="temperature",
                )
    token_ids = [int(token_id) for token_id in greedy_ids]
    for index, row_probs in host_probs.items():
        try:
            token_ids[index] = draw(row_probs, rows[index].sampling, rows[index].generator)
        except Exception as exc:  # noqa: BLE001 - this row's request fails with it
            failed[index] = exc
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    scored = [index for index, row in enumerate(rows) if row.sampling.logprobs is not None and index not in failed]
    if scored:
        scored_logits = raw if len(scored) == len(rows) else raw[scored]  # no copy when every row asks
        computed = token_logprobs(scored_logits, [token_ids[i] for i in scored], [rows[i].sampling.logprobs or 0 for i in scored])
        for index, value in zip(scored, computed, strict=True):
            logprobs[index] = value
    return StepTokens(token_ids=token_ids, logprobs=logprobs, failed=failed)


def _where(row: SamplingRow) -> str:
    return f"at output token {len(row.output_ids) + 1}"


def _settings_error(row: SamplingRow) -> SamplingSettingsError:
    """Name the setting that left a row with no finite logit to choose."""
    sampling = row.sampling
    where = _where(row)
    if len(row.output_ids) < sampling.min_tokens and sampling.stop_token_ids:
        return SamplingSettingsError(f"min_tokens masks every token the model could choose {where}", param="stop_token_ids")
    if sampling.repetition_penalty != 1.0:
        param = "repetition_penalty"
    elif sampling.logit_bias:
        param = "logit_bias"
    else:
        param = "frequency_penalty" if sampling.frequency_penalty else "presence_penalty"
    return SamplingSettingsError(f"{param} made the logits non-finite {where}", param=param)


def adjust_logits(
    logits: torch.Tensor, row: int, sampling: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int],
    end_token_ids: Sequence[int] = (),
) -> None:
    """Apply `sampling`'s logit bias, `min_tokens` and penalties to row `row` of fp32 `logits`, in place."""
    values = logits[row]
    vocab = values.shape[0]
    device = values.device
    if len(output_ids) < sampling.min_tokens and end_token_ids:
        values[torch.tensor(list(end_token_ids), device=device)] = float("-inf")
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
    """One token id from host `probs` (softmax of the temperature-scaled logits), drawn among the
    candidates `sampling` leaves (`candidates`)."""
    if not sampling.truncated:
        return categorical(probs, generator)
    values, ids = candidates(probs, sampling)
    return int(ids[categorical(values, generator)])


def candidates(probs: torch.Tensor, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens min-p, then top-k, then top-p (of the renormalized rest) leave, in vLLM's order:
    their probabilities, most likely first, and their ids. The most likely token always stays.

    Sorting a 49k vocabulary costs 5.5 ms per row on the CPU. The candidates are the top of that
    order, so `topk` of as many as can survive is taken instead, and for top-p first only a head
    of `_NUCLEUS_HEAD` tokens: that holds the nucleus unless the distribution is very flat, which
    its mass shows (then the whole order is taken). On SmolLM2's next-token distributions at
    temperature 1, the 0.95 nucleus has a median of 27 tokens and exceeds 1024 at 7% of
    positions (none at temperature 0.7), so a top-p draw costs ~0.5 ms instead of ~7 ms.
    """
    vocab = probs.shape[0]
    survivors = vocab
    threshold: float | None = 0.0  # survivors are the tokens at or above it (None: top-k decides)
    if sampling.min_p > 0.0:
        threshold = sampling.min_p * float(probs.max())
        survivors = int((probs >= threshold).sum())
    if 0 < sampling.top_k < survivors:
        survivors, threshold = sampling.top_k, None
    if sampling.top_p >= 1.0:
        return torch.topk(probs, survivors)
    if survivors > _NUCLEUS_HEAD and threshold is not None:
        mass = float(probs[probs >= threshold].sum()) if threshold > 0.0 else float(probs.sum())
        values, ids = torch.topk(probs, _NUCLEUS_HEAD)
        if float(values.sum()) < sampling.top_p * mass:  # a flat distribution: the nucleus reaches past the head
            values, ids = torch.topk(probs, survivors)
    else:
        values, ids = torch.topk(probs, survivors)
        mass = float(values.sum())
    # In fp64: compared with an fp32 tensor, a legal `top_p` below fp32's smallest value (1e-46)
    # would round to 0 and empty the set. The top token stays whatever the rounding, as it does
    # in transformers (`min_tokens_to_keep`) and vLLM.
    shares = values.double() / mass
    in_nucleus = torch.cumsum(shares, dim=0) - shares < sampling.top_p  # a prefix
    count = max(1, int(in_nucleus.sum()))
    return values[:count], ids[:count]


def categorical(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """An index drawn with probability proportional to the non-negative host `weights`."""
    cdf = torch.cumsum(weights, dim=0, dtype=torch.float64)
    target = torch.rand(1, dtype=torch.float64, generator=generator) * cdf[-1]
    # The first index whose cumulative weight exceeds the target: zero weights are never drawn.
    index = int(torch.searchsorted(cdf, target, right=True))
    return min(index, weights.shape[0] - 1)  # a target rounded up to the total (odds ~2**-53)


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

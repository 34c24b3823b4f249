"""Turning a merged ΔW back into LoRA factors: exact rank concatenation or truncated SVD.

Design decisions:

- A linear merge of LoRAs, Σ cᵢ·Bᵢ·Aᵢ, *is* a LoRA of rank Σ rᵢ: B = [c₁B₁ | c₂B₂ | …],
  A = [A₁; A₂; …]. That output is exact (error 0), so linear merges never go through SVD.
- Anything else (sparsified or sign-elected deltas, full-model inputs) is a dense ΔW.
  Its best rank-k approximation in Frobenius norm is the truncated SVD (Eckart–Young), and
  its relative error is read off the singular values: √(Σ_{i≥k} σᵢ²) / √(Σ σᵢ²). That is the
  figure reported per module and stored in the lineage.
- A small rank of a large module uses a randomized range finder and then an exact projection
  (see `truncated_svd`): the reported error stays the true error of the written factors.
- The singular values are split evenly, B = U√Σ, A = √Σ Vᵀ, so both factors have the same
  scale (better conditioned if the adapter is trained further).
- The output config has one rank for all modules (the largest needed); smaller modules are
  zero-padded. Padding is exact and keeps the config plain `r`, which every loader (PEFT,
  vLLM) reads the same way, instead of a `rank_pattern` some loaders ignore.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapterhub.merge.task_vectors import LoraFactors

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LowRank:
    """ΔW ≈ b @ a with the relative Frobenius error of the approximation (0 when exact)."""

    b: torch.Tensor
    a: torch.Tensor
    relative_error: float
    exact: bool

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def concatenate_ranks(factors: Sequence[LoraFactors], coefficients: Sequence[float]) -> LowRank:
    """Exact LoRA of Σ cᵢ·Bᵢ·Aᵢ by stacking the ranks."""
    import torch

    b = torch.cat([f.scaled_b * c for f, c in zip(factors, coefficients, strict=True)], dim=1)
    a = torch.cat([f.a for f in factors], dim=0)
    return LowRank(b=b, a=a, relative_error=0.0, exact=True)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest k whose first k singular values hold `energy` of Σσᵢ² (at least 1)."""
    import torch

    squares = singular_values.double() ** 2
    total = float(squares.sum())
    if total == 0.0:
        return 1
    captured = torch.cumsum(squares, dim=0) / total
    reached = torch.nonzero(captured >= energy - 1e-12)
    k = int(reached[0]) + 1 if len(reached) else len(singular_values)
    return max(1, k)


def truncated_svd(delta: torch.Tensor, *, rank: int | None = None, energy: float | None = None, seed: int = 0) -> LowRank:
    """Best rank-k factors of `delta` (k = `rank`, or the smallest reaching `energy`).

    A small fixed rank of a large matrix uses a seeded randomized range finder with power
    iterations (`torch.svd_lowrank`) and then projects `delta` exactly onto the subspace it
    found, so the reported error is the true error of the factors, not an estimate; the
    full SVD (needed anyway for an energy threshold) costs O(mn·min(m, n)) and dominated
    merges of SmolLM2-sized modules.
    """
    import torch

    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    matrix = delta.float()
    total = float((matrix.double() ** 2).sum())
    if total == 0.0:
        k = min(rank or 1, *matrix.shape)
        return LowRank(b=torch.zeros(matrix.shape[0], k), a=torch.zeros(k, matrix.shape[1]), relative_error=0.0, exact=True)
    if rank is not None and 2 * rank + _OVERSAMPLE < min(matrix.shape):
        return _randomized(matrix, rank, total, seed)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(rank, len(s)) if rank is not None else rank_for_energy(s, float(energy))  # type: ignore[arg-type]
    residual = float((s[k:].double() ** 2).sum())
    error = math.sqrt(min(residual / total, 1.0))
    root = torch.sqrt(s[:k])
    return LowRank(b=u[:, :k] * root, a=root.unsqueeze(1) * vh[:k], relative_error=error, exact=residual == 0.0)


_OVERSAMPLE = 10
_POWER_ITERATIONS = 4


def _randomized(matrix: torch.Tensor, rank: int, total: float, seed: int) -> LowRank:
    """Rank-`rank` factors from a randomized subspace, with the exact error of the projection."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, v = torch.svd_lowrank(matrix, q=rank + _OVERSAMPLE, niter=_POWER_ITERATIONS)
    basis = v[:, :rank]  # orthonormal columns spanning the dominant row space
    projected = matrix @ basis
    u, s, wh = torch.linalg.svd(projected, full_matrices=False)
    root = torch.sqrt(s)
    kept = float((s.double() ** 2).sum())
    error = math.sqrt(max(total - kept, 0.0) / total)
    return LowRank(b=u * root, a=root.unsqueeze(1) * (wh @ basis.T), relative_error=error, exact=False)


def pad_to_rank(low_rank: LowRank, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, a) zero-padded to `rank` columns/rows; b @ a is unchanged."""
    import torch

    extra = rank - low_rank.rank
    if extra < 0:
        raise ValueError(f"cannot pad rank {low_rank.rank} down to {rank}")
    if extra == 0:
        return low_rank.b, low_rank.a
    b = torch.cat([low_rank.b, torch.zeros(low_rank.b.shape[0], extra, dtype=low_rank.b.dtype)], dim=1)
    a = torch.cat([low_rank.a, torch.zeros(extra, low_rank.a.shape[1], dtype=low_rank.a.dtype)], dim=0)
    return b, a

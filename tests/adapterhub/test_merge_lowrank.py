"""Low-rank output: exact rank concatenation, truncated SVD and its reported error."""

from __future__ import annotations

import pytest
import torch

from adapterhub.merge.lowrank import concatenate_ranks, pad_to_rank, rank_for_energy, truncated_svd
from adapterhub.merge.task_vectors import LoraFactors


def _noisy_low_rank(rows: int, cols: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    signal = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)
    return signal + noise * torch.randn(rows, cols, generator=generator)


def _actual_error(matrix: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    return float((matrix - b @ a).norm() / matrix.norm())


def _optimal_error(matrix: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(matrix.double())
    return float((s[rank:] ** 2).sum().sqrt() / (s**2).sum().sqrt())


@pytest.mark.parametrize(("shape", "rank"), [((300, 200), 8), ((64, 48), 30)])  # randomized path, full SVD path
def test_reported_error_is_the_true_error_and_near_optimal(shape: tuple[int, int], rank: int) -> None:
    matrix = _noisy_low_rank(*shape, rank=12, noise=0.3)
    low_rank = truncated_svd(matrix, rank=rank, seed=1)
    assert low_rank.rank == rank and low_rank.b.shape == (shape[0], rank) and low_rank.a.shape == (rank, shape[1])
    actual = _actual_error(matrix, low_rank.b, low_rank.a)
    assert abs(actual - low_rank.relative_error) < 1e-5
    assert low_rank.relative_error <= _optimal_error(matrix, rank) * 1.01 + 1e-6
    again = truncated_svd(matrix, rank=rank, seed=1)
    assert torch.equal(again.a, low_rank.a)  # seeded: the same factors every time


def test_energy_threshold_picks_the_smallest_rank_reaching_it() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    total = float((s**2).sum())
    assert rank_for_energy(s, 9 / total) == 1
    assert rank_for_energy(s, 9.5 / total) == 2
    assert rank_for_energy(s, 1.0) == 4
    matrix = _noisy_low_rank(80, 60, rank=5, noise=0.01)
    low_rank = truncated_svd(matrix, energy=0.99)
    assert low_rank.relative_error <= 0.1 + 1e-6 and low_rank.rank <= 6
    assert abs(_actual_error(matrix, low_rank.b, low_rank.a) - low_rank.relative_error) < 1e-5


def test_rank_concatenation_is_exact_and_padding_changes_nothing() -> None:
    generator = torch.Generator().manual_seed(0)
    factors = [LoraFactors(torch.randn(16, r, generator=generator), torch.randn(r, 12, generator=generator), False) for r in (2, 3)]
    low_rank = concatenate_ranks(factors, [0.5, -2.0])
    expected = 0.5 * factors[0].scaled_b @ factors[0].a - 2.0 * factors[1].scaled_b @ factors[1].a
    torch.testing.assert_close(low_rank.b @ low_rank.a, expected)
    assert low_rank.exact and low_rank.rank == 5
    b, a = pad_to_rank(low_rank, 8)
    assert b.shape == (16, 8) and a.shape == (8, 12)
    torch.testing.assert_close(b @ a, expected)


def test_zero_delta_gives_zero_factors() -> None:
    low_rank = truncated_svd(torch.zeros(10, 6), rank=3)
    assert low_rank.relative_error == 0.0 and not low_rank.b.any() and low_rank.rank == 3

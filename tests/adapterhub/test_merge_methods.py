"""The shared suite over every registered merge method, plus reference formulas per method.

Everything here runs on small random tensors (milliseconds). References are written out
independently of the shared pieces in `adapterhub.merge.methods` (numpy, explicit loops), so
a bug in a shared piece cannot be copied into its own check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adapterhub.errors import AdapterhubError
from adapterhub.merge.methods import (
    GlobalParams,
    InputParams,
    get_method,
    magnitude_mask,
    method_names,
    outlier_mask,
    register_merge_method,
)

SHAPE = (24, 16)


def _task_vectors(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=generator) for _ in range(count)]


def _run(name: str, tvs, params, base=None, *, seed: int = 0, **global_kwargs) -> torch.Tensor:
    method = get_method(name)
    if base is None and method.needs_base:
        base = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99)) * 3
    return method.function(
        tvs, base, params=params, global_params=GlobalParams(**global_kwargs),
        generator=torch.Generator().manual_seed(seed),
    )


def _inputs_for(name: str) -> int:
    method = get_method(name)
    return method.max_inputs or 3


def test_required_methods_are_registered() -> None:
    required = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "della", "slerp"}
    assert required <= set(method_names())


@pytest.mark.parametrize("name", method_names())
def test_shape_dtype_and_finite(name: str) -> None:
    count = _inputs_for(name)
    params = [InputParams(weight=0.3 + 0.2 * i, density=0.5) for i in range(count)]
    merged = _run(name, _task_vectors(count), params)
    assert merged.shape == SHAPE
    assert merged.dtype == torch.float32
    assert torch.isfinite(merged).all()
    assert merged.abs().sum() > 0


@pytest.mark.parametrize("name", [n for n in method_names() if get_method(n).min_inputs == 1])
def test_one_input_weight_one_density_one_gives_it_back(name: str) -> None:
    (tv,) = _task_vectors(1)
    merged = _run(name, [tv], [InputParams(weight=1.0, density=1.0)])
    torch.testing.assert_close(merged, tv)


@pytest.mark.parametrize("name", [n for n in method_names() if get_method(n).permutation_invariant])
def test_permutation_invariance(name: str) -> None:
    count = _inputs_for(name)
    tvs = _task_vectors(count, seed=4)
    params = [InputParams(weight=w, density=d) for w, d in ((0.5, 0.3), (1.2, 0.7), (0.8, 0.5))][:count]
    forward = _run(name, tvs, params)
    order = [2, 0, 1] if count == 3 else [1, 0]
    permuted = _run(name, [tvs[i] for i in order], [params[i] for i in order])
    torch.testing.assert_close(forward, permuted, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n in method_names() if get_method(n).random])
def test_random_methods_are_deterministic_for_a_seed(name: str) -> None:
    tvs = _task_vectors(2)
    params = [InputParams(weight=0.5, density=0.5)] * 2
    first = _run(name, tvs, params, seed=7)
    again = _run(name, tvs, params, seed=7)
    other = _run(name, tvs, params, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# -- reference formulas ------------------------------------------------------------------------


def _np(tvs) -> list[np.ndarray]:
    return [t.double().numpy() for t in tvs]


def _topk_reference(x: np.ndarray, density: float) -> np.ndarray:
    k = max(1, int(density * x.size))
    threshold = np.sort(np.abs(x).ravel())[::-1][k - 1]
    return np.where(np.abs(x) >= threshold, x, 0.0)  # random floats: no ties at the threshold


def test_selection_with_tied_magnitudes_matches_a_stable_sort() -> None:
    x = torch.tensor([1.0, -2.0, 2.0, 0.5, 2.0, -1.0])
    assert magnitude_mask(x, 0.5).tolist() == [False, True, True, False, True, False]
    assert magnitude_mask(x, 0.34).tolist() == [False, True, True, False, False, False]  # lowest index wins a tie
    quantized = torch.randint(-4, 5, (40, 30), generator=torch.Generator().manual_seed(0)).float()  # many ties
    order = torch.sort(quantized.abs().flatten(), descending=True, stable=True).indices
    for density in (0.1, 0.37, 0.5, 0.9):
        expected = torch.zeros(quantized.numel(), dtype=torch.bool)
        expected[order[: int(density * quantized.numel())]] = True
        assert torch.equal(magnitude_mask(quantized, density).flatten(), expected)
    ascending = torch.sort(quantized.abs().flatten(), stable=True).indices
    n, keep = quantized.numel(), int(0.4 * quantized.numel())
    bottom = n - keep - int(0.1 * n)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[ascending[bottom : bottom + keep]] = True
    assert torch.equal(outlier_mask(quantized, 0.4, 0.1).flatten(), expected)


@pytest.mark.parametrize("kind", ["continuous", "tied", "mostly_zero"])
def test_large_weight_selection_takes_the_sampled_bracket_and_matches_a_stable_sort(kind: str) -> None:
    # Past 16 × 65536 entries the threshold comes from a sampled bracket, not a full kthvalue.
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1_200_000, generator=generator)
    if kind == "tied":
        x = (x * 4).round()
    elif kind == "mostly_zero":
        x = x * (torch.rand(x.shape, generator=generator) < 0.2)
    order = torch.sort(x.abs(), descending=True, stable=True).indices
    for density in (0.01, 0.3, 0.5, 0.97):
        expected = torch.zeros(x.numel(), dtype=torch.bool)
        expected[order[: int(density * x.numel())]] = True
        assert torch.equal(magnitude_mask(x, density), expected)


def test_linear_reference() -> None:
    tvs = _task_vectors(3)
    weights = [0.2, 0.5, 1.3]
    merged = _run("linear", tvs, [InputParams(weight=w) for w in weights])
    expected = sum(w * t for w, t in zip(weights, _np(tvs))) / sum(weights)
    np.testing.assert_allclose(merged.numpy(), expected, atol=1e-6)


def test_task_arithmetic_reference_with_negative_weight_and_lambda() -> None:
    tvs = _task_vectors(2)
    merged = _run("task_arithmetic", tvs, [InputParams(weight=1.0), InputParams(weight=-0.5)], lambda_=0.8)
    a, b = _np(tvs)
    np.testing.assert_allclose(merged.numpy(), 0.8 * (a - 0.5 * b), atol=1e-6)


def test_task_arithmetic_subtracting_a_task_removes_it() -> None:
    (tv,) = _task_vectors(1)
    merged = _run("task_arithmetic", [tv, tv], [InputParams(weight=1.0), InputParams(weight=-1.0)])
    assert merged.abs().max() == 0


def test_ties_reference() -> None:
    tvs = _task_vectors(3, seed=2)
    weights, densities = [1.0, 0.6, 0.9], [0.3, 0.5, 0.8]
    merged = _run("ties", tvs, [InputParams(weight=w, density=d) for w, d in zip(weights, densities)])
    trimmed = [w * _topk_reference(t, d) for t, w, d in zip(_np(tvs), weights, densities)]
    total = sum(trimmed)
    expected = np.zeros(SHAPE)
    for index in np.ndindex(*SHAPE):
        elected = 1.0 if total[index] >= 0 else -1.0
        agreeing = [(t[index], w) for t, w in zip(trimmed, weights) if np.sign(t[index]) == elected]
        numerator = sum(v for v, _ in agreeing)
        divisor = sum(w for _, w in agreeing) or 1.0
        expected[index] = numerator / divisor
    np.testing.assert_allclose(merged.numpy(), expected, atol=1e-6)


def test_ties_count_consensus_differs_from_sum() -> None:
    big = torch.full(SHAPE, -10.0)
    small = torch.full(SHAPE, 1.0)
    params = [InputParams(), InputParams(), InputParams()]
    by_sum = _run("ties", [big, small, small], params)
    by_count = _run("ties", [big, small, small], params, consensus="count")
    assert torch.all(by_sum == -10.0)
    assert torch.all(by_count == 1.0)


def test_magnitude_prune_reference() -> None:
    tvs = _task_vectors(2, seed=3)
    merged = _run("magnitude_prune", tvs, [InputParams(weight=1.0, density=0.25), InputParams(weight=3.0, density=0.6)])
    a, b = _np(tvs)
    expected = (_topk_reference(a, 0.25) + 3.0 * _topk_reference(b, 0.6)) / 4.0
    np.testing.assert_allclose(merged.numpy(), expected, atol=1e-6)


def test_breadcrumbs_reference() -> None:
    (tv,) = _task_vectors(1, seed=5)
    density, gamma = 0.5, 0.1
    merged = _run("breadcrumbs", [tv], [InputParams(density=density, gamma=gamma)]).numpy()
    x = tv.double().numpy()
    ranks = np.argsort(np.argsort(np.abs(x).ravel())).reshape(SHAPE)  # 0 = smallest
    n = x.size
    keep = int(density * n)
    bottom = n - keep - int(gamma * n)
    expected = np.where((ranks >= bottom) & (ranks < bottom + keep), x, 0.0)
    np.testing.assert_allclose(merged, expected, atol=1e-6)
    assert np.count_nonzero(merged) == keep


def test_dare_keeps_density_share_and_rescales_to_the_l1_norm() -> None:
    tv = torch.randn(200, 100, generator=torch.Generator().manual_seed(0))
    merged = _run("dare_linear", [tv], [InputParams(density=0.3)])
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    ratio = merged[kept] / tv[kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))  # one common rescale factor
    assert math.isclose(merged.abs().sum().item(), tv.abs().sum().item(), rel_tol=1e-4)
    without = _run("dare_linear", [tv], [InputParams(density=0.3)], rescale=False)
    assert torch.equal(without[kept], tv[kept])


def test_dare_ties_elects_signs_after_dropping() -> None:
    tvs = [torch.full(SHAPE, 1.0), torch.full(SHAPE, -3.0)]
    merged = _run("dare_ties", tvs, [InputParams(density=0.5)] * 2, rescale=False)
    # where both survive the drop, -3 wins the election and the +1 entry is excluded
    assert set(torch.unique(merged).tolist()) <= {0.0, 1.0, -3.0}
    assert (merged == -3.0).any()


def test_della_prefers_large_magnitudes() -> None:
    rows = torch.arange(1, 101, dtype=torch.float32).repeat(400, 1)  # every row: magnitudes 1..100
    merged = _run("della_linear", [rows], [InputParams(density=0.5, epsilon=0.4)], rescale=False)
    keep_rate = (merged != 0).float().mean(dim=0)
    assert abs(keep_rate.mean().item() - 0.5) < 0.02
    assert keep_rate[:10].mean() < 0.2 and keep_rate[-10:].mean() > 0.8  # p runs 0.1 → 0.9


def test_slerp_reference_and_endpoints() -> None:
    first, second = _task_vectors(2, seed=6)
    base = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    params = [InputParams(), InputParams()]
    for t, expected in ((0.0, first), (1.0, second)):
        torch.testing.assert_close(_run("slerp", [first, second], params, base, t=t), expected, atol=1e-5, rtol=1e-5)
    v0, v1 = (base + first).double().numpy().ravel(), (base + second).double().numpy().ravel()
    omega = math.acos(np.dot(v0, v1) / (np.linalg.norm(v0) * np.linalg.norm(v1)))
    t = 0.3
    expected = (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)
    merged = _run("slerp", [first, second], params, base, t=t)
    np.testing.assert_allclose((merged + base).numpy().ravel(), expected, atol=1e-5)


# -- the registry ------------------------------------------------------------------------------


def test_unknown_method_lists_the_valid_names() -> None:
    with pytest.raises(AdapterhubError, match="unknown merge method 'tie'.*dare_ties.*ties"):
        get_method("tie")


def test_registry_refuses_duplicates_and_malformed_signatures() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_merge_method("ties", description="again")
        def again(task_vectors, base, *, params, global_params, generator):  # pragma: no cover
            return task_vectors[0]

    with pytest.raises(TypeError, match="malformed signature.*missing keyword-only parameters \\['generator'\\]"):

        @register_merge_method("broken_for_test", description="bad")
        def broken(task_vectors, base, *, params, global_params):  # pragma: no cover
            return task_vectors[0]

    assert "broken_for_test" not in method_names()


def test_linear_coefficients_match_the_function() -> None:
    tvs = _task_vectors(2)
    params = [InputParams(weight=0.7), InputParams(weight=-0.2)]
    for name in ("linear", "task_arithmetic"):
        method = get_method(name)
        coefficients = method.linear_coefficients(params, GlobalParams(lambda_=1.5))
        expected = sum(c * t for c, t in zip(coefficients, tvs))
        torch.testing.assert_close(_run(name, tvs, params, lambda_=1.5), expected)

"""Subspace merge methods (TSV, Iso-C, Iso-CTS, KnOTS, Model Stock, NuSLERP) against numpy
references written from the papers' formulas, on random matrices (milliseconds).

The shared suite in test_merge_methods.py covers them too (shape, finiteness, one input,
permutation invariance, seeds); here each formula is checked on its own, independently of
the torch code (numpy SVDs, explicit loops).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adapterhub.errors import ValidationError
from adapterhub.merge.methods import GlobalParams, InputParams, get_method
from adapterhub.merge.recipe import MergeRecipe

SHAPE = (20, 12)


def _tvs(count: int, seed: int = 0, shape: tuple[int, ...] = SHAPE) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def _run(name: str, tvs, params=None, *, seed: int = 0, **global_kwargs) -> np.ndarray:
    params = params or [InputParams() for _ in tvs]
    merged = get_method(name).function(
        tvs, None, params=params, global_params=GlobalParams(**global_kwargs),
        generator=torch.Generator().manual_seed(seed),
    )
    assert merged.dtype == tvs[0].dtype and merged.shape == tvs[0].shape
    return merged.double().numpy()


def _np(tvs) -> list[np.ndarray]:
    return [t.double().numpy() for t in tvs]


def _polar(m: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(m, full_matrices=False)
    return p @ qt


def _tsv_reference(xs: list[np.ndarray], weights: list[float], share: float, alpha: float) -> np.ndarray:
    k = max(1, int(share * min(xs[0].shape)))
    us, ss, vts = [], [], []
    for x, w in zip(xs, weights):
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        us.append(u[:, :k])
        ss.append(w * s[:k])
        vts.append(vt[:k])
    u_cat, s_cat, vt_cat = np.concatenate(us, axis=1), np.concatenate(ss), np.concatenate(vts, axis=0)
    return alpha * _polar(u_cat) @ np.diag(s_cat) @ _polar(vt_cat)


def test_tsv_matches_the_reference_formula() -> None:
    tvs = _tvs(3, seed=1)
    weights = [1.0, 0.5, 1.5]
    merged = _run("tsv", tvs, [InputParams(weight=w) for w in weights], lambda_=0.9)
    np.testing.assert_allclose(merged, _tsv_reference(_np(tvs), weights, 1 / 3, 0.9), atol=1e-5)
    merged_half = _run("tsv", tvs, rank_share=0.5)
    np.testing.assert_allclose(merged_half, _tsv_reference(_np(tvs), [1.0] * 3, 0.5, 1.0), atol=1e-5)


def test_tsv_on_tasks_in_orthogonal_subspaces_is_their_sum() -> None:
    # Tasks writing to disjoint row and column spaces do not interfere: TSV keeps each whole.
    generator = torch.Generator().manual_seed(2)
    a, b = torch.zeros(SHAPE), torch.zeros(SHAPE)
    a[:10, :6] = torch.randn(10, 6, generator=generator)
    b[10:, 6:] = torch.randn(10, 6, generator=generator)
    np.testing.assert_allclose(_run("tsv", [a, b]), (a + b).numpy(), atol=1e-5)


def test_iso_c_matches_the_reference_formula() -> None:
    tvs = _tvs(3, seed=3)
    weights = [0.7, 1.0, 1.2]
    total = sum(w * x for w, x in zip(weights, _np(tvs)))
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    expected = 1.3 * s.mean() * u @ vt
    merged = _run("iso_c", tvs, [InputParams(weight=w) for w in weights], lambda_=1.3)
    np.testing.assert_allclose(merged, expected, atol=1e-5)
    assert np.allclose(np.linalg.svd(merged, compute_uv=False), 1.3 * s.mean(), atol=1e-4)  # isotropic


def test_iso_c_does_not_invent_directions_for_low_rank_inputs() -> None:
    # Two rank-2 "LoRA" updates: their sum has rank 4, and so must the merge.
    generator = torch.Generator().manual_seed(4)
    tvs = [torch.randn(SHAPE[0], 2, generator=generator) @ torch.randn(2, SHAPE[1], generator=generator) for _ in range(2)]
    for name in ("iso_c", "iso_cts", "tsv", "knots"):
        merged = _run(name, tvs)
        assert np.linalg.matrix_rank(merged, tol=1e-4) <= 4, name


def _iso_cts_reference(xs: list[np.ndarray], common_share: float, alpha: float) -> np.ndarray:
    total = sum(xs)
    r = min(total.shape)
    per_task = (r - int(common_share * r)) // len(xs)
    k = r - per_task * len(xs)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    us, ss, vts = [u[:, :k]], [s[:k]], [vt[:k]]
    for x in xs:
        residual = x - u[:, :k] @ u[:, :k].T @ x
        ut, st, vtt = np.linalg.svd(residual, full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vts.append(vtt[:per_task])
    sigma = np.concatenate(ss).mean()
    return alpha * sigma * _polar(np.concatenate(us, axis=1)) @ _polar(np.concatenate(vts, axis=0))


@pytest.mark.parametrize("common_share", [0.5, 0.8])
def test_iso_cts_matches_the_reference_formula(common_share: float) -> None:
    tvs = _tvs(3, seed=5)
    merged = _run("iso_cts", tvs, common_share=common_share, lambda_=1.1)
    np.testing.assert_allclose(merged, _iso_cts_reference(_np(tvs), common_share, 1.1), atol=1e-5)


def test_iso_cts_with_no_task_specific_rank_is_iso_c() -> None:
    tvs = _tvs(2, seed=6)
    np.testing.assert_allclose(_run("iso_cts", tvs, common_share=0.99), _run("iso_c", tvs), atol=1e-5)


def _ties_reference(vs: list[np.ndarray], weights: list[float], densities: list[float]) -> np.ndarray:
    trimmed = []
    for v, w, d in zip(vs, weights, densities):
        k = max(1, int(d * v.size))
        threshold = np.sort(np.abs(v).ravel())[::-1][k - 1]
        trimmed.append(w * np.where(np.abs(v) >= threshold, v, 0.0))
    total = sum(trimmed)
    out = np.zeros_like(total)
    for index in np.ndindex(*total.shape):
        elected = 1.0 if total[index] >= 0 else -1.0
        agreeing = [(t[index], w) for t, w in zip(trimmed, weights) if np.sign(t[index]) == elected]
        out[index] = sum(v for v, _ in agreeing) / (sum(w for _, w in agreeing) or 1.0)
    return out


@pytest.mark.parametrize("shape", [SHAPE, (40, 6)])  # wide stack (Gram eigendecomposition) and tall (SVD)
def test_knots_matches_the_reference_formula(shape: tuple[int, int]) -> None:
    tvs = _tvs(3, seed=7, shape=shape)
    weights, densities = [1.0, 0.8, 1.2], [0.4, 0.6, 0.5]
    xs = _np(tvs)
    u, s, vt = np.linalg.svd(np.concatenate(xs, axis=1), full_matrices=False)
    cols = shape[1]
    blocks = [vt[:, i * cols : (i + 1) * cols] for i in range(3)]
    expected = u @ np.diag(s) @ _ties_reference(blocks, weights, densities)
    merged = _run("knots", tvs, [InputParams(weight=w, density=d) for w, d in zip(weights, densities)])
    np.testing.assert_allclose(merged, expected, atol=1e-5)


def test_knots_with_full_density_and_one_sign_is_the_mean_in_the_shared_basis() -> None:
    # Density 1 and no sign conflict (identical inputs): the disjoint mean gives the input back.
    (tv,) = _tvs(1, seed=8)
    np.testing.assert_allclose(_run("knots", [tv, tv.clone()]), tv.numpy(), atol=1e-5)


def test_knots_dare_drops_coefficients_with_the_seed() -> None:
    tvs = _tvs(2, seed=9)
    params = [InputParams(density=0.5)] * 2
    assert np.array_equal(_run("knots_dare", tvs, params, seed=1), _run("knots_dare", tvs, params, seed=1))
    assert not np.array_equal(_run("knots_dare", tvs, params, seed=1), _run("knots_dare", tvs, params, seed=2))


def test_model_stock_matches_the_reference_formula() -> None:
    tvs = _tvs(3, seed=10)
    shared = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11)) * 2
    tvs = [tv + shared for tv in tvs]  # correlated task vectors: cos θ well above 0
    xs = [x.ravel() for x in _np(tvs)]
    cosines = [xs[i] @ xs[j] / (np.linalg.norm(xs[i]) * np.linalg.norm(xs[j])) for i in range(3) for j in range(i + 1, 3)]
    cos = float(np.mean(cosines))
    t = 3 * cos / (1 + 2 * cos)
    expected = t * sum(_np(tvs)) / 3
    np.testing.assert_allclose(_run("model_stock", tvs), expected, atol=1e-5)
    assert 0 < t < 1


def test_model_stock_of_identical_inputs_is_that_input() -> None:
    (tv,) = _tvs(1, seed=12)
    np.testing.assert_allclose(_run("model_stock", [tv, tv.clone()]), tv.numpy(), atol=1e-5)


def test_nuslerp_matches_the_reference_formula() -> None:
    a, b = _tvs(2, seed=13)
    merged = _run("nuslerp", [a, b], [InputParams(weight=1.0), InputParams(weight=3.0)])
    v0, v1 = a.double().numpy().ravel(), b.double().numpy().ravel()
    omega = math.acos(v0 @ v1 / (np.linalg.norm(v0) * np.linalg.norm(v1)))
    t = 0.75
    expected = (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)
    np.testing.assert_allclose(merged.ravel(), expected, atol=1e-5)
    np.testing.assert_allclose(_run("nuslerp", [a, b], [InputParams(weight=2.0), InputParams(weight=0.0)]), a.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_svd_methods_average_tensors_that_are_not_matrices(name: str) -> None:
    tvs = _tvs(2, seed=14, shape=(16,))
    merged = _run(name, tvs, [InputParams(weight=1.0), InputParams(weight=3.0)])
    np.testing.assert_allclose(merged, (tvs[0] + 3 * tvs[1]).numpy() / 4, atol=1e-6)


def test_recipe_takes_the_subspace_parameters_and_checks_their_ranges() -> None:
    recipe = MergeRecipe.from_dict({
        "merge_method": "iso_cts", "models": [{"model": "a"}, {"model": "b"}],
        "parameters": {"common_share": 0.6, "rank_share": 0.25},
    })
    assert recipe.global_params().common_share == 0.6 and recipe.global_params().rank_share == 0.25
    with pytest.raises(ValidationError, match="common_share"):
        MergeRecipe.from_dict({"merge_method": "iso_cts", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"common_share": 1.5}})
    with pytest.raises(ValidationError, match="iso_c takes at least 2 inputs"):
        MergeRecipe.from_dict({"merge_method": "iso_c", "models": [{"model": "a"}]})
    with pytest.raises(ValidationError, match="must not sum to zero"):
        MergeRecipe.from_dict({
            "merge_method": "nuslerp",
            "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": -1.0}}],
        })

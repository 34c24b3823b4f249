"""Merge methods that work in the singular subspaces of the task vectors.

Why a module of their own: TIES and DARE decide per entry, which cannot see that two tasks
write along the same directions of a weight matrix; these methods look at each matrix's
singular vectors instead, which is where the interference between tasks lives.

- `tsv` (Task Singular Vectors merge, Gargiulo et al., CVPR 2025, arXiv 2412.00081): keep
  each task's top singular directions, make the stacked left and right bases orthonormal by
  their polar factors (orthogonal Procrustes), recombine with the tasks' singular values.
- `iso_c` / `iso_cts` (Marczak et al., ICML 2025, arXiv 2502.04959): flatten the spectrum of
  the summed task vector to its mean singular value (Iso-C); Iso-CTS first gives part of the
  rank to each task's own directions outside the common subspace.
- `knots` / `knots_dare` (Stoica et al., ICLR 2025, arXiv 2410.19735): one SVD of the
  task vectors side by side gives a basis they share; TIES (or DARE-TIES) merges the
  tasks' coefficients in that basis, built from the shared sparsify/consensus pieces.
- `model_stock` and `nuslerp`: mergekit's methods, so recipes brought from mergekit work.

Every SVD runs in float64 (the results are compared against written-out formulas and must
not depend on the order of the inputs beyond rounding), and only directions with a nonzero
singular value are used: a sum of LoRA updates has a low rank, and the arbitrary vectors an
SVD returns for its null space must not be inflated into the merge. Tensors that are not
matrices (biases, norms) take the weighted mean for the SVD methods, as the papers' code
does, and TIES for KnOTS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from adapterhub.merge.methods import (
    Consensus,
    GlobalParams,
    InputParams,
    Sparsify,
    _resolved,
    combine,
    register_merge_method,
    slerp_tensors,
    sparsify,
)

if TYPE_CHECKING:
    import torch

_NULL_TOLERANCE = 1e-6  # singular values below this share of the largest count as zero


def _thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of a float64 matrix, cut to the directions with a nonzero singular value."""
    import torch

    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return u[:, :0], s[:0], vh[:0]
    keep = int((s > s[0] * _NULL_TOLERANCE).sum())
    return u[:, :keep], s[:keep], vh[:keep]


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows, if wider than tall): P·Qᵀ of P·Σ·Qᵀ.

    This is the orthogonal Procrustes solution TSV uses to decorrelate stacked bases.
    """
    import torch

    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def _weighted_mean(task_vectors: Sequence[torch.Tensor], params: Sequence[InputParams], lambda_: float) -> torch.Tensor:
    return combine(task_vectors, params, consensus=Consensus.NONE, normalize=True, lambda_=lambda_)


def _weighted_sum64(task_vectors: Sequence[torch.Tensor], params: Sequence[InputParams]) -> torch.Tensor:
    total = task_vectors[0].double() * params[0].weight
    for tv, p in zip(task_vectors[1:], params[1:], strict=True):
        total = total + tv.double() * p.weight
    return total


@register_merge_method(
    "tsv", description="TSV-Merge: each task's top singular directions, bases decorrelated (Procrustes), recombined.",
)
def merge_tsv(
    task_vectors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    params: Sequence[InputParams],
    global_params: GlobalParams,
    generator: torch.Generator,
) -> torch.Tensor:
    """λ · U⊥ diag(S) V⊥ᵀ over the stacked top-k singular triplets of every wᵢτᵢ.

    k is `rank_share` of the matrix rank per task (default 1/number of tasks, the paper's
    choice, so the stacked bases fill the rank exactly). U⊥ and V⊥ are the polar factors of
    the stacked bases: the orthonormal bases nearest to them, which removes the overlap
    between tasks' directions that makes a plain sum double-count them.
    """
    import torch

    first = task_vectors[0]
    if first.dim() != 2:
        return _weighted_mean(task_vectors, params, global_params.lambda_)
    share = global_params.rank_share if global_params.rank_share is not None else 1.0 / len(task_vectors)
    keep = max(1, int(share * min(first.shape)))
    us, ss, vhs = [], [], []
    for tv, p in zip(task_vectors, params, strict=True):
        u, s, vh = _thin_svd(tv.double())
        us.append(u[:, :keep])
        ss.append(s[:keep] * p.weight)
        vhs.append(vh[:keep])
    s_all = torch.cat(ss)
    if s_all.numel() == 0:
        return torch.zeros_like(first)
    u_orth = polar_factor(torch.cat(us, dim=1))
    vh_orth = polar_factor(torch.cat(vhs, dim=0))
    merged = (u_orth * s_all) @ vh_orth
    return (merged * global_params.lambda_).to(first.dtype)


@register_merge_method(
    "iso_c", description="Iso-C: the summed task vector with its spectrum flattened to the mean singular value.",
    min_inputs=2,
)
def merge_iso_c(
    task_vectors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    params: Sequence[InputParams],
    global_params: GlobalParams,
    generator: torch.Generator,
) -> torch.Tensor:
    """λ · σ̄ U Vᵀ where U S Vᵀ = Σ wᵢτᵢ and σ̄ is the mean of S.

    An isotropic spectrum stops the few directions most tasks share from drowning the
    directions only one task uses (the paper's explanation of why task arithmetic forgets).
    """
    first = task_vectors[0]
    if first.dim() != 2:
        return _weighted_mean(task_vectors, params, global_params.lambda_)
    u, s, vh = _thin_svd(_weighted_sum64(task_vectors, params))
    if s.numel() == 0:
        return first.new_zeros(first.shape)
    return (s.mean() * global_params.lambda_ * (u @ vh)).to(first.dtype)


@register_merge_method(
    "iso_cts", description="Iso-CTS: common subspace of the sum plus each task's own directions, isotropic spectrum.",
    min_inputs=2,
)
def merge_iso_cts(
    task_vectors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    params: Sequence[InputParams],
    global_params: GlobalParams,
    generator: torch.Generator,
) -> torch.Tensor:
    """Iso-C over a basis made of the sum's top `common_share` directions and, for each task,
    its top directions of what the common subspace misses (τᵢ − U_c U_cᵀ τᵢ).

    Of the sum's rank r, k = common_share·r go to the common subspace and (r − k)/T to each of
    the T tasks (k absorbs the rounding, as in the reference code); the stacked bases are made
    orthonormal by their polar factors and share one singular value, the stacked values' mean.
    """
    import torch

    first = task_vectors[0]
    if first.dim() != 2:
        return _weighted_mean(task_vectors, params, global_params.lambda_)
    weighted = [tv.double() * p.weight for tv, p in zip(task_vectors, params, strict=True)]
    u, s, vh = _thin_svd(sum(weighted[1:], weighted[0]))
    rank = s.numel()
    if rank == 0:
        return first.new_zeros(first.shape)
    count = len(task_vectors)
    per_task = (rank - int(global_params.common_share * rank)) // count
    common = rank - per_task * count
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    if per_task > 0:
        common_u = u[:, :common]
        for tv in weighted:
            residual = tv - common_u @ (common_u.T @ tv)
            u_t, s_t, vh_t = _thin_svd(residual)
            us.append(u_t[:, :per_task])
            ss.append(s_t[:per_task])
            vhs.append(vh_t[:per_task])
    sigma = torch.cat(ss).mean()
    merged = sigma * (polar_factor(torch.cat(us, dim=1)) @ polar_factor(torch.cat(vhs, dim=0)))
    return (merged * global_params.lambda_).to(first.dtype)


def _shared_basis(matrices: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """U, S and the blocks Vᵢᵀ of the thin SVD of [M₁ | M₂ | …] (float64, null directions cut).

    When the rows are fewer than the stacked columns (the usual case: T task vectors side by
    side), U and S² come from the eigendecomposition of the m×m Gram matrix Σ MᵢMᵢᵀ and
    Vᵢᵀ = S⁻¹UᵀMᵢ: the same factors as the SVD of the m × T·n matrix, about 10× faster for 8
    SmolLM2-sized modules, and the wide V is never formed. Directions below `_NULL_TOLERANCE`
    of the largest singular value are cut before the division.
    """
    import torch

    rows = matrices[0].shape[0]
    columns = [m.shape[1] for m in matrices]
    if rows > sum(columns):
        u, s, vh = _thin_svd(torch.cat(list(matrices), dim=1))
        return u, s, list(torch.split(vh, columns, dim=1))
    gram = sum(m @ m.T for m in matrices[1:]) + matrices[0] @ matrices[0].T
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    order = torch.argsort(eigenvalues, descending=True)
    s = eigenvalues[order].clamp(min=0).sqrt()
    if s.numel() == 0 or s[0] <= 0:
        return eigenvectors[:, :0], s[:0], [m[:0] for m in matrices]
    keep = order[: int((s > s[0] * _NULL_TOLERANCE).sum())]
    u, s = eigenvectors[:, keep], s[: keep.numel()]
    return u, s, [(u.T @ m) / s.unsqueeze(1) for m in matrices]


def _define_knots(name: str, *, how: Sparsify, default_rescale: bool, description: str) -> None:
    """Register KnOTS with one sparsification; sign election and disjoint mean as in TIES."""

    def merge_fn(
        task_vectors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        *,
        params: Sequence[InputParams],
        global_params: GlobalParams,
        generator: torch.Generator,
    ) -> torch.Tensor:
        import torch

        rescale = _resolved(global_params.rescale, default_rescale)
        consensus = Consensus(global_params.consensus) if global_params.consensus is not None else Consensus.SUM
        normalize = _resolved(global_params.normalize, True)
        first = task_vectors[0]
        if first.dim() != 2:
            sparse = [sparsify(tv, how, p, generator, rescale=rescale) for tv, p in zip(task_vectors, params, strict=True)]
            return combine(sparse, params, consensus=consensus, normalize=normalize, lambda_=global_params.lambda_)
        # [τ₁ | τ₂ | …] = U S [V₁ᵀ | V₂ᵀ | …]: U S is shared, Vᵢᵀ holds task i's coefficients.
        u, s, coefficients = _shared_basis([tv.double() for tv in task_vectors])
        if s.numel() == 0:
            return torch.zeros_like(first)
        sparse = [sparsify(c, how, p, generator, rescale=rescale) for c, p in zip(coefficients, params, strict=True)]
        merged = combine(sparse, params, consensus=consensus, normalize=normalize, lambda_=global_params.lambda_)
        return ((u * s) @ merged).to(first.dtype)

    merge_fn.__name__ = merge_fn.__qualname__ = f"merge_{name}"
    merge_fn.__doc__ = description
    register_merge_method(
        name, description=description, uses_density=True,
        random=how is Sparsify.RANDOM, permutation_invariant=how is not Sparsify.RANDOM,
    )(merge_fn)


_define_knots(
    "knots", how=Sparsify.MAGNITUDE, default_rescale=False,
    description="KnOTS-TIES: SVD of the task vectors side by side, TIES on each task's coefficients in that basis.",
)
_define_knots(
    "knots_dare", how=Sparsify.RANDOM, default_rescale=True,
    description="KnOTS-DARE: SVD of the task vectors side by side, DARE-TIES on each task's coefficients there.",
)


@register_merge_method(
    "model_stock", description="Model Stock: the mean task vector scaled by t = N·cosθ / (1 + (N−1)·cosθ).",
    min_inputs=2,
)
def merge_model_stock(
    task_vectors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    params: Sequence[InputParams],
    global_params: GlobalParams,
    generator: torch.Generator,
) -> torch.Tensor:
    """Model Stock (Jang et al., arXiv 2403.19522) as mergekit computes it.

    θ is the mean pairwise angle between the flattened task vectors; the merge moves from the
    base towards the inputs' average by t = N·cosθ / (1 + (N−1)·cosθ), so nearly parallel
    task vectors keep their average and unrelated ones shrink towards the base. Weights are
    not used (as in mergekit).
    """
    import torch

    flat = [tv.double().flatten() for tv in task_vectors]
    cosines = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            norms = (flat[i].norm() * flat[j].norm()).clamp(min=1e-12)
            cosines.append((torch.dot(flat[i], flat[j]) / norms).clamp(-1.0, 1.0))
    cos_theta = torch.stack(cosines).mean()
    count = len(flat)
    denominator = 1 + (count - 1) * cos_theta
    t = count * cos_theta / denominator if denominator.abs() > 1e-12 else torch.zeros_like(cos_theta)
    mean = sum(tv.double() for tv in task_vectors) / count
    return (t * mean).to(task_vectors[0].dtype)


@register_merge_method(
    "nuslerp", description="NuSLERP: slerp of the two task vectors at t = w₂ / (w₁ + w₂) (mergekit's nuslerp).",
    min_inputs=2, max_inputs=2,
)
def merge_nuslerp(
    task_vectors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    params: Sequence[InputParams],
    global_params: GlobalParams,
    generator: torch.Generator,
) -> torch.Tensor:
    """Spherical interpolation of the task vectors (mergekit's nuslerp with a base model,
    flattened), the share of the second given by the weights instead of `t`.

    Interpolating task vectors rather than whole weights (`slerp`) keeps the base fixed, so
    the result is a valid adapter merge; swapping the inputs and their weights gives the same
    result.
    """
    first, second = task_vectors
    total = params[0].weight + params[1].weight
    return slerp_tensors(params[1].weight / total, first, second)

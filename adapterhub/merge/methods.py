"""Merge methods: typed pure functions over task vectors, registered by name.

Design decisions:

- A method sees only tensors of one module: the task vectors `τ_i` of its inputs (already
  zero where an input lacks the module), optionally the base weight, and its parameters. It
  returns the merged task vector. Files, streaming and low-rank bookkeeping live elsewhere,
  so every method is testable on random tensors against a written-out reference formula.
- TIES, DARE, breadcrumbs and DELLA are not separate code paths: they are compositions of
  three shared pieces, as in the papers and in mergekit's generalized task arithmetic:
  **sparsify** (none / magnitude top-k / random drop with rescale / magnitude outliers /
  DELLA's rank-dependent drop) × **consensus** (none / TIES sign election by total or count)
  × **weighting** (Σ wᵢτᵢ, optionally divided by the weights that took part, times λ).
  Default `normalize`/`rescale` per method follow mergekit 0.1.5 so users bringing a recipe
  get the same numbers; `rescale` restores a sparsified task vector's L1 norm (mergekit's
  definition; DARE's 1/density up to sampling noise, but exact for every draw).
- The registry refuses a duplicate name and checks the function's signature when it
  registers, so a malformed method fails at import, not in the middle of a merge.
- Randomness comes only from the `torch.Generator` the caller passes (seeded per module from
  the module name), so streaming order never changes a result.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from adapterhub.errors import AdapterhubError

if TYPE_CHECKING:
    import torch


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class InputParams:
    """Per-input parameters: its weight in the sum and the share of its entries kept."""

    weight: float = 1.0
    density: float = 1.0
    gamma: float = 0.01  # breadcrumbs: share of the largest-magnitude entries dropped as outliers
    epsilon: float = 0.15  # della: spread of keep probabilities around `density`


@dataclass(frozen=True)
class GlobalParams:
    """Parameters of the whole merge; `None` means the method's own default."""

    normalize: bool | None = None
    rescale: bool | None = None
    lambda_: float = 1.0
    t: float = 0.5  # slerp: 0 gives the first input, 1 the second
    consensus: str | None = None  # override a TIES method's sign election: "sum" or "count"
    seed: int = 0
    rank_share: float | None = None  # tsv: share of each input's rank kept (None: 1/number of inputs)
    common_share: float = 0.8  # iso_cts: share of the rank given to the common subspace


# ---------------------------------------------------------------------------------------------
# Shared pieces


class Sparsify(str, Enum):
    NONE = "none"
    MAGNITUDE = "magnitude"  # keep the top-k magnitudes (TIES)
    RANDOM = "random"  # drop at random, keep each entry with p = density (DARE)
    MAGNITUDE_OUTLIERS = "magnitude_outliers"  # drop the smallest and the gamma largest (breadcrumbs)
    DELLA = "della"  # drop at random with p rising with the magnitude rank (DELLA-merging)


class Consensus(str, Enum):
    NONE = "none"
    SUM = "sum"  # TIES: the sign of the summed weighted task vectors wins
    COUNT = "count"  # the sign held by more inputs wins


def rescale_to_l1(original: torch.Tensor, masked: torch.Tensor, *, eps: float = 1e-7) -> torch.Tensor:
    """Scale a sparsified task vector back to the L1 norm of the original.

    This is mergekit 0.1.5's `rescale` (and DARE's intent: keep the task vector's size after
    dropping entries). For a random drop it is the 1/density of the paper up to sampling
    noise; unlike 1/density it is exact for every draw and also applies to magnitude pruning.
    """
    before, after = original.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _largest(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` largest values; among equal values the lowest indices win.

    Selection by the exact threshold (`_kth_largest`, linear time) instead of a sort: the
    same set a stable descending sort would give, several times faster on large weights.
    """
    import torch

    if count >= flat.numel():
        return torch.ones_like(flat, dtype=torch.bool)
    if count <= 0:
        return torch.zeros_like(flat, dtype=torch.bool)
    threshold = _kth_largest(flat, count)
    mask = flat > threshold
    missing = count - int(mask.sum())
    if missing > 0:
        # The first `missing` entries equal to the threshold, by index (nonzero is ascending);
        # only the tied entries are listed, not a running count over the whole weight.
        mask[torch.nonzero(flat == threshold).flatten()[:missing]] = True
    return mask


_SAMPLE_SIZE = 1 << 16


def _kth_largest(flat: torch.Tensor, count: int) -> torch.Tensor:
    """The `count`-th largest value of a 1-D tensor, exactly (0 < count ≤ numel).

    `kthvalue` over a whole weight costs ~30 ns an entry (a copy, then random access);
    on large weights a strided sample first brackets the answer between two values, one
    counting pass checks the bracket holds it, and `kthvalue` runs only on the few entries
    inside (a ~2% window). A bracket that misses (heavy ties, odd layouts) falls back to the
    full `kthvalue`, so the result is always the exact order statistic.
    """
    import torch

    n = flat.numel()
    if n > 16 * _SAMPLE_SIZE:
        sample = torch.sort(flat[:: n // _SAMPLE_SIZE]).values
        size = sample.numel()
        position = (n - count) / n * size  # where the answer sits in the ascending sample
        margin = 4 * math.sqrt(size) + 8  # ~16 standard deviations of a sample quantile's rank
        low = sample[max(0, math.floor(position - margin))]
        high = sample[min(size - 1, math.ceil(position + margin))]
        above = int((flat > high).sum())
        if above < count:
            window = flat[(flat >= low) & (flat <= high)]
            if above + window.numel() >= count:
                return torch.kthvalue(window, window.numel() - (count - above) + 1).values
    return torch.kthvalue(flat, n - count + 1).values


def _smallest(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` smallest values; among equal values the lowest indices win.

    Negation is exact in floating point, so this is `_largest` of `-flat` with the same ties.
    """
    return _largest(-flat, count)


def magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Mask of the `density` share of entries with the largest magnitudes (at least one).

    Ties at the threshold go to the lowest flat indices, so the result is deterministic;
    mergekit's unstable argsort may keep other equal-magnitude entries, which is the only
    way the two can differ.
    """
    k = max(1, int(density * tensor.numel()))
    return _largest(tensor.abs().flatten().float(), k).view(tensor.shape)


def random_mask(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`."""
    import torch

    return torch.rand(tensor.shape, generator=generator, dtype=torch.float32) < density


def outlier_mask(tensor: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the `gamma` share of largest magnitudes and the smallest ones.

    `density` of the entries are kept: those ranked just below the top outliers. When
    density + gamma > 1 fewer outliers are dropped so the density still holds (mergekit's rule).
    """
    count = tensor.numel()
    keep_count = int(density * count)
    bottom_count = max(0, count - keep_count - int(gamma * count))
    magnitudes = tensor.abs().flatten().float()
    mask = _smallest(magnitudes, bottom_count + keep_count) & ~_smallest(magnitudes, bottom_count)
    return mask.view(tensor.shape)


def della_mask(tensor: torch.Tensor, density: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """DELLA (MAGPRUNE): keep probability rises linearly with the magnitude rank in each row.

    The entry ranked r (0 = smallest) of n in its row is kept with
    p = density − ε + 2ε·r/(n−1): the average keep rate stays `density` while large entries
    survive more often than in DARE.
    """
    import torch

    rows = tensor.reshape(1, -1) if tensor.dim() < 2 else tensor.reshape(tensor.shape[0], -1)
    n = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs().float(), dim=1, stable=True), dim=1).float()
    spread = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
    probability = (density - epsilon) + 2 * epsilon * spread
    keep = torch.rand(rows.shape, generator=generator, dtype=torch.float32) < probability
    return keep.reshape(tensor.shape)


def sign_consensus_mask(weighted: torch.Tensor, method: Consensus) -> torch.Tensor:
    """TIES sign election over the stacked weighted task vectors (dim 0 = inputs).

    An entry takes part when its sign equals the elected one; zero entries never do, and a
    zero total elects '+', as in the TIES reference code and mergekit.
    """
    import torch

    source = weighted if method is Consensus.SUM else weighted.sign()
    positive = source.sum(dim=0) >= 0
    # sign(w) == elected, without float sign/elected tensors: w > 0 where '+' won, w < 0
    # where '−' did (zeros and NaN take part in neither).
    return torch.where(positive, weighted > 0, weighted < 0)


def sparsify(
    tensor: torch.Tensor, how: Sparsify, params: InputParams, generator: torch.Generator, *, rescale: bool
) -> torch.Tensor:
    """Apply one sparsification to one task vector, then optionally restore its L1 norm."""
    if how is Sparsify.NONE or params.density >= 1:
        return tensor
    if how is Sparsify.MAGNITUDE:
        mask = magnitude_mask(tensor, params.density)
    elif how is Sparsify.RANDOM:
        mask = random_mask(tensor, params.density, generator)
    elif how is Sparsify.MAGNITUDE_OUTLIERS:
        mask = outlier_mask(tensor, params.density, params.gamma)
    else:
        mask = della_mask(tensor, params.density, params.epsilon, generator)
    masked = tensor * mask
    return rescale_to_l1(tensor, masked) if rescale else masked


def combine(
    task_vectors: Sequence[torch.Tensor],
    params: Sequence[InputParams],
    *,
    consensus: Consensus,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """Weighted sum of (sparsified) task vectors, with optional sign consensus and normalization.

    With consensus, each entry is divided by the sum of the weights of the inputs that agree
    with the elected sign (TIES' disjoint mean); without it, by the sum of all weights. A
    divisor of (near) zero is replaced by 1 so task arithmetic with weights summing to zero
    stays finite.
    """
    import torch

    # In place on the stack (a tensor of our own) wherever the values are the same as the
    # out-of-place formula: every weight-sized temporary costs a pass and fresh memory.
    weighted = torch.stack(list(task_vectors), dim=0)
    weights = torch.tensor([p.weight for p in params], dtype=weighted.dtype).view(-1, *([1] * (weighted.dim() - 1)))
    weighted.mul_(weights)
    if consensus is Consensus.NONE:
        merged = weighted.sum(dim=0)
        if normalize:
            divisor = weights.sum()
            merged.div_(divisor if divisor.abs() >= 1e-8 else 1.0)
    else:
        mask = sign_consensus_mask(weighted, consensus)
        divisor = (weights * mask).sum(dim=0) if normalize else None
        merged = weighted.mul_(mask).sum(dim=0)
        if divisor is not None:
            merged.div_(divisor.masked_fill_(divisor == 0, 1.0))
    if lambda_ != 1:
        merged.mul_(lambda_)
    return merged


def slerp_tensors(t: float, first: torch.Tensor, second: torch.Tensor, *, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation of two tensors treated as flat vectors (mergekit's formula).

    Nearly colinear inputs (|cos| > 0.9995) fall back to linear interpolation, where slerp is
    numerically meaningless and lerp is what it tends to.
    """
    import torch

    a, b = first.double().flatten(), second.double().flatten()
    a_norm, b_norm = a.norm(), b.norm()
    if a_norm < 1e-12 or b_norm < 1e-12:
        return ((1 - t) * first.double() + t * second.double()).to(first.dtype)
    dot = torch.dot(a / a_norm, b / b_norm).clamp(-1.0, 1.0)
    if dot.abs() > dot_threshold:
        return ((1 - t) * first.double() + t * second.double()).to(first.dtype)
    theta = torch.arccos(dot)
    sin_theta = torch.sin(theta)
    s0 = torch.sin((1 - t) * theta) / sin_theta
    s1 = torch.sin(t * theta) / sin_theta
    return (s0 * first.double() + s1 * second.double()).to(first.dtype)


# ---------------------------------------------------------------------------------------------
# The registry


class MergeFunction(Protocol):
    def __call__(
        self,
        task_vectors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        *,
        params: Sequence[InputParams],
        global_params: GlobalParams,
        generator: torch.Generator,
    ) -> torch.Tensor: ...


_REQUIRED_PARAMETERS = ("task_vectors", "base")
_REQUIRED_KEYWORDS = ("params", "global_params", "generator")


@dataclass(frozen=True)
class MergeMethod:
    """A registered method and the facts the engine plans with.

    `linear`: the result is Σ cᵢτᵢ with constants cᵢ (no per-entry choices), so LoRA inputs
    merge exactly by concatenating ranks. `uses_density`/`random`: which inputs matter.
    `needs_base`: the function reads the base weight (slerp interpolates whole weights).
    """

    name: str
    function: MergeFunction
    description: str
    linear: bool = False
    uses_density: bool = False
    random: bool = False
    needs_base: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None
    permutation_invariant: bool = True
    default_normalize: bool = False

    def linear_coefficients(self, params: Sequence[InputParams], global_params: GlobalParams) -> list[float]:
        """The cᵢ of a linear method's Σ cᵢτᵢ (used to build the exact rank concatenation)."""
        if not self.linear:
            raise ValueError(f"merge method {self.name!r} is not linear")
        normalize = self.default_normalize if global_params.normalize is None else global_params.normalize
        total = sum(p.weight for p in params)
        divisor = total if (normalize and abs(total) >= 1e-8) else 1.0
        return [p.weight / divisor * global_params.lambda_ for p in params]


_METHODS: dict[str, MergeMethod] = {}


def _check_signature(name: str, function: Callable[..., Any]) -> None:
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}
    problems = []
    if tuple(positional) != _REQUIRED_PARAMETERS:
        problems.append(f"positional parameters must be {_REQUIRED_PARAMETERS}, got {tuple(positional)}")
    missing = [k for k in _REQUIRED_KEYWORDS if k not in keywords]
    if missing:
        problems.append(f"missing keyword-only parameters {missing}")
    extra = keywords - set(_REQUIRED_KEYWORDS)
    if extra:
        problems.append(f"unexpected keyword-only parameters {sorted(extra)}")
    if problems:
        raise TypeError(f"merge method {name!r} has a malformed signature: " + "; ".join(problems))


def register_merge_method(
    name: str,
    *,
    description: str,
    linear: bool = False,
    uses_density: bool = False,
    random: bool = False,
    needs_base: bool = False,
    min_inputs: int = 1,
    max_inputs: int | None = None,
    permutation_invariant: bool = True,
    default_normalize: bool = False,
) -> Callable[[MergeFunction], MergeFunction]:
    """Decorator: register `function` under `name`; refuses duplicates and bad signatures."""

    def decorate(function: MergeFunction) -> MergeFunction:
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        _check_signature(name, function)
        _METHODS[name] = MergeMethod(
            name=name, function=function, description=description, linear=linear,
            uses_density=uses_density, random=random, needs_base=needs_base,
            min_inputs=min_inputs, max_inputs=max_inputs, permutation_invariant=permutation_invariant,
            default_normalize=default_normalize,
        )
        return function

    return decorate


def get_method(name: str) -> MergeMethod:
    """The method registered as `name`; an unknown name is a user error listing the valid ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise AdapterhubError(f"unknown merge method {name!r}; valid methods: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    """Every registered method name, sorted."""
    return sorted(_METHODS)


def _resolved(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def _define_task_arithmetic_family(
    name: str, *, sparsify_how: Sparsify, consensus: Consensus, default_normalize: bool, default_rescale: bool,
    description: str,
) -> None:
    """Register one point of the sparsify × consensus × weighting grid."""

    def merge_fn(
        task_vectors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        *,
        params: Sequence[InputParams],
        global_params: GlobalParams,
        generator: torch.Generator,
    ) -> torch.Tensor:
        rescale = _resolved(global_params.rescale, default_rescale)
        sparse = [sparsify(tv, sparsify_how, p, generator, rescale=rescale) for tv, p in zip(task_vectors, params, strict=True)]
        chosen = consensus
        if consensus is not Consensus.NONE and global_params.consensus is not None:
            chosen = Consensus(global_params.consensus)
        return combine(
            sparse, params, consensus=chosen,
            normalize=_resolved(global_params.normalize, default_normalize), lambda_=global_params.lambda_,
        )

    merge_fn.__name__ = merge_fn.__qualname__ = f"merge_{name}"
    merge_fn.__doc__ = description
    register_merge_method(
        name, description=description,
        linear=sparsify_how is Sparsify.NONE and consensus is Consensus.NONE,
        uses_density=sparsify_how is not Sparsify.NONE,
        random=sparsify_how in (Sparsify.RANDOM, Sparsify.DELLA),
        permutation_invariant=sparsify_how not in (Sparsify.RANDOM, Sparsify.DELLA),
        default_normalize=default_normalize,
    )(merge_fn)


_FAMILY = (
    # name, sparsify, consensus, normalize, rescale, description
    ("linear", Sparsify.NONE, Consensus.NONE, True, False, "Weighted average Σwᵢτᵢ / Σwᵢ."),
    ("task_arithmetic", Sparsify.NONE, Consensus.NONE, False, False, "λ·Σwᵢτᵢ; a negative weight subtracts a task."),
    ("magnitude_prune", Sparsify.MAGNITUDE, Consensus.NONE, True, False, "Keep each τᵢ's top-density magnitudes, then average."),
    ("ties", Sparsify.MAGNITUDE, Consensus.SUM, True, False, "TIES: trim to top-density magnitudes, elect signs, disjoint mean."),
    ("dare_linear", Sparsify.RANDOM, Consensus.NONE, False, True, "DARE: drop entries at random (keep p=density), rescale, sum."),
    ("dare_ties", Sparsify.RANDOM, Consensus.SUM, False, True, "DARE drop and rescale, then TIES sign election."),
    ("breadcrumbs", Sparsify.MAGNITUDE_OUTLIERS, Consensus.NONE, False, False, "Model Breadcrumbs: drop small entries and gamma outliers, sum."),
    ("breadcrumbs_ties", Sparsify.MAGNITUDE_OUTLIERS, Consensus.SUM, False, False, "Breadcrumbs with TIES sign election."),
    ("della", Sparsify.DELLA, Consensus.SUM, True, True, "DELLA: magnitude-ranked random drop (MAGPRUNE), sign election, mean."),
    ("della_linear", Sparsify.DELLA, Consensus.NONE, False, True, "DELLA drop without sign election, weighted sum."),
)

for _name, _how, _consensus, _normalize, _rescale, _description in _FAMILY:
    _define_task_arithmetic_family(
        _name, sparsify_how=_how, consensus=_consensus, default_normalize=_normalize,
        default_rescale=_rescale, description=_description,
    )


@register_merge_method(
    "slerp", description="Spherical interpolation of two models' weights at t (0: first, 1: second).",
    needs_base=True, min_inputs=2, max_inputs=2, permutation_invariant=False,
)
def merge_slerp(
    task_vectors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    params: Sequence[InputParams],
    global_params: GlobalParams,
    generator: torch.Generator,
) -> torch.Tensor:
    """Slerp the two *models* (base + τᵢ), as mergekit does, and return the result minus base.

    Interpolating whole weights rather than task vectors keeps slerp's meaning (the norm of
    a weight matrix is preserved); without a base weight it interpolates the task vectors.
    """
    first, second = task_vectors
    if base is None:
        return slerp_tensors(global_params.t, first, second)
    base_f = base.to(first.dtype)
    return slerp_tensors(global_params.t, base_f + first, base_f + second) - base_f


def parameter_problems(method: MergeMethod, params: Sequence[InputParams]) -> list[str]:
    """Parameter problems that depend on the method (DELLA's ε must keep p inside (0, 1))."""
    problems = []
    if method.name.startswith("della"):
        for index, p in enumerate(params):
            if p.density < 1 and (p.density - p.epsilon <= 0 or p.density + p.epsilon >= 1):
                problems.append(
                    f"input {index + 1}: della needs 0 < density − epsilon and density + epsilon < 1 "
                    f"(density {p.density}, epsilon {p.epsilon})"
                )
    if method.name == "nuslerp" and abs(sum(p.weight for p in params)) < 1e-8:
        problems.append("nuslerp: the two weights give the share of each input and must not sum to zero")
    for index, p in enumerate(params):
        if not math.isfinite(p.weight):
            problems.append(f"input {index + 1}: weight must be a finite number, got {p.weight}")
    return problems


# The subspace methods (TSV, Iso-C/CTS, KnOTS, Model Stock, NuSLERP) live in their own module
# and register themselves with the registry above when imported; imported last so every name
# they use exists.
from adapterhub.merge import subspace as _subspace  # noqa: E402,F401

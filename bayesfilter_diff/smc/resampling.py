"""Resampling schemes as pure functions ``(log_weights, num_samples, generator) -> indices``.

Batched over leading axes: ``log_weights`` of shape ``(..., N)`` gives ancestor indices of
shape ``(..., M)`` in ``[0, N)``. The uniforms are drawn apart from the inverse-CDF map
(:func:`inverse_cdf`), so the map can be tested on fixed inputs, as in blackjax's
``smc/resampling.py`` and nchopin/particles ``resampling.py``:

- multinomial: ``M`` i.i.d. uniforms (sorted);
- stratified: ``u_j = (j + U_j) / M``, one uniform per stratum;
- systematic: ``u_j = (j + U) / M``, one uniform per problem;
- residual: ``floor(M W_i)`` deterministic copies, the rest multinomial on the residual
  weights.

The cumulative sum of the weights is computed in float64 and the search clamps to the
last index, so float32 weights whose cumulative sum ends under 1 cannot produce an
out-of-range index.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "inverse_cdf",
    "multinomial",
    "stratified",
    "systematic",
    "residual",
    "RESAMPLERS",
    "get_resampler",
]


def _weights64(log_weights: Tensor) -> Tensor:
    lw = log_weights.double()
    return torch.softmax(lw, dim=-1)


def inverse_cdf(uniforms: Tensor, weights: Tensor) -> Tensor:
    """Indices ``a_j = min{i : sum_{k<=i} W_k > u_j}`` for ``uniforms`` in ``[0, 1)``.

    ``uniforms``: ``(..., M)``; ``weights``: ``(..., N)`` normalised (any float dtype).
    """
    cdf = torch.cumsum(weights.double(), dim=-1)
    idx = torch.searchsorted(cdf.contiguous(), uniforms.double().contiguous(), right=True)
    return idx.clamp_(max=weights.shape[-1] - 1)


def _check(log_weights: Tensor, num_samples: int) -> None:
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if log_weights.dim() < 1 or log_weights.shape[-1] < 1:
        raise ValueError("log_weights must have a non-empty last axis of particles")


def _rand(shape, generator, device) -> Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=device)


def multinomial(
    log_weights: Tensor, num_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """Multinomial resampling (i.i.d. draws from the weights)."""
    _check(log_weights, num_samples)
    u = _rand(log_weights.shape[:-1] + (num_samples,), generator, log_weights.device)
    return inverse_cdf(torch.sort(u, dim=-1).values, _weights64(log_weights))


def stratified(
    log_weights: Tensor, num_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """Stratified resampling: one uniform in each of ``M`` equal strata."""
    _check(log_weights, num_samples)
    u = _rand(log_weights.shape[:-1] + (num_samples,), generator, log_weights.device)
    j = torch.arange(num_samples, dtype=torch.float64, device=log_weights.device)
    return inverse_cdf((j + u) / num_samples, _weights64(log_weights))


def systematic(
    log_weights: Tensor, num_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """Systematic resampling: one uniform shared by the ``M`` strata of a problem."""
    _check(log_weights, num_samples)
    u = _rand(log_weights.shape[:-1] + (1,), generator, log_weights.device)
    j = torch.arange(num_samples, dtype=torch.float64, device=log_weights.device)
    return inverse_cdf((j + u) / num_samples, _weights64(log_weights))


def residual(
    log_weights: Tensor, num_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """Residual resampling: ``floor(M W_i)`` copies, then multinomial on the remainder.

    Batched without loops: the deterministic copies fill slots ``0 .. D-1`` of each problem
    through the inverse CDF of the counts, the multinomial draws fill the remaining slots.
    """
    _check(log_weights, num_samples)
    W = _weights64(log_weights)
    MW = num_samples * W
    counts = torch.floor(MW)
    D = counts.sum(-1, keepdim=True)  # (..., 1) deterministic copies per problem
    j = torch.arange(num_samples, dtype=torch.float64, device=W.device)
    # deterministic part: slot j < D takes index searchsorted(cumsum(counts), j, right)
    det = torch.searchsorted(
        torch.cumsum(counts, -1).contiguous(),
        j.expand(W.shape[:-1] + (num_samples,)).contiguous(),
        right=True,
    )
    det = det.clamp_(max=W.shape[-1] - 1)
    R = (num_samples - D).clamp_min(1.0)
    res_w = (MW - counts) / R
    res_w = res_w / res_w.sum(-1, keepdim=True).clamp_min(1e-300)
    # i.i.d. (unsorted) draws: the slots j >= D must not get the largest uniforms only
    rnd = inverse_cdf(_rand(W.shape[:-1] + (num_samples,), generator, W.device), res_w)
    return torch.where(j < D, det, rnd)


RESAMPLERS: dict[str, Callable[..., Tensor]] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def get_resampler(name: str) -> Callable[..., Tensor]:
    """The resampling function called ``name`` (one of :data:`RESAMPLERS`)."""
    try:
        return RESAMPLERS[name]
    except KeyError:
        raise ValueError(f"resampling must be one of {sorted(RESAMPLERS)}, got {name!r}") from None

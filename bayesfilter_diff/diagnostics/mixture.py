"""Diagnostics against an exact Gaussian-mixture posterior: mode weights and moments.

The hardest part of a multi-modal posterior is to put the right mass on each mode. With
the exact posterior ``sum_k w_k N(m_k, C_k)`` the weights a sample set implies are

    w_hat_k = sum_i W_i p(k | x_i),

the (weighted) average of the exact responsibilities, which is an unbiased estimate of
``w_k`` for exact draws (``E[p(k | X)] = w_k``), and does not need to assign samples to
modes by hand. :func:`mixture_weight_error` reports the total variation
``(1/2) sum_k |w_hat_k - w_k|``. :func:`moment_errors` compares the first two moments.
:func:`marginal_mixture` gives the exact marginal of a mixture on a subset of coordinates
(a mixture with the sub-means and sub-covariances), used by the plots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..priors.gmm import GaussianMixture
from ..result import Result
from ._utils import sample_set, uniform_or
from .distances import weighted_moments

__all__ = [
    "implied_component_weights",
    "mixture_weight_error",
    "moment_errors",
    "marginal_mixture",
]


def _check_mixture(posterior) -> None:
    if not isinstance(posterior, GaussianMixture):
        raise TypeError(f"posterior must be a GaussianMixture, got {type(posterior).__name__}")
    if len(posterior.batch_shape) > 1:
        raise ValueError("posterior may have at most one batch axis")


def _samples_for(samples, weights, posterior) -> tuple[Tensor, Tensor, bool]:
    X, W, batched = sample_set(samples, weights, "samples")
    if X.shape[-1] != posterior.dim:
        raise ValueError(
            f"samples have dimension {X.shape[-1]} but the posterior has dimension {posterior.dim}"
        )
    nb = len(posterior.batch_shape)
    if nb and (not batched or X.shape[0] != posterior.batch_shape[0]):
        raise ValueError(
            f"the posterior is batched over {posterior.batch_shape[0]} problems: samples must "
            f"have shape ({posterior.batch_shape[0]}, N, {posterior.dim}), got "
            f"{tuple(X.shape) if batched else tuple(X.shape[1:])}"
        )
    return X, uniform_or(W, X.shape[:2], X.device), batched


def implied_component_weights(
    samples: Tensor | Result, posterior: GaussianMixture, weights: Tensor | None = None
) -> Tensor:
    """Component weights implied by samples: ``w_hat_k = sum_i W_i p(k | x_i)``.

    Parameters
    ----------
    samples
        ``(N, d)`` or ``(B, N, d)`` (matching a posterior batched over ``B`` problems), or a
        Result (its weights are used).
    posterior
        The exact posterior mixture.
    weights
        Non-negative sample weights ``(N,)`` / ``(B, N)`` (normalised here), or ``None``.

    Returns
    -------
    Tensor
        ``(B, K)`` or ``(K,)`` float64.
    """
    _check_mixture(posterior)
    X, W, batched = _samples_for(samples, weights, posterior)
    r = (
        posterior.component_log_responsibilities(X.to(posterior.means.dtype)).double().exp()
    )  # (B, N, K)
    w_hat = (W.unsqueeze(-1) * r).sum(1)
    return w_hat if batched else w_hat[0]


def mixture_weight_error(
    samples: Tensor | Result, posterior: GaussianMixture, weights: Tensor | None = None
) -> Tensor:
    """Total variation between the exact component weights and those the samples imply.

    ``TV = (1/2) sum_k |w_hat_k - w_k|`` in ``[0, 1]`` with ``w_hat`` from
    :func:`implied_component_weights`. For ``N`` exact draws its size is
    ``O(sqrt(K / N))`` (the Monte Carlo error of ``w_hat``), not zero.

    Returns
    -------
    Tensor
        ``(B,)`` or a scalar, float64.
    """
    w_hat = implied_component_weights(samples, posterior, weights)
    return 0.5 * (w_hat - posterior.weights.double()).abs().sum(-1)


def moment_errors(
    samples: Tensor | Result, posterior: GaussianMixture, weights: Tensor | None = None
) -> dict[str, Tensor]:
    """Errors of the (weighted) sample mean and covariance against the exact posterior.

    With ``m, S`` the exact mean and covariance and ``m_hat, S_hat`` the weighted sample
    moments (the covariance with the ``1 / (1 - sum W_i^2)`` correction, unbiased for
    uniform weights):

    - ``"mean"``: ``||m_hat - m|| / ||m||`` (relative error; ``inf`` when ``m = 0``);
    - ``"mean_std"``: ``||m_hat - m|| / sqrt(tr S)``, the error in units of the posterior
      spread (well defined at ``m = 0``; about ``1 / sqrt(ESS)`` for exact draws);
    - ``"cov"``: ``||S_hat - S||_F / ||S||_F`` (relative Frobenius error).

    Returns
    -------
    dict of Tensor
        Each ``(B,)`` or a scalar, float64.
    """
    _check_mixture(posterior)
    X, W, batched = _samples_for(samples, weights, posterior)
    if X.shape[1] < 2:
        raise ValueError("moment_errors needs at least two samples")
    m_hat, S_hat = weighted_moments(X, W)
    m = posterior.mean().double().reshape(-1, posterior.dim)
    S = posterior.covariance().double().reshape(-1, posterior.dim, posterior.dim)
    dm = (m_hat - m).norm(dim=-1)
    out = {
        "mean": dm / m.norm(dim=-1),
        "mean_std": dm / torch.diagonal(S, dim1=-2, dim2=-1).sum(-1).sqrt(),
        "cov": torch.linalg.matrix_norm(S_hat - S) / torch.linalg.matrix_norm(S),
    }
    return out if batched else {k: v[0] for k, v in out.items()}


def marginal_mixture(mixture: GaussianMixture, dims: Sequence[int]) -> GaussianMixture:
    """The exact marginal of ``mixture`` on the coordinates ``dims``.

    The marginal of ``sum_k w_k N(mu_k, S_k)`` on coordinates ``I`` is
    ``sum_k w_k N(mu_k[I], S_k[I, I])``: same weights, sub-means, sub-covariances.
    Isotropic and diagonal covariances stay so.
    """
    _check_mixture(mixture)
    idx = [int(i) for i in dims]
    d = mixture.dim
    if not idx or any(not -d <= i < d for i in idx) or len({i % d for i in idx}) != len(idx):
        raise ValueError(f"dims must be distinct coordinates in [0, {d}), got {tuple(dims)}")
    ix = torch.as_tensor([i % d for i in idx], device=mixture.means.device)
    means = mixture.means.index_select(-1, ix)
    if mixture.kind == "iso":
        cov = mixture.covariances
    elif mixture.kind == "diag":
        cov = mixture.covariances.index_select(-1, ix)
    else:
        cov = mixture.covariances.index_select(-1, ix).index_select(-2, ix)
    return GaussianMixture(mixture.weights, means, cov, validate=False)

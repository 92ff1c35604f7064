"""Log-space particle weights: normalisation, ESS and evidence increments.

All functions work on ``(..., N)`` tensors of log-weights, batched over leading axes
(independent problems). Following nchopin/particles ``resampling.py`` (the ``Weights``
helper): ``W = exp(lw - logsumexp(lw))``, ``ESS = 1 / sum W^2``, and the log-mean-exp of
the weights is the increment of the log-evidence estimate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["normalize", "ess", "log_mean_exp", "log_evidence_increment"]


def normalize(log_weights: Tensor) -> Tensor:
    """Normalised log-weights ``lw - logsumexp(lw)`` along the last axis."""
    return log_weights - torch.logsumexp(log_weights, dim=-1, keepdim=True)


def ess(log_weights: Tensor) -> Tensor:
    """Effective sample size ``1 / sum W_i^2`` along the last axis (in ``[1, N]``)."""
    lw = normalize(log_weights)
    return torch.exp(-torch.logsumexp(2 * lw, dim=-1))


def log_mean_exp(log_weights: Tensor) -> Tensor:
    """``log((1/N) sum_i exp(lw_i))`` along the last axis."""
    return torch.logsumexp(log_weights, dim=-1) - math.log(log_weights.shape[-1])


def log_evidence_increment(log_weights_prev: Tensor, log_increments: Tensor) -> Tensor:
    """``log sum_i W_{i,prev} exp(g_i)``: one factor of the SMC evidence estimate."""
    return torch.logsumexp(normalize(log_weights_prev) + log_increments, dim=-1)

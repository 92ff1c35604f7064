"""Diagnostics of weighted (SMC) samplers read from a :class:`~bayesfilter_diff.Result`.

The loop that drives every sampler (:mod:`bayesfilter_diff.samplers.loop`) records in
:class:`~bayesfilter_diff.result.RunInfo`, per reweighting and problem, the effective sample
size before any resampling (``info.ess``), whether the problem was then resampled
(``info.resampled``) and the running log-evidence estimate (``info.log_evidence``); entry
``k < num_steps`` is the weighting before move ``k``, the last entry the final weighting.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..result import Result

__all__ = ["ess_trace", "resampling_events", "log_evidence_error"]


def _check_result(result) -> None:
    if not isinstance(result, Result):
        raise TypeError(f"result must be a Result, got {type(result).__name__}")


def _trace(result: Result, key: str, what: str) -> Tensor:
    _check_result(result)
    t = getattr(result.info, key, None)
    if t is None:
        raise ValueError(
            f"result has no {what} trace (info.{key}): it comes from an unweighted sampler "
            "or a weighted one with no steps"
        )
    return t if result.batched else t[:, 0]


def ess_trace(result: Result, relative: bool = False) -> Tensor:
    """Effective sample size after each reweighting, before resampling.

    Parameters
    ----------
    result
        A weighted sampler's Result.
    relative
        Divide by the number of particles ``N`` (values in ``[1/N, 1]``).

    Returns
    -------
    Tensor
        ``(num_steps + 1, B)`` for a batched problem, ``(num_steps + 1,)`` otherwise
        (float64).
    """
    e = _trace(result, "ess", "ESS").double()
    return e / result.num_samples if relative else e


def resampling_events(result: Result) -> Tensor:
    """Whether each problem was resampled after each reweighting: bool
    ``(num_steps + 1, B)`` or ``(num_steps + 1,)``. ``resampling_events(res).sum(0)`` counts them per problem."""
    return _trace(result, "resampled", "resampling").bool()


def log_evidence_error(result: Result, exact_log_evidence: Tensor | float) -> Tensor:
    """``log Z_hat - log Z``: the error of the sampler's log-evidence estimate.

    The SMC estimate ``Z_hat`` is unbiased for ``Z``, so ``log Z_hat`` is biased low by about
    ``Var(Z_hat / Z) / 2``; the error shrinks like ``1 / N``.

    Returns
    -------
    Tensor
        ``(B,)`` or a scalar, float64.
    """
    _check_result(result)
    if result.log_evidence is None:
        raise ValueError("result has no log-evidence estimate (result.log_evidence is None)")
    est = result.log_evidence.double()
    exact = torch.as_tensor(exact_log_evidence, dtype=torch.float64, device=est.device)
    try:
        torch.broadcast_shapes(est.shape, exact.shape)
    except RuntimeError:
        raise ValueError(
            f"exact_log_evidence of shape {tuple(exact.shape)} does not match the estimate's "
            f"shape {tuple(est.shape)}"
        ) from None
    return est - exact

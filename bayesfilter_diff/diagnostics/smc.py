"""Diagnostics of weighted (SMC) samplers read from a :class:`~bayesfilter_diff.Result`.

The loop that drives every sampler (:mod:`bayesfilter_diff.samplers.loop`) records in
:class:`~bayesfilter_diff.result.RunInfo`, per reweighting and problem, the effective sample
size before any resampling (``info.ess``), whether the problem was then resampled
(``info.resampled``) and the running log-evidence estimate (``info.log_evidence``); entry
``k < num_steps`` is the weighting before move ``k``, the last entry the final weighting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..result import Result

__all__ = [
    "ess_trace",
    "resampling_events",
    "log_evidence_error",
    "EvidenceEstimate",
    "pooled_log_evidence",
    "log_bayes_factor",
]


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


@dataclass(frozen=True)
class EvidenceEstimate:
    """A log-evidence (or log Bayes factor) with its Monte Carlo standard error and the
    number of independent runs it pools."""

    value: float
    std_error: float
    runs: int


def _log_evidences(runs: Any) -> Tensor:
    """Independent runs' log-evidence estimates as a float64 vector: a tensor ``(R,)``, or a
    sequence of numbers, Results, Posteriors (anything with ``log_evidence``)."""
    if isinstance(runs, Tensor):
        v = runs.detach().double().reshape(-1)
    elif isinstance(runs, Sequence) and not isinstance(runs, str) and len(runs) > 0:
        vals = []
        for i, r in enumerate(runs):
            z = getattr(r, "log_evidence", r)
            if z is None:
                raise ValueError(f"run {i} has no evidence estimate (an unweighted sampler)")
            z = torch.as_tensor(z, dtype=torch.float64)
            if z.numel() != 1:
                raise ValueError(
                    f"run {i} holds {z.numel()} evidence estimates (a batch of problems): "
                    "pass its log_evidence tensor (one entry per independent copy) instead"
                )
            vals.append(z.reshape(()))
        v = torch.stack(vals)
    else:
        raise TypeError(
            "runs must be a tensor of log-evidences or a non-empty sequence of numbers, "
            f"Results or Posteriors; got {type(runs).__name__}"
        )
    if v.numel() < 2:
        raise ValueError("a Monte Carlo error needs at least 2 independent runs")
    return v


def pooled_log_evidence(runs: Any) -> EvidenceEstimate:
    """Pool independent unbiased evidence estimates ``Z_r`` (SMC runs with different
    generators, or independent copies of a problem in one batch): ``log mean_r Z_r``, still
    unbiased in ``Z``, with the delta-method standard error of the log,
    ``sd_r(Z_r) / (sqrt(R) mean_r(Z_r))`` (computed stably in log space)."""
    lz = _log_evidences(runs)
    R = lz.numel()
    m = torch.logsumexp(lz, 0) - math.log(R)
    rel = torch.exp(lz - m)  # Z_r / mean(Z)
    se = float(rel.std() / math.sqrt(R))
    return EvidenceEstimate(float(m), se, R)


def log_bayes_factor(runs_a: Any, runs_b: Any) -> EvidenceEstimate:
    """``log p(y | model a) - log p(y | model b)`` from independent runs of each model
    (:func:`pooled_log_evidence`), with the standard error of the difference (the two
    models' runs independent)."""
    a, b = pooled_log_evidence(runs_a), pooled_log_evidence(runs_b)
    return EvidenceEstimate(
        a.value - b.value, math.hypot(a.std_error, b.std_error), min(a.runs, b.runs)
    )

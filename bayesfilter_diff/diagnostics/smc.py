"""Diagnostics of weighted (SMC) samplers read from a :class:`~bayesfilter_diff.Result`.

The loop that drives every sampler (:mod:`bayesfilter_diff.samplers.loop`) records in
:class:`~bayesfilter_diff.result.RunInfo`, per reweighting and problem, the effective sample
size before any resampling (``info.ess``), whether the problem was then resampled
(``info.resampled``) and the running log-evidence estimate (``info.log_evidence``); entry
``k < num_steps`` is the weighting before move ``k``, the last entry the final weighting.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..result import Result
from ..smc.particles import MIN_LINEAGES, distinct_count, genealogy_ess, genealogy_variance

__all__ = [
    "ess_trace",
    "resampling_events",
    "log_evidence_error",
    "EvidenceEstimate",
    "pooled_log_evidence",
    "log_bayes_factor",
    "MeanEstimate",
    "runs_mcse",
    "genealogy_mcse",
    "StepCheck",
    "step_check",
    "ReferenceCheck",
    "reference_check",
    "RunsCheck",
    "runs_check",
    "pool_runs",
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


@dataclass(frozen=True)
class MeanEstimate:
    """A posterior mean with its Monte Carlo standard error.

    ``value`` and ``std_error`` have the shape of the test function's value (``event``, or
    ``(B, *event)`` per problem for :func:`genealogy_mcse`); ``runs`` is the number of
    independent runs pooled (:func:`runs_mcse`), ``lineages`` the number of distinct
    time-0 ancestors the genealogy estimate rests on (:func:`genealogy_mcse`)."""

    value: Tensor
    std_error: Tensor
    runs: int = 1
    lineages: Tensor | None = None


def _weighted_mean(res: Result, fn) -> tuple[Tensor, Tensor, Tensor]:
    """Per problem: ``W`` ``(B, N)``, ``phi`` ``(B, N, k)`` and the weighted mean ``(B, k)``."""
    x = res.samples if res.batched else res.samples.unsqueeze(0)
    W = res.weights().double()
    W = W if res.batched else W.unsqueeze(0)
    phi = (x if fn is None else fn(x)).double()
    if phi.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"fn must map samples (B, N, ...) to (B, N, ...) values, got {tuple(phi.shape)}"
        )
    phi = phi.reshape(phi.shape[:2] + (-1,))
    return W, phi, (W[..., None] * phi).sum(1)


def runs_mcse(runs: Any, fn=None) -> MeanEstimate:
    """The posterior mean of ``fn(x)`` (``x`` by default) pooled over independent runs, with
    its Monte Carlo standard error from their spread (``sd_r / sqrt(R)``).

    ``runs``: a sequence of unbatched Results or Posteriors of the same problem (different
    generators), or one batched Result whose problems are independent copies of one
    observation. This is the error to trust for SMC output: the draws of one run share
    ancestors, so within-run statistics (ArviZ's ESS / MCSE of one chain) overstate the
    precision, often several-fold.
    """
    if isinstance(runs, Result):
        if not runs.batched or runs.samples.shape[0] < 2:
            raise ValueError("one Result must be batched over >= 2 independent copies")
        means = _weighted_mean(runs, fn)[2]
        event = tuple(runs.samples.shape[2:]) if fn is None else None
    elif isinstance(runs, Sequence) and not isinstance(runs, str) and len(runs) >= 2:
        rs: list[Result] = []
        for i, r in enumerate(runs):
            r = getattr(r, "result", r)
            if not isinstance(r, Result) or r.batched:
                raise ValueError(f"run {i} must be an unbatched Result or Posterior")
            rs.append(r)
        means = torch.cat([_weighted_mean(r, fn)[2] for r in rs])
        event = tuple(rs[0].samples.shape[1:]) if fn is None else None
    else:
        raise ValueError(
            "runs must be >= 2 independent runs: a sequence of Results / Posteriors, or one "
            "Result batched over independent copies"
        )
    R = means.shape[0]
    value, se = means.mean(0), means.std(0) / math.sqrt(R)
    if event is not None:
        value, se = value.reshape(event), se.reshape(event)
    return MeanEstimate(value, se, R)


def genealogy_mcse(result: Result, fn=None, min_lineages: int = MIN_LINEAGES) -> MeanEstimate:
    """The Monte Carlo standard error of one SMC run's posterior mean of ``fn(x)``, from its
    genealogy (Chan & Lai 2013; Lee & Whiteley 2018): with ``E_i`` the time-0 ancestor of
    final particle ``i`` and ``W_i`` its weight,
    ``Var ~ sum_e (sum_{i: E_i = e} W_i (phi_i - phi_hat))^2``.

    The estimate needs many surviving lineages: with few (long runs, sharp likelihoods)
    it is biased low (measured, 128 copies of a 3-D Gaussian problem: variance ratio to
    the copies' spread 0.8-1.3 with 180-300 lineages, 0.63-0.98 with 32-38), so below
    ``min_lineages`` distinct ancestors a
    :class:`~bayesfilter_diff.PosteriorQualityWarning` says to use independent runs
    (:func:`runs_mcse`) instead. Per problem: ``value`` / ``std_error`` ``(B, *event)``
    (unbatched: ``event``).
    """
    import warnings

    from ..errors import PosteriorQualityWarning

    _check_result(result)
    roots = result.info.roots
    if roots is None:
        raise ValueError("this Result has no genealogy (info.roots): an unweighted sampler?")
    W, phi, _ = _weighted_mean(result, fn)
    idx = roots.to(phi.device).long()
    idx = idx if result.batched else idx.reshape(1, -1)
    mean, var = genealogy_variance(W, phi, idx)  # (B, k) each
    lineages = distinct_count(idx)
    if bool((lineages < min_lineages).any()):
        warnings.warn(
            f"the genealogy estimate of the Monte Carlo error rests on {int(lineages.min())} "
            f"surviving time-0 lineage(s) (< {min_lineages}): it underestimates the error; "
            "use independent runs (diagnostics.runs_mcse)",
            PosteriorQualityWarning,
            stacklevel=2,
        )
    shape = tuple(phi.shape[:1]) + (
        tuple(result.samples.shape[2 if result.batched else 1 :]) if fn is None else (-1,)
    )
    value, se = mean.reshape(shape), var.sqrt().reshape(shape)
    if not result.batched:
        value, se = value[0], se[0]
    return MeanEstimate(value, se, 1, lineages)


@dataclass(frozen=True)
class StepCheck:
    """One sampler at ``n`` and ``factor n`` steps (:func:`step_check`): does the answer
    move beyond its Monte Carlo error when the steps grow?

    ``results``: the two runs' Results (coarse, fine). Per problem ``(B,)`` (unbatched: a
    scalar), float64:

    - ``log_evidence_shift``: fine minus coarse log-evidence (``None`` for samplers without
      an evidence), with ``log_evidence_se``, the Monte Carlo sd of that difference (the
      two runs' ``info.log_evidence_se`` combined);
    - ``mean_shift``: the largest over coordinates of ``|mean_fine - mean_coarse|`` in
      units of the fine run's posterior sd, with ``mean_z``, the same difference over its
      Monte Carlo error (genealogy errors for weighted runs, ``sd / sqrt(N)`` otherwise);
    - ``moved``: bool, the evidence moved by more than 4 of its standard errors or a mean
      by more than the two-sided ``1e-3 / d`` normal line (``d`` coordinates).

    For an error of first order in the step (the DDPM / DDIM kernels: ``O(1 / n)``), the
    fine run's own discretisation error is about ``shift / (factor - 1)``, and
    ``log_evidence_extrapolated`` removes it (Richardson: ``fine + shift / (factor - 1)``,
    with ``log_evidence_extrapolated_se``, its Monte Carlo sd from the two runs'; ``None``
    without evidences). Measured (N = 4096, two seeds each; errors against the exact
    evidence, extrapolated sd 0.011-0.05): a 2-D prior of three narrow modes, data between
    them, the default TDS at 100 / 200 steps +0.118 / +0.060 -> +0.001 and +0.116 / +0.065
    -> +0.015; two modes at +-3 in d = 4, data between, noise 1e-2: +0.096 / +0.055 ->
    +0.015 and +0.118 / +0.030 -> -0.058; the README mixture, TDS's DDIM kernel at 20 / 40
    steps: +0.145 / +0.118 -> +0.091 and +0.210 / +0.104 -> -0.001. It assumes the error is
    first order: compare two extrapolations (``n``, ``2n``; ``2n``, ``4n``) before relying
    on it."""

    steps: tuple[int, int]
    results: tuple[Result, Result]
    log_evidence_shift: Tensor | None
    log_evidence_se: Tensor | None
    mean_shift: Tensor
    mean_z: Tensor
    moved: Tensor
    log_evidence_extrapolated: Tensor | None = None
    log_evidence_extrapolated_se: Tensor | None = None


def _mean_and_error(res: Result) -> tuple[Tensor, Tensor, Tensor]:
    """Per problem ``(B, k)``: the posterior mean, its Monte Carlo error and the posterior sd."""
    W, phi, mean = _weighted_mean(res, None)
    sd = (W[..., None] * (phi - mean[:, None]) ** 2).sum(1).sqrt()
    roots = res.info.roots
    if res.log_weights is not None and roots is not None:
        idx = roots.to(phi.device).long()
        idx = idx if res.batched else idx.reshape(1, -1)
        _, var = genealogy_variance(W, phi, idx)
        return mean, var.sqrt(), sd
    return mean, sd / math.sqrt(phi.shape[1]), sd


def step_check(
    sampler: Any,
    prior: Any,
    problem: Any,
    num_samples: int,
    generator: torch.Generator | None = None,
    warn: bool = True,
    factor: int = 2,
    *,
    stacklevel: int = 2,
) -> StepCheck:
    """Run ``sampler`` as given (``n = sampler.num_steps``) and with ``factor n`` steps on
    the same problem, and compare (:class:`StepCheck`). A run is exact for its discretised
    chain, not for the continuous model, and nothing in one run shows the difference; this
    shows it at the cost of a second run of twice the steps. With ``warn``, a
    :class:`~bayesfilter_diff.PosteriorQualityWarning` says when the answer moved.

    It sees a discretisation error once the shift exceeds 4 Monte Carlo sd of the
    difference, so its power grows with ``num_samples`` and ``factor`` (an ``O(1 / n)``
    error moves by ``(1 - 1 / factor)`` of the coarse run's). Measured on the README mixture
    (``2 x 8`` operator, ``sigma_y = 0.1``; TDS with its DDIM kernel, 20 -> 40 steps, whose
    log-evidence errors are +0.245 and +0.149): N = 8192 moved (-0.096, sd 0.021); N = 1024
    did not (-0.09, sd 0.06). With ``reverse_variance="analytic"`` (50 -> 100 steps, errors
    -0.017 / -0.012) it stayed (+0.005, sd 0.03). ``stacklevel`` is passed to the warning."""
    import warnings

    from ..errors import PosteriorQualityWarning

    n = getattr(sampler, "num_steps", None)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise ValueError(f"factor must be an integer >= 2, got {factor!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(
            f"step_check needs a sampler with an integer num_steps >= 1, got "
            f"{type(sampler).__name__} with num_steps={n!r}"
        )
    fine_sampler = dataclasses.replace(sampler, num_steps=factor * n)
    coarse = sampler.sample(prior, problem, num_samples, generator=generator)
    fine = fine_sampler.sample(prior, problem, num_samples, generator=generator)
    m0, e0, _ = _mean_and_error(coarse)
    m1, e1, sd1 = _mean_and_error(fine)
    diff = (m1 - m0).abs()
    mean_shift = (diff / sd1.clamp_min(1e-300)).amax(-1)
    mean_z = (diff / (e0**2 + e1**2).sqrt().clamp_min(1e-300)).amax(-1)
    d = m1.shape[-1]
    from scipy import stats

    z_line = float(stats.norm.isf(1e-3 / (2 * d)))
    moved = mean_z > z_line
    shift = se = extra = extra_se = None
    if coarse.log_evidence is not None and fine.log_evidence is not None:
        shift = (fine.log_evidence.double() - coarse.log_evidence.double()).reshape(-1)
        c = 1.0 / (factor - 1)  # Richardson: fine + c shift, a first-order error removed
        extra = fine.log_evidence.double().reshape(-1) + c * shift
        s0, s1 = coarse.info.log_evidence_se, fine.info.log_evidence_se
        if s0 is not None and s1 is not None:
            se = (s0.double() ** 2 + s1.double() ** 2).sqrt().reshape(-1).to(shift.device)
            moved = moved | (shift.abs() > 4 * se)
            # the sd of (1 + c) fine - c coarse
            extra_se = (((1 + c) * s1.double()) ** 2 + (c * s0.double()) ** 2).sqrt()
            extra_se = extra_se.reshape(-1).to(extra.device)
    if warn and bool(moved.any()):
        probs = torch.nonzero(moved).flatten().tolist()
        parts = []
        if shift is not None:
            i = int(shift.abs().argmax())
            parts.append(
                f"the log-evidence moved by {float(shift[i]):+.3g}"
                + (f" (Monte Carlo sd {float(se[i]):.2g})" if se is not None else "")
            )
        parts.append(
            f"a posterior mean by up to {float(mean_shift.max()):.2g} posterior sd "
            f"({float(mean_z.max()):.3g} Monte Carlo errors)"
        )
        warnings.warn(
            f"{type(sampler).__name__}: from {n} to {factor * n} steps "
            + " and ".join(parts)
            + f"{'' if not problem.batched else f' for problem(s) {probs}'}: the time "
            "discretisation matters at this number of steps; the finer run's own error is "
            f"about 1 / {factor - 1} of that shift (first order)"
            + (
                f"; extrapolated, the log-evidence is {float(extra[int(shift.abs().argmax())]):.4g} "
                "(StepCheck.log_evidence_extrapolated)"
                if extra is not None and shift is not None
                else ""
            )
            + ". Remedies: more steps "
            f"(step_check again at {factor * n}); for TDS, reverse_variance='analytic'.",
            PosteriorQualityWarning,
            stacklevel=stacklevel,
        )
    if not coarse.batched:
        mean_shift, mean_z, moved = mean_shift[0], mean_z[0], moved[0]
        shift = None if shift is None else shift[0]
        se = None if se is None else se[0]
        extra = None if extra is None else extra[0]
        extra_se = None if extra_se is None else extra_se[0]
    return StepCheck(
        (n, factor * n), (coarse, fine), shift, se, mean_shift, mean_z, moved, extra, extra_se
    )


@dataclass(frozen=True)
class ReferenceCheck:
    """A run against a reference run of the same problem (:func:`reference_check`): do their
    posterior means and standard deviations differ beyond Monte Carlo error?

    ``results``: (checked, reference). Per problem ``(B,)`` (unbatched: a scalar), float64,
    each the largest over the test functions (the ``d`` coordinates and ``directions`` fixed
    random unit directions):

    - ``mean_shift``: ``|mean - mean_ref|`` in units of the reference's posterior sd, with
      ``mean_z``, the same difference over its Monte Carlo error (the two runs' errors
      combined: genealogy errors for weighted runs, ``sd / sqrt(N)`` for unweighted draws);
    - ``sd_ratio``: the ratio of posterior sds (checked / reference) farthest from 1 (in log),
      with ``sd_z``, the largest difference of the variances over its Monte Carlo error;
    - ``ks``: the largest two-sample Kolmogorov-Smirnov distance between the two weighted
      clouds' marginals, scaled by ``sqrt(n)`` (``n = n1 n2 / (n1 + n2)`` from the runs'
      effective sizes: ``info.genealogy_ess`` for SMC runs, ``N`` for independent draws),
      which sees what moments miss (a few exploded draws inflate a variance and its error
      alike);
    - ``log_evidence_shift`` / ``log_evidence_se``: checked minus reference log-evidence and
      the sd of that difference, where both runs estimate it (else ``None``);
    - ``differs``: bool, a ``z`` above ``line`` (the two-sided normal line at ``1e-3`` over
      the number of tests), ``ks`` above ``ks_line`` (Kolmogorov's at the same level), or
      the evidence shifted by more than 4 of its sd.
    """

    results: tuple[Result, Result]
    mean_shift: Tensor
    mean_z: Tensor
    sd_ratio: Tensor
    sd_z: Tensor
    ks: Tensor
    log_evidence_shift: Tensor | None
    log_evidence_se: Tensor | None
    differs: Tensor
    line: float
    ks_line: float


def _moments_and_errors(res: Result, fn) -> tuple[Tensor, ...]:
    """Per problem ``(B, k)``: the mean of ``fn(x)`` and its Monte Carlo error, the variance
    and its Monte Carlo error (genealogy errors for weighted runs with roots, i.i.d. ones
    otherwise)."""
    W, phi, mean = _weighted_mean(res, fn)
    sq = (phi - mean[:, None]) ** 2
    var = (W[..., None] * sq).sum(1)
    roots = res.info.roots
    if res.log_weights is not None and roots is not None:
        idx = roots.to(phi.device).long()
        idx = idx if res.batched else idx.reshape(1, -1)
        e_mean = genealogy_variance(W, phi, idx)[1].sqrt()
        e_var = genealogy_variance(W, sq, idx)[1].sqrt()
    else:  # independent draws: N of them, or the weights' effective number
        n = (1.0 / (W**2).sum(1))[:, None]
        e_mean = (var / n).sqrt()
        e_var = ((W[..., None] * (sq - var[:, None]) ** 2).sum(1) / n).sqrt()
    return mean, e_mean, var, e_var


def _effective_size(res: Result) -> Tensor:
    """``(B,)``: what the cloud is worth in independent draws (genealogy ESS for SMC runs,
    the weights' ESS otherwise; ``N`` for unweighted draws)."""
    W = res.weights().double()
    W = W if res.batched else W.unsqueeze(0)
    if res.log_weights is not None and res.info.genealogy_ess is not None:
        return res.info.genealogy_ess.double().reshape(-1).to(W.device).clamp(min=1.0)
    return 1.0 / (W**2).sum(-1)


def _ks_distance(res: Result, ref: Result, fn) -> Tensor:
    """``(B, k)``: the largest gap between the two weighted empirical CDFs of each column."""
    W1, phi1, _ = _weighted_mean(res, fn)
    W0, phi0, _ = _weighted_mean(ref, fn)
    vals = torch.cat([phi1, phi0.to(phi1.device)], 1)  # (B, N1 + N0, k)
    w = torch.cat([W1, -W0.to(W1.device)], 1)[..., None].expand_as(vals)
    order = vals.argsort(1)
    cdf_gap = w.gather(1, order).cumsum(1)
    # ties: only the gap after the last of equal values counts
    sv = vals.gather(1, order)
    last = torch.ones_like(sv, dtype=torch.bool)
    last[:, :-1] = sv[:, 1:] != sv[:, :-1]
    return torch.where(last, cdf_gap.abs(), torch.zeros_like(cdf_gap)).amax(1)


def _coordinates_and_directions(d: int, k: int, seed: int):
    """The test functions of the checks: ``x`` ``(B, N, ...)`` -> ``(B, N, d + k)``, every
    coordinate and ``k`` random unit directions fixed by ``seed``, float64."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(k, d, generator=g, dtype=torch.float64)
    U = U / U.norm(dim=1, keepdim=True).clamp_min(1e-300)

    def fn(x: Tensor) -> Tensor:
        flat = x.double().reshape(x.shape[:2] + (d,))
        return torch.cat([flat, flat @ U.to(flat.device).T], -1) if k else flat

    return fn


def reference_check(
    result: Any,
    reference: Any,
    warn: bool = True,
    directions: int = 32,
    seed: int = 0,
) -> ReferenceCheck:
    """Compare ``result`` (any sampler's :class:`~bayesfilter_diff.Result` or
    :class:`~bayesfilter_diff.inference.Posterior`) with ``reference``, a run of the same
    problem by an asymptotically exact sampler (or exact draws as an unweighted Result):
    posterior means and sds along every coordinate and ``directions`` random unit directions
    (fixed by ``seed``), each difference against the two runs' Monte Carlo errors, and the
    log-evidences where both have one (:class:`ReferenceCheck`). With ``warn``, a
    :class:`~bayesfilter_diff.PosteriorQualityWarning` says when they differ.

    This is the check for what no single run shows: an approximate sampler whose draws fit
    the data and lie in the prior's support but are biased in the directions the data do not
    reach (MGPS on the quadrature study's 2-D problems: 5-50 times the exact floor with
    no quality warning). Its power grows with both runs' effective sizes; a result that does
    not differ is consistent with the reference at that precision, not proven equal. The
    reference's errors come from its genealogy, which underestimates them when few time-0
    lineages survive (see :func:`genealogy_mcse`): check ``reference.info.ancestors``, or pass
    exact draws.
    """
    import warnings

    from scipy import stats

    from ..errors import PosteriorQualityWarning

    res, ref = getattr(result, "result", result), getattr(reference, "result", reference)
    for name, r in (("result", res), ("reference", ref)):
        if not isinstance(r, Result):
            raise TypeError(f"{name} must be a Result or Posterior, got {type(r).__name__}")
    if res.batched != ref.batched:
        raise ValueError(
            f"result and reference must both be batched or both unbatched, got batched="
            f"{res.batched} and {ref.batched}"
        )
    lead = 2 if res.batched else 1
    ev, ev_ref = tuple(res.samples.shape[lead:]), tuple(ref.samples.shape[lead:])
    if ev != ev_ref or (res.batched and res.samples.shape[0] != ref.samples.shape[0]):
        raise ValueError(
            f"result and reference must be runs of the same problem(s): samples "
            f"{tuple(res.samples.shape)} against {tuple(ref.samples.shape)}"
        )
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 0:
        raise ValueError(f"directions must be an int >= 0, got {directions!r}")
    if not (bool(torch.isfinite(res.samples).all()) and bool(torch.isfinite(ref.samples).all())):
        raise ValueError("result and reference must have finite samples")
    d = math.prod(ev)
    k = directions if d > 1 else 0
    fn = _coordinates_and_directions(d, k, seed)

    m, em, v, ev_ = _moments_and_errors(res, fn)
    m0, em0, v0, ev0 = _moments_and_errors(ref, fn)
    m0, em0, v0, ev0 = (t.to(m.device) for t in (m0, em0, v0, ev0))
    tiny = 1e-300
    diff = (m - m0).abs()
    mean_shift = (diff / v0.sqrt().clamp_min(tiny)).amax(-1)
    mean_z = (diff / (em**2 + em0**2).sqrt().clamp_min(tiny)).amax(-1)
    log_ratio = 0.5 * (v.clamp_min(tiny).log() - v0.clamp_min(tiny).log())
    sd_ratio = log_ratio.gather(-1, log_ratio.abs().argmax(-1, keepdim=True)).squeeze(-1).exp()
    sd_z = ((v - v0).abs() / (ev_**2 + ev0**2).sqrt().clamp_min(tiny)).amax(-1)
    tests = 3 * (d + k)
    line = float(stats.norm.isf(1e-3 / (2 * tests)))
    ks_line = float(stats.kstwobign.isf(1e-3 / tests))
    n1, n0 = _effective_size(res), _effective_size(ref).to(m.device)
    n = n1 * n0 / (n1 + n0)
    ks = _ks_distance(res, ref, fn).amax(-1) * n.sqrt()
    differs = (mean_z > line) | (sd_z > line) | (ks > ks_line)
    shift = se = None
    if res.log_evidence is not None and ref.log_evidence is not None:
        shift = (
            res.log_evidence.double() - ref.log_evidence.double().to(res.log_evidence.device)
        ).reshape(-1)
        s0, s1 = res.info.log_evidence_se, ref.info.log_evidence_se
        if s0 is not None and s1 is not None:
            se = (s0.double() ** 2 + s1.double().to(s0.device) ** 2).sqrt().reshape(-1)
            differs = differs | (shift.abs() > 4 * se.to(shift.device))
    if warn and bool(differs.any()):
        probs = torch.nonzero(differs).flatten().tolist()
        d_ = differs
        parts = []  # only what crossed its line, over the problems that differ
        if bool((mean_z[d_] > line).any()):
            parts.append(
                f"a posterior mean by up to {float(mean_shift[d_].max()):.2g} reference sd "
                f"({float(mean_z[d_].max()):.3g} Monte Carlo errors)"
            )
        if bool((sd_z[d_] > line).any()):
            lo, hi = float(sd_ratio[d_].min()), float(sd_ratio[d_].max())
            parts.append(
                f"a posterior sd by a factor {lo:.3g}"
                + (f" to {hi:.3g}" if hi != lo else "")
                + f" ({float(sd_z[d_].max()):.3g} errors)"
            )
        if bool((ks[d_] > ks_line).any()):
            parts.append(
                f"a marginal's distribution (Kolmogorov-Smirnov {float(ks[d_].max()):.3g} "
                f"against {ks_line:.3g})"
            )
        if shift is not None and se is not None:
            far = shift.abs() > 4 * se.to(shift.device)
            if bool(far.any()):
                i = int((shift.abs() / se.clamp_min(tiny)).argmax())
                parts.append(f"the log-evidence by {float(shift[i]):+.3g} (sd {float(se[i]):.2g})")
        warnings.warn(
            "the result differs from the reference beyond Monte Carlo error ("
            + "; ".join(parts)
            + f"; line {line:.3g} errors){f' for problem(s) {probs}' if res.batched else ''}. "
            "If the reference is an exact sampler's healthy run, the result is biased: use an "
            "exact sampler, or more steps / a smaller step size for this one; if the reference "
            "itself warned, rerun it with more particles or steps first.",
            PosteriorQualityWarning,
            stacklevel=2,
        )
    if not res.batched:
        mean_shift, mean_z, sd_ratio, sd_z, ks, differs = (
            t[0] for t in (mean_shift, mean_z, sd_ratio, sd_z, ks, differs)
        )
        shift = None if shift is None else shift[0]
        se = None if se is None else se[0]
    return ReferenceCheck(
        (res, ref), mean_shift, mean_z, sd_ratio, sd_z, ks, shift, se, differs, line, ks_line
    )


@dataclass(frozen=True)
class RunsCheck:
    """Independent runs of one problem against each other (:func:`runs_check`): do they
    agree within the Monte Carlo errors each run reports about itself?

    ``results``: the runs (a tuple of Results; one batched Result whose problems are the
    copies). ``mean``: the posterior mean pooled over the runs with its error from their
    spread (:func:`runs_mcse`), floored at the runs' own combined errors; ``log_evidence``:
    the pooled evidence (:func:`pooled_log_evidence`), its error floored likewise, ``None``
    without evidences. The statistics, float64, are
    Cochran's ``Q = sum_r (m_r - m_hat)^2 / e_r^2`` (``m_hat`` the inverse-variance mean) of
    each test function's estimates ``m_r`` with the errors ``e_r`` the runs report (genealogy
    errors for SMC runs, ``sd / sqrt(N)`` for independent draws), ``chi^2`` with ``R - 1``
    degrees of freedom when the errors are right:

    - ``mean_q`` / ``var_q``: the largest ``Q`` of the posterior means / variances over the
      test functions (the ``d`` coordinates and ``directions`` random unit directions);
    - ``log_evidence_q``: ``Q`` of the log-evidences with ``info.log_evidence_se``
      (``None`` without them);
    - ``error_ratio``: ``sqrt(median Q / median chi^2_{R-1})`` over the means' test
      functions: about how many times the runs' spread exceeds the errors they report (1
      when they are right);
    - ``line``: the ``chi^2_{R-1}`` line at ``1e-3`` over the number of tests;
    - ``disagree``: a ``Q`` above ``line`` (a run whose evidence is not finite where the
      others' is gives an infinite ``log_evidence_q``).
    """

    results: tuple[Result, ...]
    mean: MeanEstimate
    log_evidence: EvidenceEstimate | None
    mean_q: float
    var_q: float
    log_evidence_q: float | None
    error_ratio: float
    line: float
    disagree: bool


def _runs_of(runs: Any) -> tuple[Result, ...]:
    """The runs as Results: a sequence of >= 2 unbatched Results / Posteriors, or one
    Result batched over >= 2 copies (split into its problems)."""
    if getattr(runs, "runs", None) is not None:
        raise ValueError(
            "runs: this Posterior pools independent runs already (infer(..., runs=R)); "
            "their check is its .runs"
        )
    if isinstance(runs, Result) or isinstance(getattr(runs, "result", None), Result):
        r = getattr(runs, "result", runs)
        if not r.batched or r.samples.shape[0] < 2:
            raise ValueError(
                "runs: one Result must be batched over >= 2 independent copies of a problem"
            )
        if not bool(torch.isfinite(r.samples).all()):
            raise ValueError("runs has non-finite samples")
        return (r,)
    if isinstance(runs, Sequence) and not isinstance(runs, str) and len(runs) >= 2:
        out: list[Result] = []
        for i, r in enumerate(runs):
            if getattr(r, "runs", None) is not None:
                raise ValueError(
                    f"runs[{i}] pools independent runs already (infer(..., runs=R)): pass "
                    "single runs, or compare pooled results by their errors"
                )
            r = getattr(r, "result", r)
            if not isinstance(r, Result) or r.batched:
                raise ValueError(
                    f"runs[{i}] must be an unbatched Result or Posterior, got "
                    f"{type(r).__name__}{' (batched)' if isinstance(r, Result) else ''}"
                )
            if out and r.samples.shape[1:] != out[0].samples.shape[1:]:
                raise ValueError(
                    f"runs must be runs of one problem: runs[{i}] has draws of shape "
                    f"{tuple(r.samples.shape[1:])}, runs[0] {tuple(out[0].samples.shape[1:])}"
                )
            if not bool(torch.isfinite(r.samples).all()):
                raise ValueError(f"runs[{i}] has non-finite samples")
            same = [j for j, o in enumerate(out) if o is r]
            if same:
                raise ValueError(f"runs[{i}] is runs[{same[0]}]: the check needs independent runs")
            out.append(r)
        return tuple(out)
    raise ValueError(
        "runs must be >= 2 independent runs of one problem: a sequence of Results / "
        f"Posteriors, or one Result batched over copies; got {type(runs).__name__}"
    )


def _cochran_q(m: Tensor, e: Tensor, scale: Tensor | None = None) -> Tensor:
    """``Q`` over the first axis (runs) of estimates ``m`` with errors ``e``, per column.

    Errors are floored at ``1e-12`` of the estimates' scale (and at ``1e-150``, so that their
    squares stay normal numbers): runs that all report no error and agree (an observed
    coordinate of noiseless data, equal to ``y`` in every particle) give ``Q = 0``; a run
    reporting no error (a collapsed cloud) that differs gives a huge ``Q``. A ``Q`` that
    cannot be computed (a dead run's NaN estimates) is infinite: a disagreement. ``scale``
    (per column) replaces ``max |m|`` where the estimates' rounding is relative to another
    size (a variance's: the squared values')."""
    if scale is None:
        scale = m.abs().amax(0)
    scale = scale.reshape((1,) + tuple(m.shape[1:])).nan_to_num(nan=0.0, posinf=0.0)
    e = torch.maximum(e.nan_to_num(nan=math.inf), 1e-12 * scale + 1e-150)
    w = e.pow(-2)
    m_hat = (w * m).sum(0) / w.sum(0)
    dev = m - m_hat
    q = torch.where(dev == 0, torch.zeros_like(dev), w * dev**2).sum(0)
    return q.nan_to_num(nan=math.inf)


def runs_check(
    runs: Any,
    warn: bool = True,
    directions: int = 32,
    seed: int = 0,
    *,
    stacklevel: int = 2,
) -> RunsCheck:
    """Check that independent runs of one problem (different generators, or copies of the
    observation in one batch) agree within the Monte Carlo errors they report
    (:class:`RunsCheck`), and pool them. With ``warn``, a
    :class:`~bayesfilter_diff.PosteriorQualityWarning` says when they do not.

    Each run's own diagnostics cannot see a region its particles never reached, nor that
    its genealogy's error bars are too small; the spread of independent runs shows both: a
    mode of small prior weight found by some runs and not by others, or runs on a thin
    genealogy, move their estimates apart by more than their reported errors. Runs that all
    miss the same region agree, and this check passes them: it bounds what the runs can
    tell, not the distance to the posterior. Tested per posterior mean and variance along
    every coordinate and ``directions`` random unit directions (fixed by ``seed``), and on
    the log-evidences, each by Cochran's ``Q`` against ``chi^2_{R-1}`` at a family level
    of ``1e-3``. The pooled estimates in the result carry errors from the runs' spread,
    which stay honest when the runs' own errors do not, floored at the runs' own combined
    errors (``sqrt(sum_r e_r^2) / R`` for the mean; for the evidence ``sqrt(sum_r s_r^2
    se_r^2)``, ``s_r = Z_r / sum Z``): with few runs the spread is itself uncertain (4 runs
    give it to about +-40%; from 2 runs alone 16% of estimates would lie more than 4 such
    errors from the truth, a Student-t with one degree of freedom); ``RunsCheck.mean`` weighs the runs equally,
    whereas a pooled cloud (:func:`pool_runs`, ``infer(..., runs=R)``) weighs them by their
    evidences.

    The reported errors are themselves estimates, correlated with the estimates they
    qualify (a run's larger sample variance comes with a larger error of it), so with few
    particles or skewed posteriors the check flags correct runs more often than ``1e-3``:
    measured with independent exact draws, 24 of 200 at N = 32, 3-4 of 200 at N = 256 - 1000
    with lognormal or Student-t marginals, none of 200 at N >= 2048. Runs of a few hundred
    particles that disagree may be correct; rerun with more. ``stacklevel`` is passed to
    the warning.
    """
    import warnings

    from scipy import stats

    from ..errors import PosteriorQualityWarning

    results = _runs_of(runs)
    directions = _index("directions", directions, 0)
    seed = _index("seed", seed, 0)
    batched = len(results) == 1
    first = results[0]
    ev = tuple(first.samples.shape[2 if batched else 1 :])
    d = math.prod(ev)
    if d == 0:
        raise ValueError("runs: the draws have no coordinates (an empty event shape)")
    k = directions if d > 1 else 0
    fn = _coordinates_and_directions(d, k, seed)

    if batched:
        m, em, v, ev_ = _moments_and_errors(first, fn)  # (R, k) each
        lz = first.log_evidence
        lz_se = first.info.log_evidence_se
    else:
        parts = [_moments_and_errors(r, fn) for r in results]
        dev = parts[0][0].device
        m, em, v, ev_ = (torch.cat([p[i].to(dev) for p in parts]) for i in range(4))
        has_z = all(r.log_evidence is not None for r in results)
        lz = torch.stack([r.log_evidence.reshape(()) for r in results]) if has_z else None  # type: ignore[union-attr]
        ses = [r.info.log_evidence_se for r in results]
        lz_se = (
            torch.stack([s.reshape(()).to(dev) for s in ses])  # type: ignore[union-attr]
            if has_z and all(s is not None for s in ses)
            else None
        )
    R = m.shape[0]
    # a variance is rounded relative to the squared values (mean^2 + variance), not itself
    q_mean, q_var = _cochran_q(m, em), _cochran_q(v, ev_, (m**2 + v).abs().amax(0))
    q_z = None
    dead: list[int] = []  # runs whose evidence is not finite while others' is
    if lz is not None:
        lzd = lz.double().reshape(-1)
        fin = torch.isfinite(lzd)
        if bool(fin.any()) and not bool(fin.all()):
            dead = torch.nonzero(~fin).flatten().tolist()
            q_z = math.inf
        elif lz_se is not None and bool(fin.all()):
            sed = lz_se.double().reshape(-1).to(lzd.device)
            if bool(torch.isfinite(sed).all()):  # (NaN below min_particles: not tested)
                q_z = float(_cochran_q(lzd[:, None], sed[:, None])[0])
    tests = 2 * (d + k) + (q_z is not None)
    line = float(stats.chi2.isf(1e-3 / tests, R - 1))
    mean_q, var_q = float(q_mean.max()), float(q_var.max())
    # the median of chi^2_{R-1}, not its mean: 1 for runs whose errors are right
    ratio = math.sqrt(float(q_mean.median()) / float(stats.chi2.median(R - 1)))
    disagree = mean_q > line or var_q > line or (q_z is not None and q_z > line)
    # pooled errors: the runs' spread, floored at the errors they report (a spread of two
    # to four runs is itself a rough estimate, at times far below both: the floor keeps
    # it from making the pooled error smaller than what each run knows of itself)
    spread = runs_mcse(first if batched else list(results))
    own = (em[:, :d].pow(2).sum(0).sqrt() / R).reshape(spread.std_error.shape)
    own = own.nan_to_num(nan=0.0).to(spread.std_error)
    pooled = dataclasses.replace(spread, std_error=torch.maximum(spread.std_error, own))
    pooled_z = None
    if lz is not None and not bool(torch.isnan(lz.double()).any()):
        if bool(torch.isfinite(lz.double()).any()):
            lzd = lz.double().reshape(-1).cpu()
            pooled_z = pooled_log_evidence(lzd)
            if lz_se is not None:
                # delta method on log mean_r Z_r: sqrt(sum_r s_r^2 se_r^2), s_r = Z_r / sum Z
                s = torch.softmax(lzd, 0)
                own_z = float((s**2 * lz_se.double().reshape(-1).cpu() ** 2).sum().sqrt())
                if math.isfinite(own_z) and own_z > pooled_z.std_error:
                    pooled_z = dataclasses.replace(pooled_z, std_error=own_z)
    if warn and disagree:
        found = []
        if mean_q > line:
            found.append(f"posterior means (Q up to {mean_q:.3g})")
        if var_q > line:
            found.append(f"posterior variances (Q up to {var_q:.3g})")
        if dead:
            found.append(f"log-evidences (run(s) {dead} not finite where the others are)")
        elif q_z is not None and q_z > line:
            assert lz is not None
            found.append(
                f"log-evidences (Q {q_z:.3g}: {', '.join(f'{float(z):.4g}' for z in lz.reshape(-1)[:8])}"
                f"{', ...' if R > 8 else ''})"
            )
        warnings.warn(
            f"{R} independent runs disagree beyond the Monte Carlo errors they report: "
            + "; ".join(found)
            + f", against the chi^2_{R - 1} line {line:.3g}; their spread is about "
            f"{ratio:.2g} times the reported errors. Either some runs missed a region of the "
            "posterior the others found (a mode of small prior weight), or each run's error "
            "bars are too small (a thin genealogy). Use the pooled estimates with errors from "
            "the spread (RunsCheck.mean, .log_evidence); to make each run trustworthy: more "
            "particles, more steps, or a sampler whose proposal reaches the missed region.",
            PosteriorQualityWarning,
            stacklevel=stacklevel,
        )
    return RunsCheck(results, pooled, pooled_z, mean_q, var_q, q_z, ratio, line, disagree)


def _index(name: str, value: Any, minimum: int) -> int:
    """An integer argument (Python or NumPy) ``>= minimum``, or a ValueError naming it."""
    import operator

    try:
        v = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        v = None
    if v is None or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return v


def pool_runs(result: Any) -> Result:
    """One cloud from ``R`` independent runs of one problem, given as a Result batched over
    ``R`` copies of the observation (or a Posterior holding one): the island combination of
    SMC runs, each run's normalised weights times its evidence estimate ``Z_r`` (equal
    weights per run without evidences), so the pooled cloud targets the posterior like each
    run and its evidence ``log mean_r Z_r`` stays unbiased in ``Z``. An unbatched Result of
    ``R N`` particles whose record pools the runs': ``info.ess`` / ``min_ess`` the runs'
    ESS summed (the pooled cloud's when the ``Z_r`` agree), ``resampled`` any run's,
    ``info.log_evidence`` the pooled running estimate; roots, ``ancestors`` and ``distinct``
    over all runs (lineages of different runs are distinct), ``genealogy_ess`` recomputed
    on the pooled cloud, ``log_evidence_se`` the runs' combined (``sqrt(sum_r s_r^2
    se_r^2)``, ``s_r = Z_r / sum Z``), ``residual_ratio`` their ``s_r``-weighted mean,
    ``quality`` every run's findings; ``steps`` / ``extra`` stay the batched run's.
    Check first that the runs agree (:func:`runs_check`): pooling runs that missed
    different regions averages their errors, it does not remove them."""

    res = getattr(result, "result", result)
    if not isinstance(res, Result) or not res.batched or res.samples.shape[0] < 2:
        raise ValueError(
            "pool_runs needs a Result batched over >= 2 independent copies of one problem"
        )
    R, N = res.samples.shape[:2]
    event = tuple(res.samples.shape[2:])
    x = res.samples.reshape((1, R * N) + event)
    info = res.info
    dev = res.samples.device
    lw = res.log_weights
    if lw is None:
        share = torch.full((R,), 1.0 / R, dtype=torch.float64, device=dev)
        pooled_lw = None
        log_z = None
    else:
        lz = res.log_evidence
        if lz is not None and lz.numel() != R:
            raise ValueError(f"pool_runs: log_evidence holds {lz.numel()} values for {R} copies")
        lse = torch.logsumexp(lw.double(), 1, keepdim=True)
        alive = torch.isfinite(lse)  # a copy whose weights are all 0 carries no mass
        lwn = torch.where(alive, lw.double() - lse, torch.full_like(lse, -math.inf))
        if lz is None:
            lzr = torch.where(alive[:, 0], 0.0, -math.inf).to(torch.float64)
        else:
            lzr = lz.double().reshape(R)
            if bool(torch.isnan(lzr).any()) or bool((lzr == math.inf).any()):
                raise ValueError(
                    "pool_runs: a copy's log-evidence is NaN or +inf "
                    f"({[round(float(z), 4) for z in lzr]}): the runs cannot be pooled"
                )
            lzr = torch.where(alive[:, 0], lzr, torch.full_like(lzr, -math.inf))
        if not bool(torch.isfinite(lzr).any()):
            raise ValueError("pool_runs: every copy's weights (or evidence) are zero")
        share = torch.softmax(lzr, 0)
        log_share = torch.where(share > 0, torch.log(share), torch.full_like(share, -math.inf))
        pooled_lw = (lwn + log_share[:, None]).reshape(1, R * N)
        log_z = None if lz is None else (torch.logsumexp(lzr, 0) - math.log(R)).to(lz.dtype)

    def pooled(t: Tensor | None, how: str) -> Tensor | None:
        if t is None:
            return None
        if how == "sum":
            return t.sum(-1, keepdim=True)
        if how == "any":
            return t.any(-1, keepdim=True)
        if how == "max":
            return t.amax(-1, keepdim=True)
        if how == "nanmean":
            return t.double().nanmean(-1, keepdim=True)
        if how == "logmeanexp":
            return torch.logsumexp(t.double(), -1, keepdim=True) - math.log(R)
        if how == "share":
            return (share.to(t.device) * t.double()).sum(-1, keepdim=True)
        raise AssertionError(how)

    roots = None
    if info.roots is not None:
        offset = torch.arange(R, device=info.roots.device)[:, None] * N
        roots = (info.roots.long() + offset).reshape(1, R * N)
    ess = pooled(info.ess, "sum")
    out = dataclasses.replace(
        info,
        ess=ess,
        resampled=pooled(info.resampled, "any"),
        log_evidence=pooled(info.log_evidence, "logmeanexp"),
        min_ess=None if ess is None else ess.min(0).values,
        acceptance=pooled(info.acceptance, "nanmean"),
        ancestors=None if roots is None else distinct_count(roots),
        roots=roots,
        distinct=pooled(info.distinct, "sum"),
        support_ratio=pooled(info.support_ratio, "max"),
        path_ratio=pooled(info.path_ratio, "max"),
        escaped=pooled(info.escaped, "sum"),
        residual_ratio=pooled(info.residual_ratio, "share"),
        quality=list(info.quality),
    )
    if pooled_lw is not None and roots is not None:
        out.genealogy_ess = genealogy_ess(pooled_lw.exp(), x, roots)
    if info.log_evidence_se is not None:
        se = info.log_evidence_se.double().to(share.device)
        out.log_evidence_se = (share**2 * se**2).sum().sqrt().reshape(1)
    return Result(
        samples=x[0],
        log_weights=None if pooled_lw is None else pooled_lw[0].to(lw.dtype),  # type: ignore[union-attr]
        log_evidence=log_z,
        info=out,
        batched=False,
    )

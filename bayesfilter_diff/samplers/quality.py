"""The quality check every run ends with: does the Result say what it is worth?

A weighted run can collapse and still return ``N`` equally weighted particles (resampling
resets the weights), so the final weights alone say nothing. The loop records, per problem,
the ESS of every reweighting before resampling, the surviving ancestors and the distinct
final samples (:class:`~bayesfilter_diff.result.RunInfo`); this module reads them, and the
draws of unweighted samplers, and reports each finding as a :class:`QualityIssue`, warned
as a :class:`~bayesfilter_diff.PosteriorQualityWarning` with its remedy.

Thresholds (:class:`QualityPolicy`, documented defaults; the particle checks apply from
``N >= 10``, below which an ESS says little):

- ``min_ess``: some reweighting left fewer than ``max(2, 0.05 N)`` effective particles: the
  posterior was carried by a few particles at that step, whatever happened after (on the
  Gaussian-mixture benchmark's problems healthy TDS / MCGdiff runs keep at least 27% of N
  at every step; the runs that dipped to 2-3% were 6-7 times the exact floor away);
- ``genealogy``: the genealogy says the cloud is worth fewer than ``0.2 N`` independent
  draws (``info.genealogy_ess``), or (from ``N >= 200``) fewer than 50 initial particles
  have descendants (then the estimate itself is biased high; below 50 lineages it is capped
  at their number, so a small cloud is judged by the capped estimate: until 2026-12-05 the
  check began at ``N = 200``, and MCGdiff and FPS-SMC runs of 16-128 particles on the
  README mixture, descending from 1-13 initial particles, went unwarned while the default's
  kept 8-79 lineages, at least 0.31 N): resampling, step after step,
  left the final particles descending from a few lineages, so every average carries more than
  ``sqrt(5) ~ 2.2`` times the Monte Carlo error of ``N`` exact draws (the validation
  studies' "within 2x of the floor" line) although no single step's ESS need be low
  (MCGdiff on the noise-level study: genealogy ESS 1-19% of N, sliced W 2-7x the exact
  floor, every step's ESS above 70%; healthy TDS runs there: 28-53%);
- ``few_particles``: a weighted run with ``N < 10``: none of the particle checks can tell
  whether it degenerated, and ``info.log_evidence_se`` is NaN (with one to a few lineages
  the genealogy's estimate is 0 or far too small: 30 TDS runs at N = 1 missed the evidence
  by 9 nats in sd, each reporting 0);
- ``distinct``: fewer than ``max(2, 0.1 N)`` distinct final samples: the cloud is
  copies of a few particles (resampling without enough diversity);
- ``exploded``: draws (of positive weight) more than ``100`` times the scale of the starting
  noise ``sigma(t_max) sqrt(d)`` (at least 1): a diverged step size (DPS, RED-diff, DAPS) or
  an overshooting proposal (TDS at small noise) rather than a posterior. A prior whose data
  lie that far out is not served by the reference start either (on the linear VP path
  ``alpha_T x0`` would be ~0.7 ``sigma_T``); every sampler's draws on the Gaussian-mixture
  benchmark stay within 21 times it (means up to ``16 sqrt(d)``). Was ``1e3`` until
  2026-12-04: on the shipped two-moons prior (data norms <= 2, start 1.4, a `1 x 2`
  operator, ``sigma_y = 0.05``) DPS at 100 steps left one of 512 particles at norm 659 (the
  mean off by 1.3) and DCPS at 20 steps 12-29% of its particles beyond norm 4, the
  largest of 64 at 862, unwarned;
- ``off_support``: (unweighted samplers) the draws, renoised to ``sigma / alpha = 0.3`` and
  denoised by the prior, move more than ``4`` times the bound ``d sigma^2 / alpha^2`` on the
  mean squared move of any prior's own draws (:func:`support_ratio`): draws where the prior
  has no mass, from an overshooting step size (DPS with a strong operator: the ratio 21 at
  `10 A`, sliced W 170 times the floor, before its norms reach the ``exploded`` line).
  Exact posteriors measured 0.9-1.9 on the README mixture and with two of eight
  coordinates observed 10 prior standard deviations off; an observation that far off in
  *every* coordinate (identity operator, log-evidence -335 to -4155) puts the exact
  posterior itself there, at 5.8-8.5: the warning then reports a prior-data conflict, and
  says so;
- ``escaped``: (approximate samplers that follow the model's path, ``Sampler.on_path``)
  draws far from the rest whose own paths do not lead to them. The loop keeps the states at
  the grid times nearest ``sigma / alpha`` = 1, 3, 10 (:data:`PATH_LEVELS`); a draw's
  :func:`path_ratio` ``||x_t - alpha_t x0||^2 / (d sigma_t^2)`` is ``chi^2_d / d`` on an exact
  path, whatever the prior. A draw counts as escaped when its ratio is above the ``1 -
  1e-4 / (N m)`` quantile of that law and at least ``16`` (:func:`path_line`; approximate
  samplers' draws that did not escape reached 13.7 on the benchmark mixtures) *and* it lies
  more than ``10`` times the cloud's median distance from the cloud's (coordinatewise)
  median: neither alone would do (exact paths into a small far mode are far from the cloud
  but on their paths; approximate samplers' paths at ``d = 8`` are often off by a few noise
  widths in the bulk). Found on the shipped two-moons prior: DPS at scale 0.1, 20 steps, one
  of 256 draws at norm 52.7 (data within 2, start 1.41): a step threw it off at the start and
  the network, which extrapolates off its data, never pulled it back, so ``exploded`` and
  ``off_support`` did not see it (the mean moved by ~0.2). On the Gaussian-mixture benchmark
  (d = 8 and 80, d_y = 1, 2, 4, 20 and 100 steps, seeds 0-2, N = 1000, the 11 samplers
  that follow the path) it fired in 13 of 396 runs (PiGDM 7, DPS 3, DCPS 2, PiGDM-flow 1;
  FPS, DDRM, DDNM, DDNM+, DiffPIR, DAPS, MGPS never), and of the 142 flagged draws of seven
  of them 139 lay beyond the exact posterior's 0.1% quantile of log-density (docs/methods/dps.md);
- ``misfit``: (every sampler; Gaussian noise of a known scale, Poisson noise, and Pyro
  sites of the laws :mod:`~bayesfilter_diff.samplers.scores` lists) the draws do not fit the
  observation: the (weighted) mean over the draws of ``||y - A(x)||^2 / (d_y sigma_y^2)``
  (:func:`residual_ratio`, ``info.residual_ratio``; for other laws the mean square of ``y``'s
  normal scores, ``Phi^{-1}`` of each entry's probability integral transform under the
  draw's likelihood, randomised for counts: the same ``chi^2_{d_y} / d_y`` law, the
  Gaussian ratio being its special case) is above :func:`residual_line`. With
  ``x'`` an exact posterior draw of a ``y`` the model produced, ``(x', y)`` is a draw of the
  joint law and ``y - A(x')`` the model's noise, so the ratio is ``chi^2_{d_y} / d_y`` per
  draw whatever the prior, and the cloud's mean is a conditional expectation of it; the line
  is the stop-loss bound at ``1e-6`` on such a mean (a little above the ``chi^2`` quantile:
  14.8 at ``d_y = 2``, 2.76 at 32) and at least ``2`` (residuals whose mean square is twice
  the noise's). A posterior predictive check: it fires when the sampler did not condition
  on ``y`` or when the model cannot explain ``y`` (``noise_std`` below the data's error, a
  prior-data conflict), and says both. Found silent before: DPS on a 64-D two-mode mixture with half
  of the coordinates observed at ``sigma_y = 1e-3``, its posterior mean 13 posterior standard
  deviations off in them (ratio 3e4; the exact posterior's 1.0); DPS on the README mixture
  (``2 x 8`` operator, ``sigma_y = 0.1``) with ``A x`` spread with sd 9 and 4 where the exact
  posterior's has 0.1 (ratio 4.8e3). On the Gaussian-mixture benchmark (540 runs,
  docs/methods/README.md) the exact samplers never reached a third of the line; 100 of 360
  approximate-sampler runs crossed it, 66 of them warned of nothing else;
- ``precision``: (Gaussian noise of a known scale) the input's dtype rounds the largest
  ``|y_j|`` by more than ``0.05`` noise standard deviations (:func:`precision_ratio`,
  ``eps(dtype) max |y_j| / sigma_y``): ``y``, if it was rounded to that dtype, and the
  residuals ``y - A(x)`` computed in it carry errors of that size in noise units, which no
  other check sees (float32, a two-mode 16-D mixture under ``Dense(gain A)`` at
  ``sigma_y = 1e-3``, four runs each: the default sampler's log-evidence error -0.15 /
  -0.19 / -0.29 / -0.44 at ratios 0.004 / 0.036 / 0.09 / 0.18, against -0.21 in float64 at
  every gain; bfloat16 data at ``sigma_y = 1e-3`` on a masked 8-D problem: draws 6 posterior
  sd off, log-evidence +6, warned only by chance before);
- ``overfit``: (the same problems) the draws fit ``y`` *more* tightly than its noise
  allows: the ratio is below :func:`residual_low_line`, the lower stop-loss bound at
  ``1e-6`` (a conditional expectation is smaller in convex order, so its lower tail is
  bounded as its upper one is), at most ``0.5``; about 0.2 at ``d_y = 32``, 0.35 at 64, and
  near 0 for ``d_y <= 4``, where it cannot fire. Samplers that treat the data as noiseless or
  over-weight them: DDRM on the 64-D mixture above at ``sigma_y = 1e-2`` (0.1; its mean
  right, its spread in the observed coordinates a third of the posterior's), PiGDM and
  DiffPIR at ``1e-3`` (0.01, 0.02), DDNM's projection on the benchmark mixtures (24 of 36
  runs), RePaint and SMCDiff on the noisy digit inpaintings (0.00), DPS and RED-diff on
  digit denoising (0.05-0.35); no exact sampler's run on those benchmarks came near it;
- ``start``: the prior knows its noisy marginal (a Gaussian mixture) and the chain's
  reference start ``N(0, sigma_T^2 I)`` is more than ``0.05`` nats from it
  (``info.start_kl``): the chain's prior is off the model's by up to ``sqrt(KL / 2)`` in
  total variation (0.16 here), far modes misweighted, and every sampler of the chain
  inherits it with healthy weights (the benchmark mixture: 0.57-0.86 nats at d = 800, chain
  mode weights off by a TV of 0.26-0.37; 0.02-0.03 nats at d = 80, 0.003-0.005 at d = 8);
- ``shared_draw``: (every run of ``N >= 10`` of a sampler that conditions its particles on
  one random draw per run, ``Sampler.shared_draw``: SMCDiff's noised observation path,
  FPS-SMC's y-sequence) the
  run's error estimates omit that draw's variance (SMCDiff, 8-D two-mode mixture, one
  observed coordinate, N = 4000, 100 steps: a mode weight of 0.238 came out 0.13-0.45 over
  six runs, three of them with nothing else warned and genealogy errors of 0.01-0.015).

The ``precision`` test also covers Pyro sites with a constant ``scale`` parameter (Laplace,
Student-t, ...: ``problem.data_scale_ratio``, set by ``bfd.infer``; bfloat16 data on a
Laplace / Student-t site of scale ``1e-3`` put the mean 0.4 posterior sd off and the
log-evidence 0.15-0.44 high, unwarned before 2026-12-05).

Configure with the warnings filter: ``warnings.simplefilter("error",
bfd.PosteriorQualityWarning)`` raises, ``"ignore"`` stays quiet.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PosteriorQualityWarning
from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from ..result import RunInfo
from ..smc.particles import MIN_LINEAGES
from .kernels import rowsq, time_at_log_snr
from .scores import poisson_scores, uniforms_for

__all__ = [
    "QualityIssue",
    "QualityPolicy",
    "assess",
    "warn",
    "support_ratio",
    "SUPPORT_NOISE",
    "PATH_LEVELS",
    "path_snapshot_steps",
    "path_ratio",
    "path_line",
    "escaped_draws",
    "residual_ratio",
    "residual_line",
    "residual_low_line",
    "precision_ratio",
]


@dataclass(frozen=True)
class QualityIssue:
    """One finding: its kind, the problems (batch indices) it concerns, and what to do."""

    kind: str
    problems: tuple[int, ...]
    message: str


@dataclass(frozen=True)
class QualityPolicy:
    """Thresholds of the quality check (module docstring)."""

    min_ess_fraction: float = 0.05
    distinct_fraction: float = 0.1
    explode_factor: float = 100.0
    min_particles: int = 10
    genealogy_fraction: float = 0.2
    genealogy_min_particles: int = 200
    min_lineages: int = MIN_LINEAGES
    start_kl: float = 0.05
    support_factor: float = 4.0
    path_level: float = 1e-4
    path_floor: float = 16.0
    escape_distance: float = 10.0
    residual_level: float = 1e-6
    residual_floor: float = 2.0
    residual_low_floor: float = 0.5
    precision_line: float = 0.05


#: ``sigma / alpha`` of the times at which an approximate sampler's states are kept for the
#: path test (:func:`path_ratio`)
PATH_LEVELS = (1.0, 3.0, 10.0)


#: the quality check's remedy for TDS's Jacobian twist (the default's for linear-Gaussian
#: problems with at most 16 observations) when its weights or lineages collapse
_JACOBIAN_TAIL = (
    "if the data lie far in the prior's tail (diagnostics.prior_predictive_check, "
    "Posterior.prior_predictive_check), the operator's twist, TDS(twist_variance='operator', "
    "reverse_variance='reference', adaptive_ess=0.1), with many particles (the default's "
    "jacobian_fallback=True reruns a run that collapsed so): the Jacobian "
    "twist is a Gaussian matched to the moments of x0 given x_t, which misjudges particles "
    "still between the prior's modes when the data are far from both, and more particles "
    "or steps do not mend it (measured: the README mixture, data 2.5 times a prior draw, "
    "noise 1e-3: log-evidence 37-41 nats low at N = 1000 and 8192 with 200 steps inserted; "
    "the operator's twist -0.12 to +0.07 at N = 8192, 0.2-0.8 off at N = 1000 with a thin "
    "genealogy; docs/methods/tds.md); "
)


#: the thin-genealogy remedy for TDS's operator twist
_JACOBIAN_REMEDY = (
    "for few observations, TDS(twist_variance='jacobian') (the twist's covariance from the "
    "denoiser's Jacobian, one backward pass per observed coordinate: it keeps the lineages "
    "that an anisotropic prior costs the operator's twist); "
)


def replacing_jacobian(issues: list[QualityIssue], why: str) -> list[QualityIssue]:
    """The findings of an operator-twist run that replaced a collapsed Jacobian-twist run
    (``TDS(jacobian_fallback=True)``): the Jacobian twist is not offered as their remedy,
    and each says what the run replaced."""
    note = f" This run replaced a run with TDS's Jacobian twist: {why}."
    return [
        dataclasses.replace(q, message=q.message.replace(_JACOBIAN_REMEDY, "") + note)
        for q in issues
    ]


def path_snapshot_steps(schedule, times: Tensor) -> tuple[int, ...]:
    """The steps ``k`` (before the last) whose grid time is nearest, in ``log(sigma /
    alpha)``, to each of :data:`PATH_LEVELS`, among those within a factor 2 of it; sorted,
    without repeats (empty when the grid does not reach them)."""
    t = times[:-1].detach().to("cpu", torch.float64)
    ratio = schedule.sigma(t) / schedule.alpha(t)
    ok = torch.isfinite(ratio) & (ratio > 0)
    if not bool(ok.any()):
        return ()
    logr = torch.where(ok, ratio.clamp_min(1e-300).log(), torch.full_like(ratio, math.inf))
    out = set()
    for level in PATH_LEVELS:
        gap = (logr - math.log(level)).abs()
        k = int(gap.argmin())
        if float(gap[k]) <= math.log(2.0):
            out.add(k)
    return tuple(sorted(out))


def path_ratio(schedule, times: Tensor, snapshots: list[tuple[int, Tensor]], x: Tensor) -> Tensor:
    """How far the draws ``x`` ``(B, N, *event)`` are from where their own paths lead:
    ``(B, N)`` float64, the largest over the kept states ``x_t`` (``snapshots``: step and
    ``(B, N, *event)`` state at ``times[step]``) of ``||x_t - alpha_t x||^2 / (d sigma_t^2)``.

    On an exact path (the forward process's joint law of ``(x_t, x0)``) ``x_t - alpha_t x0 =
    sigma_t z`` with ``z`` standard normal, so each ratio is ``chi^2_d / d`` (mean 1); a draw
    that a step threw off its path, or that left the prior's support where the network
    extrapolates and no longer pulls it back, scores far above it."""
    B, N = x.shape[:2]
    d = x[0, 0].numel()
    flat = x.reshape(B, N, -1)
    out = torch.zeros(B, N, dtype=torch.float64, device=x.device)
    for k, xt in snapshots:
        t = times[k].to(torch.float64)
        a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
        # one pass writing the difference, one reading it (kernels.rowsq: float32 accurate)
        diff = torch.add(xt.reshape(B, N, -1), flat, alpha=-a)
        out = torch.maximum(out, rowsq(diff).double() / (d * s * s))
    return out


def path_line(d: int, N: int, m: int, policy: QualityPolicy = QualityPolicy()) -> float:
    """The ratio above which a draw counts as off its path: the ``1 - level / (N m)``
    quantile of ``chi^2_d / d`` (``m`` kept states; ``level`` the chance that any of the
    ``N m`` ratios of exact paths crosses it), and at least ``policy.path_floor``."""
    from scipy import stats

    q = float(stats.chi2.isf(policy.path_level / max(1, N * m), d)) / d
    return max(policy.path_floor, q)


def escaped_draws(ratio: Tensor, x: Tensor, line: float, policy: QualityPolicy) -> Tensor:
    """``(B, N)`` bool: draws off their paths (``ratio > line``) that also lie more than
    ``policy.escape_distance`` times the cloud's median distance from its (coordinatewise)
    median."""
    off = ratio > line
    if not bool(off.any()):
        return off
    return off & (_median_distances(x) > policy.escape_distance)


def _median_distances(x: Tensor) -> Tensor:
    """``(B, N)``: each draw's distance from the cloud's coordinatewise median, over the
    median of those distances."""
    flat = x.reshape(x.shape[0], x.shape[1], -1).double()
    dist = (flat - flat.median(dim=1, keepdim=True).values).norm(dim=-1)
    return dist / dist.median(dim=1, keepdim=True).values


def residual_ratio(problem: InverseProblem, x: Tensor, log_weights: Tensor | None) -> Tensor | None:
    """``(B,)`` float64: the mean over the draws (weighted by ``log_weights`` ``(B, N)``
    when given) of ``sum_j z_j^2 / d_y``, ``z_j`` the normal score of ``y``'s entry ``j``
    under the draw's likelihood (:mod:`~bayesfilter_diff.samplers.scores`): for Gaussian noise
    of a known scale ``||y - A(x)||^2 / (d_y sigma_y^2)``, each problem's own ``sigma_y``; for
    Poisson noise and for Pyro sites of the laws that module lists (a problem's
    ``squared_scores_fn``) the randomised probability integral transform. ``None`` for the
    noiseless case and for a ``log_likelihood_fn`` without ``squared_scores_fn``.

    A posterior draw ``x'`` of an observation ``y`` the model produced makes ``(x', y)`` a
    draw of the joint law, so the scores are independent standard normals given ``x'``: each
    draw's ratio is ``chi^2_{d_y} / d_y`` (mean 1), whatever the prior, the operator and the
    likelihood, and the mean over exact draws is a conditional expectation of one of them
    (:func:`residual_line`)."""
    B, N = x.shape[:2]
    m = problem.y_flat.shape[-1]
    with torch.no_grad():
        if problem.log_likelihood_fn is not None:
            if problem.squared_scores_fn is None:
                return None
            try:  # (a diagnostic: a model it cannot replay must not cost the run)
                sq = problem.squared_scores_fn(x)
            except Exception as e:  # noqa: BLE001
                warnings.warn(
                    f"the posterior predictive check (info.residual_ratio) was skipped: the "
                    f"likelihood's normal scores could not be computed ({type(e).__name__}: {e})",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return None
            if sq is None:
                return None
            sq = sq.double()
        elif problem.noise == "poisson":
            y = problem.y_batched.unsqueeze(1)
            rate = problem.poisson_rate * problem.operator(x)
            z = poisson_scores(rate, y, uniforms_for(y))
            sq = rowsq(z.reshape(B, N, -1))
        elif problem.noise != "gaussian" or problem.min_noise_std <= 0:
            return None
        else:
            y = problem.y_batched.unsqueeze(1).to(x.dtype)
            r = torch.sub(y, problem.operator(x))
            sq = rowsq(r.reshape(B, N, -1)).double()  # (B, N)
            sq = sq / problem.noise_stds.to(device=x.device, dtype=torch.float64)[:, None] ** 2
    # a draw where the likelihood is undefined (a diverged rate) fits nothing
    sq = torch.nan_to_num(sq, nan=math.inf)
    if log_weights is None:
        mean = sq.mean(-1)
    else:
        w = torch.softmax(log_weights.double(), -1)
        mean = (torch.where(w > 0, w * sq, torch.zeros_like(sq))).sum(-1)
    return mean / m


def residual_low_line(d_y: int, policy: QualityPolicy = QualityPolicy()) -> float:
    """The residual ratio below which the draws fit the observation more tightly than its
    noise allows: the largest ``c`` with ``min_{b > c} E[(b - Q)_+] / (b - c) <= level``
    for ``Q ~ chi^2_{d_y} / d_y`` (the lower stop-loss bound, which holds for any
    conditional expectation of ``Q`` since it is smaller in convex order: exact draws of a
    model-generated ``y`` fall below it with chance at most ``level``), and at most
    ``policy.residual_low_floor`` (a mean square half the noise's). About 0.2 at
    ``d_y = 32``, 0.35 at 64, 0.5 from a few hundred; below 0.0005 for ``d_y <= 4``, where
    ``chi^2`` has mass near 0 and the check cannot fire."""
    import numpy as np
    from scipy import stats

    k = max(1, int(d_y))
    b = np.concatenate(
        [stats.chi2.ppf(np.logspace(-1, -14, 400), k) / k, np.linspace(0.01, 1.0, 200)]
    )
    stop_loss = b * stats.chi2.cdf(k * b, k) - stats.chi2.cdf(k * b, k + 2)
    c = float(np.max(b - stop_loss / policy.residual_level))
    return min(policy.residual_low_floor, c)


def precision_ratio(problem: InverseProblem, dtype: torch.dtype) -> Tensor | None:
    """``(B,)`` float64: the rounding of ``dtype`` at each observation's largest entry in
    units of its noise, ``eps(dtype) max_j |y_j| / sigma_y`` (for Pyro sites,
    ``eps(dtype)`` times ``problem.data_scale_ratio``, the largest ``max |y| / scale`` over
    the sites with a constant scale parameter); ``None`` where the likelihood has no noise
    scale known before the run. Above ``QualityPolicy.precision_line`` the
    dtype cannot resolve ``y`` (if it was rounded to it) nor the residuals ``y - A(x)``
    (computed in it) to a small fraction of the noise."""
    if problem.log_likelihood_fn is not None:
        # a Pyro site's own scale (Laplace, Student-t, ...), where it is a constant
        ratio = getattr(problem, "data_scale_ratio", None)
        if ratio is None:
            return None
        val = torch.finfo(dtype).eps * float(ratio)
        return torch.full((problem.batch_size,), val, dtype=torch.float64, device=problem.y.device)
    if problem.noise != "gaussian":
        return None
    if problem.min_noise_std <= 0:
        return None
    eps = torch.finfo(dtype).eps
    big = problem.y_flat.detach().abs().amax(-1).double()
    return eps * big / problem.noise_stds.to(device=big.device, dtype=torch.float64)


def residual_line(d_y: int, policy: QualityPolicy = QualityPolicy()) -> float:
    """The residual ratio above which the draws do not fit the observation: the least
    ``c`` with ``min_b E[(Q - b)_+] / (c - b) <= level`` for ``Q ~ chi^2_{d_y} / d_y``
    (the stop-loss bound, which holds for any conditional expectation of ``Q``: exact
    draws of a model-generated ``y`` cross it with chance at most ``level``), and at least
    ``policy.residual_floor`` (a residual whose mean square is twice the noise's)."""
    import numpy as np
    from scipy import stats

    k = max(1, int(d_y))
    b = stats.chi2.isf(np.logspace(-1, -14, 400), k)
    stop_loss = (k * stats.chi2.sf(b, k + 2) - b * stats.chi2.sf(b, k)) / k
    c = float(np.min(b / k + stop_loss / policy.residual_level))
    return max(policy.residual_floor, c)


#: ``sigma / alpha`` of the time at which :func:`support_ratio` renoises the draws
SUPPORT_NOISE = 0.3


def support_ratio(
    prior: DiffusionModel, x: Tensor, t_min: float, t_max: float, per_particle: bool = False
) -> Tensor:
    """How far the prior's denoiser moves the draws ``x`` ``(B, N, *event)``, per problem
    ``(B,)`` float64: renoised to the time ``t`` in ``[t_min, t_max]`` where
    ``sigma / alpha = SUPPORT_NOISE`` (the nearest end if the path does not reach it),
    ``x_t = alpha x + sigma z``, the mean over particles of ``||E[x0 | x_t] - x||^2`` over
    ``d sigma^2 / alpha^2``.

    For draws of the prior this is at most 1 whatever the prior and its scale (the
    denoiser's mean squared error is at most that of ``x_t / alpha``, which is
    ``d sigma^2 / alpha^2``); draws where the prior has little mass are pulled back and
    score far above it. The power is best for data whose scale is near ``SUPPORT_NOISE``
    or below (standardised data, images in ``[-1, 1]``): a two-component mixture's draws
    shifted by 10 standard deviations of its components score 7.4 / 21 / 7.1 / 1.8 / 1.03
    at scales 0.1 / 0.3 / 1 / 3 / 30 (at large scales the renoising is local). One
    network evaluation per particle (not counted in ``nfe``); the
    noise ``z`` comes from a generator of its own (seed 0), so the caller's stream and the
    run's draws are untouched. ``per_particle=True``: the ``(B, N)`` ratios whose mean
    this is (their spread gives its Monte Carlo error).
    """
    sch = prior.schedule
    lam = torch.tensor([-2.0 * math.log(SUPPORT_NOISE)], dtype=torch.float64)
    t = time_at_log_snr(sch, lam, t_min, t_max)
    ratio = (sch.sigma(t) / sch.alpha(t)).item()
    t_x = t.to(dtype=x.dtype, device=x.device)
    a, s = sch.alpha(t_x), sch.sigma(t_x)
    gen = torch.Generator(device=x.device).manual_seed(0)
    z = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    x0 = prior.denoise(z.mul_(s).add_(x, alpha=float(a)), t_x.reshape(()))
    d = x[0, 0].numel()
    moved = (x0 - x).reshape(x.shape[0], x.shape[1], -1).double().pow(2).sum(-1)
    moved = moved / (d * ratio**2)
    return moved if per_particle else moved.mean(-1)


def _problems(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(mask).flatten().tolist())


def _where(problems: tuple[int, ...], batched: bool) -> str:
    if not batched:
        return ""
    shown = list(problems[:8])
    more = f" and {len(problems) - 8} more" if len(problems) > 8 else ""
    return f" for problem(s) {shown}{more}"


def _residual_words(gaussian: bool, value: float, obs_dim: int) -> str:
    """The residual ratio ``value`` in words, for the messages."""
    if gaussian:
        return (
            f"mean squared residual ||y - A(x)||^2 is {value:.3g} times d_y sigma_y^2 "
            f"(d_y = {obs_dim})"
        )
    return (
        f"mean squared normal score of y under their likelihood (each entry's probability "
        f"integral transform through Phi^-1, randomised for counts) is {value:.3g} per entry "
        f"(d_y = {obs_dim})"
    )


def assess(
    name: str,
    info: RunInfo,
    samples: Tensor,
    num_samples: int,
    scale: float,
    batched: bool,
    policy: QualityPolicy = QualityPolicy(),
    log_weights: Tensor | None = None,
    obs_dim: int = 0,
    precision: Tensor | None = None,
    dtype: torch.dtype | None = None,
    gaussian: bool = True,
    shared_draw: bool = False,
) -> list[QualityIssue]:
    """The findings of one run (empty for a healthy one).

    Parameters
    ----------
    name
        The sampler's name (for the messages).
    info
        The run's record (ESS trace, ancestors, distinct samples).
    samples
        ``(B, N, *event)``.
    num_samples
        ``N``.
    scale
        The typical norm of a draw the run started from (``sigma(t_max) sqrt(d)``, or
        larger): draws far beyond it count as exploded.
    batched
        Whether to name problems in the messages.
    policy
        The thresholds.
    log_weights
        ``(B, N)`` final log-weights of a weighted sampler (particles of weight 0 are not
        counted as exploded).
    obs_dim
        ``d_y``, the size of one observation (for the residual check's line).
    precision, dtype
        :func:`precision_ratio` ``(B,)`` of the coarser of the input's and the
        computation's dtype, and that dtype (for the messages).
    gaussian
        Whether the likelihood is Gaussian noise (the residual check's messages then speak of
        ``||y - A(x)||^2``; otherwise of normal scores).
    shared_draw
        Whether the sampler conditions the run on one random draw shared by its particles
        (:attr:`~bayesfilter_diff.samplers.base.Sampler.shared_draw`): a ``shared_draw``
        finding for every run of ``N >= min_particles``.
    """
    N = num_samples
    out: list[QualityIssue] = []
    if shared_draw and N >= policy.min_particles:
        out.append(
            QualityIssue(
                "shared_draw",
                tuple(range(samples.shape[0])),
                f"{name}: every particle of this run follows one random noised path of the "
                "observation, drawn once per run; on a finite grid each run is conditioned on "
                "it, so runs differ by more than their own diagnostics show (the genealogy "
                "ESS sees the particles, not the path): measured with SMCDiff on an 8-D "
                "two-mode mixture with one observed coordinate (N = 4000, 100 steps), a mode "
                "weight of 0.238 came out 0.13-0.45 over six runs whose genealogy predicted "
                "an error of 0.01-0.015. Remedies: the spread of independent runs "
                "(diagnostics.runs_check); an asymptotically exact sampler (TDS; MCGdiff for "
                "linear-Gaussian problems).",
            )
        )
    if info.ess is not None and N < policy.min_particles:  # a weighted run
        out.append(
            QualityIssue(
                "few_particles",
                tuple(range(samples.shape[0])),
                f"{name}: N = {N} particles are too few to check this run: the ESS, "
                f"lineage and spread checks need N >= {policy.min_particles}, and its Monte "
                "Carlo error cannot be estimated (info.log_evidence_se is NaN). Remedy: more "
                "particles; for error bars, several independent runs "
                "(diagnostics.runs_check).",
            )
        )
    jacobian = name == "TDS" and getattr(info.extra, "twist", None) == "jacobian"
    if info.min_ess is not None and info.ess is not None and N >= policy.min_particles:
        floor = max(2.0, policy.min_ess_fraction * N)
        low = info.min_ess < floor
        if bool(low.any()):
            probs = _problems(low)
            k = int(info.ess[:, probs[0]].argmin())
            t = float(info.times[min(k, info.num_steps)]) if info.times is not None else math.nan
            worst = float(info.min_ess[list(probs)].min())
            out.append(
                QualityIssue(
                    "min_ess",
                    probs,
                    f"{name}: the particle weights degenerated{_where(probs, batched)}: the "
                    f"smallest ESS before resampling was {worst:.3g} of N = {N} (first at "
                    f"step {k}, t = {t:.3g}), so a few particles carried the posterior and the "
                    "draws and evidence are unreliable. Remedies: more particles; "
                    + (_JACOBIAN_TAIL if jacobian else "")
                    + "more steps; "
                    + ("adaptive steps (TDS(adaptive_ess=0.1)); " if name == "TDS" else "")
                    + (
                        "the full or a low-rank Hessian in the Laplace twist (it used an "
                        "isotropic curvature: more coordinates than TDS(laplace_max_dim=...) "
                        "and no Hessian range of rank below laplace_max_dim - 8 found; raise "
                        "laplace_max_dim above that rank, or above d for the full Hessian: a "
                        "50-count Poisson GLM at d = 100, N = 256: log-evidence -167.8 to "
                        "-171.1 with the Hessian, -223 to -260 without, against -168.8; the "
                        "full Hessian costs d backward passes of the likelihood per Newton "
                        "step and a d x d factorisation per particle, minutes at d = 100 and "
                        "over a quarter of an hour at d = 256 with N = 64, on one core); "
                        if "isotropic" in str(getattr(info.extra, "twist", ""))
                        else ""
                    )
                    + "TDS's conditioned proposal (exact conditioning at the informative end "
                    "for a linear-Gaussian problem; for other sites TDS(proposal='conditioned'), "
                    "the kernel conditioned on the Laplace twist's quadratic model); "
                    "check that noise_std is not far smaller than the model's error.",
                )
            )
    if info.genealogy_ess is not None and N >= policy.min_particles:
        thin = info.genealogy_ess < policy.genealogy_fraction * N
        if info.ancestors is not None and N >= policy.genealogy_min_particles:
            # below ~50 lineages the estimate itself is unreliable (biased high)
            thin = thin | (info.ancestors.to(thin.device) < policy.min_lineages)
        if bool(thin.any()):
            probs = _problems(thin)
            i = probs[int(info.genealogy_ess[list(probs)].argmin())]
            est = float(info.genealogy_ess[i])
            worth = (
                f"by the genealogy estimate they are worth about {est:.3g} independent draws "
                f"of N = {N}, so posterior averages carry about {math.sqrt(N / est):.2g} times "
                "the Monte Carlo error of N exact draws (more if the run missed a region of "
                "the posterior, which no particle's genealogy shows)"
            )
            if info.ancestors is not None:
                k_all = info.ancestors.to(info.genealogy_ess.device)[list(probs)]
                k = int(k_all.min())
                if k < policy.min_lineages:
                    # the estimate is biased high here: the lineage count is the warning
                    worth = (
                        f"they descend from only {k} of the N = {N} initial particles, too "
                        "few for the estimate of their worth (genealogy ESS) or of the "
                        "evidence's error (info.log_evidence_se, then far too small) to be "
                        f"trusted; posterior averages may carry up to about "
                        f"{math.sqrt(N / k):.2g} times the Monte Carlo error of N exact draws"
                    )
                else:
                    worth += f" ({int(info.ancestors[i])} surviving initial lineages)"
            # TDS's conditioned proposal is the remedy the others are pointed to; for TDS
            # itself 400 steps instead of 100 left the error of such draws as it was (d = 80)
            remedy = (
                "several independent runs, checked against each other and pooled "
                "(diagnostics.runs_check)."
                if name == "TDS"
                else "for a linear-Gaussian problem, TDS (its conditioned proposal keeps the "
                "lineages); error bars from independent runs (diagnostics.runs_check)."
            )
            if name == "TDS" and getattr(info.extra, "twist", None) == "chain":
                # the operator's twist (a locally flat prior): anisotropic priors thin it
                remedy = _JACOBIAN_REMEDY + remedy
            elif jacobian:
                remedy = _JACOBIAN_TAIL + remedy
            out.append(
                QualityIssue(
                    "genealogy",
                    probs,
                    f"{name}: the draws rest on a thin genealogy{_where(probs, batched)}: "
                    f"{worth}. Remedies: more particles; " + remedy,
                )
            )
    if info.distinct is not None and N >= policy.min_particles:
        few = info.distinct < max(2.0, policy.distinct_fraction * N)
        if bool(few.any()):
            probs = _problems(few)
            worst = int(info.distinct[list(probs)].min())
            out.append(
                QualityIssue(
                    "distinct",
                    probs,
                    f"{name}: only {worst} distinct samples of N = {N}{_where(probs, batched)}: "
                    "the cloud is copies of a few particles (the final weights' ESS overstates "
                    "it). Remedies: more particles or steps; resample less often "
                    "(ess_threshold < 1, systematic resampling).",
                )
            )
    if info.start_kl is not None and info.start_kl > policy.start_kl:
        probs = tuple(range(samples.shape[0]))
        tv = math.sqrt(info.start_kl / 2)
        out.append(
            QualityIssue(
                "start",
                probs,
                f"{name}: the chain starts from the reference N(0, sigma_T^2 I), which is "
                f"{info.start_kl:.2g} nats from this prior's exact noisy marginal p_T (its "
                "mass lies far from the origin on the scale 1 / alpha_T), so the chain's "
                "prior, and with it the posterior this run targets, can be off the model's "
                f"(total variation up to {tv:.2g}; far modes misweighted) whatever the "
                "diagnostics of the weights say. Remedies: exact_start=True on the "
                "mixture's diffusion(), or a longer path (a schedule with smaller alpha_T).",
            )
        )
    ratio = info.support_ratio
    if ratio is not None and bool((ratio > policy.support_factor).any()):
        probs = _problems(ratio > policy.support_factor)
        worst = float(ratio[list(probs)].max())
        out.append(
            QualityIssue(
                "off_support",
                probs,
                f"{name}: the draws lie where the prior has little mass{_where(probs, batched)}: "
                f"renoised to sigma / alpha = {SUPPORT_NOISE:g} and denoised by the prior they "
                f"move {worst:.3g} times the mean squared distance that bounds the move of "
                "the prior's own draws. Either the step size overshoots or the run diverged "
                "(then these are not posterior draws), or the observation lies far outside "
                "what the prior can produce (a prior-data conflict: exact posteriors scored "
                "up to 2 with a few coordinates 10 prior standard deviations off, 6-9 with "
                "all of them). Remedies: a smaller step size / guidance scale (DPS scale, "
                "RED-diff lr, DAPS lr), more steps; an exact sampler (TDS; MCGdiff for "
                "linear-Gaussian problems) tells the two apart, its evidence measures the "
                "conflict.",
            )
        )
    norms = samples.reshape(samples.shape[0], samples.shape[1], -1).double().norm(dim=-1)
    if info.escaped is not None and bool((info.escaped > 0).any()):
        probs = _problems(info.escaped > 0)
        i = probs[int(info.escaped[list(probs)].argmax())]
        count = int(info.escaped[i])
        r = float(info.path_ratio[i]) if info.path_ratio is not None else math.nan
        far = float(_median_distances(samples[i : i + 1]).max())
        out.append(
            QualityIssue(
                "escaped",
                probs,
                f"{name}: {count} of N = {N} draws escaped{_where(probs, batched)}: they lie "
                f"far from the rest (the farthest {far:.3g} times the cloud's median distance "
                "from its median) and their own paths do not lead there (a "
                f"state of the path was {math.sqrt(r):.3g} noise widths from alpha_t x0 "
                "against ~1 on an exact path): a step threw them off and the later steps did "
                "not bring them back (a learned network extrapolates where its prior has no "
                "data and need not pull them back). They are not posterior draws (on the "
                "benchmark mixtures 139 of 142 such draws lay beyond the exact posterior's 0.1% "
                "quantile of density) and they dominate averages (a mean, a variance). Remedies: a "
                "smaller step size / guidance scale (DPS scale, DAPS lr), more steps; an exact "
                "sampler (TDS; MCGdiff for linear-Gaussian problems).",
            )
        )
    if precision is not None and bool((precision > policy.precision_line).any()):
        probs = _problems(precision > policy.precision_line)
        worst = float(precision[list(probs)].max())
        kind = str(dtype).replace("torch.", "")
        out.append(
            QualityIssue(
                "precision",
                probs,
                f"{name}: {kind} cannot resolve the observation at its noise "
                f"level{_where(probs, batched)}: its rounding at the largest |y| is "
                f"{worst:.2g} noise standard deviations, so y (where it was rounded to "
                f"{kind}) and the residuals y - A(x) carry errors of that size in noise "
                "units, and the weights, the evidence and the misfit check with them "
                "(measured in float32: rounding of 0.09 / 0.18 noise sd put the default "
                "sampler's log-evidence a further 0.08 / 0.22 nats low, with nothing else "
                "warned; in bfloat16 a 64-D masked problem at noise_std 1e-3 ended 6 "
                "posterior sd off). Remedies: pass y, the operator and the prior in "
                "float64 (.double()); 16-bit data as float32.",
            )
        )
    rr = info.residual_ratio
    if rr is not None and obs_dim > 0:
        line = residual_line(obs_dim, policy)
        bad = rr > line
        if bool(bad.any()):
            probs = _problems(bad)
            worst = float(rr[list(probs)].max())
            cause = (
                "the sampler did not condition on y at this noise level (an approximate "
                "sampler's guidance or projection; a collapsed SMC run, see the other "
                "warnings)"
            )
            remedy = (
                "run an exact sampler (TDS; MCGdiff for linear-Gaussian problems): if its "
                "draws fit, this sampler was the problem (a larger guidance scale or more "
                "steps may help it); if they do not fit either, check the noise model "
                "(noise_std) and the prior"
                if log_weights is None
                else "more particles or steps if the run degenerated; otherwise check the "
                "noise model (noise_std: the data's error may be larger) and the prior (its "
                "evidence, log_evidence, measures the conflict)"
            )
            out.append(
                QualityIssue(
                    "misfit",
                    probs,
                    f"{name}: the draws do not fit the observation{_where(probs, batched)}: "
                    f"their {_residual_words(gaussian, worst, obs_dim)}, where the exact "
                    "posterior's draws of an "
                    f"observation the model could have produced stay below {line:.3g} (their "
                    "mean over such observations is 1). Either "
                    + cause
                    + ", or the model does not explain y (a noise model narrower than the "
                    "data's error, e.g. noise_std too small; a prior-data conflict). "
                    "Remedies: " + remedy + ".",
                )
            )
    if rr is not None and obs_dim > 0:
        low_line = residual_low_line(obs_dim, policy)
        tight = rr < low_line
        if low_line > 0 and bool(tight.any()):
            probs = _problems(tight)
            least = float(rr[list(probs)].min())
            out.append(
                QualityIssue(
                    "overfit",
                    probs,
                    f"{name}: the draws fit the observation more tightly than its noise "
                    f"allows{_where(probs, batched)}: their "
                    f"{_residual_words(gaussian, least, obs_dim)}, where the exact posterior's "
                    "draws of an observation the model could "
                    f"have produced stay above {low_line:.3g} (their mean is 1): they follow "
                    "y's noise, as a sampler that treats the data as noiseless or over-weights "
                    "them does (the spread of the posterior is then too small where y "
                    "informs it), or the noise model is wider than the data's error (noise_std "
                    "too large). Remedies: an "
                    "exact sampler (TDS; MCGdiff for linear-Gaussian problems) tells the two "
                    "apart; for this sampler a smaller guidance scale or its noise-aware "
                    "variant (DDNM+ for DDNM).",
                )
            )
    # draws far beyond the starting noise: a diverged step size or proposal (for weighted
    # samplers, among the particles that carry weight)
    if log_weights is not None:
        norms = torch.where(log_weights > -math.inf, norms, torch.zeros_like(norms))
    big = norms.max(-1).values > policy.explode_factor * scale
    if bool(big.any()):
        probs = _problems(big)
        worst = float(norms[list(probs)].max())
        remedy = (
            "a smaller step size / guidance scale (DPS scale, RED-diff lr, DAPS lr), more steps"
            if log_weights is None
            else "more steps (the proposal overshoots), a variance-inflated twist, or an "
            "exact sampler built for the likelihood (TDS's conditioned proposal or MCGdiff "
            "for linear-Gaussian problems)"
        )
        out.append(
            QualityIssue(
                "exploded",
                probs,
                f"{name}: draws exploded{_where(probs, batched)} (largest norm {worst:.3g}, "
                f"against {scale:.3g} for the starting noise): the run diverged, these are "
                f"not posterior draws. Remedies: {remedy}.",
            )
        )
    return out


def warn(issues: list[QualityIssue], stacklevel: int = 4) -> None:
    """Warn each finding as a :class:`~bayesfilter_diff.PosteriorQualityWarning`
    (``stacklevel`` counted from this function, as :func:`warnings.warn`'s)."""
    for issue in issues:
        warnings.warn(issue.message, PosteriorQualityWarning, stacklevel=stacklevel)

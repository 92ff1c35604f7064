"""Twisted Diffusion Sampler (TDS): sequential Monte Carlo with twisted proposals.

Wu, Trippe, Naesseth, Blei & Cunningham, "Practical and Asymptotically Exact Conditional
Sampling in Diffusion Models", NeurIPS 2023. Reference code: blt2114/twisted_diffusion_sampler.
See ``docs/methods/tds.md``.

Twisting function ``log p~_t(y | x_t) = log N(y; A(x0_hat(x_t)), (sigma_y^2 + v_t) I)``
(Gaussian noise; ``v_t`` from ``twist_variance``, ``sig2 = sigma_t^2 / alpha_t^2``:
``"none"`` 0 (paper), ``"inflated"`` ``sig2``, ``"pigdm"`` ``tau2 sig2 / (tau2 + sig2)``),
or, ``"operator"`` (linear operators), ``N(y; A x0_hat, sigma_y^2 I + sig2 A A^T)``: the
covariance of ``A x0`` given ``x_t`` under a locally flat prior, which the scalar
``"inflated"`` matches only when ``A A^T = I`` (masks). For every other likelihood (Poisson
noise, a custom ``log_likelihood_fn`` such as a Pyro Student-t or Bernoulli site, Gaussian
noise through a nonlinear operator) the twist is the same idea without a closed form: the
Laplace approximation of ``log int p(y | x0) N(x0; x0_hat, v_t I) dx0`` at the integrand's
mode (:func:`~bayesfilter_diff.samplers.kernels.smoothed_log_likelihood`), which equals the
``"operator"`` twist for a linear-Gaussian likelihood; ``"none"`` keeps the paper's
``log p(y | x0_hat(x_t))``, which collapses on informative sites.
Update (paper notation ``t = T .. 0``; ours: a step from ``t`` to ``s < t``):

1. ``x_T ~ N(0, sigma_T^2 I)`` with weight ``w_T = p~_T(y | x_T)``;
2. twisted ``x0~ = x0_hat + (sigma_t^2 / alpha_t) grad_{x_t} log p~_t(y | x_t)``
   (conditional Tweedie; untwisted where ``alpha_t = 0``);
3. proposal ``q(x_s | x_t, y) = N(alpha_s x0~ + c_eps eps~, std^2 I)``, the ancestral
   (DDIM ``eta = 1``) kernel at ``x0~``; deterministic (the untwisted mean) where
   ``std = 0``, i.e. the last step of VP / flow paths;
4. weight ``w_s = p(x_s | x_t) p~_s(y | x_s) / [q(x_s | x_t, y) p~_t(y | x_t)]``, with
   the exact likelihood ``p(y | x_0)`` in place of ``p~_0`` at the last step.

``proposal="conditioned"`` (the default where it applies: Gaussian noise through a linear
operator with an SVD or a small matrix, ``twist_variance="operator"``) replaces step 3
where the twist is sharper than the prior (``v_s <= prior_variance``) by the model's kernel
``N(x_s; m, std^2 I)`` (``m`` its untwisted mean) conditioned exactly on the twist at ``s``
linearised as ``A x0_hat(x_s) ~ A (x0_hat(x_t) + (x_s - m) / alpha_s)`` (a rank-``r`` Gaussian
update in the operator's spectral coordinates); the weight is then
``Z(x_t) p~_s(y | x_s) / [p~_lin(y | x_s) p~_t(y | x_t)]`` with ``Z`` the linearised
predictive ``N(y; A x0_hat(x_t), sigma_y^2 I + (v_s + std^2 / alpha_s^2) A A^T)``. Its twist
variance is the chain's own, ``v_{t_k} = sum_{j >= k} std_j^2 / alpha_{t_{j+1}}^2`` over the
rest of the grid (``v = 0`` at the last time), so ``Z(x_t) = p~_t(y | x_t)`` exactly: where
``x0_hat`` is linear (a locally flat prior, the informative end of the path) the weights are
constant and nothing is resampled. No backward pass in those steps.

For the Laplace twist ``proposal="conditioned"`` does the same with the likelihood's
quadratic model from the twist's evaluation at the parent (the curvature at the
integrand's mode, eigendecomposed, and the gradient whose smoothing is the twist's own at
``x0_hat(x_t)``): the kernel times that model smoothed by ``v_s`` at ``x0_hat(x_t) + (x_s -
m) / alpha_s`` is Gaussian, drawn and normalised in closed form per eigendirection, and the
weight is the same ratio (docs/methods/tds.md, "The conditioned proposal for the Laplace
twist").

``twist_variance="jacobian"`` (Gaussian noise through a linear operator; ``bfd.infer``'s
default with at most ``JACOBIAN_MAX_OBSERVATIONS`` observed coordinates ``m``) takes the twist's covariance from the denoiser's Jacobian
``J = d x0_hat / d x_t`` instead of a locally flat prior: ``N(y; A x0_hat, sigma_y^2 I +
(sigma_t^2 / alpha_t) A J A^T)`` (Tweedie's second moment, the likelihood approximation of
Boys et al., "Tweedie Moment Projected Diffusions for Inverse Problems", 2023), exact for a
Gaussian prior of any covariance. Every move conditions the kernel ``N(m, v I)`` on that
twist at ``s`` linearised at the kernel's mean, ``A x0_hat_s(x_s) ~ A x0_hat_s(m) + A J_s(m)
(x_s - m)`` (Matheron's rule; ``m`` backward passes through the network at ``(m, s)``), with
the same weight form as above; the twist at the new particle keeps the covariance ``C_s(m)``
of its kernel's mean (a function of the path, divided out at the next step). Two network
calls per step. A network's Jacobian carries its error times ``sigma_t^2 / alpha_t^2``, so
it is trusted where the twist is sharp only: for a prior without an exact denoiser
(``prior.exact_denoiser``, a mixture's closed form) the moves are the operator's until the
chain's twist variance falls to ``prior_variance`` and then blend the operator's conditioned
move into the Jacobian's over one decade of that variance, the covariance held above a tenth
of the locally flat prior's (``_JACOBIAN_FLOOR``; docs/methods/tds.md, "The Jacobian
twist").

The weighted particles target the posterior of the discrete chain
``p_theta(x_0) p(y | x_0)`` as ``N -> inf``, and the loop's evidence estimate is unbiased
for ``p_theta(y)``.

Defaults and departures:

- ``twist_variance="operator"``: the code's ``var_type=1`` (``"inflated"``) with the
  operator's ``A A^T`` (identical for masks; for other operators the scalar inflation is
  too sharp by ``s_i^2`` and diverges when ``s_i >> 1``, measured in docs/methods/tds.md);
  the Laplace-smoothed likelihood with ``v_t = sig2`` for nonlinear operators and
  non-Gaussian likelihoods (the code: the likelihood at ``x0_hat``, which collapses there:
  docs/methods/tds.md). The paper's ``"none"`` makes the weights heavy-tailed at small
  ``sigma_y``; ``prior_variance = 1`` for ``"pigdm"``.
- Resampling ``"systematic"`` at ``ess_threshold = 0.5`` (the image code: every step).
- The full Gaussian density with ``sigma_y`` (the code: noiseless, no normalising
  constant); the kernel's ancestral variance (the code: the model's variance).
- ``clamp_x0=None`` (the code clips ``x0~`` to ``[-1, 1]``); when set it acts on the
  proposal mean only, so the weights stay exact.
- One network call and one backward pass per particle per step; Gaussian noise needs
  ``noise_std > 0``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple, cast

import torch
from torch import Tensor

from ..operators.base import LinearOperator
from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from ..result import Result
from ..smc.particles import MIN_LINEAGES
from . import quality
from .base import Context, Move, Requirements, SMCSampler, check_clamp, check_finite_nonnegative
from .kernels import (
    LOG2PI,
    SiteQuadratic,
    SmoothedLogLikelihood,
    ddim_coefficients,
    ddim_mean,
    ddim_weights,
    most_general_curvature,
    rowdot,
    rowsq,
    smoothed_log_likelihood,
    tweedie_coefficient,
)
from .spectral import PixelGaussian, PixelObservation, informative_time_grid, observe_on_pixels

__all__ = ["TDS"]

_TWISTS = ("none", "inflated", "pigdm", "operator", "jacobian")
_PROPOSALS = ("auto", "gradient", "conditioned", "model")
_REVERSE_VARIANCES = ("ddim", "analytic", "reference", "observed")
#: the conditioned proposal takes the SVD of an operator's matrix (per problem for a
#: per-problem operator) when the operator has none, up to this many entries in all
_DENSE_MAX = 2**24


#: :func:`~bayesfilter_diff.samplers.registry.default_sampler` takes ``twist_variance=
#: "jacobian"`` for linear-Gaussian problems with at most this many observed coordinates
#: (its cost per trusted step: two network calls and one backward pass per observed
#: coordinate; 3x the operator twist's CPU time on the digits U-Net with 10)
JACOBIAN_MAX_OBSERVATIONS = 16

#: ``twist_variance="jacobian"`` with a network: the twist's covariance is held above
#: ``sigma_y^2 I + f v_t A A^T`` (``f`` this, ``v_t`` the chain's twist variance), so a
#: network's Jacobian cannot make the twist more than ``1 / f`` times sharper than a locally
#: flat prior's (on ``moons_diffusion`` at ``sigma_y = 1e-3`` without it the evidence was
#: 0.1 nats low with a healthy genealogy; docs/methods/tds.md)
_JACOBIAN_FLOOR = 0.1

#: ``reverse_variance="analytic"``: the exact trace of the denoiser's Jacobian (one backward
#: pass per coordinate) up to this dimension, one Rademacher probe above it.
_EXACT_TRACE_MAX_DIM = 4


def _gaussian_x0_variance(schedule, t: Tensor, tau2: float) -> Tensor:
    """``Var[x0 | x_t]`` of a ``N(m, tau2 I)`` prior: ``tau2 sigma_t^2 / (alpha_t^2 tau2 +
    sigma_t^2)`` (finite at ``alpha_t = 0``)."""
    a2, s2 = schedule.alpha(t) ** 2, schedule.sigma(t) ** 2
    return tau2 * s2 / (tau2 * a2 + s2)


def _uses_gaussian_twist(problem: InverseProblem) -> bool:
    return problem.noise == "gaussian" and problem.log_likelihood_fn is None


def _gaussian_logpdf(r: Tensor, chol: Tensor) -> Tensor:
    """``log N(r; 0, L L^T)`` over the last axis of ``r`` for the Cholesky factor ``L``."""
    u = torch.linalg.solve_triangular(chol, r.unsqueeze(-1), upper=False).squeeze(-1)
    log_det = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * rowsq(u) - log_det - 0.5 * r.shape[-1] * LOG2PI


@dataclass(frozen=True)
class TDSState:
    """Particles ``x_t``, their ``x0_hat``, twist ``log p~_t(y | x_t)`` and its gradient
    (the last three are ``None`` after the final move)."""

    x: Tensor
    x0: Tensor | None = None
    grad: Tensor | None = None
    log_twist: Tensor | None = None
    x0_var: Tensor | None = None  # (B, N): Var[x0 | x_t] per coordinate ("analytic")
    # with rejuvenation: the model's kernel that made x_t from its parent, N(mean, var I)
    kernel_mean: Tensor | None = None
    kernel_var: Tensor | None = None  # (B, N)
    # the Laplace twist's mode x* per particle (x's shape): where the next evaluation of
    # the particle's twist starts Newton (laplace_warm_start)
    mode: Tensor | None = None
    # the conditioned proposal for the Laplace twist: the log-likelihood's second-order
    # model at x0_hat (kernels.SiteQuadratic's fields, float64): point and gradient
    # (B, N, d), curvature vectors (B, N, d, k) (None: the axes) and values (B, N, k); kept
    # as they were by rejuvenation's moves (any model keeps the weights exact)
    quad_point: Tensor | None = None
    quad_grad: Tensor | None = None
    quad_vectors: Tensor | None = None
    quad_values: Tensor | None = None
    # reverse_variance="observed": the kernel's Cov[x0 | x_t] from the observed directions,
    # H H^T = Cov Q (Q^T Cov Q)^-1 Q^T Cov (Q: the right singular vectors of A), H (B, N, d,
    # k) in the run's dtype, times sqrt(w), and the weight w (B, N) of that kernel against
    # the reference's (the Jacobian's trust), from the denoiser's A J at x_t itself (None:
    # the reference's scalar, as after the first move)
    observed_root: Tensor | None = None
    observed_weight: Tensor | None = None


class _TwistEval(NamedTuple):
    """:meth:`TDS._twist` at particles ``x_t``: ``x0_hat``, ``log p~_t(y | x_t)`` ``(B, N)``,
    its gradient in ``x_t`` (``None`` where not asked for), ``Var[x0 | x_t]`` per coordinate
    ``(B, N)`` (``None`` unless the kernel carries it) and the Laplace twist's mode
    (``None`` for the other twists)."""

    x0: Tensor
    log_twist: Tensor
    grad: Tensor | None
    x0_var: Tensor | None
    mode: Tensor | None = None
    quadratic: SiteQuadratic | None = None


def _state(x: Tensor, tw: _TwistEval) -> TDSState:
    """The state of particles ``x`` whose twist is ``tw``."""
    q = tw.quadratic
    return TDSState(
        x,
        tw.x0,
        tw.grad,
        tw.log_twist,
        tw.x0_var,
        mode=tw.mode,
        quad_point=None if q is None else q.point,
        quad_grad=None if q is None else q.grad,
        quad_vectors=None if q is None else q.vectors,
        quad_values=None if q is None else q.values,
    )


@dataclass(frozen=True)
class TDSInfo:
    """What the run used: ``twist`` is the ``twist_variance`` (``"chain"``: the chain's own
    variance of the conditioned proposal; ``"inflated"`` also for the conditioned proposal
    with the analytic reverse variance, ``sig2``), ``"likelihood"`` (the likelihood at
    ``x0_hat``) or ``"laplace(<variance>, <curvature>)"`` (the same variances); ``proposal``
    is ``"gradient"``, ``"conditioned"`` or ``"model"``."""

    twist: str
    proposal: str = "gradient"
    #: with ``reverse_variance="reference"``: whose ``Var[x0 | x_t]`` the kernel carries,
    #: ``"prior"`` (the prior's own average) or ``"gaussian(<tau2>)"`` (the stand-in)
    #: with ``jacobian_fallback``: why this run replaced a Jacobian-twist run of the same
    #: call (its smallest ESS, inserted steps and lineages), ``None`` when it did not
    reference_variance: str | None = None
    replaced: str | None = None


def _pixel_twist(
    op: LinearOperator, pix: PixelObservation, sig2: Tensor, s2: Tensor | float
) -> Callable[[Tensor], Tensor]:
    """:meth:`TDS._operator_twist` for an operator whose SVD is diagonal in pixels (masks,
    the identity): ``A A^T`` is diagonal, so ``log N(y; A x0, s2 I + sig2 A A^T)`` is a
    weighted sum of squares on the image, ``sum_j (y~_j - s_j x0_j)^2 / (sig2 s_j^2 + s2)``
    over the observed pixels (``y~`` placed on the pixel grid): no gather of the observed
    entries and no scatter in its gradient. The weights per class of pixels (one value per
    singular value), then one gather each."""
    sp, label = pix.classes.values, pix.classes.label  # (u,), (d,)
    noise = s2 if not isinstance(s2, Tensor) else s2.reshape(-1, 1, 1)
    den = sig2 * sp**2 + noise  # (u,) or (B, 1, u)
    sw = torch.where(sp > 0, torch.where(sp > 0, den, torch.ones_like(den)).rsqrt(), 0.0)
    # the residual weighted by 1 / sqrt(den), written once and read by a row-wise dot
    sw_pix = sw.index_select(-1, label)
    return PixelGaussian(op, sw_pix * pix.y, (sw * sp).index_select(-1, label))


@dataclass(frozen=True)
class TDS(SMCSampler):
    """Twisted Diffusion Sampler (Wu et al., NeurIPS 2023) for any differentiable likelihood.

    Parameters
    ----------
    num_steps
        Number of steps of the time grid (inherited, default 100).
    grid
        ``"uniform"`` or ``"ddpm"`` (inherited).
    resampling
        Resampling scheme (inherited, default ``"systematic"`` as in the reference code).
    ess_threshold
        Resample a problem's particles when ``ESS < ess_threshold * N`` (inherited,
        default 0.5; 1 resamples at every step, 0 never).
    twist_variance
        ``"operator"`` (default: ``N(y; A x0_hat, sigma_y^2 I + sig2 A A^T)`` for a linear
        operator, ``"inflated"`` otherwise), ``"inflated"`` (code ``var_type=1``), ``"none"``
        (paper) or ``"pigdm"`` (code ``var_type=2`` / ``6``): the extra variance ``v_t`` of
        the Gaussian twist ``N(y; A(x0_hat), (sigma_y^2 + v_t) I)``. For non-Gaussian
        likelihoods it sets the smoothing variance of the Laplace twist (``"operator"`` and
        ``"inflated"``: ``sig2``; ``"pigdm"``: its ``v_t``; ``"none"``: the likelihood at
        ``x0_hat``). ``"jacobian"`` (Gaussian noise through a linear operator only; its
        own conditioned proposal, no ``clamp_x0``, no rejuvenation, kernel ``"ddim"``,
        ``"reference"`` or ``"observed"``): the covariance of ``A x0`` given ``x_t`` from
        the denoiser's Jacobian, ``(sigma_t^2 / alpha_t) A J A^T`` (module docstring), one
        backward pass per observed coordinate (two with ``"observed"``) and two network
        calls per step; it keeps the lineages that a full-covariance (anisotropic) prior
        costs the operator's twist. At every move for
        a prior with an exact denoiser (``prior.exact_denoiser``: a Gaussian mixture), on
        the sharp end of the path only for a network, whose Jacobian is inaccurate at high
        noise (docs/methods/tds.md, "The Jacobian twist").
    prior_variance
        ``tau2``, the variance per coordinate of a Gaussian stand-in ``N(m, tau2 I)`` for
        the prior, or ``None`` (default). ``"pigdm"``'s ``v_t = tau2 sig2 / (tau2 + sig2)``
        and the conditioned proposal's threshold take it (``None``: 1; the reference code's
        image default is 0.12). ``reverse_variance="reference"`` adds ``Var[x0 | x_t]`` of
        the stand-in or, with ``None``, the prior's own average
        (:meth:`~bayesfilter_diff.DiffusionModel.x0_variance`) where the model knows it (a
        Gaussian mixture), a unit Gaussian's elsewhere (a network: there the unit stand-in
        measured closer than the network's own average, docs/methods/tds.md).
    clamp_x0
        ``(low, high)`` to clamp the twisted ``x0~`` of the proposal, or ``None`` (default).
    max_log_snr_step
        Refine the time grid to this log-SNR step where a Gaussian twist through a linear
        operator is informative, and extend it past the last positive time until the
        twist's inflation is under 1% of ``sigma_y^2`` (default 1.0; 0: the plain grid).
        Inserted times cost one network call each (``info.nfe``): +5 to +35 on a
        100-step uniform grid for ``sigma_y / s_max`` from 1e-1 to 1e-4.
    adaptive_ess
        Adaptive steps: a move whose incremental weights would bring a problem's ESS below
        this fraction of ``N`` is discarded and redone to an intermediate time (the log-SNR
        midpoint; the time midpoint towards ``t = 0``), repeatedly, at most
        ``max_inserted_steps`` times per run (default 200). Default 0 (off);
        :func:`~bayesfilter_diff.samplers.registry.default_sampler` (``bfd.infer`` with no
        sampler) sets 0.1. The discarded moves' network calls count in ``info.nfe``, the
        insertions in ``info.inserted_steps``; the final grid is ``info.times``. The grid
        is shared by the problems of a batch, so with adaptive steps a problem's grid (not
        its target's limit) can depend on its neighbours.
    max_inserted_steps
        See ``adaptive_ess``.
    proposal
        ``"auto"`` (default): ``"conditioned"`` where it applies (Gaussian noise, a linear
        operator with an SVD or a matrix of at most 2**24 entries, per problem included,
        ``twist_variance="operator"``, ``reverse_variance`` ``"ddim"`` or ``"reference"``,
        no ``clamp_x0``),
        ``"gradient"`` otherwise; ``"gradient"``: the paper's twisted ancestral step
        everywhere; ``"conditioned"``: the exact Gaussian conditioning of the
        model's kernel on the linearised twist wherever the twist's variance is below
        ``prior_variance`` (module docstring), an error where it does not apply (it also
        takes ``reverse_variance="analytic"``, then conditioning the analytic kernel; not
        chosen by ``"auto"``); for the Laplace twist (non-Gaussian and nonlinear sites) the
        kernel conditioned on the twist's quadratic model (curvature at the mode, the
        twist's own gradient; :meth:`_laplace_conditioned_move`), no backward pass through
        the network on those steps. On the informative end of the path it keeps the weights
        flat, so far fewer lineages are lost to resampling (measured in
        docs/methods/tds.md). ``"model"``: the model's own reverse kernel, the twist in
        the weights only (no Tweedie shift, no gradient of the twist): where the twist's
        Gaussian around the denoiser's mean points the shift the wrong way (a multimodal
        prior under a likelihood with a symmetry, e.g. ``|x|``), the gradient proposal
        under-weights a mode with healthy diagnostics and this one does not; on
        informative likelihoods it loses more of its weights per step (docs/methods/tds.md,
        "A mode under-weighted by the Tweedie shift").
    rejuvenation_steps, rejuvenation_scale
        Resample-move: after each resampling, this many MALA moves of every particle's
        current state given its parent (:meth:`rejuvenate`; default 0, off), step
        ``rejuvenation_scale`` (default 0.5) times the kernel's standard deviation,
        adapted towards an acceptance of 0.57; acceptance in ``info.acceptance``.
    laplace_max_dim
        The Laplace twist's curvature: the likelihood's Hessian diagonal where two probes
        find it diagonal (a likelihood that factors over coordinates; 2 backward passes, any
        ``d``), else the full Hessian (its ``d`` rows from backward passes of the
        likelihood, batched where they fit, per Newton step; no network call) up to this
        signal dimension ``d`` (default 64); above it, a low-rank Hessian from at most this
        many Hessian-vector products (a randomised range finder) where its rank is at least 8
        below that, an isotropic estimate otherwise; ``info.extra.twist`` names the kind
        (docs/methods/tds.md, "Above laplace_max_dim").
    laplace_warm_start
        The Laplace twist's Newton starts from the particle's parent's mode where that is
        better than ``x0_hat`` and on the same mode of Newton's objective (no valley
        between them; default ``True``; fewer Newton steps per evaluation,
        docs/methods/tds.md, "Newton from the parent's mode"); ``False`` starts from
        ``x0_hat`` (and the anchors) only, so the twist is a function of ``x_t`` and the
        cloud alone.
    reverse_variance
        The reverse kernel's variance: ``"ddim"`` (default; the paper's DDIM ``eta = 1``
        kernel, ``std^2 I``, which drops ``b^2 Var[x0 | x_t]``), ``"analytic"`` (adds it,
        ``Var[x0 | x_t]`` per particle from the denoiser's Jacobian trace: one more backward
        pass per step) or ``"reference"`` (adds the prior's average one, or that of a
        ``N(m, prior_variance I)`` prior, see ``prior_variance``: the same for every
        particle, no network call; it keeps the conditioned proposal and
        the chain's own twist; :func:`~bayesfilter_diff.samplers.registry.default_sampler`'s
        choice for linear-Gaussian problems with more than 16 observations) or
        ``"observed"`` (``twist_variance="jacobian"`` only: the reference's, with ``b^2
        Cov[x0 | x_t]`` from the denoiser's Jacobian at each particle in the operator's
        observed directions and across them, Nystrom-completed; m more backward passes per
        step; the default's choice with at most 16). docs/methods/tds.md measures them.
    jacobian_fallback
        With ``twist_variance="jacobian"``: when a run's weights degenerated (the quality
        check's smallest-ESS finding) and its draws descend from fewer than
        ``MIN_LINEAGES`` (50) initial particles, the whole batch is run again, from the
        same generator, with the operator's twist and the reference kernel, and that run
        is returned
        (``info.extra.replaced`` says why; ``info.nfe`` and ``info.wall_time`` count both
        runs). The Jacobian twist, a Gaussian matched to the moments of ``x0 | x_t``,
        misjudges particles between the prior's modes when the data lie far from both
        (docs/methods/tds.md). Default ``False``;
        :func:`~bayesfilter_diff.samplers.registry.default_sampler` sets it.
    """

    # noise_positive: the final weight is the likelihood p(y | x0), a point mass for
    # noiseless Gaussian observations
    requires = Requirements(
        likelihoods=frozenset({"gaussian", "poisson", "custom"}),
        noise_positive=True,
        per_problem=True,
        differentiates=True,
    )
    exact_start = True
    exact = True

    twist_variance: str = "operator"
    prior_variance: float | None = None
    clamp_x0: tuple[float, float] | None = None
    laplace_max_dim: int = 64
    laplace_warm_start: bool = True
    max_log_snr_step: float = 1.0
    adaptive_ess: float = 0.0
    max_inserted_steps: int = 200
    reverse_variance: str = "ddim"
    proposal: str = "auto"
    rejuvenation_steps: int = 0
    rejuvenation_scale: float = 0.5
    jacobian_fallback: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.twist_variance not in _TWISTS:
            raise ValueError(
                f"twist_variance must be one of {_TWISTS}, got {self.twist_variance!r}"
            )
        pv = self.prior_variance
        if pv is not None and (
            isinstance(pv, bool) or not isinstance(pv, int | float) or not 0 < pv < math.inf
        ):
            raise ValueError(f"prior_variance must be None or a finite number > 0, got {pv!r}")
        check_clamp("clamp_x0", self.clamp_x0)
        m = self.laplace_max_dim
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"laplace_max_dim must be an int >= 0, got {m!r}")
        if not isinstance(self.laplace_warm_start, bool):
            raise ValueError(
                f"laplace_warm_start must be True or False, got {self.laplace_warm_start!r}"
            )
        a = self.adaptive_ess
        if isinstance(a, bool) or not isinstance(a, int | float) or not 0 <= a < 1:
            raise ValueError(f"adaptive_ess must be a number in [0, 1), got {a!r}")
        if self.reverse_variance not in _REVERSE_VARIANCES:
            raise ValueError(
                f"reverse_variance must be one of {_REVERSE_VARIANCES}, got "
                f"{self.reverse_variance!r}"
            )
        if self.reverse_variance == "observed" and self.twist_variance != "jacobian":
            raise ValueError(
                "reverse_variance='observed' takes the kernel's covariance in the observed "
                "directions from the Jacobian twist: it needs twist_variance='jacobian', got "
                f"{self.twist_variance!r}"
            )
        if self.proposal not in _PROPOSALS:
            raise ValueError(f"proposal must be one of {_PROPOSALS}, got {self.proposal!r}")
        if not isinstance(self.jacobian_fallback, bool):
            raise ValueError(
                f"jacobian_fallback must be True or False, got {self.jacobian_fallback!r}"
            )
        if self.jacobian_fallback and self.twist_variance != "jacobian":
            raise ValueError(
                "jacobian_fallback replaces a collapsed run of the Jacobian twist: it needs "
                f"twist_variance='jacobian', got {self.twist_variance!r}"
            )
        mi = self.max_inserted_steps
        if isinstance(mi, bool) or not isinstance(mi, int) or mi < 0:
            raise ValueError(f"max_inserted_steps must be an int >= 0, got {mi!r}")
        check_finite_nonnegative("max_log_snr_step", self.max_log_snr_step)
        r = self.rejuvenation_steps
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"rejuvenation_steps must be an int >= 0, got {r!r}")
        c = self.rejuvenation_scale
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0 < c < math.inf:
            raise ValueError(f"rejuvenation_scale must be a finite number > 0, got {c!r}")
        if self.twist_variance == "jacobian":
            clash = [
                f"{name}={value!r}"
                for name, value, ok in (
                    ("proposal", self.proposal, self.proposal in ("auto", "conditioned")),
                    (
                        "reverse_variance",
                        self.reverse_variance,
                        self.reverse_variance != "analytic",
                    ),
                    ("clamp_x0", self.clamp_x0, self.clamp_x0 is None),
                    ("rejuvenation_steps", r, r == 0),
                )
                if not ok
            ]
            if clash:
                raise ValueError(
                    "twist_variance='jacobian' has its own conditioned proposal and takes "
                    "proposal 'auto' or 'conditioned', reverse_variance 'ddim', 'reference' or "
                    "'observed', "
                    f"no clamp_x0 and no rejuvenation; got {', '.join(clash)}"
                )

    def sample(
        self,
        prior: DiffusionModel,
        problem: InverseProblem,
        num_samples: int,
        generator: torch.Generator | None = None,
    ) -> Result:
        """:meth:`Sampler.sample`; with ``jacobian_fallback``, the operator's twist's run
        in place of a Jacobian-twist run that collapsed (the class docstring)."""
        if not self.jacobian_fallback:
            return super().sample(prior, problem, num_samples, generator)
        # the Jacobian run's warnings are held until it is known whether it is returned
        with warnings.catch_warnings(record=True) as held:
            warnings.simplefilter("always")
            first = super().sample(prior, problem, num_samples, generator)
        # collapsed: weights degenerate (the quality check's finding) and the draws of
        # fewer than MIN_LINEAGES initial particles (runs whose weights dipped but kept
        # their lineages are kept: at 2 prior scales out they beat the operator's twist)
        info = first.info
        low = sorted({p for q in info.quality or [] if q.kind == "min_ess" for p in q.problems})
        collapsed: list[int] = []
        if low and info.ancestors is not None:
            few = info.ancestors.reshape(-1)[low] < MIN_LINEAGES
            collapsed = [low[i] for i in torch.nonzero(few).flatten().tolist()]
        if not collapsed:  # (its warnings at the caller's line, as Sampler.sample's)
            for w in held:
                warnings.warn(w.message, stacklevel=2)
            return first
        assert info.min_ess is not None and info.ancestors is not None
        ess = float(info.min_ess.reshape(-1)[collapsed].min())
        roots = int(info.ancestors.reshape(-1)[collapsed].min())
        why = (
            f"its weights degenerated (smallest ESS {ess:.3g} of N = {num_samples}, "
            f"{info.inserted_steps} steps inserted) and its draws descended from {roots} "
            f"initial particles (problem(s) {collapsed})"
        )
        operator = replace(
            self,
            twist_variance="operator",
            reverse_variance="reference",
            jacobian_fallback=False,
        )
        with warnings.catch_warnings(record=True) as held:
            warnings.simplefilter("always")
            second = operator.sample(prior, problem, num_samples, generator)
        info = second.info
        own = {q.message for q in info.quality or []}
        for w in held:  # (other warnings as they were; the findings below)
            if str(w.message) not in own:
                warnings.warn(w.message, stacklevel=2)
        info.quality = quality.replacing_jacobian(info.quality or [], why)
        quality.warn(info.quality, stacklevel=3)  # (at the caller of sample)
        info.nfe += first.info.nfe
        info.wall_time += first.info.wall_time
        info.extra = replace(info.extra, replaced=why)
        return second

    def check(self, prior, problem: InverseProblem) -> None:
        super().check(prior, problem)
        if self.twist_variance == "jacobian" and not self._conditions_gaussian(problem):
            raise ValueError(
                "TDS twist_variance='jacobian' needs Gaussian noise through a linear operator "
                "with an SVD (has_svd or pixel_svd) or a matrix of at most 2**24 entries "
                f"(got noise={problem.noise!r}, a {type(problem.operator).__name__} operator"
                + (", a log_likelihood_fn" if problem.log_likelihood_fn is not None else "")
                + "); use twist_variance='operator'"
            )
        if self.proposal == "conditioned" and not self.conditions(problem):
            raise ValueError(
                "TDS proposal='conditioned' needs twist_variance='operator', clamp_x0=None "
                "and either Gaussian noise through a linear operator with an SVD (has_svd or "
                "pixel_svd) or a matrix of at most 2**24 entries, or a likelihood the Laplace "
                "twist smooths (Poisson, a log_likelihood_fn, a nonlinear operator); use "
                "proposal='gradient' or 'auto'"
            )

    def conditions(self, problem: InverseProblem) -> bool:
        """Whether the run uses the conditioned proposal (``proposal`` and the problem): the
        Gaussian one (:meth:`_conditions_gaussian`) or, with ``proposal="conditioned"``, the
        Laplace twist's (:meth:`_laplace_conditioned_move`)."""
        return self._conditions_gaussian(problem) or self._conditions_laplace(problem)

    def _conditions_laplace(self, problem: InverseProblem) -> bool:
        """Whether the moves condition the kernel on the Laplace twist's quadratic model:
        ``proposal="conditioned"`` (not chosen by ``"auto"``), a Laplace-smoothed twist
        with ``twist_variance="operator"``, no ``clamp_x0``."""
        return (
            self.proposal == "conditioned"
            and self.twist_variance == "operator"
            and self.clamp_x0 is None
            and self._smooths_likelihood(problem)
        )

    def _conditions_gaussian(self, problem: InverseProblem) -> bool:
        """Whether the run uses the Gaussian conditioned proposal (:meth:`_conditioned_move`,
        or the Jacobian twist's)."""
        if self.proposal in ("gradient", "model"):
            return False
        op = problem.operator
        return (
            _uses_gaussian_twist(problem)
            and op.is_linear
            and bool(
                getattr(op, "has_svd", False)
                or getattr(op, "pixel_svd", False)
                or _DENSE_MAX >= op.in_dim * op.out_dim * int(getattr(op, "batch_size", 1))
            )
            and self.twist_variance in ("operator", "jacobian")
            and self.clamp_x0 is None
            # "auto" keeps the analytic reverse variance with the gradient proposal (with
            # the conditioned one it measured worse on the noise-level study, tds.md)
            and (self.proposal == "conditioned" or self.reverse_variance != "analytic")
        )

    def _grid_table(self, ctx: Context) -> tuple[Tensor, list[str]]:
        """For the current grid (computed once per grid): the chain's twist variance at
        each time (:meth:`_chain_variance`) and each move's kind (:meth:`_move_kind`)."""
        ts = ctx.times
        key = ("tds.grid", ts.data_ptr(), ts.numel())  # a refined grid is a new tensor
        table = ctx.cache.get(key)
        if table is None:
            coef = ddim_coefficients(ctx.prior.schedule, ts[:-1], ts[1:], 1.0)
            a_s = coef.alpha_s
            kvar = coef.std**2
            if self._reference_kernel:  # the kernel's b^2 Var[x0 | x_t] too
                sch = ctx.prior.schedule
                b = ddim_weights(coef, sch.sigma(ts[:-1]))[1]
                kvar = kvar + b**2 * self._kernel_x0_variance(ctx, ts[:-1])
            term = torch.where(a_s > 0, kvar / torch.where(a_s > 0, a_s, 1.0) ** 2, 0.0)
            tail = torch.cat([term.flip(0).cumsum(0).flip(0), term.new_zeros(1)]).to(ctx.dtype)
            kinds = [
                "deterministic" if not pos else ("conditioned" if sharp else "gradient")
                for pos, sharp in zip((coef.std > 0).tolist(), (tail[1:] <= self._tau2).tolist())
            ]
            table = ctx.cache[key] = (tail, kinds)
        return table

    def _chain_variance(self, ctx: Context, t: Tensor) -> Tensor:
        """The conditioned proposal's twist variance at grid time ``t``: ``v_{t_k} =
        sum_{j >= k} std_j^2 / alpha_{t_{j+1}}^2`` over the rest of the (current) grid, 0 at
        its last time, so that the kernel's predictive at ``t_k`` is the twist there."""
        tail = self._grid_table(ctx)[0]
        hit = ctx.times == t  # the first match (a degenerate grid can repeat a time)
        return tail[hit.to(torch.int8).argmax()]

    def _move_kind(self, ctx: Context, k: int) -> str:
        """The move from grid index ``k``: ``"gradient"`` (the paper's; always without the
        conditioned proposal), ``"deterministic"`` (``std = 0``) or ``"conditioned"`` (the
        twist at the arrival time no wider than ``prior_variance``)."""
        if not self.conditions(ctx.problem) or k + 1 >= ctx.times.numel():
            return "gradient"
        return self._grid_table(ctx)[1][k]

    def _wants_gradient(self, ctx: Context, k: int) -> bool:
        """Whether the move from grid index ``k`` needs the twist's gradient."""
        if self.twist_variance == "jacobian" and getattr(ctx.prior, "exact_denoiser", False):
            return False  # every move is the Jacobian's
        return self.proposal != "model" and self._move_kind(ctx, k) == "gradient"

    def _jacobian_trust(self, ctx: Context, kind: str, k: int) -> float:
        """The weight ``w`` of the Jacobian in the move from grid index ``k`` (``twist_variance=
        "jacobian"``; 0 otherwise): 1 for an exact denoiser (``prior.exact_denoiser``, a
        mixture's closed form) at every move; for a network 0 on the gradient moves (the
        twist wider than ``prior_variance``) and on the conditioned moves
        ``log(tau2 / v_s) / log(10)`` clipped to ``[0, 1]``, ``v_s`` the chain's twist
        variance at the arrival: from the operator's twist at ``v_s = tau2`` to the
        Jacobian's at ``v_s <= tau2 / 10``, where a network's Jacobian is accurate
        (docs/methods/tds.md); read once per grid from :meth:`_grid_table`."""
        if self.twist_variance != "jacobian":
            return 0.0
        if getattr(ctx.prior, "exact_denoiser", False):
            return 1.0
        if kind == "gradient":
            return 0.0
        ts = ctx.times
        key = ("tds.trust", ts.data_ptr(), ts.numel())
        trust = ctx.cache.get(key)
        if trust is None:
            tail = self._grid_table(ctx)[0].tolist()
            trust = ctx.cache[key] = [
                1.0 if v <= 0 else min(1.0, max(0.0, math.log10(self._tau2 / v))) for v in tail
            ]
        return trust[k + 1]

    @staticmethod
    def _pixels(ctx: Context) -> PixelObservation:
        """The observation on the pixel grid (``op.pixel_svd``), once per run; cached."""
        pix = ctx.cache.get("tds.pixels")
        if pix is None:
            op = cast(LinearOperator, ctx.problem.operator)
            pix = ctx.cache["tds.pixels"] = observe_on_pixels(op, ctx.y.unsqueeze(1))
        return pix

    @staticmethod
    def _matrix_svd(ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
        """``(U, s, V^T)`` of the operator's matrix, per problem for a per-problem operator:
        ``(B | 1, m, k)``, ``(B | 1, 1, k)``, ``(B | 1, k, d)``, ``k = min(m, d)``; cached."""
        svd = ctx.cache.get("tds.matrix_svd")
        if svd is None:
            M = torch.as_tensor(cast(LinearOperator, ctx.problem.operator).matrix)
            M = M.to(dtype=ctx.dtype, device=ctx.device)
            M = M if M.dim() == 3 else M[None]
            U, s, Vh = torch.linalg.svd(M, full_matrices=False)
            svd = ctx.cache["tds.matrix_svd"] = (U, s[:, None, :], Vh)
        return svd

    def _conditioned_move(
        self,
        ctx: Context,
        x0: Tensor,
        mean: Tensor,
        std_x: Tensor,
        alpha_s: Tensor,
        t_next: Tensor,
        last: bool,
    ) -> tuple[Tensor, Tensor]:
        """``x_s`` from the kernel ``N(mean, std^2 I)`` conditioned on the twist at ``s``
        linearised around ``x0_hat(x_t)``, and ``log Z(x_t) - log p~_lin(y | x_s)`` (module
        docstring). At the last step the twist is the likelihood of ``x_s`` itself.
        ``std_x``: the kernel's standard deviation, a scalar or per particle (``(B, N, 1,
        ...)``, the analytic reverse variance)."""
        op = cast(LinearOperator, ctx.problem.operator)
        std = std_x.reshape(std_x.shape[:2] + (1,)) if std_x.dim() > 1 else std_x
        s2 = ctx.problem.noise_variance()
        if last:  # p(y | x_s): linear in x_s with slope 1, around the kernel's mean
            a_s, v_s, centre = torch.ones_like(std), torch.zeros_like(std), mean
        else:
            a_s, v_s, centre = alpha_s, self._twist_extra_variance(ctx, t_next), x0
        y = ctx.y.unsqueeze(1)  # (B, 1, *out)
        noise = s2 if not isinstance(s2, Tensor) else s2.reshape(-1, 1, 1)
        dense = None
        # the coefficients per coordinate, or per class of pixels (one value per singular
        # value: `spread` gathers them to the pixels, `total` sums over the pixels)
        spread: Callable[[Tensor], Tensor] = lambda w: w  # noqa: E731
        total: Callable[[Tensor], Tensor] = lambda w: w.sum(-1)  # noqa: E731
        if op.pixel_svd:
            pix = self._pixels(ctx)
            label, count = pix.classes.label, pix.classes.counts
            sv = pix.classes.values  # (u,)
            r = pix.residual(op.flat_in(centre))  # (B, N, d), 0 off the range
            spread = lambda w: w.index_select(-1, label)  # noqa: E731
            total = lambda w: (count * w).sum(-1)  # noqa: E731
        elif op.has_svd:
            sv = op.singular_values().to(dtype=y.dtype, device=y.device)  # (r,)
            r = op.Ut(y - op(centre))[..., : sv.numel()]  # (B, N, r)
        else:  # the SVD of the matrix (per problem), once per run
            dense = self._matrix_svd(ctx)
            U, sv, Vh = dense  # (B | 1, m, k), (B | 1, 1, k), (B | 1, k, d)
            r = op.flat_out(y - op(centre)) @ U  # (B, N, k)
        den = noise + v_s * sv**2  # the twist's variance at s per coordinate
        den_z = den + (std / a_s) ** 2 * sv**2  # the linearised predictive's
        prec = 1 / std**2 + sv**2 / (a_s**2 * den)
        # the coordinate's move: u = k_r r + prec^(-1/2) z (conditional mean k_r r); the
        # coefficients are per coordinate (per particle too with a per-particle std)
        k_r = sv / (a_s * den * prec)
        z = ctx.randn()
        if op.pixel_svd:  # = std z off the range (the noise's array reused for the draw)
            u = op.flat_in(z).mul_(spread(prec.rsqrt())).addcmul_(spread(k_r), r)
        else:  # the observed coordinates' part of std z replaced by their conditional draw
            if dense is None:
                zr = op.Vt_range(z)  # (B, N, r)
            else:
                zr = op.flat_in(z) @ dense[2].transpose(-1, -2)  # (B, N, k)
            u = torch.addcmul(k_r * r, prec.rsqrt(), zr)
            du = u - std * zr
            back = op.V_range(du) if dense is None else (du @ dense[2]).reshape(mean.shape)
            x_new = torch.addcmul(mean, std_x, z).add_(back)
        # -0.5 sum over the range of [r^2 / den_z + log den_z - (r - sv u / a_s)^2 / den
        # - log den]: the residuals weighted by 1 / sqrt(variance), each read by a dot
        on = sv > 0
        safe_z = torch.where(on, den_z, torch.ones_like(den_z))
        safe = torch.where(on, den, torch.ones_like(den))
        c_z = torch.where(on, safe_z.rsqrt(), 0.0)
        c_s = torch.where(on, safe.rsqrt(), 0.0)
        r_s = torch.addcmul(r * spread(c_s), spread(c_s * sv / a_s), u, value=-1.0)
        if op.pixel_svd:  # u and r are read for the last time: the draw and r_z in place
            x_new = u.add_(op.flat_in(mean)).reshape(mean.shape)
            r_z = r.mul_(spread(c_z))
        else:
            r_z = r * spread(c_z)
        # (one sum of log-ratios, not a difference of two large float32 sums; 0 off the range)
        logs = total(torch.log(safe_z / safe))
        return x_new, -0.5 * (rowsq(r_z) - rowsq(r_s) + logs)

    # ------------------------------------------------------------------ Jacobian twist
    def _rows(self, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
        """The operator's matrix ``A`` as rows on the event shape ``(B | 1, m, *event)`` (the
        network's backward passes), flat ``(B | 1, 1, m, d)`` in the run's dtype, and its
        Gram matrix ``A A^T`` ``(B | 1, 1, m, m)`` in float64; cached."""
        rows = ctx.cache.get("tds.rows")
        if rows is None:
            op = cast(LinearOperator, ctx.problem.operator)
            M = torch.as_tensor(op.matrix).to(dtype=ctx.dtype, device=ctx.device)
            M = M if M.dim() == 3 else M[None]
            shaped = M.reshape(M.shape[:2] + tuple(ctx.prior.event_shape))
            gram = (M.double() @ M.double().transpose(-1, -2)).unsqueeze(1)
            rows = ctx.cache["tds.rows"] = (shaped, M.unsqueeze(1), gram)
        return rows

    def _residual(self, ctx: Context, x0: Tensor) -> Tensor:
        """``y - A x0`` flat, ``(B, N, m)``, in float64."""
        op = ctx.problem.operator
        return (op.flat_out(ctx.y.unsqueeze(1)) - op.flat_out(op(x0))).double()

    def _jacobian_covariance(self, ctx: Context, t: Tensor, aj: Tensor, noise: Tensor) -> Tensor:
        """The twist's covariance ``sigma_y^2 I + (sigma_t^2 / alpha_t) A J A^T`` of ``A x0``
        given ``x_t`` (Tweedie's second moment, ``Cov[x0 | x_t] = sigma_t^2 / alpha_t J``)
        from ``aj = A J`` ``(B, N, m, d)`` and ``noise = sigma_y^2 I``, in float64: the
        symmetric part with its negative
        eigenvalues set to 0 (a network's Jacobian need not be symmetric or positive);
        ``alpha_t > 0``. For a network (no ``prior.exact_denoiser``) it is also held above
        ``sigma_y^2 I + f v_t A A^T`` (in the Loewner order: the eigenvalues of the
        covariance whitened by that floor clamped at 1), ``v_t`` the chain's twist variance
        and ``f = _JACOBIAN_FLOOR``: a network's Jacobian that claims more than ``1 / f``
        times the locally flat prior's precision is not believed (docs/methods/tds.md)."""
        sch = ctx.prior.schedule
        a, s = sch.alpha(t).double(), sch.sigma(t).double()
        _, A, gram = self._rows(ctx)
        k = (s**2 / a) * (aj.double() @ A.double().transpose(-1, -2))
        k = 0.5 * (k + k.transpose(-1, -2))
        if getattr(ctx.prior, "exact_denoiser", False):
            ev, vec = torch.linalg.eigh(k)
            return (vec * ev.clamp_min(0.0).unsqueeze(-2)) @ vec.transpose(-1, -2) + noise
        v = self._chain_variance(ctx, t).double()
        low = torch.linalg.cholesky(noise + _JACOBIAN_FLOOR * v * gram)
        # the covariance whitened by the floor, its eigenvalues clamped at 1, coloured back
        w = torch.linalg.solve_triangular(low, noise + k, upper=False)
        w = torch.linalg.solve_triangular(low, w.transpose(-1, -2), upper=False)
        ev, vec = torch.linalg.eigh(0.5 * (w + w.transpose(-1, -2)))
        root = low @ vec * ev.clamp_min(1.0).sqrt().unsqueeze(-2)
        return root @ root.transpose(-1, -2)

    def _observed_covariance(
        self, ctx: Context, t: Tensor, aj: Tensor, trust: float
    ) -> tuple[Tensor, Tensor]:
        """``reverse_variance="observed"``: ``Cov[x0 | x_t]`` as far as the Jacobian twist's
        ``aj = A J`` ``(B, N, m, d)`` at time ``t`` measures it, the columns ``G = Cov Q``
        (``Q^T Cov = (sigma_t^2 / alpha_t) diag(1 / s) U^T (A J)`` for ``A = U diag(s) V^T``,
        ``Q = V``), completed by Nystrom: ``G C^-1 G^T`` with ``C = Q^T Cov Q`` (exact in
        the observed block and across it; in the unobserved block the part of ``Cov``
        that the observed directions predict). Returns ``H`` with ``H H^T = G C^-1 G^T``,
        ``(B, N, d, k)`` in the run's dtype, times ``sqrt(trust)``, and ``trust`` as ``(B,
        N)``. ``C``'s eigenvalues are clamped at ``1e-8 v`` for an exact denoiser and to
        ``[f v, v / f]`` for a network, whose unobserved columns of ``H`` are also capped at
        ``v / f`` (``v`` the reference's ``Var[x0 | x_t]``, ``f = _JACOBIAN_FLOOR``, as the
        twist's floor); the directions of singular values below ``1e-8`` of the largest (a
        rank-deficient ``A``) are left out."""
        U, s, Vh = self._matrix_svd(ctx)
        sch = ctx.prior.schedule
        a, sg = sch.alpha(t).double(), sch.sigma(t).double()
        v = self._kernel_x0_variance(ctx, t).double()
        s64 = s.double()  # (B | 1, 1, k)
        ok = s64 > 1e-8 * s64.amax(-1, keepdim=True)
        inv = torch.where(ok, 1 / torch.where(ok, s64, 1.0), 0.0)
        # (the (N, k, d) arrays in the run's dtype, as A J itself; k x k algebra in float64)
        dt = aj.dtype
        Q = Vh.transpose(-1, -2).to(dt).unsqueeze(1)  # (B | 1, 1, d, k)
        # Q^T Cov, (B, N, k, d), and C = Q^T Cov Q, its symmetric part
        scale = (sg**2 / a) * inv.unsqueeze(-1)  # (B | 1, 1, k, 1)
        qc = scale.to(dt) * (U.to(dt).transpose(-1, -2).unsqueeze(1) @ aj)
        c = (qc @ Q).double()
        c = 0.5 * (c + c.transpose(-1, -2))
        eye = torch.eye(c.shape[-1], dtype=torch.float64, device=c.device)
        both = ok.unsqueeze(-1) & ok.unsqueeze(-2)  # (B | 1, 1, k, k)
        c = torch.where(both, c, v * eye)  # (unobserved: the reference's, G's column is 0)
        ev, W = torch.linalg.eigh(c)
        exact = getattr(ctx.prior, "exact_denoiser", False)
        ev = ev.clamp_min(1e-8 * v) if exact else ev.clamp(_JACOBIAN_FLOOR * v, v / _JACOBIAN_FLOOR)
        # H = G W ev^-1/2 = Q W ev^1/2 + (I - Q Q^T) G W ev^-1/2 (the observed block as
        # clamped, the cross and unobserved blocks from G = Cov Q)
        G = qc.transpose(-1, -2)  # (B, N, d, k)
        X = G - Q @ (Q.transpose(-1, -2) @ G)
        root = torch.where(ev > 0, ev, 1.0).rsqrt() * (ev > 0)
        across = X @ (W * root.unsqueeze(-2)).to(dt)
        if not exact:  # a network's unobserved columns: at most v / f each
            norm2 = across.pow(2).sum(-2).double().clamp_min(1e-300)
            cap = (v / _JACOBIAN_FLOOR / norm2).sqrt().clamp_max(1.0)
            across = across * cap.to(dt).unsqueeze(-2)
        H = Q @ (W * ev.sqrt().unsqueeze(-2)).to(dt) + across
        w = torch.full(aj.shape[:2], float(trust), dtype=torch.float64, device=aj.device)
        return H * math.sqrt(trust), w

    def _observed_draw(
        self,
        ctx: Context,
        var: Tensor,
        low: Tensor,
        root: Tensor,
        aj: Tensor,
        aj64: Tensor,
        gram: Tensor,
        cov: Tensor,
        chol: Tensor,
        r: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The Jacobian move's draw with the kernel ``N(m, Sigma)``, ``Sigma = var (I - Q
        Q^T) + low Q Q^T + R R^T`` (``reverse_variance="observed"``; ``var``, ``low``
        ``(B, N)``; ``R = root`` ``(B, N, d, k)``; ``Q = V`` of the operator's SVD),
        conditioned on the linearised twist ``r ~ A J (x - m) + eta``, ``eta ~ N(0, C)``
        (``cov = C``, ``chol`` its factor; ``aj64`` and ``gram = (A J)(A J)^T`` in float64):
        Matheron's rule ``x - m = Sigma^(1/2) z + Sigma
        (A J)^T S^-1 (r - A J Sigma^(1/2) z - eta)``, ``S = C + A J Sigma (A J)^T``, with
        ``Sigma^(1/2) z = sqrt(var) z + (sqrt(low) - sqrt(var)) Q Q^T z + R z'``. Returns
        ``x - m`` flat in the run's dtype and ``S``'s Cholesky factor."""
        _, _, Vh = self._matrix_svd(ctx)
        Q = Vh.transpose(-1, -2).to(aj.dtype).unsqueeze(1)  # (B | 1, 1, d, k)
        Qt = Q.transpose(-1, -2)
        # (A J Q in float64: var (A J)(A J)^T - (var - low) (A J Q)(A J Q)^T cancels in the
        # observed block; A J R in the run's dtype, its outer product only adds)
        ajq = aj64 @ Q.double()  # (B, N, m, k)
        ajr = (aj @ root).double()
        S = cov + var[..., None, None] * gram
        S = S + (low - var)[..., None, None] * (ajq @ ajq.transpose(-1, -2))
        chol_s = torch.linalg.cholesky(S + ajr @ ajr.transpose(-1, -2))
        # (the d-vectors in the run's dtype, as the isotropic draw's; the rest in float64)
        z = ctx.randn().reshape(var.shape + (-1,))
        z2 = ctx.randn(var.shape + (root.shape[-1],))
        dt = z.dtype
        sd, sd_low = var.sqrt()[..., None], low.clamp_min(0.0).sqrt()[..., None]
        zq = (Qt @ z.unsqueeze(-1)).squeeze(-1)
        root_z = sd.to(dt) * z + (Q @ ((sd_low - sd).to(dt) * zq).unsqueeze(-1)).squeeze(-1)
        root_z = root_z + (root @ z2.unsqueeze(-1)).squeeze(-1)
        m = cov.shape[-1]
        eta = (chol @ ctx.randn(var.shape + (m,)).double().unsqueeze(-1)).squeeze(-1)
        res = r - (aj @ root_z.unsqueeze(-1)).squeeze(-1).double() - eta
        sol = torch.cholesky_solve(res.unsqueeze(-1), chol_s)
        u = (aj.transpose(-1, -2) @ sol.to(aj.dtype)).squeeze(-1)  # (A J)^T S^-1 (...)
        sigma_u = var[..., None].to(dt) * u
        sigma_u = sigma_u + (
            Q @ ((low - var)[..., None].to(dt) * (Qt @ u.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)
        ).squeeze(-1)
        sigma_u = sigma_u + (root @ (root.transpose(-1, -2) @ u.unsqueeze(-1))).squeeze(-1)
        return root_z + sigma_u, chol_s

    def _jacobian_move(
        self, ctx: Context, state: TDSState, k: int, t, t_next, trust: float
    ) -> Move:
        """The move of ``twist_variance="jacobian"`` (module docstring): the model's kernel
        ``N(m, v I)`` conditioned on the twist at ``s`` linearised at the kernel's mean,
        ``A x0_hat_s(x_s) ~ A x0_hat_s(m) + A J_s(m) (x_s - m)`` with covariance ``C_s(m)``,
        drawn by Matheron's rule; the twist at the new particle is ``N(y; A x0_hat_s(x_s),
        C_s(m))`` (``C`` from its kernel's mean: a function of the path, which the weights
        divide out at the next step); the last step conditions on ``p(y | x_0)`` itself.
        With ``trust = w < 1`` the centre, slope and covariance are ``w`` times these plus
        ``1 - w`` times the operator's conditioned move's (``x0_hat_t(x_t)``, ``A /
        alpha_s``, ``sigma_y^2 I + v_s A A^T``), which it is at ``w = 0``. With
        ``reverse_variance="observed"`` the kernel's covariance is ``v I + w b^2 (H H^T - v_ref
        Q Q^T)``, ``H H^T`` the Nystrom completion of ``Cov[x0 | x_t]`` from the observed
        directions (:meth:`_observed_covariance`, taken when ``x_t`` was made;
        :meth:`_observed_draw`)."""
        sch = ctx.prior.schedule
        x, x0, lt = state.x, state.x0, state.log_twist
        assert x0 is not None and lt is not None
        last = k == ctx.times.numel() - 2
        coef = ddim_coefficients(sch, t, t_next, 1.0)
        s_t = sch.sigma(t)
        mean = ddim_mean(x, x0, coef, s_t)
        var = (coef.std**2).double().expand(lt.shape)
        b2 = ddim_weights(coef, s_t)[1].double() ** 2
        if state.x0_var is not None:  # the reference kernel's b^2 Var[x0 | x_t]
            var = var + b2 * state.x0_var.double()
        # "observed": the kernel's covariance var I + w b^2 (H H^T - v Q Q^T), H H^T the
        # Nystrom completion of Cov[x0 | x_t] from the observed directions
        extra = None
        if state.observed_root is not None and state.x0_var is not None:
            assert state.observed_weight is not None
            low = var - state.observed_weight * b2 * state.x0_var.double()
            b = b2.sqrt().to(state.observed_root.dtype)
            extra = (low, b * state.observed_root)
        rows, A, gram_a = self._rows(ctx)
        m = A.shape[-2]
        s2 = torch.as_tensor(ctx.problem.noise_variance(), dtype=torch.float64)
        eye = torch.eye(m, dtype=torch.float64, device=x.device)
        noise = s2.to(x.device).reshape(-1, 1, 1, 1) * eye
        if last:  # p(y | x_0) is linear in x_0: the conditioning is exact
            centre, aj, cov = mean, A, noise
        else:
            # (the rows A J in the run's dtype, their m x m products in float64)
            centre, aj = ctx.denoise_jacobian(mean, t_next, rows)
            cov = self._jacobian_covariance(ctx, t_next, aj, noise)
            if trust < 1:  # towards the operator's conditioned move (a locally flat prior)
                v_s = self._chain_variance(ctx, t_next).double()
                cov_flat = noise + v_s * gram_a
                centre = torch.lerp(x0, centre, trust)
                aj = torch.lerp(A / coef.alpha_s.to(A.dtype), aj, trust)
                cov = torch.lerp(cov_flat, cov, trust)
        r = self._residual(ctx, centre)  # (B, N, m)
        chol = torch.linalg.cholesky(cov)
        # the linearised predictive of y: S = C + v (A J)(A J)^T (the product in float64:
        # in float32 its rounding, ~1e-7 of its largest entries, broke S's positivity for
        # operators of condition 1e4-1e5 at noise 1e-2 - 1e-3)
        aj64 = aj.double()
        gram = aj64 @ aj64.transpose(-1, -2)
        flat = lt.shape + (-1,)
        if extra is None:
            chol_s = torch.linalg.cholesky(cov + var[..., None, None] * gram)
            # Matheron: x = m + sd z + v (A J)^T S^-1 (r - sd A J z - eta), eta ~ N(0, C)
            z = ctx.randn().reshape(flat)
            sd = var.sqrt()
            eta = (chol @ ctx.randn(lt.shape + (m,)).double().unsqueeze(-1)).squeeze(-1)
            aj_z = (aj @ z.unsqueeze(-1)).squeeze(-1).double()
            sol = torch.cholesky_solve((r - sd[..., None] * aj_z - eta).unsqueeze(-1), chol_s)
            shift = (aj.transpose(-1, -2) @ sol.to(aj.dtype)).squeeze(-1)
            dx = sd[..., None].to(z.dtype) * z + var[..., None].to(z.dtype) * shift
        else:
            low, root = extra
            dx, chol_s = self._observed_draw(ctx, var, low, root, aj, aj64, gram, cov, chol, r)
        x_new = mean + dx.reshape(mean.shape)
        dx = (x_new - mean).reshape(flat)  # as drawn
        # log Z(x_t) - log p~_lin(y | x_s): the proposal's normaliser over its linear twist
        lin = r - (aj @ dx.unsqueeze(-1)).squeeze(-1).double()
        log_ratio = _gaussian_logpdf(r, chol_s) - _gaussian_logpdf(lin, chol)
        if last:
            lt_new = ctx.problem.log_likelihood(x_new)
            lt_new = torch.where(torch.isnan(lt_new), torch.full_like(lt_new, -math.inf), lt_new)
            new_state = TDSState(x_new)
            lt64 = lt_new.double()
        else:
            observed: tuple[Tensor, Tensor] | tuple[None, None] = (None, None)
            if self.reverse_variance == "observed":
                # Cov[x0 | x_s] at the new particle, for the next move's kernel (m more
                # backward passes: at the kernel's mean, free, it left twice the bias)
                x0_new, aj_new = ctx.denoise_jacobian(x_new, t_next, rows)
                observed = self._observed_covariance(ctx, t_next, aj_new, trust)
            else:
                x0_new = ctx.denoise(x_new, t_next)
            lt64 = _gaussian_logpdf(self._residual(ctx, x0_new), chol)
            lt_new = lt64.to(lt.dtype)
            var_new = self._reference_variance(ctx, t_next, lt_new)
            new_state = TDSState(
                x_new,
                x0_new,
                None,
                lt_new,
                var_new,
                observed_root=observed[0],
                observed_weight=observed[1],
            )
        incr = (log_ratio + lt64 - lt.double()).to(lt.dtype)
        incr = torch.where(torch.isfinite(lt), incr, torch.full_like(incr, -math.inf))
        return Move(new_state, incr)

    # ------------------------------------------------------------------ time grid
    def time_grid(self, prior, problem: InverseProblem) -> Tensor:
        """The run's grid, refined where a Gaussian twist through a linear operator is
        informative (``max_log_snr_step``; 0 keeps the grid as it is).

        The twist's extra variance ``sig2 A A^T`` must fall well below ``sigma_y^2`` before
        the last step swaps the twist for the likelihood: a uniform grid's last positive
        time has ``sig2 ~ 2e-3`` on the linear VP path, so at ``sigma_y = 1e-2`` the final
        weight sharpened the twist ~100-fold and its ESS fell to 2% of N. Times are
        inserted past the grid's last positive time up to log-SNR
        ``log(s_max^2 / sigma_y^2) + log(100)`` (twist inflation at most 1% of
        ``sigma_y^2``), and into every step beyond log-SNR ``log(s_max^2 / sigma_y^2)``
        wider than ``max_log_snr_step``; each inserted time costs one network call.
        """
        base = super().time_grid(prior, problem)
        if not _uses_gaussian_twist(problem):
            return base
        # per-problem noise: refine for the most informative problem
        return informative_time_grid(
            prior.schedule, base, problem.operator, problem.min_noise_std, self.max_log_snr_step
        )

    # ------------------------------------------------------------------ twisting function
    def _twist_extra_variance(self, ctx: Context, t: Tensor) -> Tensor:
        """``v_t`` (0-d tensor; ``inf`` where ``alpha_t = 0`` for ``"inflated"``)."""
        sch = ctx.prior.schedule
        a2, s2 = sch.alpha(t) ** 2, sch.sigma(t) ** 2
        if self.twist_variance == "none":
            return torch.zeros_like(a2)
        if self.conditions(ctx.problem):
            if self.reverse_variance == "analytic":
                # the continuous model's under a locally flat prior, sig2 (the analytic
                # kernel's per-particle variance has no grid sum). The N(0, tau2 I) prior's
                # tau2 sig2 / (tau2 + sig2), used before, is sharper than a wider prior's:
                # heavy-tailed weights, log-evidence 0.1-1.3 nats low on the noise-level
                # mixture with a healthy genealogy and no warning (docs/methods/tds.md)
                return s2 / a2
            return self._chain_variance(ctx, t)
        if self.twist_variance in ("inflated", "operator"):
            return s2 / a2  # sig2 = sigma^2 / alpha^2 (inf at alpha = 0)
        return _gaussian_x0_variance(sch, t, self._tau2)  # "pigdm"

    def _operator_twist(self, ctx: Context, t: Tensor) -> Callable[[Tensor], Tensor]:
        """``x0 -> log N(y; A x0, sigma_y^2 I + sig2 A A^T)`` per particle, without its
        normalising constant (constant in ``x``, it telescopes through the weights: the
        evidence estimate is unchanged)."""
        op = cast(LinearOperator, ctx.problem.operator)
        sig2 = self._twist_extra_variance(ctx, t)
        s2 = ctx.problem.noise_variance()  # a float, or (B, 1) per problem
        y = ctx.y.unsqueeze(1)  # (B, 1, *out)
        if op.pixel_svd:
            return _pixel_twist(op, self._pixels(ctx), sig2, s2)

        def fn(x0: Tensor) -> Tensor:
            r = y - op(x0)
            q = r * op.gram_solve(r, sig2, s2)
            return -0.5 * q.reshape(q.shape[:2] + (-1,)).sum(-1)

        return fn

    def degenerate_hint(self, problem: InverseProblem) -> str | None:
        """The likely cause when every weight of a problem vanished (the loop's
        DegenerateWeightsError): the Laplace twist of a likelihood that is zero somewhere."""
        if not self._smooths_likelihood(problem):
            return None
        return (
            "the twist is the Laplace-smoothed likelihood around each particle's x0_hat, "
            "-inf wherever the log-likelihood is -inf there and Newton finds no point where "
            "it is finite: a likelihood with a hard support (Uniform noise, a constraint, a "
            "rate of exactly 0) must be written with a density that is positive everywhere "
            "(e.g. a steep but smooth edge)"
        )

    def _smooths_likelihood(self, problem: InverseProblem) -> bool:
        """Whether the twist is the Laplace-smoothed likelihood (:func:`smoothed_log_likelihood`):
        Poisson and custom likelihoods, and Gaussian noise through a nonlinear operator with
        ``"operator"`` (the exact Gaussian form needs a linear ``A``)."""
        if not _uses_gaussian_twist(problem):
            return self.twist_variance != "none"
        return self.twist_variance == "operator" and not problem.operator.is_linear

    def _twist(
        self, ctx: Context, x: Tensor, t: Tensor, grad: bool = True, start: Tensor | None = None
    ) -> _TwistEval:
        """``x0_hat(x)``, ``log p~_t(y | x)`` ``(B, N)``, its gradient w.r.t. ``x`` (for the
        Laplace twist: the gradient with the likelihood's curvature held fixed; ``None``
        with ``grad=False``, the conditioned proposal's forward-only call), with
        ``reverse_variance="analytic"`` ``Var[x0 | x_t]`` per coordinate ``(B, N)``, and for
        the Laplace twist its mode, Newton started from ``start`` (the parent's mode) where
        that is better than ``x0_hat`` and ``laplace_warm_start`` is on."""
        probe = None
        if self.reverse_variance == "analytic":
            shape = tuple(ctx.prior.event_shape)
            d = math.prod(shape)
            if d <= _EXACT_TRACE_MAX_DIM:
                # the exact trace: d backward passes through the network
                probe = torch.eye(d, dtype=x.dtype, device=x.device).reshape((d,) + shape)
            else:
                # one Rademacher probe per step, shared by the particles (the kernel stays
                # a function of x_t given the step's probe)
                bits = torch.randint(0, 2, shape, generator=ctx.generator, device=x.device)
                probe = (2 * bits - 1).to(x.dtype)[None]
        problem = ctx.problem
        fn: Callable[[Tensor], Tensor]
        v = self._twist_extra_variance(ctx, t)
        if not bool(torch.isfinite(v)):
            # An infinitely wide twist is flat: any constant works (it telescopes).
            def fn(x0: Tensor) -> Tensor:
                return 0.0 * x0.reshape(x0.shape[:2] + (-1,)).sum(-1)

        elif self._smooths_likelihood(problem):
            if not grad and self._conditions_laplace(problem):
                return self._laplace_values(ctx, x, t, v, probe, start)
            modes: list[Tensor] = []

            def smooth(x0: Tensor) -> tuple[Tensor, Tensor]:
                sm = self._smoothed(ctx, x0, v, start)
                modes.append(sm.mode)
                return sm.value, sm.direction

            x0, lt, g, tr = ctx.denoise_backward(x, t, smooth, direction=True, probe=probe)
            g = g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # (a fresh gradient: in place)
            ref = self._reference_variance(ctx, t, lt)
            var = ref if ref is not None else self._x0_variance(ctx, t, tr)
            return _TwistEval(x0, lt, g, var, modes[-1] if self.laplace_warm_start else None)
        elif not _uses_gaussian_twist(problem):
            fn = problem.log_likelihood  # "none": the likelihood at x0_hat (paper)
        elif self.twist_variance in ("operator", "jacobian"):
            fn = self._operator_twist(ctx, t)
        else:
            var = problem.noise_variance() + v  # (B, 1) for per-problem noise
            y = ctx.y.unsqueeze(1)  # (B, 1, *out)
            m = problem.operator.out_dim

            def fn(x0: Tensor) -> Tensor:
                r = y - problem.operator(x0)
                sq = (r**2).reshape(r.shape[:2] + (-1,)).sum(-1)
                return -0.5 * sq / var - 0.5 * m * (torch.log(var) + LOG2PI)

        if not grad:
            # the conditioned proposal's call: no gradient of the twist (with the analytic
            # reverse variance, the probes' backward passes only)
            x0_var = None
            if probe is None:
                x0 = ctx.denoise(x, t)
            else:
                x0, tr = ctx.denoise_trace(x, t, probe)
                x0_var = self._x0_variance(ctx, t, tr)
            lt = fn(x0)
            lt = torch.where(torch.isnan(lt), torch.full_like(lt, -math.inf), lt)
            return _TwistEval(
                x0, lt, None, x0_var if probe is not None else self._reference_variance(ctx, t, lt)
            )
        if isinstance(fn, PixelGaussian):  # its gradient in closed form: autograd only
            # through the network (J^T u), not through the twist's residual and squares
            x0, lt, g, tr = ctx.denoise_backward(
                x, t, fn.value_and_grad, direction=True, probe=probe
            )
        else:
            x0, lt, g, tr = ctx.denoise_backward(x, t, fn, direction=False, probe=probe)
        # A particle whose likelihood is undefined (e.g. a Poisson rate <= 0) gets weight 0.
        lt = torch.where(torch.isnan(lt), torch.full_like(lt, -math.inf), lt)
        g = g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # (a fresh gradient: in place)
        if self._reference_kernel:
            return _TwistEval(x0, lt, g, self._reference_variance(ctx, t, lt))
        return _TwistEval(x0, lt, g, self._x0_variance(ctx, t, tr))

    def _smoothed(
        self, ctx: Context, x0: Tensor, v: Tensor, start: Tensor | None, quadratic: bool = False
    ) -> SmoothedLogLikelihood:
        """The Laplace twist's :func:`smoothed_log_likelihood` at ``x0`` with this sampler's
        options (Newton from ``start`` with ``laplace_warm_start``); records its curvature
        kind for ``info.extra.twist``."""
        sm = smoothed_log_likelihood(
            ctx.problem.log_likelihood,
            x0,
            v,
            max_dim=self.laplace_max_dim,
            memo=ctx.cache.setdefault("tds.rank", {}),
            start=start if self.laplace_warm_start else None,
            quadratic=quadratic,
        )
        ctx.cache.setdefault("tds.curvature", set()).add(sm.curvature)
        return sm

    def _laplace_values(
        self,
        ctx: Context,
        x: Tensor,
        t: Tensor,
        v: Tensor,
        probe: Tensor | None,
        start: Tensor | None,
    ) -> _TwistEval:
        """The Laplace twist at ``x`` for a conditioned move: no backward pass through the
        network (the analytic reverse variance's probes only), and the log-likelihood's
        quadratic model at ``x0_hat(x)``, from which the next move draws."""
        tr = None
        if probe is None:
            x0 = ctx.denoise(x, t)
        else:
            x0, tr = ctx.denoise_trace(x, t, probe)
        sm = self._smoothed(ctx, x0.detach(), v, start, quadratic=True)
        lt = torch.where(torch.isnan(sm.value), torch.full_like(sm.value, -math.inf), sm.value)
        ref = self._reference_variance(ctx, t, lt)
        var = ref if ref is not None else self._x0_variance(ctx, t, tr)
        mode = sm.mode if self.laplace_warm_start else None
        return _TwistEval(x0, lt, None, var, mode, sm.quadratic)

    def _laplace_conditioned_move(
        self,
        ctx: Context,
        state: TDSState,
        mean: Tensor,
        std_x: Tensor,
        alpha_s: Tensor,
        t_next: Tensor,
        last: bool,
    ) -> tuple[Tensor, Tensor]:
        """``x_s`` from the kernel ``N(mean, std^2 I)`` conditioned on the Laplace twist at
        ``s`` as the parent's quadratic model of the log-likelihood makes it
        (``state.quad_*``, :class:`~bayesfilter_diff.samplers.kernels.SiteQuadratic`:
        ``log p(y | x) ~ g^T (x - p) - 1/2 (x - p)^T H (x - p)`` at ``p = x0_hat(x_t)``,
        ``H = V diag(lam) V^T`` the curvature at the twist's mode, ``g`` such that the
        twist's own gradient at ``p`` is the model's): smoothed by ``N(0, v_s I)`` that model
        is ``log G(c) = -1/2 (c - p)^T P (c - p) + beta^T (c - p)`` with ``P = H (I + v_s
        H)^{-1}``, ``beta = (I + v_s H)^{-1} g``, at ``c = x0_hat(x_t) + (x_s - mean) /
        alpha_s`` (the linearisation of the Gaussian conditioned move; at the last step ``c
        = x_s``, ``v = 0``: the likelihood's model itself). The proposal ``N(mean, std^2 I)
        G / Z`` is Gaussian, drawn and normalised in ``V``'s eigenbasis (off ``V``'s span ``P
        = 0``: the gradient proposal's shift); returns ``x_s`` and ``log Z(x_t) - log G(c(x_s))``, so that with
        the twists ``p~_s(y | x_s) / p~_t(y | x_t)`` the weight is exact for any model (the
        better it fits the twist, the flatter the weights)."""
        assert state.quad_point is not None and state.quad_grad is not None
        assert state.quad_values is not None and state.x0 is not None
        V, lam = state.quad_vectors, state.quad_values
        flat = mean.shape[:2] + (-1,)
        var = std_x.double() ** 2
        var = var.reshape(var.shape[:2] + (1,)) if var.dim() > 1 else var
        if last:
            one = torch.ones((), dtype=torch.float64, device=mean.device)
            a, v, centre = one, 0 * one, mean
        else:
            a = alpha_s.double()
            v, centre = self._twist_extra_variance(ctx, t_next).double(), state.x0
        e = centre.reshape(flat).double() - state.quad_point  # (B, N, d)
        g = state.quad_grad

        def along(w: Tensor) -> Tensor:  # coordinates in V's basis
            return w if V is None else (V.transpose(-1, -2) @ w.unsqueeze(-1)).squeeze(-1)

        def back(w: Tensor) -> Tensor:
            return w if V is None else (V @ w.unsqueeze(-1)).squeeze(-1)

        e_v, g_v = along(e), along(g)
        shrink = 1 / (1 + v * lam)
        P, beta = lam * shrink, g_v * shrink
        Q = (1 / var + P * a**2).expand(e_v.shape)
        lin = (beta - P * e_v) * a  # the proposal's natural parameters: mean lin / Q
        z = ctx.randn().reshape(flat).double()
        z_v = along(z)
        delta = back(lin / Q + z_v * Q.rsqrt())
        if V is not None:  # off V's span: P = 0, the shift var a g_perp
            g_off = g - back(g_v)
            delta = delta + var * a * g_off + var.sqrt() * (z - back(z_v))
        x_new = mean + delta.to(mean.dtype).reshape(mean.shape)
        delta = (x_new - mean).reshape(flat).double()  # as drawn
        d_v = along(delta)
        # log Z - log G(c) per direction: -1/2 log(var Q) + lin^2 / (2 Q)
        # + 1/2 P a d (2 e + a d) - beta a d
        ratio = (
            -0.5 * torch.log(var * Q)
            + 0.5 * lin**2 / Q
            + 0.5 * P * a * d_v * (2 * e_v + a * d_v)
            - beta * a * d_v
        )
        log_ratio = ratio.sum(-1)
        if V is not None:
            d_off = delta - back(d_v)
            log_ratio = (
                log_ratio + 0.5 * var.squeeze(-1) * a**2 * rowsq(g_off) - a * rowdot(g_off, d_off)
            )
        return x_new, log_ratio.to(mean.dtype)

    def _reference_variance(self, ctx: Context, t: Tensor, like: Tensor) -> Tensor | None:
        """``reverse_variance="reference"`` (and ``"observed"``): :meth:`_kernel_x0_variance`
        at ``t``, the same for every particle (no network call); ``None`` for the other
        kernels."""
        if not self._reference_kernel:
            return None
        return self._kernel_x0_variance(ctx, t).to(like.dtype).expand(like.shape)

    @property
    def _reference_kernel(self) -> bool:
        """Whether the kernel carries the reference's ``b^2 Var[x0 | x_t]``."""
        return self.reverse_variance in ("reference", "observed")

    @property
    def _tau2(self) -> float:
        """The Gaussian stand-in's variance: ``prior_variance``, 1 when it is ``None``."""
        return 1.0 if self.prior_variance is None else float(self.prior_variance)

    def _kernel_x0_variance(self, ctx: Context, t: Tensor) -> Tensor:
        """The reference kernel's ``Var[x0 | x_t]`` at times ``t``: with ``prior_variance
        = None`` the prior's own average (:meth:`DiffusionModel.x0_variance`: a Gaussian
        mixture's) where it knows it, else that of a
        ``N(m, tau2 I)`` prior, ``tau2 sigma_t^2 / (alpha_t^2 tau2 + sigma_t^2)``."""
        v = self._own_x0_variance(ctx, t)
        if v is not None:
            return v.to(dtype=t.dtype, device=t.device)
        return _gaussian_x0_variance(ctx.prior.schedule, t, self._tau2)

    def _x0_variance(self, ctx: Context, t: Tensor, tr: Tensor | None) -> Tensor | None:
        """``Var[x0 | x_t]`` per coordinate from ``z^T J z`` (Tweedie's second moment:
        ``Cov[x0 | x_t] = sigma_t^2 / alpha_t * d x0_hat / d x_t``), clamped at 0; ``None``
        without a probe or where ``alpha_t = 0``."""
        if tr is None:
            return None
        sch = ctx.prior.schedule
        a, s = sch.alpha(t), sch.sigma(t)
        if not bool(a > 0):
            return None
        d = math.prod(ctx.prior.event_shape)
        return (s**2 / a * tr / d).clamp_min(0.0)

    # ------------------------------------------------------------------ the sampler
    def init(self, ctx: Context, setup: None) -> tuple[TDSState, Tensor]:
        t0 = ctx.times[0]
        # x_T ~ N(0, sigma_T^2 I), the reference distribution of the chain (as in DDIM).
        x = ctx.start()
        tw = self._twist(ctx, x, t0, grad=self._wants_gradient(ctx, 0))
        lt = tw.log_twist
        # w_T = p~_T(y | x_T): the proposal of x_T is the chain's own reference.
        state = _state(x, tw)
        if self.rejuvenation_steps:
            s2 = ctx.prior.schedule.sigma(t0) ** 2
            kvar = s2.to(x.dtype).expand(lt.shape)
            state = replace(state, kernel_mean=torch.zeros_like(x), kernel_var=kvar)
        return state, lt

    def move(self, ctx: Context, setup: None, state: TDSState, k: int, t, t_next) -> Move:
        sch = ctx.prior.schedule
        x, x0, g, lt = state.x, state.x0, state.grad, state.log_twist
        assert x0 is not None and lt is not None
        kind = self._move_kind(ctx, k)
        if kind == "gradient" and g is None and self.proposal != "model":
            kind = "conditioned"  # a time inserted after a conditioned move
        trust = self._jacobian_trust(ctx, kind, k)
        if trust > 0:
            return self._jacobian_move(ctx, state, k, t, t_next, trust)
        last = k == ctx.times.numel() - 2
        red = tuple(range(2, x.dim()))
        coef = ddim_coefficients(sch, t, t_next, 1.0)
        s_t = sch.sigma(t)
        # 1. Prior (untwisted) ancestral mean: alpha_s x0_hat + c_eps eps_hat.
        mean_u = ddim_mean(x, x0, coef, s_t)
        b = ddim_weights(coef, s_t)[1]  # the weight of x0_hat in the DDIM mean
        std: Tensor = coef.std
        keep = None  # particles whose kernel is deterministic ("analytic" with no variance)
        if state.x0_var is not None:
            # "analytic": the reverse kernel's variance std^2 + b^2 Var[x0 | x_t] with b the
            # weight of x0 in the DDIM mean (the term DDIM drops; Bao et al. 2022), per
            # particle
            var = std**2 + b**2 * state.x0_var
            keep = (var <= 0).reshape(var.shape + (1,) * len(red))
            std = torch.where(var > 0, var, torch.ones_like(var)).sqrt()
            std = std.reshape(var.shape + (1,) * len(red))
        if kind == "deterministic" and state.x0_var is not None:
            kind = "conditioned"  # "analytic": the last step draws x0 ~ N(x0_hat, b^2 v)
        laplace = self._conditions_laplace(ctx.problem)
        if kind == "conditioned" and laplace and state.quad_grad is None:
            kind = "gradient"  # (a twist evaluated for a gradient move: not expected)
        if kind == "conditioned":
            # 2-3'. The kernel conditioned on the linearised twist at s (module docstring).
            if state.x0_var is not None:  # a deterministic particle: a vanishing variance
                std = var.clamp_min(1e-20).sqrt().reshape(std.shape)
            if laplace:
                x_new, log_ratio = self._laplace_conditioned_move(
                    ctx, state, mean_u, std, coef.alpha_s, t_next, last
                )
            else:
                x_new, log_ratio = self._conditioned_move(
                    ctx, x0, mean_u, std, coef.alpha_s, t_next, last
                )
        elif self.proposal == "model" and (keep is not None or bool(std > 0)):
            # the model's own kernel: the twist enters the weights only (p / q = 1)
            reuse = keep is None and not self.rejuvenation_steps
            x_new = (mean_u if reuse else mean_u.clone()).addcmul_(std, ctx.randn())
            log_ratio = torch.zeros_like(lt)
            if keep is not None:
                x_new = torch.where(keep, mean_u, x_new)
        elif keep is not None or bool(std > 0):
            assert g is not None
            # 2. Twisted x0 (conditional Tweedie): x0~ = x0_hat + sigma_t^2 / alpha_t * grad.
            # 3. Proposal q(x_s | x_t, y) = N(alpha_s x0~ + c_eps eps~, std^2 I); the DDIM
            #    mean is affine in x0 with weight b, so mean_tw = mean_u + b (x0~ - x0_hat).
            tw = tweedie_coefficient(coef.alpha_t, s_t)
            if self.clamp_x0 is not None:
                dx0 = g * tw  # x0~ - x0_hat
                x0_tw = x0 + dx0
                clamped = x0_tw.clamp(self.clamp_x0[0], self.clamp_x0[1])
                # (the unclamped entries as without a clamp, bit for bit)
                delta = torch.where(clamped == x0_tw, g * (tw * b), (clamped - x0) * b)
            else:
                delta = g * (tw * b)
            z = ctx.randn()
            # mean_tw + std z (in the untwisted mean's array where nothing reads it later)
            reuse = keep is None and not self.rejuvenation_steps
            x_new = (mean_u.add_(delta) if reuse else torch.add(mean_u, delta)).addcmul_(std, z)
            # 4. log p(x_s | x_t) - log q(x_s | x_t, y) with x_s - mean_tw = std z:
            #    -sum(z delta) / std - sum(delta^2) / (2 std^2), per particle
            flat = delta.shape[:2] + (-1,)
            zd = rowdot(z.reshape(flat), delta.reshape(flat))
            dd = rowsq(delta.reshape(flat))
            sp = std.reshape(std.shape[:2]) if std.dim() > 1 else std
            log_ratio = -(zd / sp + dd / (2 * sp**2))
            if keep is not None:
                x_new = torch.where(keep, mean_u, x_new)
                log_ratio = torch.where(keep.reshape(log_ratio.shape), 0.0, log_ratio)
        else:
            # Deterministic kernel (last step of VP / flow paths): x_0 = the untwisted mean.
            x_new = mean_u
            log_ratio = torch.zeros_like(lt)
        if last:
            # 5a. Final weight: exact likelihood p(y | x_0) over the last twist p~_1(y | x_1).
            lt_new = ctx.problem.log_likelihood(x_new)
            lt_new = torch.where(torch.isnan(lt_new), torch.full_like(lt_new, -math.inf), lt_new)
            new_state = TDSState(x_new)
        else:
            # 5b. Twist at the new particles (also gives the next step's proposal).
            grad = self._wants_gradient(ctx, k + 1)
            nxt = self._twist(ctx, x_new, t_next, grad=grad, start=state.mode)
            lt_new = nxt.log_twist
            new_state = _state(x_new, nxt)
            if self.rejuvenation_steps:  # the model's kernel, for the moves after resampling
                kvar = var if state.x0_var is not None else coef.std**2
                kvar = kvar.to(x_new.dtype).expand(lt_new.shape)
                new_state = replace(new_state, kernel_mean=mean_u, kernel_var=kvar)
        # 6. w_s = p(x_s | x_t) p~_s(y | x_s) / [q(x_s | x_t, y) p~_t(y | x_t)]; a particle
        #    already at p~_t = 0 (weight 0) stays at weight 0.
        incr = log_ratio + lt_new - lt
        incr = torch.where(torch.isfinite(lt), incr, torch.full_like(incr, -math.inf))
        return Move(new_state, incr)

    def rejuvenate(
        self, ctx: Context, setup: None, state: TDSState, k: int, moved: Tensor
    ) -> tuple[TDSState, Tensor | None]:
        """Resample-move: ``rejuvenation_steps`` MALA moves of ``x_t`` (``t = times[k]``) that
        leave the current target invariant, for the problems that resampled (``moved``).

        The weighted particles target the model's path with the twist at its end,
        ``prod_j p(x_{t_j} | x_{t_{j-1}}) p~_t(y | x_t)``; the chain's marginals are unknown,
        so the only exactly invariant moves keep the path before ``x_t`` and move ``x_t``
        under ``N(x_t; m, v I) p~_t(y | x_t)``, ``m, v`` the model's kernel from the
        particle's parent (the reference ``N(0, sigma_T^2 I)`` at ``k = 0``). Proposal
        ``x' = x + h/2 (-(x - m) / v + grad log p~_t) + sqrt(h) z`` with ``h = c^2 v``; ``c``
        starts at ``rejuvenation_scale`` and is adapted per problem between steps towards
        an acceptance of 0.57. Each move costs one network call with a backward pass.
        Returns the acceptance rate per problem (NaN where none moved)."""
        if not self.rejuvenation_steps or state.kernel_mean is None or not bool(moved.any()):
            return state, None
        assert state.kernel_var is not None and state.log_twist is not None
        t = ctx.times[k]
        x, m = state.x, state.kernel_mean
        red = tuple(range(2, x.dim()))
        v = state.kernel_var.reshape(state.kernel_var.shape + (1,) * len(red))
        x0, lt, g, var = state.x0, state.log_twist, state.grad, state.x0_var
        if g is None:
            x0, lt, g, var, *_ = self._twist(ctx, x, t)
        assert g is not None
        scale = ctx.cache.get("tds.rejuvenation_scale")
        if scale is None:
            scale = torch.full((ctx.B,), float(self.rejuvenation_scale), dtype=x.dtype)
        h = scale.to(x.device).reshape((-1, 1) + (1,) * len(red)) ** 2 * v

        def log_target(x: Tensor, lt: Tensor) -> Tensor:
            return -0.5 * ((x - m) ** 2 / v).sum(red) + lt

        def drift(x: Tensor, g: Tensor) -> Tensor:
            return x + 0.5 * h * (g - (x - m) / v)

        accepted = torch.zeros(ctx.B, dtype=torch.float64, device=x.device)
        for _ in range(self.rejuvenation_steps):
            mu = drift(x, g)
            xp = mu + h.sqrt() * ctx.randn()
            x0p, ltp, gp, varp, *_ = self._twist(ctx, xp, t)
            assert gp is not None
            log_a = (
                log_target(xp, ltp)
                - log_target(x, lt)
                - ((x - drift(xp, gp)) ** 2 / (2 * h)).sum(red)
                + ((xp - mu) ** 2 / (2 * h)).sum(red)
            )
            u = torch.rand(lt.shape, generator=ctx.generator, dtype=torch.float64, device=x.device)
            ok = (torch.log(u) < log_a.double()) & moved[:, None] & torch.isfinite(ltp)
            keep = ok.reshape(ok.shape + (1,) * len(red))
            x, g = torch.where(keep, xp, x), torch.where(keep, gp, g)
            lt = torch.where(ok, ltp, lt)
            if x0 is not None:
                x0 = torch.where(keep, x0p, x0)
            if var is not None and varp is not None:
                var = torch.where(ok, varp, var)
            accepted = accepted + ok.double().mean(-1)
        rate = accepted / self.rejuvenation_steps
        # adapt the scale towards an acceptance of 0.57 (Roberts & Rosenthal 1998) for the
        # next rejuvenation: a function of the past, so the next moves stay invariant
        adapted = scale * torch.exp(rate.to(scale) - 0.57)
        ctx.cache["tds.rejuvenation_scale"] = torch.where(moved.to(scale.device), adapted, scale)
        out = replace(
            state,
            x=x,
            x0=x0,
            grad=None if state.grad is None else g,
            log_twist=lt,
            x0_var=var,
        )
        return out, torch.where(moved, rate, torch.full_like(rate, math.nan))

    def run_info(self, ctx: Context, setup: None) -> TDSInfo:
        info = self._run_info(ctx)
        if not self._reference_kernel:
            return info
        own = self._own_x0_variance(ctx, ctx.times[:1]) is not None
        return replace(info, reference_variance="prior" if own else f"gaussian({self._tau2:g})")

    def _own_x0_variance(self, ctx: Context, t: Tensor) -> Tensor | None:
        """The prior's own average ``Var[x0 | x_t]`` where ``prior_variance`` is ``None``
        and the model knows it (:meth:`DiffusionModel.x0_variance`), else ``None``."""
        own = getattr(ctx.prior, "x0_variance", None)
        return own(t) if self.prior_variance is None and own is not None else None

    def _run_info(self, ctx: Context) -> TDSInfo:
        if self.twist_variance == "jacobian":
            return TDSInfo("jacobian", "conditioned")
        prop = "model" if self.proposal == "model" else "gradient"
        if self._smooths_likelihood(ctx.problem):
            kind = most_general_curvature(ctx.cache.get("tds.curvature", ()))
            if self._conditions_laplace(ctx.problem):
                v = "inflated" if self.reverse_variance == "analytic" else "chain"
                return TDSInfo(f"laplace({v}, {kind})", "conditioned")
            v = "inflated" if self.twist_variance == "operator" else self.twist_variance
            return TDSInfo(f"laplace({v}, {kind})", prop)
        if not _uses_gaussian_twist(ctx.problem):
            return TDSInfo("likelihood", prop)
        if self.conditions(ctx.problem):
            # the analytic kernel's twist is sig2 (a locally flat prior's); the others the chain's
            twist = "inflated" if self.reverse_variance == "analytic" else "chain"
            return TDSInfo(twist, "conditioned")
        return TDSInfo(self.twist_variance, prop)

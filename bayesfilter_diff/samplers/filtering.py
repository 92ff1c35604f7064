"""Filtering SMC: the filtering perspective with an exact member.

FPS-SMC (Dou & Song, ICLR 2024; :mod:`.fps`) filters a noised observation sequence
``y_{t_0}, ..., y_{t_n} = y`` as the observations of a hidden Markov model, and so targets
``p(x_{0:T}) prod_k g_k(x_k)``, the posterior of its *filtering model*: over-concentrated for
``p(x0 | y)`` (docs/methods/fps.md). Zhao (2025, "Generative diffusion posterior sampling for
informative likelihoods", arXiv 2506.01083; code ``zgbkdlm/gfk``) keeps an observation path
but uses each potential only as a *twist*: the targets are

    gamma_k(x_{t_k:T}) ∝ p(x_T) prod_j p(x_{t_{j+1}} | x_{t_j}) g_k(x_{t_k}),
    g_n(x_0) = p(y | x_0),

so the potentials telescope and the last target is the posterior of the chain whatever the
path. With a Gaussian potential linear in ``x_t``, the proposal ``p(x_s | x_t) g_s(x_s)`` is
exact (fully adapted, :func:`.spectral.gaussian_product` per spectral coordinate) and the
weight depends on ``x_t`` only::

    w(x_t) = int p(x_s | x_t) g_s(x_s) dx_s / g_t(x_t) = N(v_s; A mu(x_t), omega_s + v A A^T) / g_t(x_t),

with ``p(x_s | x_t) = N(mu(x_t), v I)``. Two potentials ``g_t(x_t) = N(v_t; A x_t, omega_t)``:

- ``twist="mean"`` (default; Zhao's deterministic path): ``v_t = alpha_t y`` and
  ``omega_t = alpha_t^2 sigma_y^2 I + sigma_t^2 A A^T``, the law of ``alpha_t y`` given
  ``x_t`` under a flat prior (``x0 = (x_t - sigma_t eps) / alpha_t``);
- ``twist="gaussian"``: the law of ``y`` given ``x_t`` under an isotropic Gaussian stand-in
  ``N(m, c I)`` for the prior (for a mixture prior its mean and variance per coordinate,
  ``c = tr(Cov) / d``): ``x0_hat = a_t x_t + b_t`` with ``a_t = c alpha_t / (alpha_t^2 c +
  sigma_t^2)``, ``b_t = m sigma_t^2 / (alpha_t^2 c + sigma_t^2)`` and ``r_t^2 = c sigma_t^2 /
  (alpha_t^2 c + sigma_t^2)``, so ``g_t(x_t) ∝ N(y; A x0_hat, sigma_y^2 I + r_t^2 A A^T)``,
  written as ``v_t = (y - A b_t) / a_t``, ``omega_t = (sigma_y^2 I + r_t^2 A A^T) / a_t^2``
  (a factor constant in ``x_t`` apart, which cancels between consecutive weights). As ``c``
  grows this is ``"mean"``; for a Gaussian prior ``N(m, c I)`` it is the exact ``p(y |
  x_t)`` of the continuous path, so the weights are flat up to the time discretisation.
  Any positive potentials keep the target, so the stand-in's quality changes only the
  weights' variance;
- ``twist="fps"``: FPS-SMC's own sampled y-sequence and filtering likelihood
  (``omega_t = alpha_t^2 sigma_y^2 I``), made exact by the telescoping: FPS-SMC with its
  bias removed.

The kernel ``p(x_s | x_t)``: DDIM(``eta``) (default ``eta = 1``, the ancestral kernel, whose
chain converges to the continuous prior as steps grow) or, with ``eta=None``, FPS's
``c_rate`` kernel. The start is ``x_T ~ N(0, sigma_T^2 I) g_T`` (weight its normaliser), the
last weight swaps ``g_n`` for the likelihood where they differ (``sigma(t_n) > 0``, VE
paths), so ``Result.log_evidence`` estimates ``log p(y)`` of the chain.

Departures from the code (``gfk``, ``make_fk_normal_likelihood``): the diffusion's own
DDIM / DDPM kernel instead of an Euler step of the reverse SDE; the flat-prior ``omega_t``
instead of the code's random-walk recursion ``Omega_{j+1} = a_j^2 (c_j F F^T + Omega_j) +
s_j^2 I`` (both are valid twists: any positive choice leaves the target exact); systematic
resampling at ``ESS < N / 2`` (the code: stratified at ``0.7 N``); an evidence estimate
(the code computes none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ..operators.base import LinearOperator
from ..problem import InverseProblem
from .base import Context, Move, Requirements, SMCSampler, check_finite_nonnegative
from .fps import FPSGrid, _validate, _y_path, fps_grid
from .kernels import log_normal
from .spectral import (
    gaussian_product,
    informative_time_grid,
    out_of_range_log_likelihood,
    spectral_observation,
)

__all__ = ["FilteringSMC"]

_TWISTS = ("mean", "gaussian", "fps")


@dataclass(frozen=True)
class FilteringSetup:
    """The kernel on the grid, singular values ``(r,)``, ``U^T y`` ``(B, 1, m)``, the
    observation path in U-coordinates ``(n + 1, B, 1, m)`` and the potentials' variances
    per observed coordinate ``(n + 1, B or 1, 1, r)``."""

    grid: FPSGrid
    s: Tensor
    y_tilde: Tensor
    path: Tensor
    omega: Tensor


@dataclass(frozen=True)
class FilteringState:
    """Particles ``x_t`` and ``log g_t(x_t)``."""

    x: Tensor
    log_g: Tensor


@dataclass(frozen=True)
class FilteringSMC(SMCSampler):
    """Exact filtering SMC (the construction of Zhao 2025; module docstring).

    Parameters
    ----------
    num_steps, grid
        The time grid (inherited; default 100 uniform steps).
    twist
        ``"mean"`` (default: the path ``alpha_t y`` with the flat-prior variance),
        ``"gaussian"`` (``p(y | x_t)`` under an isotropic Gaussian stand-in for the prior:
        ``prior_variance`` or a mixture prior's own moments) or ``"fps"`` (FPS-SMC's sampled
        y-sequence and filtering likelihood, telescoped).
    prior_variance, prior_mean
        The stand-in ``N(prior_mean, prior_variance I)`` of ``twist="gaussian"`` (default
        ``None``: a Gaussian-mixture prior's mean and variance per coordinate; other priors
        need ``prior_variance``, with ``prior_mean`` 0 unless given).
    eta
        DDIM(``eta``) kernel (default 1, ancestral); ``None``: FPS's ``c_rate`` kernel.
    c_rate
        FPS's correlation rate: the kernel when ``eta`` is None, and the y-sequence's bridge
        for ``twist="fps"`` (default 0.95, FPS's).
    max_log_snr_step
        Refine the grid where the potentials are informative (default 1.0; 0: the plain
        grid; :meth:`time_grid`).
    resampling, ess_threshold
        Inherited (systematic at ``ESS < N / 2``).
    """

    requires = Requirements(svd=True, noise_positive=True)
    exact = True

    twist: str = "mean"
    prior_variance: float | None = None
    prior_mean: float = 0.0
    eta: float | None = 1.0
    c_rate: float = 0.95
    max_log_snr_step: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.twist not in _TWISTS:
            raise ValueError(f"twist must be one of {_TWISTS}, got {self.twist!r}")
        _validate(self)
        check_finite_nonnegative("max_log_snr_step", self.max_log_snr_step)
        if self.prior_variance is not None and not (
            math.isfinite(self.prior_variance) and self.prior_variance > 0
        ):
            raise ValueError(
                f"prior_variance must be positive and finite, got {self.prior_variance}"
            )
        if not math.isfinite(self.prior_mean):
            raise ValueError(f"prior_mean must be finite, got {self.prior_mean}")

    def time_grid(self, prior, problem: InverseProblem) -> Tensor:
        """The grid refined where the potentials sharpen, and extended before the last step
        until ``sigma_t^2 s_max^2`` is under 1% of ``sigma_y^2``
        (:func:`~.kernels.informative_time_grid`, as TDS): the last weight swaps ``g`` for
        the likelihood."""
        return informative_time_grid(
            prior.schedule,
            super().time_grid(prior, problem),
            problem.operator,
            problem.min_noise_std,
            self.max_log_snr_step,
        )

    # ------------------------------------------------------------------ the potentials
    def _stand_in(self, ctx: Context) -> tuple[Tensor, Tensor]:
        """``twist="gaussian"``'s prior stand-in: mean ``(B or 1, 1, d)`` and variance per
        coordinate ``(B or 1, 1, 1)``."""
        d = cast(LinearOperator, ctx.problem.operator).in_dim
        dt, dev = ctx.dtype, ctx.device
        if self.prior_variance is not None:
            mean = torch.full((1, 1, d), self.prior_mean, dtype=dt, device=dev)
            return mean, torch.full((1, 1, 1), self.prior_variance, dtype=dt, device=dev)
        mixture = getattr(ctx.prior, "mixture", None)
        if mixture is None:
            raise ValueError(
                "FilteringSMC: twist='gaussian' needs prior_variance (and prior_mean) for a "
                "prior that is not a Gaussian mixture (the variance per coordinate of the data, "
                "e.g. about 0.25 for images in [-1, 1])"
            )
        mean = mixture.mean().to(dtype=dt, device=dev).reshape(-1, 1, d)
        var = mixture.average_variance().to(dtype=dt, device=dev).reshape(-1, 1, 1)
        return mean, var

    def _potentials(
        self, ctx: Context, grid: FPSGrid, obs_s: Tensor, y_tilde: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The deterministic paths ``(n + 1, B, 1, m)`` and variances ``(n + 1, B or 1, 1,
        r)`` of ``twist="mean"`` and ``"gaussian"`` (module docstring)."""
        dt, dev = ctx.dtype, ctx.device
        alpha = torch.tensor(grid.alpha, dtype=dt, device=dev)[:, None, None, None]
        sigma = torch.tensor(grid.sigma, dtype=dt, device=dev)[:, None, None, None]
        noise_var = ctx.problem.noise_std**2
        r = obs_s.numel()
        if self.twist == "mean":
            # per step in Python floats, as the potential was first written (same rounding)
            omega = [a**2 * noise_var + sg**2 * obs_s**2 for a, sg in zip(grid.alpha, grid.sigma)]
            return alpha * y_tilde, torch.stack(omega)[:, None, None, :]
        if not bool((alpha > 0).all()):
            raise ValueError(
                "FilteringSMC: twist='gaussian' needs alpha(t) > 0 on the whole grid (y is "
                "independent of x_t at alpha = 0, e.g. t = 1 on a flow path); use twist='mean'"
            )
        mean, c = self._stand_in(ctx)
        den = alpha**2 * c + sigma**2  # (n + 1, B or 1, 1, 1)
        a, b, r2 = c * alpha / den, sigma**2 / den, c * sigma**2 / den
        op = cast(LinearOperator, ctx.problem.operator)
        A_m = torch.zeros_like(y_tilde)  # U^T A m: (B or 1, 1, m), zero outside the range
        A_m[..., :r] = obs_s * op.Vt(mean)[..., :r]
        return (y_tilde - b * A_m) / a, (noise_var + r2 * obs_s**2) / a**2

    def _log_g(self, setup: FilteringSetup, k: int, x_bar: Tensor) -> Tensor:
        """``log g_{t_k}(x)`` ``(B, N)`` for spectral coordinates ``x_bar`` ``(B, N, d)``."""
        r = setup.s.numel()
        v = setup.path[k][..., :r]
        return log_normal(v, setup.s * x_bar[..., :r], setup.omega[k]).sum(-1)

    def _propose(
        self, ctx: Context, setup: FilteringSetup, k: int, mu_bar: Tensor, v: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``x ∝ N(mu, v I) g_{t_k}(x)``: its spectral coordinates, ``V x_bar`` and
        ``log int N(x; mu, v I) g_{t_k}(x) dx``."""
        op = cast(LinearOperator, ctx.problem.operator)
        r = setup.s.numel()
        omega = setup.omega[k]
        target = setup.path[k][..., :r]
        z = ctx.randn((ctx.B, ctx.N, op.in_dim))
        if not bool((omega > 0).all()):
            # FPS's filtering likelihood alpha_t^2 sigma_y^2 is a point mass at alpha = 0
            raise ValueError(
                "FilteringSMC: twist='fps' needs alpha(t) > 0 on the whole grid (its potential "
                "N(y_t; A x_t, alpha_t^2 sigma_y^2) is a point mass at alpha = 0, e.g. t = 1 "
                "on a flow path); use twist='mean'"
            )
        p = gaussian_product(mu_bar[..., :r], v, target, omega, setup.s)
        obs = p.mean + p.var.sqrt() * z[..., :r]
        x_bar = torch.cat([obs, mu_bar[..., r:] + v**0.5 * z[..., r:]], -1)
        log_pred = log_normal(target, setup.s * mu_bar[..., :r], p.pred_var).sum(-1)
        return x_bar, op.V(x_bar), log_pred

    # ------------------------------------------------------------------ the sampler
    def setup(self, ctx: Context) -> FilteringSetup:
        op = cast(LinearOperator, ctx.problem.operator)
        grid = fps_grid(ctx.prior.schedule, ctx.times, self.c_rate, self.eta)
        obs = spectral_observation(op, ctx.y, dtype=ctx.dtype)
        y_tilde = obs.y_tilde[:, None, :]
        if self.twist == "fps":
            path = _y_path(obs.s, y_tilde, op.out_dim, grid, 1, ctx.generator)
            nv = ctx.problem.noise_std**2
            omega = torch.stack([torch.full_like(obs.s, a**2 * nv) for a in grid.alpha])
            omega = omega[:, None, None, :]
        else:
            path, omega = self._potentials(ctx, grid, obs.s, y_tilde)
        return FilteringSetup(grid, obs.s, y_tilde, path, omega)

    def init(self, ctx: Context, setup: FilteringSetup) -> tuple[FilteringState, Tensor]:
        op = cast(LinearOperator, ctx.problem.operator)
        mu = torch.zeros((ctx.B, ctx.N, op.in_dim), dtype=ctx.dtype, device=ctx.device)
        x_bar, x, log_z = self._propose(ctx, setup, 0, mu, setup.grid.sigma[0] ** 2)
        log_g = self._log_g(setup, 0, x_bar)
        return FilteringState(x, log_g), log_z

    def move(
        self,
        ctx: Context,
        setup: FilteringSetup,
        state: FilteringState,
        k: int,
        t: Tensor,
        t_next: Tensor,
    ) -> Move:
        op = cast(LinearOperator, ctx.problem.operator)
        coef = setup.grid.step(k)
        mu = ctx.denoise_mean(state.x, t, coef, setup.grid.sigma[k])
        mu_bar = op.Vt(mu)
        v = coef.std**2
        if v > 0:
            x_bar, x, log_pred = self._propose(ctx, setup, k + 1, mu_bar, v)
        else:  # a deterministic kernel (the last step of VP / flow paths)
            x_bar, x = mu_bar, mu
            log_pred = self._log_g(setup, k + 1, x_bar)
        log_g = self._log_g(setup, k + 1, x_bar)
        return Move(FilteringState(x, log_g), log_pred - state.log_g)

    def finalize(
        self, ctx: Context, setup: FilteringSetup, state: FilteringState
    ) -> tuple[Tensor, Tensor]:
        # swap the last potential for the likelihood p(y | x_0) (they coincide on the
        # observed coordinates when sigma(t_n) = 0; the part of y outside the range of A
        # enters the evidence only)
        op = cast(LinearOperator, ctx.problem.operator)
        noise_var = ctx.problem.noise_std**2
        r = setup.s.numel()
        x_bar = op.Vt(state.x)
        lik = log_normal(setup.y_tilde[..., :r], setup.s * x_bar[..., :r], noise_var).sum(-1)
        if setup.y_tilde.shape[-1] > r:
            lik = lik + out_of_range_log_likelihood(setup.y_tilde, r, noise_var)
        return state.x, lik - state.log_g

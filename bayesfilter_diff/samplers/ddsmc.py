"""DDSMC: decoupled diffusion sequential Monte Carlo for linear-Gaussian inverse problems.

Ekström Kelvinius, Zhao & Lindsten, "Solving Linear-Gaussian Bayesian Inverse Problems
with Decoupled Diffusion Sequential Monte Carlo", ICML 2025 (arXiv 2502.06379). Reference
code: filipekstrm/ddsmc (``ddsmc/ddsmc_sampler.py``, class ``DDSMCDDPM``, and the
Gaussian-mixture driver ``gmm/toy_gaussian.py``). See ``docs/methods/ddsmc.md``.

Update
------
For ``y = A x + sigma_y n``, ``A = U diag(s) V^T`` with ``r`` singular values, in the
spectral coordinates ``x_bar = V^T x``, ``y~ = U^T y`` (:mod:`.spectral`). With
``x0_hat(x_t)`` the denoiser and ``rho_t^2 = rho_scale sigma_t^2 / (alpha_t^2 + sigma_t^2)``
(the code: ``(1 - abar_t) / 2`` on VP paths), the *decoupled* likelihood

    p~_t(y | x_t) = N(y; A x0_hat(x_t), sigma_y^2 I + rho_t^2 A A^T)

(per observed coordinate ``N(y~_i; s_i x_bar0_i, sigma_y^2 + rho_t^2 s_i^2)``) twists the
prior chain of the *decoupled* kernel (``eta``: 0 the code's default, 1 the DDPM posterior)

    p_eta(x_s | x_t) ∝ N(x_s; alpha_s x0_hat(x_t), sigma_s^2) N(x_t; (alpha_t / alpha_s) x_s, beta / eta)
                    = N(x_s; a x0_hat(x_t) + b x_t, c^2 I),   beta = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2

(:func:`decoupled_coefficients`). The targets are ``gamma_t ∝ p(x_T) prod p_eta p~_t(y | x_t)``:

1. ``x_T ~ N(0, sigma_T^2 I)`` with weight ``p~_T(y | x_T)``;
2. proposal: ``x0 | x_t ~ N(x0_hat, rho_t^2 I)`` conditioned on ``y`` (per observed
   coordinate a Gaussian product, :func:`.spectral.gaussian_product`: mean ``m_i``,
   variance ``v_i``; ``x0_hat``, ``rho_t^2`` on the null space), and the kernel's ``x0``
   swapped for it::

       r(x_s | x_t, y) = N(a m + b x_t, max(c^2 - a^2 rho_t^2, 0) + a^2 v)

   (the null-space coordinates keep ``N(a x0_hat + b x_t, c^2)``: their ratio to the
   prior kernel is exactly 1 and is not computed);
3. weight ``w = p~_s(y | x_s) p_eta(x_s | x_t) / [p~_t(y | x_t) r(x_s | x_t, y)]``
   (one network call per particle per step, no gradient);
4. last step (``sigma_s = 0``: the kernel is the point ``x_0 = a x0_hat(x_1)``):
   ``final_step="exact"`` takes that point with weight ``p(y | x_0) / p~_1(y | x_1)``, so
   the particles target the posterior of the chain ``p_eta(x_0) p(y | x_0)`` and the
   evidence estimate is unbiased for its ``p(y)``; ``"code"`` sets ``x_0 = m`` (the
   conditioned mean) with the same weight, as the reference code (not a draw of any
   fixed chain's posterior: its authors mark the step as unsettled).

Defaults and departures from the code
-------------------------------------
- ``eta = 0``, ``rho_scale = 0.5`` (the code's); ``rho_t`` written for any path
  (``sigma_t^2 / (alpha_t^2 + sigma_t^2)`` is ``1 - abar_t`` on VP paths).
- ``resampling = "systematic"`` at ``ess_threshold = 0.5`` (the code: multinomial at every
  step, the ESS computed but unused).
- The proposal variance: for ``eta > 0`` the code uses ``sigma_s^2 - a^2 rho^2 + a^2 v``
  (the ``eta = 0`` formula) where the kernel's variance is ``c^2``; here ``c^2`` (equal at
  ``eta = 0``). ``c^2 - a^2 rho_t^2`` is clamped at 0 (the code takes a NaN square root when
  the grid is coarse near the data end).
- ``final_step = "exact"`` (the code's is ``"code"``).
- Full Gaussian densities with their normalisers, so ``Result.log_evidence`` estimates
  ``log p(y)`` of the chain (the code returns no evidence and drops the constants).
- Start ``N(0, sigma_T^2 I)`` (the code: ``N(0, I)``); the time grid is the toolkit's
  (refined where the twist is informative, ``max_log_snr_step``, as TDS), not MCGdiff's
  singular-value grid.
- Reconstruction by Tweedie only (the code's ``--use_ode`` probability-flow
  reconstruction costs ``O(t)`` calls per step).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ..errors import PosteriorQualityWarning
from ..operators.base import LinearOperator
from ..problem import InverseProblem
from ..schedules import Schedule
from .base import (
    Context,
    Move,
    Requirements,
    SMCSampler,
    check_finite_nonnegative,
    check_positive_int,
)
from .kernels import log_normal
from .spectral import (
    gaussian_product,
    informative_time_grid,
    out_of_range_log_likelihood,
    spectral_observation,
)

__all__ = ["DDSMC", "decoupled_coefficients"]

_FINAL = ("exact", "code")
_RECONSTRUCTIONS = ("tweedie", "ode")
_RHOS = ("scaled", "flat")


def decoupled_coefficients(
    schedule: Schedule, t: Tensor, s: Tensor, eta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, b, c2)`` of the decoupled kernel ``p_eta(x_s | x_t) = N(a x0 + b x_t, c2 I)``:
    the normalised product ``N(x_s; alpha_s x0, sigma_s^2) N(x_t; k x_s, beta / eta)`` with
    ``k = alpha_t / alpha_s`` and ``beta = sigma_t^2 - k^2 sigma_s^2`` (the transition's
    variance). ``eta = 0``: ``N(alpha_s x0, sigma_s^2)`` (no memory of ``x_t``);
    ``eta = 1``: the DDPM posterior ``q(x_s | x_t, x0)``."""
    a_t, s_t = schedule.alpha(t), schedule.sigma(t)
    a_s, s_s = schedule.alpha(s), schedule.sigma(s)
    k = a_t / a_s
    beta = (s_t**2 - k**2 * s_s**2).clamp_min(0)
    den = beta + eta * k**2 * s_s**2
    if not bool(den > 0):
        # a step of zero length with eta = 0 (or to sigma_s = 0): the limit N(alpha_s x0, sigma_s^2)
        return a_s, torch.zeros_like(a_s), s_s**2
    a = a_s * beta / den
    b = eta * k * s_s**2 / den
    c2 = s_s**2 * beta / den
    return a, b, c2


@dataclass(frozen=True)
class DDSMCSetup:
    """The observation in the SVD basis: singular values ``(r,)``, ``y~ = U^T y``
    ``(B, 1, m)`` and ``sigma_y^2`` (a float, or ``(B, 1, 1)`` per problem)."""

    s: Tensor
    y_tilde: Tensor
    noise_var: Tensor | float


@dataclass(frozen=True)
class DDSMCState:
    """Particles ``x_t``, ``V^T x0_hat(x_t)`` and ``log p~_t(y | x_t)`` (the last two
    ``None`` after the final move)."""

    x: Tensor
    x0_bar: Tensor | None = None
    log_twist: Tensor | None = None


@dataclass(frozen=True)
class DDSMC(SMCSampler):
    """Decoupled diffusion SMC (Ekström Kelvinius, Zhao & Lindsten, ICML 2025).

    Parameters
    ----------
    num_steps, grid
        The time grid (inherited, default 100 uniform steps).
    resampling, ess_threshold
        Inherited (default systematic at ``ESS < N / 2``; the code: multinomial, every
        step, i.e. ``resampling="multinomial", ess_threshold=1``).
    eta
        The kernel's memory of ``x_t``: 0 (default, the paper's decoupled kernel
        ``N(alpha_s x0_hat, sigma_s^2)``) to 1 (the DDPM posterior).
    rho_scale
        ``rho_t^2 = rho_scale sigma_t^2 / (alpha_t^2 + sigma_t^2)``, the assumed variance of
        ``x0`` given ``x_t`` in the twist and the proposal (default 0.5, the code's).
    final_step
        ``"exact"`` (default: the chain's own last point, weighted by the likelihood) or
        ``"code"`` (the conditioned mean, as the reference code; biased).
    max_log_snr_step
        Refine the grid where the twist is informative and extend it before the last step
        (as :class:`~bayesfilter_diff.samplers.tds.TDS`; default 1.0, 0: the plain grid).
    """

    requires = Requirements(svd=True, noise_positive=True, per_problem=True)
    exact_start = True
    exact = True

    eta: float = 0.0
    rho_scale: float = 0.5
    rho: str = "scaled"
    reconstruction: str = "tweedie"
    ode_steps: int = 10
    final_step: str = "exact"
    max_log_snr_step: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        if not 0 < self.rho_scale < math.inf:
            raise ValueError(f"rho_scale must be a finite number > 0, got {self.rho_scale!r}")
        if self.rho not in _RHOS:
            raise ValueError(f"rho must be one of {_RHOS}, got {self.rho!r}")
        if self.reconstruction not in _RECONSTRUCTIONS:
            raise ValueError(
                f"reconstruction must be one of {_RECONSTRUCTIONS}, got {self.reconstruction!r}"
            )
        check_positive_int("ode_steps", self.ode_steps)
        if self.final_step not in _FINAL:
            raise ValueError(f"final_step must be one of {_FINAL}, got {self.final_step!r}")
        check_finite_nonnegative("max_log_snr_step", self.max_log_snr_step)

    def time_grid(self, prior, problem: InverseProblem) -> Tensor:
        return informative_time_grid(
            prior.schedule,
            super().time_grid(prior, problem),
            problem.operator,
            problem.min_noise_std,
            self.max_log_snr_step,
        )

    # ------------------------------------------------------------------ pieces
    def _rho2(self, ctx: Context, t: Tensor) -> Tensor:
        sch = ctx.prior.schedule
        a2, s2 = sch.alpha(t) ** 2, sch.sigma(t) ** 2
        if self.rho == "flat":
            return s2 / a2  # inf where alpha = 0: a flat twist
        return self.rho_scale * s2 / (a2 + s2)

    def _log_twist(self, setup: DDSMCSetup, x0_bar: Tensor, rho2: Tensor | float) -> Tensor:
        """``log N(y; A x0, sigma_y^2 I + rho2 A A^T)`` per particle, ``(B, N)``."""
        s, r = setup.s, setup.s.numel()
        if not bool(torch.isfinite(torch.as_tensor(rho2))):
            return torch.zeros(x0_bar.shape[:2], dtype=x0_bar.dtype, device=x0_bar.device)
        var = setup.noise_var + rho2 * s**2
        out = log_normal(setup.y_tilde[..., :r], s * x0_bar[..., :r], var).sum(-1)
        if setup.y_tilde.shape[-1] > r:
            out = out + out_of_range_log_likelihood(setup.y_tilde, r, setup.noise_var)
        return out

    def _reconstruct(self, ctx: Context, x: Tensor, k: int) -> Tensor:
        """``V^T x0_hat(x)`` for particles at ``times[k]``: Tweedie's ``E[x0 | x_t]`` (one
        call), or the probability-flow ODE from ``times[k]`` to the data end by DDIM
        (``eta = 0``) steps on at most ``ode_steps`` of the grid's remaining times (as many
        calls; the last step lands on the x0-prediction)."""
        op = cast(LinearOperator, ctx.problem.operator)
        times = ctx.times
        if self.reconstruction == "tweedie" or k >= times.numel() - 2:
            return op.Vt(ctx.denoise(x, times[k]))
        rest = times.numel() - 1 - k  # steps from times[k] to the end
        m = min(self.ode_steps, rest)
        idx = torch.linspace(k, times.numel() - 1, m + 1).round().long().tolist()
        sch = ctx.prior.schedule
        for j, (u, v) in enumerate(zip(idx[:-1], idx[1:])):
            x0 = ctx.denoise(x, times[u])
            if j == m - 1:
                return op.Vt(x0)
            a_u, s_u = sch.alpha(times[u]), sch.sigma(times[u])
            a_v, s_v = sch.alpha(times[v]), sch.sigma(times[v])
            x = a_v * x0 + s_v * (x - a_u * x0) / s_u
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ the sampler
    def setup(self, ctx: Context) -> DDSMCSetup:
        if self.eta < 1 and self.reconstruction == "tweedie":
            # a bias of the target itself: no weight can show it
            warnings.warn(
                PosteriorQualityWarning(
                    f"DDSMC: with eta = {self.eta:g} < 1 and Tweedie's reconstruction the chain "
                    "DDSMC targets drops Var[x0 | x_t] at every step, so its prior (and these "
                    "draws) are narrower than the model's at any step count "
                    "(docs/methods/ddsmc.md). Remedies: eta=1 (the DDPM kernel), or "
                    "reconstruction='ode'."
                ),
                stacklevel=4,
            )
        op = cast(LinearOperator, ctx.problem.operator)
        obs = spectral_observation(op, ctx.y, dtype=ctx.dtype)
        return DDSMCSetup(obs.s, obs.y_tilde[:, None, :], ctx.problem.noise_variance(1))

    def init(self, ctx: Context, setup: DDSMCSetup) -> tuple[DDSMCState, Tensor]:
        t0 = ctx.times[0]
        x = ctx.start()
        x0_bar = self._reconstruct(ctx, x, 0)
        lt = self._log_twist(setup, x0_bar, self._rho2(ctx, t0))
        return DDSMCState(x, x0_bar, lt), lt

    def move(
        self, ctx: Context, setup: DDSMCSetup, state: DDSMCState, k: int, t: Tensor, t_next: Tensor
    ) -> Move:
        op = cast(LinearOperator, ctx.problem.operator)
        x, x0b, lt = state.x, state.x0_bar, state.log_twist
        assert x0b is not None and lt is not None
        r = setup.s.numel()
        a, b, c2 = decoupled_coefficients(ctx.prior.schedule, t, t_next, self.eta)
        rho2 = self._rho2(ctx, t)
        # x0 | x_t ~ N(x0_hat, rho_t^2) conditioned on y, per observed coordinate
        post = gaussian_product(
            x0b[..., :r], rho2, setup.y_tilde[..., :r], setup.noise_var, setup.s
        )
        xb = op.Vt(x) if float(b) != 0 else None
        mix = (lambda u: a * u) if xb is None else (lambda u: a * u + b * xb[..., : u.shape[-1]])
        last = k == ctx.times.numel() - 2
        if not bool(c2 > 0):
            # deterministic kernel (the last step of VP / flow paths): x_0 = a x0_hat + b x_t
            x0_obs = post.mean if self.final_step == "code" else x0b[..., :r]
            x_bar = torch.cat([mix(x0_obs), mix(x0b)[..., r:]], -1)
            log_ratio = torch.zeros_like(lt)
        else:
            # r(x_s | x_t, y): the kernel's x0 swapped for its conditioned law (observed
            # coordinates; the null space keeps the kernel, ratio 1)
            pm = mix(x0b)
            qm = mix(post.mean)
            qv = (c2 - a**2 * rho2).clamp_min(0) + a**2 * post.var
            z = ctx.randn((ctx.B, ctx.N, op.in_dim))
            obs = qm + qv.sqrt() * z[..., :r]
            x_bar = torch.cat([obs, pm[..., r:] + c2.sqrt() * z[..., r:]], -1)
            log_ratio = (log_normal(obs, pm[..., :r], c2) - log_normal(obs, qm, qv)).sum(-1)
        x_new = op.V(x_bar)
        if last:
            # p(y | x_0): the twist with rho = 0 (the likelihood), in the same coordinates
            lt_new = self._log_twist(setup, x_bar, 0.0)
            new_state = DDSMCState(x_new)
        else:
            x0b_new = self._reconstruct(ctx, x_new, k + 1)
            lt_new = self._log_twist(setup, x0b_new, self._rho2(ctx, t_next))
            new_state = DDSMCState(x_new, x0b_new, lt_new)
        return Move(new_state, log_ratio + lt_new - lt)

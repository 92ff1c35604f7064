"""DDNM and DDNM+: denoising diffusion null-space models (Wang, Yu & Zhang, ICLR 2023).

Y. Wang, J. Yu and J. Zhang, "Zero-Shot Image Restoration Using Denoising Diffusion
Null-Space Model", ICLR 2023 (arXiv 2212.00490). Reference code: wyhuai/DDNM
(``functions/svd_ddnm.py``: ``ddnm_diffusion``, ``ddnm_plus_diffusion``;
``functions/svd_operators.py``: ``Lambda``, ``Lambda_noise``). See ``docs/methods/ddnm.md``.

Update
------
Notation: ``a = alpha(t_next)``, ``c = sigma(t_next)`` (VP: ``sqrt(abar_next)``,
``sqrt(1 - abar_next)``), ``A = U S V^T``, ``ybar_i = (U^T y)_i / s_i``
(:func:`.spectral.spectral_observation`). One step from ``t`` to ``t_next``:

1. ``x0_hat = E[x0 | x_t]`` and the model's noise ``eps_hat = (x_t - alpha_t x0_hat) / sigma_t``;
2. range-null-space correction (:func:`.spectral.pinv_correction`)::

       x0_hat' = x0_hat - V Lambda V^T A^+ (A x0_hat - y),
       i.e. x0bar'_i = x0bar_i + lambda_i (ybar_i - x0bar_i) on the observed coordinates;

3. ``x_next = a x0_hat' + V (d1 . zbar) + V (d2 . epsbar)``, ``zbar ~ N(0, I)``.

DDNM (:class:`DDNM`, noiseless ``y = A x0``; ``ddnm_diffusion``): ``lambda = 1`` and
``(d1, d2) = (c eta, c sqrt(1 - eta^2))`` everywhere, i.e.
``x_next = a x0_hat' + c (eta z + sqrt(1 - eta^2) eps_hat)``.

DDNM+ (:class:`DDNMPlus`, ``y = A x0 + sigma_y n``; ``ddnm_plus_diffusion``, the paper's
eqs. 12, 17 and 51), per spectral coordinate ``i``::

    lambda_i = 1                                    if c >= a sigma_y / s_i
             = s_i c sqrt(1 - eta^2) / (a sigma_y)  otherwise
    (d1, d2) = (c eta, 0)                           if c < a sigma_y / s_i
             = (sqrt(c^2 - a^2 sigma_y^2 / s_i^2), 0) if c > a sigma_y / s_i
             = (c eta, c sqrt(1 - eta^2))           if s_i = 0 (i >= rank) or on a tie

so that the noise carried in through ``A^+ y`` and the fresh noise ``d1`` add up to variance
``c^2``. For ``sigma_y = 0`` (or ``a = 0``) DDNM+ equals DDNM, as in the code.

Both start from ``x_T = sigma_T z`` (the code's ``x_T ~ N(0, I)``; not y-informed); the last
step (``a = 1``, ``c = 0``) returns ``x0_hat'``, so DDNM ends with ``A x = y`` (up to the
projection of ``y`` on the range of ``A``). Not consistent posterior samplers
(``docs/methods/ddnm.md``).

Defaults and departures
-----------------------
- ``eta = 0.85`` (``--eta``), 100 steps (``time_travel.T_sampling``) on the code's respaced
  DDPM grid (``grid="ddpm"``).
- Time travel (RePaint's schedule, ``travel_length`` L and ``travel_repeat`` R; the configs'
  ``L = R = 1`` is off, here too): after arriving at the grid point with DDPM index
  ``j = num_steps - 1 - position``, ``j % L == 0`` and ``j < num_steps - L``, jump back ``L``
  grid points ``R - 1`` times by re-noising the last *unprojected* ``x0_hat``
  (``x_{t+L} = alpha x0_hat + sigma z``) and redo the ``L`` steps, inside :meth:`move` (one
  NFE each).
- ``sqrt(1 - eta^2)`` in DDNM+'s ``lambda`` is the code's (the paper's eq. 19 has none). The
  paper's SVD-free DDNM+ is not implemented; DDNM ignores ``noise_std``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ..operators.base import LinearOperator
from .base import Context, Move, Requirements, Sampler
from .kernels import x0_to_eps
from .spectral import pinv_correction, residual_std, spectral_observation

__all__ = ["DDNM", "DDNMPlus"]


@dataclass(frozen=True)
class DDNMSetup:
    """Singular values ``s`` ``(r,)`` and the spectral observation ``ybar`` ``(B, 1, r)``."""

    s: Tensor
    ybar: Tensor


@dataclass(frozen=True)
class DDNMState:
    """Particles ``x_t``."""

    x: Tensor


@dataclass(frozen=True)
class _NullSpaceSampler(Sampler):
    """Shared DDNM machinery: spectral correction, noise, time travel."""

    requires = Requirements(svd=True)
    exact_start = True
    on_path = True

    num_steps: int = 100
    grid: str = "ddpm"
    eta: float = 0.85
    travel_length: int = 1
    travel_repeat: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        for name in ("travel_length", "travel_repeat"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.travel_repeat > 1 and self.travel_length >= self.num_steps:
            raise ValueError(
                f"travel_length ({self.travel_length}) must be smaller than num_steps "
                f"({self.num_steps}) when travel_repeat > 1"
            )

    def setup(self, ctx: Context) -> DDNMSetup:
        obs = spectral_observation(cast(LinearOperator, ctx.problem.operator), ctx.y)
        return DDNMSetup(obs.s, obs.y_bar.unsqueeze(1))

    def init(self, ctx: Context, setup: DDNMSetup) -> tuple[DDNMState, None]:
        return DDNMState(ctx.start()), None

    # ------------------------------------------------------------------ per-method rule
    def _coefficients(
        self, s: Tensor, a: Tensor, c: Tensor, sigma_y: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(lambda, d1, d2)`` on the ``r`` observed spectral coordinates."""
        raise NotImplementedError

    # ------------------------------------------------------------------ one reverse step
    def _reverse(
        self, ctx: Context, setup: DDNMSetup, x: Tensor, t: Tensor, t_next: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One reverse step ``t -> t_next``; returns ``(x_next, x0_hat)`` (unprojected)."""
        sch = ctx.prior.schedule
        op = cast(LinearOperator, ctx.problem.operator)
        s = setup.s
        r = s.numel()
        # 1. x0_hat and the model's eps_hat.
        x0 = ctx.denoise(x, t)
        eps = x0_to_eps(x, x0, sch.alpha(t), sch.sigma(t))
        a, c = sch.alpha(t_next), sch.sigma(t_next)
        lam, d1, d2 = self._coefficients(s, a, c, ctx.problem.noise_std)
        # 2. x0_hat' = x0_hat - V Lambda V^T A^+ (A x0_hat - y): in spectral coordinates the
        #    observed part moves by lambda_i (ybar_i - x0bar_i), the null space is unchanged.
        x0b = op.Vt(x0)
        x0p = x0 + op.V_range(pinv_correction(x0b, setup.ybar, lam))
        # 3. noise: c (eta z + sqrt(1 - eta^2) eps_hat) on the null space, (d1, d2) on the
        #    observed coordinates.
        zb = ctx.randn(x0b.shape)
        epsb = op.Vt(eps)
        c_eta, c_det = c * self.eta, c * (1.0 - self.eta**2) ** 0.5
        noise = torch.cat(
            [d1 * zb[..., :r] + d2 * epsb[..., :r], c_eta * zb[..., r:] + c_det * epsb[..., r:]],
            dim=-1,
        )
        return a * x0p + op.V(noise), x0

    def move(self, ctx: Context, setup: DDNMSetup, state: DDNMState, k: int, t, t_next) -> Move:
        x, x0 = self._reverse(ctx, setup, state.x, t, t_next)
        # Time travel (RePaint schedule): at DDPM index j = n - 1 - (k + 1) with j % L == 0
        # and j < n - L, jump back L grid points R - 1 times and redo the L reverse steps.
        n, L, R = self.num_steps, self.travel_length, self.travel_repeat
        p = k + 1
        j = n - 1 - p
        if R > 1 and j >= 0 and j % L == 0 and j < n - L:
            sch = ctx.prior.schedule
            times = ctx.times
            for _ in range(R - 1):
                tb = times[p - L]
                # re-noise the last unprojected x0_hat (code: x0_preds[-1]) to times[p - L]
                x = sch.alpha(tb) * x0 + sch.sigma(tb) * ctx.randn()
                for q in range(p - L, p):
                    x, x0 = self._reverse(ctx, setup, x, times[q], times[q + 1])
        return Move(DDNMState(x))


@dataclass(frozen=True)
class DDNM(_NullSpaceSampler):
    """DDNM (Wang et al., ICLR 2023) for noiseless problems: null-space projection + DDIM.

    Parameters
    ----------
    num_steps
        Reverse steps (code default ``T_sampling = 100``).
    grid
        ``"ddpm"`` (default, the code's respaced indices) or ``"uniform"``.
    eta
        Noise mixing of the step (code default 0.85).
    travel_length, travel_repeat
        RePaint-style time travel ``L`` and ``R`` (default 1, 1: off).
    """

    def _coefficients(self, s, a, c, sigma_y):
        one = torch.ones_like(s)
        return one, c * self.eta * one, c * (1.0 - self.eta**2) ** 0.5 * one


@dataclass(frozen=True)
class DDNMPlus(_NullSpaceSampler):
    """DDNM+ (Wang et al., ICLR 2023) for noisy problems: per-singular-value scaling.

    Parameters
    ----------
    num_steps
        Reverse steps (code default ``T_sampling = 100``).
    grid
        ``"ddpm"`` (default, the code's respaced indices) or ``"uniform"``.
    eta
        Noise mixing of the step (code default 0.85).
    travel_length, travel_repeat
        RePaint-style time travel ``L`` and ``R`` (default 1, 1: off).
    """

    def _coefficients(self, s, a, c, sigma_y):
        c_eta, c_det = c * self.eta, c * (1.0 - self.eta**2) ** 0.5
        lam = torch.ones_like(s)
        d1 = c_eta * torch.ones_like(s)
        d2 = c_det * torch.ones_like(s)
        if sigma_y == 0 or float(a) == 0:
            return lam, d1, d2
        thr = a * sigma_y / s  # c compared with a sigma_y / s_i (the noise a ybar_i carries)
        noisy = c < thr  # y noisier than x_next: shrink the correction, all noise fresh
        lam = torch.where(noisy, s * c_det / (a * sigma_y), lam)
        d1 = torch.where(noisy, c_eta, d1)
        d2 = torch.where(noisy, torch.zeros_like(d2), d2)
        clean = c > thr  # x_next noisier than y: top the noise of A^+ y up to c^2
        d1 = torch.where(clean, residual_std(c, thr), d1)
        d2 = torch.where(clean, torch.zeros_like(d2), d2)
        return lam, d1, d2

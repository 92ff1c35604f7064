"""DDRM: denoising diffusion restoration models (Kawar, Elad, Ermon & Song, NeurIPS 2022).

B. Kawar, M. Elad, S. Ermon and J. Song, "Denoising Diffusion Restoration Models",
NeurIPS 2022 (arXiv 2201.11793). Reference code: bahjat-kawar/ddrm
(``functions/denoising.py::efficient_generalized_steps``). See ``docs/methods/ddrm.md``.

Update
------
DDRM works in the spectral coordinates of ``A = U S V^T`` and in the variance-exploding
variable ``x_VE = x_t / alpha_t = x0 + S_t eps`` with ``S_t = sigma_t / alpha_t`` (VP:
``sqrt((1 - abar_t) / abar_t)``). With ``xbar = V^T x_VE``, ``x0bar = V^T x0_hat``,
``epsbar = V^T eps_hat``, ``ybar_i = (U^T y)_i / s_i`` (:func:`.spectral.spectral_observation`)
and ``S_n`` the VE noise level of the next time, one step is, per spectral coordinate ``i``
with ``z ~ N(0, 1)``:

1. ``x0_hat = E[x0 | x_t]``, ``eps_hat = (x_t - alpha_t x0_hat) / sigma_t``, in spectral
   coordinates;
2. missing (``i >= rank``, ``s_i = 0``):
   ``xbar_i = x0bar_i + sqrt(1 - eta^2) S_n epsbar_i + eta S_n z_i``;
3. "before" (``s_i S_n >= sigma_y``: noisier than ``y``):
   ``xbar_i = eta_b ybar_i + (1 - eta_b) x0bar_i + sqrt(S_n^2 - eta_b^2 sigma_y^2 / s_i^2) z_i``;
4. "after" (``s_i S_n < sigma_y``: less noisy than ``y``):
   ``xbar_i = x0bar_i + sqrt(1 - eta^2) S_n (s_i / sigma_y) (ybar_i - x0bar_i) + eta S_n z_i``;
5. ``x_{t_next} = alpha_{t_next} V xbar``.

Initialisation: ``xbar_T,i = ybar_i + sqrt(S_T^2 - sigma_y^2 / s_i^2) z_i`` where
``s_i S_T > sigma_y``, else ``S_T z_i``, and ``x_T = alpha_T V xbar_T``, written as
``alpha_T ybar + sqrt(sigma_T^2 - alpha_T^2 sigma_y^2 / s_i^2) z`` (finite at ``alpha_T = 0``).
Times come from the sampler's grid (``S_t`` from the schedule), so DDRM runs on any
VP / VE / flow path. DDRM is not a consistent posterior sampler (``docs/methods/ddrm.md``).

Defaults and departures
-----------------------
- ``eta = 0.85`` (``--eta``, for both ``eta_A`` and ``eta_C``), ``eta_b = 1`` (``--etaB``), 20
  steps (the paper's NFE) on the code's respaced grid (``grid="ddpm"``).
- ``sigma_y`` as given (the code doubles its ``--sigma_0`` for images in ``[-1, 1]``); the
  start is scaled by ``alpha_T`` as in the paper (the code divides by ``S_T``).
- Ties ``s_i S_n == sigma_y`` go to "before" (the paper's rule; the code sends them to
  "missing"), so a noiseless problem ends with ``A x = y`` exactly.
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

__all__ = ["DDRM"]


@dataclass(frozen=True)
class DDRMSetup:
    """Singular values ``s`` ``(r,)`` and the spectral observation ``ybar`` ``(B, 1, r)``."""

    s: Tensor
    ybar: Tensor


@dataclass(frozen=True)
class DDRMState:
    """Particles ``x_t``."""

    x: Tensor


@dataclass(frozen=True)
class DDRM(Sampler):
    """DDRM (Kawar et al., NeurIPS 2022): spectral-domain posterior sampling.

    Parameters
    ----------
    num_steps
        Number of steps (paper: 20).
    grid
        ``"ddpm"`` (default): the code's respaced DDPM indices ``950, 900, ..., 0`` for 20
        steps, i.e. times ``(k + 1) / 1000`` and then ``0``; ``"uniform"`` is coarser near
        ``t = 0``, which leaves visibly more noise on the observed coordinates of a noisy
        problem (the last step returns ``x0_hat`` of a state at ``t = 1 / num_steps``).
    eta
        Noise mixing of the "missing" and "after" cases (paper: 0.85).
    eta_b
        Weight of ``ybar`` in the "before" case (paper: 1.0).
    """

    requires = Requirements(svd=True)
    on_path = True

    num_steps: int = 20
    grid: str = "ddpm"
    eta: float = 0.85
    eta_b: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        if not 0.0 <= self.eta_b <= 1.0:
            raise ValueError(f"eta_b must be in [0, 1], got {self.eta_b!r}")

    def setup(self, ctx: Context) -> DDRMSetup:
        obs = spectral_observation(cast(LinearOperator, ctx.problem.operator), ctx.y)
        return DDRMSetup(obs.s, obs.y_bar.unsqueeze(1))

    def init(self, ctx: Context, setup: DDRMSetup) -> tuple[DDRMState, None]:
        sch = ctx.prior.schedule
        op = cast(LinearOperator, ctx.problem.operator)
        s, ybar = setup.s, setup.ybar
        r = s.numel()
        sy = ctx.problem.noise_std
        t0 = ctx.times[0]
        a, sg = sch.alpha(t0), sch.sigma(t0)
        z = ctx.randn(ctx.shape[:2] + (op.in_dim,))
        # alpha_T xbar_T: alpha_T ybar_i + sqrt(sigma_T^2 - alpha_T^2 sigma_y^2 / s_i^2) z_i
        # where s_i S_T > sigma_y (i.e. s_i sigma_T > alpha_T sigma_y), else sigma_T z_i.
        xb = sg * z
        obs = s * sg > a * sy
        xb_obs = torch.where(obs, a * ybar + residual_std(sg, a * sy / s) * z[..., :r], xb[..., :r])
        xb = torch.cat([xb_obs, xb[..., r:]], dim=-1)
        return DDRMState(op.V(xb)), None

    def move(self, ctx: Context, setup: DDRMSetup, state: DDRMState, k: int, t, t_next) -> Move:
        sch = ctx.prior.schedule
        op = cast(LinearOperator, ctx.problem.operator)
        s, ybar = setup.s, setup.ybar
        r = s.numel()
        sy = ctx.problem.noise_std
        x = state.x
        # 1. x0_hat and eps_hat, in spectral coordinates.
        x0 = ctx.denoise(x, t)
        eps = x0_to_eps(x, x0, sch.alpha(t), sch.sigma(t))
        x0b, epsb = op.Vt(x0), op.Vt(eps)
        a_n = sch.alpha(t_next)
        S_n = sch.sigma(t_next) / a_n  # VE noise level of the next time
        z = ctx.randn(x0b.shape)
        c_det = (1.0 - self.eta**2) ** 0.5
        # 2. "missing" (every coordinate; the observed ones are overwritten below).
        xb = x0b + c_det * S_n * epsb + self.eta * S_n * z
        x0r, zr = x0b[..., :r], z[..., :r]
        # 3. "before": s_i S_n >= sigma_y (always for sigma_y = 0).
        before = s * S_n >= sy
        std_b = residual_std(S_n, self.eta_b * sy / s)
        xb_before = self.eta_b * ybar + (1.0 - self.eta_b) * x0r + std_b * zr
        # 4. "after": s_i S_n < sigma_y (only possible for sigma_y > 0); the correction
        #    lambda_i (ybar_i - x0bar_i) with lambda_i = sqrt(1 - eta^2) S_n s_i / sigma_y.
        if sy > 0:
            corr = pinv_correction(x0b, ybar, c_det * S_n * (s / sy))
            xb_after = x0r + corr + self.eta * S_n * zr
            xb_obs = torch.where(before, xb_before, xb_after)
        else:
            xb_obs = xb_before
        xb = torch.cat([xb_obs, xb[..., r:]], dim=-1)
        # 5. back to the VP (or general) variable: x_next = alpha_next V xbar.
        return Move(DDRMState(a_n * op.V(xb)))

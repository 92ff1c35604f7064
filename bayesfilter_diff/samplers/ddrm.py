"""DDRM: denoising diffusion restoration models (Kawar, Elad, Ermon & Song, NeurIPS 2022).

DDRM works in the spectral coordinates of ``A = U S V^T`` and in the variance-exploding
variable ``x_VE = x_t / alpha_t = x0 + S_t eps`` with ``S_t = sigma_t / alpha_t`` (VP:
``sqrt((1 - abar_t) / abar_t)``). With ``xbar = V^T x_VE``, ``x0bar = V^T x0_hat``,
``epsbar = V^T eps_hat``, ``ybar_i = (U^T y)_i / s_i`` and ``S_n`` the VE noise level of the
next time, one step of the official ``functions/denoising.py::efficient_generalized_steps``
(bahjat-kawar/ddrm), and of the paper's variational update, is, per spectral coordinate
``i`` with ``z ~ N(0, 1)``:

- missing (``i >= rank``, ``s_i = 0``):
  ``xbar_i = x0bar_i + sqrt(1 - eta^2) S_n epsbar_i + eta S_n z_i``;
- "after" (``s_i S_n < sigma_y``: less noisy than ``y``):
  ``xbar_i = x0bar_i + sqrt(1 - eta^2) S_n (s_i / sigma_y) (ybar_i - x0bar_i) + eta S_n z_i``;
- "before" (``s_i S_n >= sigma_y``: noisier than ``y``):
  ``xbar_i = eta_b ybar_i + (1 - eta_b) x0bar_i + sqrt(S_n^2 - eta_b^2 sigma_y^2 / s_i^2) z_i``;

then ``x_{t_next} = alpha_{t_next} V xbar``. Times come from the sampler's grid (``S_t`` from
the schedule), not from DDPM indices, so DDRM runs on any VP/VE/flow path.

Defaults (paper, and ``main.py`` of the official code): ``eta = 0.85`` (``--eta``, used for
both ``eta_A`` and ``eta_C``), ``eta_b = 1`` (``--etaB``), 20 steps (the paper's NFE; the
code's ``--timesteps`` defaults to 1000) on the code's respaced grid (``grid="ddpm"``:
``seq = range(0, 1000, 1000 // num_steps)``, index ``k`` at time ``(k + 1) / 1000``).
``sigma_y`` is used as given (the code doubles its ``--sigma_0`` for images in ``[-1, 1]``).

Initialisation: ``xbar_T,i = ybar_i + sqrt(S_T^2 - sigma_y^2 / s_i^2) z_i`` where
``s_i S_T > sigma_y``, else ``S_T z_i``, and ``x_T = alpha_T V xbar_T`` (the paper's
scaling; the code divides by ``S_T`` instead of multiplying by ``alpha_T = sqrt(abar_T)``,
larger by ``1 / sqrt(1 - abar_T)``). Written as ``alpha_T ybar + sqrt(sigma_T^2 - alpha_T^2
sigma_y^2 / s_i^2) z`` it stays finite when ``alpha_T = 0`` (flow path at ``t = 1``).

Departures from the code (documented choices):

- Ties ``s_i S_n == sigma_y`` go to "before" (the paper's ``sigma_t >= sigma_y / s_i``);
  the code's strict inequalities send them to "missing". This matters at the last step
  of a noiseless problem (``S_n = 0 = sigma_y``): the paper's rule returns ``ybar`` on the
  observed coordinates, so ``A x = y`` exactly, while the code returns ``x0_hat``
  unprojected. With ``sigma_y > 0`` the last step gives ``x0_hat`` (the "after" case with
  ``S_n = 0``), as in the code.
- Zero singular values are never in the list (the operators return only ``s_i > 0``), so
  the code's ``U^T y / s`` division by zero cannot occur; coordinates beyond the rank are
  "missing".

Behaviour on a standard normal prior (exact chain moments, ``tests/test_ddrm.py``): the
output reproduces ``y`` exactly for noiseless problems and its means are close to the
posterior's, but DDRM is not a consistent posterior sampler: the eta-mixed noise
``eta S_n z`` is a fixed fraction of the noise level, not a vanishing ancestral step, so the
variance of unobserved directions tends to about 0.76 of the prior's however many steps
(0.63 / 0.73 / 0.76 at 20 / 100 / 1000 steps), and with noisy ``y`` the variance of
observed directions is off by factors (1.6 and 0.15 of the posterior's at 20 steps, 0.19
and 0.14 at 1000, for posterior variances 0.011 and 0.026). DDNM+ (with the code's
``sqrt(1 - eta^2)``) is the same chain as DDRM with ``eta_b = 1`` except for the
initialisation and ties.

NFE: one network call per step, no backpropagation. Needs a linear operator with an SVD and
Gaussian noise (``sigma_y = 0`` allowed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Context, Sampler

__all__ = ["DDRM"]


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

    def check(self, prior, problem) -> None:
        self._require_svd(problem)
        self._require_gaussian(problem)

    def init(self, ctx: Context):
        sch = ctx.prior.schedule
        op = ctx.problem.operator
        s = op.singular_values()
        r = s.numel()
        sy = ctx.problem.noise_std
        # Spectral observation ybar = S^-1 U^T y on the first r coordinates, (B, 1, r).
        ybar = (op.Ut(ctx.y)[..., :r] / s).unsqueeze(1)
        ctx.cache["ybar"] = ybar
        t0 = ctx.times[0]
        a, sg = sch.alpha(t0), sch.sigma(t0)
        z = ctx.randn(ctx.shape[:2] + (op.in_dim,))
        # alpha_T xbar_T: alpha_T ybar_i + sqrt(sigma_T^2 - alpha_T^2 sigma_y^2 / s_i^2) z_i
        # where s_i S_T > sigma_y (i.e. s_i sigma_T > alpha_T sigma_y), else sigma_T z_i.
        xb = sg * z
        obs = s * sg > a * sy
        std_obs = (sg**2 - (a * sy / s) ** 2).clamp_min(0).sqrt()
        xb_obs = torch.where(obs, a * ybar + std_obs * z[..., :r], xb[..., :r])
        xb = torch.cat([xb_obs, xb[..., r:]], dim=-1)
        return {"x": op.V(xb)}, None

    def step(self, ctx: Context, state, i, t, t_next):
        sch = ctx.prior.schedule
        op = ctx.problem.operator
        s = op.singular_values()
        r = s.numel()
        sy = ctx.problem.noise_std
        ybar = ctx.cache["ybar"]
        x = state["x"]
        # 1. x0_hat and eps_hat, in spectral coordinates.
        x0 = ctx.denoise(x, t)
        eps = (x - sch.alpha(t) * x0) / sch.sigma(t)
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
        std_b = (S_n**2 - (self.eta_b * sy / s) ** 2).clamp_min(0).sqrt()
        xb_before = self.eta_b * ybar + (1.0 - self.eta_b) * x0r + std_b * zr
        # 4. "after": s_i S_n < sigma_y (only possible for sigma_y > 0).
        if sy > 0:
            xb_after = x0r + c_det * S_n * (s / sy) * (ybar - x0r) + self.eta * S_n * zr
            xb_obs = torch.where(before, xb_before, xb_after)
        else:
            xb_obs = xb_before
        xb = torch.cat([xb_obs, xb[..., r:]], dim=-1)
        # 5. back to the VP (or general) variable: x_next = alpha_next V xbar.
        return {"x": a_n * op.V(xb)}, None

"""DCPS: divide-and-conquer posterior sampling (Janati, Moufad, Durmus, Moulines & Olsson,
"Divide-and-Conquer Posterior Sampling for Denoising Diffusion Priors", NeurIPS 2024,
arXiv 2403.11407).

Reference code: ``Badr-MOUFAD/dcps`` @ ``2cca2f3`` (``src/posterior_samplers/dcps.py``,
``demo_imges.py``, ``demo_trajectory.py``). See ``docs/methods/dcps.md``.

Update
------
The grid is split into ``blocks`` blocks between the times ``tau_0 = 0 < ... < tau_L = 1``
(uniform). Block ``l`` (from the top) targets the intermediate posterior with the
potential at its lower end ``tau_l``,

    log g_l(z) = -||alpha_{tau_l} y - A z||^2 / (2 sigma_y^2)      (``g_0`` the likelihood),

and runs, from its upper end ``tau_{l+1}`` down to ``tau_l``:

1. ``langevin_steps`` tamed Langevin steps at ``u = tau_{l+1}`` on
   ``p_u(x) g_l(m(x))``, ``m(x)`` the DDPM mean from ``u`` to ``tau_l`` at ``x0_hat(x)``:
   ``G = grad log g_l(m(x)) + score_u(x)``, ``x <- x + gamma / (1 + gamma ||G||) G +
   sqrt(2 gamma) xi`` (the code's taming: the noise keeps ``gamma``);
2. for each step ``t -> t'`` of the block, a diagonal Gaussian ``q = N(mu, diag(s^2))``
   fitted by ``grad_steps`` normalised-gradient steps (each parameter block moves by ``lr``
   in norm, per particle) on

       L = -log g_l(X_tau) + KL(q || N(m_p, s_p^2 I)),   X_t' = mu + s xi,
       X_tau ~ N(DDPM mean t' -> tau_l at x0_hat(X_t'), its variance)

   (one draw of each per step; a network call and a backward pass), with ``N(m_p, s_p^2)``
   the DDPM transition ``t -> t'`` at ``x0_hat(x_t)``; then ``x_t' ~ q``.

The last step returns ``x0_hat`` at the last positive time. Approximate: the Gaussian
transitions and the variational family, and the intermediate potentials (exact only for
``g_0``).

Defaults (the code's images): 3 blocks (``obs_timesteps = linspace(0, 999, 4)``), 300 steps,
``langevin_steps = 5``, ``gamma = 1e-3``, ``grad_steps = 2``, ``lr = 1.5``. Departures:
continuous time; the final ``x0_hat`` (the code returns ``x`` at its last positive time, with
its noise); linear operators with Gaussian noise only (the code also has Poisson and JPEG
potentials).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Context, Move, Requirements, Sampler, check_positive_int
from .kernels import ddim_coefficients

__all__ = ["DCPS"]


@dataclass(frozen=True)
class DCPSState:
    x: Tensor


def _row_norm(g: Tensor) -> Tensor:
    """Per-particle norm ``(B, N, 1, ...)`` of ``g`` ``(B, N, ...)``."""
    n = g.reshape(g.shape[0], g.shape[1], -1).norm(dim=-1)
    return n.reshape(n.shape + (1,) * (g.dim() - 2))


@dataclass(frozen=True)
class DCPS(Sampler):
    """Divide-and-conquer posterior sampling (Janati et al., NeurIPS 2024).

    Parameters
    ----------
    num_steps, grid
        The time grid (default 300 uniform steps; rounded down to a multiple of ``blocks``).
    blocks
        Number of blocks (default 3, the code's ``L = 4`` boundaries).
    langevin_steps, gamma
        Tamed Langevin steps at the top of each block and their step size (default 5,
        1e-3).
    grad_steps, lr
        Normalised-gradient steps per transition and their length (default 2, 1.5: the
        code's images; its trajectories: ``lr = 5e-2``).
    """

    requires = Requirements(linear=True, noise_positive=True, differentiates=True)
    exact_start = True
    on_path = True

    num_steps: int = 300
    blocks: int = 3
    langevin_steps: int = 5
    gamma: float = 1e-3
    grad_steps: int = 2
    lr: float = 1.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("blocks", self.blocks)
        check_positive_int("grad_steps", self.grad_steps)
        if isinstance(self.langevin_steps, bool) or self.langevin_steps < 0:
            raise ValueError(f"langevin_steps must be an int >= 0, got {self.langevin_steps!r}")
        for name in ("gamma", "lr"):
            v = getattr(self, name)
            if not 0 < v < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if self.num_steps < self.blocks:
            raise ValueError(
                f"num_steps ({self.num_steps}) must be at least blocks ({self.blocks})"
            )

    def time_grid(self, prior, problem) -> Tensor:
        """``blocks`` uniform blocks of ``num_steps // blocks`` uniform steps each."""
        n = (self.num_steps // self.blocks) * self.blocks
        return prior.schedule.time_grid(
            n, self.grid, dtype=problem.y.dtype, device=problem.y.device
        )

    # ------------------------------------------------------------------ pieces
    def _log_g(self, ctx: Context, z: Tensor, tau: Tensor) -> Tensor:
        """``log g(z) = -||alpha_tau y - A z||^2 / (2 sigma_y^2)`` per particle ``(B, N)``."""
        a = ctx.prior.schedule.alpha(tau)
        r = a * ctx.y.unsqueeze(1) - ctx.problem.operator(z)
        return -0.5 * (r * r).reshape(r.shape[:2] + (-1,)).sum(-1) / ctx.problem.noise_std**2

    def _ddpm(self, ctx: Context, x: Tensor, x0: Tensor, t: Tensor, s: Tensor):
        """Mean and std of the DDPM transition ``t -> s`` at ``x0`` (``s`` may be 0)."""
        sch = ctx.prior.schedule
        coef = ddim_coefficients(sch, t, s, 1.0)
        c_x = coef.c_eps / sch.sigma(t)
        return c_x * x + (coef.alpha_s - c_x * coef.alpha_t) * x0, coef.std

    def _langevin(self, ctx: Context, x: Tensor, u: Tensor, tau: Tensor) -> Tensor:
        sch = ctx.prior.schedule
        a_u, s_u = sch.alpha(u), sch.sigma(u)
        for _ in range(self.langevin_steps):
            with torch.enable_grad():
                xr = x.detach().requires_grad_(True)
                ctx.nfe += 1
                ctx.backprop = True
                x0 = ctx.prior.denoise(xr, u)
                m, _ = self._ddpm(ctx, xr, x0, u, tau)
                (g,) = torch.autograd.grad(self._log_g(ctx, m, tau).sum(), xr)
            score = (a_u * x0.detach() - x) / s_u**2
            G = g + score
            h = self.gamma / (1 + self.gamma * _row_norm(G))
            x = x + h * G + (2 * self.gamma) ** 0.5 * ctx.randn()
        return x

    def _fit(
        self, ctx: Context, m_p: Tensor, s_p: Tensor, t_next: Tensor, tau: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(mu, log s)`` after ``grad_steps`` normalised-gradient steps from ``(m_p, log
        s_p)``."""
        mu = m_p.detach().clone()
        ls = torch.full_like(mu, float(torch.log(s_p)))
        red = tuple(range(2, mu.dim()))
        at_end = bool(t_next == tau)
        for _ in range(self.grad_steps):
            with torch.enable_grad():
                mu_r, ls_r = mu.requires_grad_(True), ls.requires_grad_(True)
                x = mu_r + torch.exp(ls_r) * ctx.randn()
                if at_end:
                    x_tau = x
                else:
                    ctx.nfe += 1
                    ctx.backprop = True
                    x0 = ctx.prior.denoise(x, t_next)
                    m_b, s_b = self._ddpm(ctx, x, x0, t_next, tau)
                    x_tau = m_b + s_b * ctx.randn()
                d = ls_r - torch.log(s_p)
                kl = 0.5 * (-2 * d + torch.exp(2 * d) + (mu_r - m_p) ** 2 / s_p**2).sum(red)
                loss = (kl - self._log_g(ctx, x_tau, tau)).sum()
                g_mu, g_ls = torch.autograd.grad(loss, [mu_r, ls_r])
            mu = mu.detach() - self.lr * g_mu / (_row_norm(g_mu) + 1e-8)
            ls = ls.detach() - self.lr * g_ls / (_row_norm(g_ls) + 1e-8)
        return mu, ls

    # ------------------------------------------------------------------ the sampler
    def init(self, ctx: Context, setup: None) -> tuple[DCPSState, None]:
        return DCPSState(ctx.start()), None

    def move(self, ctx: Context, setup: None, state: DCPSState, k: int, t, t_next) -> Move:
        x = state.x
        n = (ctx.times.numel() - 1) // self.blocks  # steps per block
        tau = ctx.times[(k // n + 1) * n]  # the block's lower end
        if k == ctx.times.numel() - 2:
            return Move(DCPSState(ctx.denoise(x, t)))  # x0_hat at the last positive time
        if k % n == 0 and self.langevin_steps:
            x = self._langevin(ctx, x, t, tau)
        m_p, s_p = self._ddpm(ctx, x, ctx.denoise(x, t), t, t_next)
        mu, ls = self._fit(ctx, m_p, s_p, t_next, tau)
        return Move(DCPSState(mu + torch.exp(ls) * ctx.randn()))

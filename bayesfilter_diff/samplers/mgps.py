"""MGPS: variational diffusion posterior sampling with midpoint guidance (Moufad, Janati,
Bedin, Durmus, Oudjane, Moulines & Olsson, ICLR 2025, arXiv 2410.09945).

Reference code: ``YazidJanati/mgps`` @ ``7839182`` (``src/posterior_samplers/mgps.py``,
``configs/experiments/sampler/mgps.yaml``). See ``docs/methods/mgps.md``.

Update
------
A posterior transition ``x_t -> x_t'`` (``t' < t``) goes through a midpoint ``m = alpha t'``:

1. the prior's Gaussian transition to the midpoint, ``p^(x_m | x_t) = N(mu_p, s_p^2 I)``, the
   DDPM posterior ``q(x_m | x_t, x0 = x0_hat(x_t))`` (one network call);
2. a diagonal Gaussian ``q(x_m) = N(mu, diag(exp(2 v)))`` fitted by ``grad_steps`` Adam steps
   (learning rate ``lr``) on

       L(mu, v) = -log p(y | x0_hat(x_m, m)) + KL(q || p^(. | x_t)),   x_m = mu + exp(v) xi,

   one reparameterised draw per step (a network call and a backward pass through it); the
   mean starts at the DDPM posterior mean with the previous midpoint's ``x0_hat``, the log-std
   at ``log s_p``;
3. ``x_m ~ q``, then ``x_t' ~ q(x_t' | x_m, x_t)``, the forward process's bridge (no network
   call); ``x0_hat(x_m, m)`` is kept for the next initialisation (one call);
4. the last step returns ``x0_hat`` at the last positive time.

The guidance is evaluated at ``x_m``, less noisy than ``x_t``: the likelihood term is sharper
than DPS's at the same step. Approximate: the Gaussian ``p^`` and the variational family.

Defaults (the code's images): ``alpha = 0.5``, ``lr = 3e-2``, 2 gradient steps per step, 10
for the first 10 steps (the code's Gaussian mixture: ``lr = 0.1``, 20 for the first 10 and
every tenth step: ``first_grad_steps=20, every_tenth_grad_steps=20``), 300 steps.
Departures: the toolkit's continuous time (the code's midpoint ``floor(alpha t')`` on the
0..999 DDPM scale is ``alpha t'`` here), any likelihood the problem defines (the code: the
Gaussian one), the code's warm-start branch for images (a second fit over ``x_1`` above
``t = 0.7``) left out (the mixture setting disables it too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..schedules import Schedule
from .base import Context, Move, Requirements, Sampler, check_positive_int
from .kernels import ddim_coefficients

__all__ = ["MGPS", "forward_bridge"]


def forward_bridge(
    schedule: Schedule, m: Tensor, s: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(c_m, c_t, var)`` of the forward process's bridge ``q(x_s | x_m, x_t) = N(c_m x_m +
    c_t x_t, var I)`` for ``m < s < t``: the normalised ``q(x_s | x_m) q(x_t | x_s)``."""
    a_m, s_m = schedule.alpha(m), schedule.sigma(m)
    a_s, s_s = schedule.alpha(s), schedule.sigma(s)
    a_t, s_t = schedule.alpha(t), schedule.sigma(t)
    k1 = a_s / a_m
    v1 = (s_s**2 - k1**2 * s_m**2).clamp_min(0)  # x_s | x_m
    k2 = a_t / a_s
    v2 = (s_t**2 - k2**2 * s_s**2).clamp_min(0)  # x_t | x_s
    den = v2 + k2**2 * v1
    return k1 * v2 / den, k2 * v1 / den, v1 * v2 / den


@dataclass(frozen=True)
class MGPSState:
    """Particles ``x_t`` and the last midpoint's ``x0_hat`` (the next fit's initialisation)."""

    x: Tensor
    x0_prev: Tensor


@dataclass(frozen=True)
class MGPS(Sampler):
    """Midpoint guidance posterior sampling (Moufad et al., ICLR 2025).

    Parameters
    ----------
    num_steps, grid
        The time grid (default 300 uniform steps, the code's).
    alpha
        The midpoint ``m = alpha t'`` of each step to ``t'`` (default 0.5).
    lr
        Adam's learning rate on the variational mean and log-std (default 3e-2).
    grad_steps
        Gradient steps per step (default 2).
    first_grad_steps
        Gradient steps in the first 10 steps (default 10).
    every_tenth_grad_steps
        Gradient steps in every tenth step after those (default 2; the code's mixture
        setting: 20).
    """

    requires = Requirements(
        likelihoods=frozenset({"gaussian", "poisson", "custom"}),
        noise_positive=True,
        differentiates=True,
    )
    exact_start = True
    on_path = True

    num_steps: int = 300
    alpha: float = 0.5
    lr: float = 3e-2
    grad_steps: int = 2
    first_grad_steps: int = 10
    every_tenth_grad_steps: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("grad_steps", "first_grad_steps", "every_tenth_grad_steps"):
            check_positive_int(name, getattr(self, name))

    def _steps(self, k: int) -> int:
        if k < 10:
            return self.first_grad_steps
        if k % 10 == 0:
            return self.every_tenth_grad_steps
        return self.grad_steps

    def init(self, ctx: Context, setup: None) -> tuple[MGPSState, None]:
        t0 = ctx.times[0]
        x = ctx.start()
        return MGPSState(x, ctx.denoise(x, t0)), None

    def fit(
        self, ctx: Context, m: Tensor, mu_p: Tensor, s_p: Tensor, mu0: Tensor, steps: int
    ) -> tuple[Tensor, Tensor]:
        """Fit ``N(mu, diag(exp(2 v)))`` to ``p(y | x0_hat(x_m, m)) N(x_m; mu_p, s_p^2 I)`` by
        ``steps`` Adam steps from ``mu = mu0``, ``v = log s_p``; returns ``(mu, v)``."""
        mu = mu0.detach().clone().requires_grad_(True)
        v = torch.full_like(mu0, float(torch.log(s_p))).requires_grad_(True)
        opt = torch.optim.Adam([mu, v], lr=self.lr)
        red = tuple(range(2, mu.dim()))
        s2 = s_p**2
        for _ in range(steps):
            with torch.enable_grad():
                xm = mu + torch.exp(v) * ctx.randn()
                ctx.nfe += 1
                ctx.backprop = True
                x0 = ctx.prior.denoise(xm, m)
                data = -ctx.problem.log_likelihood(x0)  # (B, N)
                # KL(q || N(mu_p, s2 I)) up to constants
                kl = 0.5 * ((-2 * v + ((mu - mu_p) ** 2 + torch.exp(2 * v)) / s2).sum(red))
                loss = (data + kl).sum()
                # gradients of the variational parameters only (not the network's)
                mu.grad, v.grad = torch.autograd.grad(loss, [mu, v])
            opt.step()
        return mu.detach(), v.detach()

    def move(self, ctx: Context, setup: None, state: MGPSState, k: int, t, t_next) -> Move:
        sch = ctx.prior.schedule
        x = state.x
        if k == ctx.times.numel() - 2:
            return Move(MGPSState(ctx.denoise(x, t), state.x0_prev))  # x0_hat at the last time
        m = self.alpha * t_next
        # 1. p^(x_m | x_t): the DDPM posterior at x0_hat(x_t)
        coef = ddim_coefficients(sch, t, m, 1.0)
        c_x = coef.c_eps / sch.sigma(t)
        c_0 = coef.alpha_s - c_x * coef.alpha_t
        mu_p = c_x * x + c_0 * ctx.denoise(x, t)
        # 2. the variational fit, its mean started at the previous midpoint's x0_hat
        mu0 = c_x * x + c_0 * state.x0_prev
        mu, v = self.fit(ctx, m, mu_p, coef.std, mu0, self._steps(k))
        # 3. x_m ~ q, x_t' from the forward bridge
        xm = mu + torch.exp(v) * ctx.randn()
        c_m, c_t, var = forward_bridge(sch, m, t_next, t)
        x_new = c_m * xm + c_t * x + var.sqrt() * ctx.randn()
        return Move(MGPSState(x_new, ctx.denoise(xm, m)))

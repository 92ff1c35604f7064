"""PnP-DM: split Gibbs sampling with a diffusion prior (Wu, Sun, Chen, Zhang, Yue & Bouman,
"Principled Probabilistic Imaging using Diffusion Models as Plug-and-Play Priors", NeurIPS
2024, arXiv 2405.18782).

Reference code: ``zihuiwu/PnP-DM-public`` (``pnpdm/samplers/pnp_edm/pnp_edm.py``,
``denoiser_edm.py``, ``tasks/__init__.py``); InverseBench ``devzhk/InverseBench``
(``algo/pnpdm.py``). See ``docs/methods/pnpdm.md``.

Update
------
Split Gibbs on ``pi(x, z) ∝ p(x) N(z; x, rho^2 I) p(y | z)`` with the coupling ``rho``
annealed, ``rho_k = max(rho_0 decay^k, rho_min)``, ``k = 0 .. K - 1``:

1. likelihood step: ``z ~ pi(z | x, y) ∝ N(y; A z, sigma_y^2 I) N(z; x, rho_k^2 I)``, exact
   for a linear operator with an SVD (a Gaussian product per spectral coordinate,
   :func:`.spectral.condition`; the code's SVD / FFT draw);
2. prior step: ``x ~ pi(x | z) ∝ p(x) N(z; x, rho_k^2 I)``, the posterior of a denoising
   problem at VE noise level ``rho_k``: the diffusion's reverse process started at the time
   ``t*`` with ``sigma_t* / alpha_t* = rho_k`` from ``x_t* = alpha_t* z`` (the code's VP
   scaling), by ``prior_steps`` ancestral (DDPM) steps uniform in time from ``t*`` to 0, the
   last step returning ``x0_hat``.

Each of the ``N`` samples is an independent chain; the sample is the last ``x``. For a fixed
``rho`` the chain's stationary law has the ``x``-marginal ``p(x) N(y; A x, sigma_y^2 I +
rho^2 A A^T)``: the likelihood widened by ``rho^2 A A^T`` (exact only as ``rho -> 0``, where
the Gibbs sampler mixes ever more slowly).

Defaults (the code's FFHQ linear tasks): ``num_steps = K = 100``, ``rho_0 = 10``,
``decay = 0.9``, ``rho_min = 0.3`` (reached at ``k = 34``). Departures: ancestral DDPM steps
on the diffusion's own path, ``prior_steps`` of them from every ``rho_k`` (the code:
Euler-Maruyama on the part of a fixed 100-level EDM / VP grid below ``rho_k``: 9 to 67 steps
on the VP grid), started exactly at ``rho_k`` (the code: at the first grid level below it), ``x^0 = 0``, the last ``x`` only
(the code also averages 20 saved iterates for its posterior mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ..operators.base import LinearOperator
from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from .base import Context, Move, Requirements, Sampler, check_positive_int
from .daps import time_of_ve_sigma
from .kernels import ddim_coefficients
from .spectral import condition, spectral_observation

__all__ = ["PnPDM"]


@dataclass(frozen=True)
class PnPDMSetup:
    """Singular values ``(r,)``, ``U^T y`` ``(B, 1, m)``, the coupling of every iteration
    ``(K,)`` and the prior step's grid as fractions of ``t*``, ``(prior_steps + 1,)`` from 1
    to 0."""

    s: Tensor
    y_tilde: Tensor
    rho: Tensor
    grid: Tensor


@dataclass(frozen=True)
class PnPDMState:
    x: Tensor


@dataclass(frozen=True)
class PnPDM(Sampler):
    """Split Gibbs sampling with a diffusion prior (Wu et al., NeurIPS 2024).

    Parameters
    ----------
    num_steps
        Gibbs iterations ``K`` (default 100).
    rho_0, decay, rho_min
        The coupling's annealing ``rho_k = max(rho_0 decay^k, rho_min)`` (default 10, 0.9,
        0.3: the code's linear tasks).
    prior_steps
        Ancestral steps of each prior step, uniform in time from ``t*`` to 0 (default 20:
        one network call each, 2000 per sample with ``K = 100``; the code: 9 to 67).
    """

    requires = Requirements(svd=True, noise_positive=True)

    num_steps: int = 100
    rho_0: float = 10.0
    decay: float = 0.9
    rho_min: float = 0.3
    prior_steps: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("prior_steps", self.prior_steps)
        if not 0 < self.rho_min <= self.rho_0 < float("inf"):
            raise ValueError(
                f"need 0 < rho_min <= rho_0 < inf, got rho_min={self.rho_min!r}, "
                f"rho_0={self.rho_0!r}"
            )
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay!r}")

    def _rho(self) -> Tensor:
        """The coupling of every iteration, ``max(rho_0 decay^k, rho_min)``, ``(K,)`` float64."""
        k = torch.arange(self.num_steps, dtype=torch.float64)
        return (self.rho_0 * self.decay**k).clamp_min(self.rho_min)

    def time_grid(self, prior: DiffusionModel, problem: InverseProblem) -> Tensor:
        """The start time ``t*`` of every iteration's prior step (``sigma / alpha = rho_k``),
        then 0: ``K + 1`` times, non-increasing (constant once ``rho_min`` is reached)."""
        t = time_of_ve_sigma(prior.schedule, self._rho())
        t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
        return t.to(dtype=problem.y.dtype, device=problem.y.device)

    def setup(self, ctx: Context) -> PnPDMSetup:
        op = cast(LinearOperator, ctx.problem.operator)
        obs = spectral_observation(op, ctx.y, dtype=ctx.dtype)
        rho = self._rho()
        grid = torch.linspace(1.0, 0.0, self.prior_steps + 1, dtype=torch.float64)
        return PnPDMSetup(
            obs.s,
            obs.y_tilde[:, None, :],
            rho.to(dtype=ctx.dtype, device=ctx.device),
            grid.to(dtype=ctx.dtype, device=ctx.device),
        )

    def init(self, ctx: Context, setup: PnPDMSetup) -> tuple[PnPDMState, None]:
        return PnPDMState(torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)), None

    def move(
        self, ctx: Context, setup: PnPDMSetup, state: PnPDMState, k: int, t: Tensor, t_next
    ) -> Move:
        op = cast(LinearOperator, ctx.problem.operator)
        sch = ctx.prior.schedule
        rho = setup.rho[k]
        # 1. likelihood step: z ~ N(y; A z, sigma_y^2) N(z; x, rho^2), exactly
        noise_var = ctx.problem.noise_std**2
        z_std = ctx.randn((ctx.B, ctx.N, op.in_dim))
        z, _ = condition(op, setup.s, op.Vt(state.x), rho**2, noise_var, setup.y_tilde, z_std)
        # 2. prior step: the reverse process from t* (sigma / alpha = rho) at alpha z
        times = t * setup.grid
        x = sch.alpha(t) * z
        for j in range(times.numel() - 1):
            u, v = times[j], times[j + 1]
            coef = ddim_coefficients(sch, u, v, 1.0)
            x0 = ctx.denoise(x, u)
            if j == times.numel() - 2:
                x = x0  # the last step (to t = 0): x0_hat
                break
            c_x = coef.c_eps / sch.sigma(u)
            x = c_x * x + (coef.alpha_s - c_x * coef.alpha_t) * x0 + coef.std * ctx.randn()
        return Move(PnPDMState(x))

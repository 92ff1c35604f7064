"""RED-diff: variational (regularisation-by-denoising) inverse problems with a diffusion prior.

Mardani, Song, Kautz & Vahdat, "A Variational Perspective on Solving Inverse Problems with
Diffusion Models", ICLR 2024. Reference code: NVlabs/RED-diff ``algos/reddiff.py``,
``_configs/algo/reddiff.yaml``, ``_configs/exp/default.yaml``. See ``docs/methods/reddiff.md``.

This is optimisation, not sampling: every sample is one independent optimisation of a
signal ``mu`` (shape ``(B, N, *event)``; the ``N`` samples differ only through the noise
drawn along the way). Paper (Eq. 10 and Alg. 1), one Adam step per grid time ``t`` from
``T`` down::

    loss = ||y - A mu||^2 / (2 sigma_v^2) + lambda w_t sg(eps_hat(x_t, t) - eps)^T mu

1. ``x0_pred = mu + sigma_x0 n0``; ``x_t = alpha_t x0_pred + sigma_t eps``, ``eps ~ N(0, I)``;
2. ``eps_hat(x_t, t)`` from the denoiser (``sg``: stop-gradient, no network gradients);
3. ``g = lambda w_t (eps_hat - eps) / c_reg + obs_weight * A^T (A mu - y) / c_obs``, the
   gradient of the loss in closed form per sample (autograd for nonlinear operators);
4. ``mu <- Adam(mu, g)``, done by hand elementwise (``torch.optim.Adam``, bias-corrected,
   ``weight_decay = 0``), so the ``N`` optimisations are exactly independent.

Scaling (``loss_scaling``): ``"code"`` (default), the official code's means,
``c_reg = d`` (entries of ``x``) and ``c_obs = m`` (entries of ``y``) per sample, with which
``lambda = 0.25`` was tuned (``sigma_y`` does not enter); ``"paper"``, ``c_reg = 1`` and
``c_obs = sigma_y^2`` (needs ``noise_std > 0``).

Weightings ``w_t`` (``weighting``, from the code): with ``snr_inv = sigma_t / alpha_t``,
``"linear"`` ``snr_inv``, ``"sqrt"`` ``sqrt(snr_inv)``, ``"square"`` ``snr_inv^2``,
``"log"`` ``log(1 + snr_inv)``, ``"trunc_linear"`` ``min(snr_inv, 1)``,
``"power2over3"`` ``snr_inv^(2/3)``, ``"const"`` ``1``.

Defaults (``_configs/algo/reddiff.yaml``, ``_configs/exp/default.yaml``): ``lam = 0.25``,
``weighting = "linear"``, ``obs_weight = 1``, ``lr = 0.1``, ``betas = (0.9, 0.99)``,
``sigma_x0 = 0``, ``num_steps = 50`` on the ``"ddpm"`` grid (the code's discrete steps
980, ..., 0: one step per ``t = times[k]``, ``k < num_steps``; the last grid point is not
visited). ``mu_init = "pinv"``: the code's ``A^+ y`` for operators with an SVD, damped to
``A^T (A A^T + sigma_y^2 I)^-1 y`` when ``sigma_y > 0``; the adjoint ``A^T y`` for linear
operators without one; zeros for nonlinear operators (``"adjoint"``, ``"zeros"`` on request).

Departures from the code (details in the notes): per-sample ``d`` and ``m`` in the means (the
code's also cover the batch); the damped pseudo-inverse start; ``mu`` returned after the last
Adam step (the code returns ``x0_pred`` from before it); no autograd graph for the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ..operators.base import LinearOperator
from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from .base import Context, Move, Requirements, Sampler
from .kernels import x0_to_eps

__all__ = ["REDDiff"]

_WEIGHTINGS = ("linear", "sqrt", "square", "log", "trunc_linear", "power2over3", "const")


def _weight(snr_inv: Tensor, kind: str) -> Tensor:
    if kind == "linear":
        return snr_inv
    if kind == "sqrt":
        return snr_inv.sqrt()
    if kind == "square":
        return snr_inv**2
    if kind == "log":
        return torch.log1p(snr_inv)
    if kind == "trunc_linear":
        return snr_inv.clamp_max(1.0)
    if kind == "power2over3":
        return snr_inv ** (2.0 / 3.0)
    return torch.ones_like(snr_inv)


@dataclass(frozen=True)
class REDDiffSetup:
    """The divisors of the two loss terms: ``c_reg`` (regulariser) and ``c_obs`` (data)."""

    c_reg: float
    c_obs: float


@dataclass(frozen=True)
class REDDiffState:
    """The optimised signal ``mu`` (``x``) and Adam's first and second moments."""

    x: Tensor
    m: Tensor
    v: Tensor


@dataclass(frozen=True)
class REDDiff(Sampler):
    """RED-diff: per-sample Adam on ``mu`` with the denoising-score regulariser.

    Parameters
    ----------
    num_steps
        Number of Adam steps (one per grid time; default 50).
    grid
        Time grid (default ``"ddpm"``, the code's discrete steps ``980, ..., 0``).
    lam
        Regularisation weight ``lambda`` (code: ``grad_term_weight``, default 0.25).
    weighting
        ``w_t`` as a function of ``sigma_t / alpha_t`` (default ``"linear"``).
    obs_weight
        Weight of the data term (code: ``obs_weight``, default 1).
    lr
        Adam learning rate (default 0.1).
    betas
        Adam ``(beta1, beta2)`` (default ``(0.9, 0.99)``).
    adam_eps
        Adam's ``eps`` (torch's default ``1e-8``).
    loss_scaling
        ``"code"`` (means over entries, default) or ``"paper"`` (``1 / sigma_y^2``).
    mu_init
        ``"pinv"`` (default), ``"adjoint"`` or ``"zeros"``.
    sigma_x0
        Noise added to ``mu`` before noising, ``x0_pred = mu + sigma_x0 n0`` (default 0).
    """

    requires = Requirements(likelihoods=frozenset({"gaussian"}))

    num_steps: int = 50
    grid: str = "ddpm"
    lam: float = 0.25
    weighting: str = "linear"
    obs_weight: float = 1.0
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    loss_scaling: str = "code"
    mu_init: str = "pinv"
    sigma_x0: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.lam < math.inf:
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if self.weighting not in _WEIGHTINGS:
            raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {self.weighting!r}")
        if not 0 <= self.obs_weight < math.inf:
            raise ValueError(f"obs_weight must be a finite number >= 0, got {self.obs_weight!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if len(tuple(self.betas)) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps!r}")
        if self.loss_scaling not in ("code", "paper"):
            raise ValueError(f"loss_scaling must be 'code' or 'paper', got {self.loss_scaling!r}")
        if self.mu_init not in ("pinv", "adjoint", "zeros"):
            raise ValueError(f"mu_init must be 'pinv', 'adjoint' or 'zeros', got {self.mu_init!r}")
        if not 0 <= self.sigma_x0 < math.inf:
            raise ValueError(f"sigma_x0 must be a finite number >= 0, got {self.sigma_x0!r}")

    def check(self, prior: DiffusionModel, problem: InverseProblem) -> None:
        """Gaussian noise (:attr:`requires`); ``loss_scaling='paper'`` needs ``noise_std > 0``."""
        super().check(prior, problem)
        if self.loss_scaling == "paper" and problem.noise_std <= 0:
            raise ValueError("REDDiff with loss_scaling='paper' needs noise_std > 0")

    # ------------------------------------------------------------------ the sampler
    def setup(self, ctx: Context) -> REDDiffSetup:
        op = ctx.problem.operator
        if self.loss_scaling == "code":
            return REDDiffSetup(float(op.in_dim), float(op.out_dim))
        return REDDiffSetup(1.0, ctx.problem.noise_std**2)

    def init(self, ctx: Context, setup: REDDiffSetup) -> tuple[REDDiffState, None]:
        op = ctx.problem.operator
        y = ctx.y
        if not op.is_linear or self.mu_init == "zeros":
            mu0 = torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)
        else:
            lin = cast(LinearOperator, op)
            if self.mu_init == "pinv" and lin.has_svd and ctx.problem.noise_std > 0:
                # damped: A^T (A A^T + sigma_y^2 I)^-1 y (module docstring)
                m = lin.adjoint(lin.gram_solve(y, 1.0, ctx.problem.noise_std**2))
            elif self.mu_init == "pinv" and lin.has_svd:
                m = lin.pinv(y)
            else:
                m = lin.adjoint(y)
            mu0 = m.unsqueeze(1).expand(ctx.shape).clone()
        zeros = torch.zeros_like(mu0)
        return REDDiffState(mu0, zeros, zeros.clone()), None

    def move(
        self, ctx: Context, setup: REDDiffSetup, state: REDDiffState, k: int, t, t_next
    ) -> Move:
        sch = ctx.prior.schedule
        mu, m, v = state.x, state.m, state.v
        # 1. x0_pred = mu + sigma_x0 n0; x_t = alpha_t x0_pred + sigma_t eps (fresh eps).
        x0p = mu + self.sigma_x0 * ctx.randn() if self.sigma_x0 > 0 else mu
        a_t, s_t = sch.alpha(t), sch.sigma(t)
        eps = ctx.randn()
        x_t = a_t * x0p + s_t * eps
        # 2. eps_hat(x_t, t) from the denoiser (no gradient through the network).
        eps_hat = x0_to_eps(x_t, ctx.denoise(x_t, t), a_t, s_t)
        # 3. Gradient of lambda w_t sg(eps_hat - eps)^T x0_pred / c_reg
        #    + obs_weight ||y - A x0_pred||^2 / (2 c_obs) with respect to mu.
        #    (alpha_t = 0, a flow at t = 1: x_t = eps and eps_hat = eps, so the term is 0.)
        snr_inv = s_t / a_t.clamp_min(torch.finfo(mu.dtype).tiny)
        w_t = torch.where(a_t > 0, self.lam * _weight(snr_inv, self.weighting), 0.0)
        g = (w_t / setup.c_reg) * (eps_hat - eps)
        if self.obs_weight > 0:
            g = g + (self.obs_weight / setup.c_obs) * ctx.problem.residual_gradient(x0p)
        # 4. Adam (elementwise, bias-corrected; step count n = k + 1).
        b1, b2 = self.betas
        n = k + 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**n)
        v_hat = v / (1 - b2**n)
        mu = mu - self.lr * m_hat / (v_hat.sqrt() + self.adam_eps)
        return Move(REDDiffState(mu, m, v))

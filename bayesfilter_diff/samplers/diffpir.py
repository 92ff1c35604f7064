"""DiffPIR: denoising diffusion models for plug-and-play image restoration.

Zhu, Zhang, Liang, Cao, Wen, Timofte & Van Gool, CVPR Workshops 2023. Reference code:
yuanzhi-zhu/DiffPIR ``main_ddpir_{deblur,sisr,inpainting}.py``, ``utils/utils_model.py``.
See ``docs/methods/diffpir.md``.

Update (paper, Alg. 1; ``sb_t = sqrt(1 - abar_t) / sqrt(abar_t)``), for ``t -> t'``::

    1. x0^(t)  = x0_hat(x_t, t)                                               (denoiser)
    2. x0_hat  = argmin_x ||y - A x||^2 + rho_t ||x - x0^(t)||^2,  rho_t = lambda sigma_n^2 / sb_t^2
    3. eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)
       x_t'    = sqrt(abar_t') x0_hat + sqrt(1 - abar_t') (sqrt(1 - zeta) eps_hat + sqrt(zeta) z)

In our notation ``sb_t = sigma_t / alpha_t``, so ``rho_t = lambda sigma_y^2 alpha_t^2 /
sigma_t^2`` (``alpha_t = 0`` allowed), and step 2 is the operator's proximal map
(:meth:`~bayesfilter_diff.operators.LinearOperator.prox_l2`): closed form in the SVD,
otherwise conjugate gradients started at ``x0^(t)`` (``cg_iters``, ``cg_tol``, per sample).
``sigma_y = 0`` gives ``rho_t = 0``: the exact projection onto ``{A x = y}``.

Defaults and departures:

- ``num_steps = 100``, ``lam = 7``, ``zeta = 0.3`` (what the deblurring script runs), on the
  code's ``"quad"`` grid ``t_i = t_max (1 - sqrt(i / n))`` (``spacing="grid"``: the
  ``grid`` field).
- ``rho_t`` in the prior's units: the code's effective weight on ``[-1, 1]`` images is
  ``lam = 7 / 4``.
- ``sigma_y = 0`` is the exact projection (the code floors ``sigma_n`` at 0.001).
- The last step goes to ``t = 0`` and returns the proximal ``x0_hat``; no clipping;
  ``eta = 0`` only; ``x_T = sigma_T z``; the operator's exact proximal map instead of the
  code's FFT solutions.
- Needs a linear operator and Gaussian noise.
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
from .base import Context, Move, Requirements, Sampler, check_positive_int
from .kernels import x0_to_eps

__all__ = ["DiffPIR", "quad_time_grid"]


def quad_time_grid(num_steps: int, t_max: float = 1.0, dtype=None, device=None) -> Tensor:
    """DiffPIR's ``'quad'`` skip schedule in continuous time: ``t_i = t_max (1 - sqrt(i/n))``."""
    u = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    return (t_max * (1.0 - u.sqrt())).to(dtype=dtype or torch.get_default_dtype(), device=device)


@dataclass(frozen=True)
class DiffPIRSetup:
    """Per-run constants: observations ``(B, 1, *out)``."""

    y: Tensor


@dataclass(frozen=True)
class DiffPIRState:
    x: Tensor


@dataclass(frozen=True)
class DiffPIR(Sampler):
    """DiffPIR: half-quadratic splitting with a proximal data step and DDIM re-noising.

    Parameters
    ----------
    num_steps
        Number of steps (NFEs; default 100).
    lam
        ``lambda`` in ``rho_t = lambda sigma_y^2 alpha_t^2 / sigma_t^2`` (default 7).
    zeta
        Fraction of fresh noise in the re-noising step (default 0.3).
    spacing
        ``"quad"`` (default) or ``"grid"`` (use the ``grid`` field).
    cg_iters
        Conjugate-gradient iterations for operators without an SVD (default 50).
    cg_tol
        Relative residual at which CG stops updating a sample (default 1e-10).
    """

    requires = Requirements(linear=True)
    exact_start = True
    on_path = True

    num_steps: int = 100
    lam: float = 7.0
    zeta: float = 0.3
    spacing: str = "quad"
    cg_iters: int = 50
    cg_tol: float = 1e-10

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if not 0.0 <= self.zeta <= 1.0:
            raise ValueError(f"zeta must be in [0, 1], got {self.zeta!r}")
        if self.spacing not in ("quad", "grid"):
            raise ValueError(f"spacing must be 'quad' or 'grid', got {self.spacing!r}")
        check_positive_int("cg_iters", self.cg_iters)
        if not self.cg_tol >= 0:
            raise ValueError(f"cg_tol must be >= 0, got {self.cg_tol!r}")

    def time_grid(self, prior: DiffusionModel, problem: InverseProblem) -> Tensor:
        if self.spacing == "grid":
            return super().time_grid(prior, problem)
        y = problem.y
        return quad_time_grid(self.num_steps, dtype=y.dtype, device=y.device)

    # ------------------------------------------------------------------ sampler
    def setup(self, ctx: Context) -> DiffPIRSetup:
        return DiffPIRSetup(ctx.y.unsqueeze(1))

    def init(self, ctx: Context, setup: DiffPIRSetup) -> tuple[DiffPIRState, None]:
        return DiffPIRState(ctx.start()), None

    def prox(self, ctx: Context, setup: DiffPIRSetup, x0: Tensor, rho: Tensor) -> Tensor:
        """Step 2: ``(A^T A + rho I)^-1 (A^T y + rho x0)`` (SVD, or CG from ``x0``)."""
        return cast(LinearOperator, ctx.problem.operator).prox_l2(
            x0, setup.y, rho, cg_iters=self.cg_iters, cg_tol=self.cg_tol
        )

    def move(
        self,
        ctx: Context,
        setup: DiffPIRSetup,
        state: DiffPIRState,
        k: int,
        t: Tensor,
        t_next: Tensor,
    ) -> Move:
        sch = ctx.prior.schedule
        x = state.x
        a_t, s_t = sch.alpha(t), sch.sigma(t)
        # 1. x0^(t) = E[x0 | x_t].
        x0 = ctx.denoise(x, t)
        # 2. Proximal data step with rho_t = lam sigma_y^2 alpha_t^2 / sigma_t^2 (Eq. 13).
        rho = self.lam * ctx.problem.noise_std**2 * a_t**2 / s_t**2
        x0 = self.prox(ctx, setup, x0, rho)
        # 3. eps_hat from the corrected x0, then DDIM re-noising with zeta (Eq. 15).
        eps = x0_to_eps(x, x0, a_t, s_t)
        a_s, s_s = sch.alpha(t_next), sch.sigma(t_next)
        z = ctx.randn()
        x_next = a_s * x0 + s_s * (math.sqrt(1 - self.zeta) * eps + math.sqrt(self.zeta) * z)
        return Move(DiffPIRState(x_next))

"""DiffPIR: denoising diffusion models for plug-and-play image restoration.

Zhu, Zhang, Liang, Cao, Wen, Timofte & Van Gool, CVPR Workshops 2023. Reference code:
yuanzhi-zhu/DiffPIR ``main_ddpir_{deblur,sisr,inpainting}.py``, ``utils/utils_model.py``.

Update (paper, Alg. 1; ``sb_t = sqrt(1 - abar_t) / sqrt(abar_t)``), for ``t -> t'``::

    x0^(t)  = x0_hat(x_t, t)                                               (denoiser)
    x0_hat  = argmin_x ||y - A x||^2 + rho_t ||x - x0^(t)||^2,  rho_t = lambda sigma_n^2 / sb_t^2
    eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)
    x_t'    = sqrt(abar_t') x0_hat + sqrt(1 - abar_t') (sqrt(1 - zeta) eps_hat + sqrt(zeta) z)

In our notation ``sb_t = sigma_t / alpha_t``, so ``rho_t = lambda sigma_y^2 alpha_t^2 /
sigma_t^2`` (written without dividing by ``alpha``, so ``alpha_t = 0`` is allowed) and the
proximal step is ``x0_hat = (A^T A + rho_t I)^-1 (A^T y + rho_t x0^(t))``. For operators
with an SVD it is closed form in spectral coordinates,
``xbar_i = (s_i (U^T y)_i + rho xbar0_i) / (s_i^2 + rho)`` for ``i < r`` and ``xbar0_i``
otherwise; for other linear operators it is solved by conjugate gradients started at
``x0^(t)`` (``cg_iters`` iterations, per sample). ``sigma_y = 0`` gives ``rho_t = 0``: the
exact projection ``x0^(t) - A^+ (A x0^(t) - y)`` onto ``{A x = y}``.

Units of ``rho_t``. The official code takes ``sigma_n`` on the ``[0, 1]`` image scale while
``sb_t`` lives on the model's ``[-1, 1]`` scale, so in consistent units its ``rho`` is
``(lambda / 4) sigma_y^2 / sb_t^2`` with ``sigma_y`` on the model scale. Here every quantity
is in the prior's units and ``rho_t = lam sigma_y^2 alpha_t^2 / sigma_t^2``: the default
``lam = 7`` is the paper's / deblurring script's value *as a number*; to reproduce the
official code's effective weight on ``[-1, 1]`` images use ``lam = 7 / 4``.

Time grid (``spacing``): ``"quad"`` (default, the code's ``skip_type='quad'``):
``t_i = t_max (1 - sqrt(i / n))``, a big first jump and dense steps near 0; ``"grid"``:
the inherited ``grid`` field (``"uniform"`` / ``"ddpm"``).

Defaults: ``num_steps = 100`` (deblurring NFE), ``lam = 7``, ``zeta = 0.3`` (the values the
deblurring script actually runs: ``lambdas = [lambda_ * i for i in range(7, 8)]``, zeta
``0.1 * 3``). The yaml configs list ``lambda = 1``, ``zeta = 0.1`` (SR, deblur) or 1.0
(inpainting); the inpainting script runs NFE 20, ``lambda = 1``, ``zeta = 1``.

Where the official code departs from the paper, and what is done here:

- Units of ``rho`` (above).
- Noise-free runs use ``sigma_n = max(0.001, sigma_n)``; here ``sigma_y = 0`` means the exact
  projection.
- In the last iteration the code calls the model but discards ``x0`` and skips the data
  step; the output is ``x`` at the smallest index (residual noise ``sqrt(1 - abar_0)``).
  Here the last step goes to ``t = 0`` like every other step: the output is the proximal
  ``x0_hat`` of the last step (for ``sigma_y = 0``, ``A x = y`` exactly).
- ``x0`` is clipped to ``[-1, 1]`` in the code; not here.
- The code has a DDPM-style ``eta`` (default 0, using a one-step ``beta_t`` even when steps
  are skipped); only ``eta = 0`` (the paper) is implemented.
- The deblurring / SR data steps use FFT solutions with circular boundaries and a
  specific decimation; here the operator's own SVD (or CG) gives the exact proximal map.
- The code initialises ``x_T`` from ``y``; with ``abar_999 = 4e-5`` that is pure noise, so
  here ``x_T = sigma_T z``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from .base import Context, Sampler

__all__ = ["DiffPIR", "quad_time_grid"]


def quad_time_grid(num_steps: int, t_max: float = 1.0, dtype=None, device=None) -> Tensor:
    """DiffPIR's ``'quad'`` skip schedule in continuous time: ``t_i = t_max (1 - sqrt(i/n))``."""
    u = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    return (t_max * (1.0 - u.sqrt())).to(dtype=dtype or torch.get_default_dtype(), device=device)


def _event_dot(a: Tensor, b: Tensor, event_dim: int) -> Tensor:
    return (a * b).sum(tuple(range(a.dim() - event_dim, a.dim())), keepdim=True)


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
        if (
            isinstance(self.cg_iters, bool)
            or not isinstance(self.cg_iters, int)
            or self.cg_iters < 1
        ):
            raise ValueError(f"cg_iters must be a positive int, got {self.cg_iters!r}")
        if not self.cg_tol >= 0:
            raise ValueError(f"cg_tol must be >= 0, got {self.cg_tol!r}")

    def check(self, prior: DiffusionModel, problem: InverseProblem) -> None:
        self._require_gaussian(problem)

    def time_grid(self, prior: DiffusionModel, problem: InverseProblem) -> Tensor:
        if self.spacing == "grid":
            return super().time_grid(prior, problem)
        y = problem.y
        return quad_time_grid(self.num_steps, dtype=y.dtype, device=y.device)

    # ------------------------------------------------------------------ proximal map
    def _prox_svd(self, ctx: Context, x0: Tensor, rho: Tensor) -> Tensor:
        op = ctx.problem.operator
        s, uty = ctx.cache["s"], ctx.cache["uty"]
        r = s.numel()
        xb = op.Vt(x0)
        head = (s * uty + rho * xb[..., :r]) / (s**2 + rho)
        return op.V(torch.cat([head, xb[..., r:]], dim=-1))

    def _prox_cg(self, ctx: Context, x0: Tensor, rho: Tensor) -> Tensor:
        """Solve ``(A^T A + rho I) x = A^T y + rho x0`` by CG from ``x0``, per sample."""
        op = ctx.problem.operator
        k = ctx.prior.event_dim

        def M(v: Tensor) -> Tensor:
            return op.adjoint(op(v)) + rho * v

        x = x0
        r = ctx.cache["aty"] + rho * x0 - M(x)
        p = r
        rr = _event_dot(r, r, k)
        stop = (ctx.cache["aty_norm2"] + rho**2 * _event_dot(x0, x0, k)) * self.cg_tol**2
        tiny = torch.finfo(x0.dtype).tiny
        for _ in range(self.cg_iters):
            active = rr > stop
            if not bool(active.any()):
                break
            Mp = M(p)
            pMp = _event_dot(p, Mp, k)
            a = torch.where(active, rr / pMp.clamp_min(tiny), 0.0)
            x = x + a * p
            r = r - a * Mp
            rr_new = _event_dot(r, r, k)
            beta = torch.where(active, rr_new / rr.clamp_min(tiny), 0.0)
            p = torch.where(active, r + beta * p, p)
            rr = torch.where(active, rr_new, rr)
        return x

    # ------------------------------------------------------------------ sampler
    def init(self, ctx: Context):
        op = ctx.problem.operator
        y = ctx.y
        if op.has_svd:
            s = op.singular_values()
            ctx.cache["s"] = s
            ctx.cache["uty"] = op.Ut(y)[..., : s.numel()].unsqueeze(1)  # (B, 1, r)
        else:
            aty = op.adjoint(y).unsqueeze(1)  # (B, 1, *event)
            ctx.cache["aty"] = aty
            ctx.cache["aty_norm2"] = _event_dot(aty, aty, ctx.prior.event_dim)
        return {"x": ctx.prior.schedule.sigma(ctx.times[0]) * ctx.randn()}, None

    def step(self, ctx: Context, state, i, t, t_next):
        sch = ctx.prior.schedule
        x = state["x"]
        a_t, s_t = sch.alpha(t), sch.sigma(t)
        # 1. x0^(t) = E[x0 | x_t].
        x0 = ctx.denoise(x, t)
        # 2. Proximal data step with rho_t = lam sigma_y^2 alpha_t^2 / sigma_t^2 (Eq. 13).
        rho = self.lam * ctx.problem.noise_std**2 * a_t**2 / s_t**2
        if ctx.problem.operator.has_svd:
            x0 = self._prox_svd(ctx, x0, rho)
        else:
            x0 = self._prox_cg(ctx, x0, rho)
        # 3. eps_hat from the corrected x0, then DDIM re-noising with zeta (Eq. 15).
        eps = (x - a_t * x0) / s_t
        a_s, s_s = sch.alpha(t_next), sch.sigma(t_next)
        z = ctx.randn()
        x_next = a_s * x0 + s_s * (math.sqrt(1 - self.zeta) * eps + math.sqrt(self.zeta) * z)
        return {"x": x_next}, None

"""Diffusion Posterior Sampling (DPS): ancestral steps plus a measurement-gradient step.

Chung, Kim, Mccann, Klasky & Ye, "Diffusion Posterior Sampling for General Noisy Inverse
Problems", ICLR 2023 (Algorithms 1 and 2). Reference code: DPS2022/diffusion-posterior-sampling.
See ``docs/methods/dps.md``.

Update (paper notation ``i = N .. 1``; ours: a step from ``t`` to ``s < t``), per particle:

1. ``x0_hat = E[x0 | x_t]`` (one network call, differentiated), the data fit
   ``D = ||y - A(x0_hat)||^2`` and ``grad_{x_t} D``;
2. ancestral step ``x'_s = alpha_s x0_hat + c_eps eps_hat + std z`` (the DDIM kernel of
   :mod:`.kernels`; ``eta = 1`` is DDPM's ancestral step, the paper's choice);
3. ``x_s = x'_s - zeta_i grad_{x_t} D``, with ``zeta_i = scale / sqrt(D_i)``
   (``step_rule="paper"``: the paper's ``zeta' / ||y - A(x0_hat)||``) or half of it
   (``"code"``: the official code's ``scale * grad ||r||``);
4. a particle whose ``D`` or step is not finite skips step 3 (counted per step and
   problem in ``info["dps_nonfinite"]``, shape ``(num_steps, B)``).

Data fit ``D``: Gaussian noise ``||y - A(x0_hat)||^2`` (``sigma_y`` absorbed in ``zeta``, so
``noise_std = 0`` is allowed); Poisson noise ``||y - rate A(x0_hat)||^2_Lambda`` with
``Lambda_jj = 1 / (2 max(y_j, 1))`` (``poisson="weighted"``, the paper's Sec. 3.2) or half
the Poisson deviance (``"nll"``, the exact negative log-likelihood gradient).

Defaults and departures:

- ``scale = 1``, ``num_steps = 1000``, ``eta = 1``; the official configs use the code rule
  with scale 0.3 - 1.0 (``= 2 x`` the paper rule's scale).
- Step sizes are per particle; the official code normalises by the norm of the whole batch.
- ``clamp_x0 = None``; ``(-1, 1)`` reproduces the code's ``clip_denoised``.
- Unweighted samples, no evidence estimate (DPS is not exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ..operators.base import LinearOperator
from .base import Context, Move, Requirements, Sampler, check_clamp
from .kernels import ddim_coefficients, ddim_mean, rowsq
from .spectral import PixelGaussian

__all__ = ["DPS"]

_RULES = ("paper", "code")
_POISSON = ("weighted", "nll")


@dataclass(frozen=True)
class DPSSetup:
    """Per-run constants: observations ``(B, 1, *out)`` and, for Poisson
    ``"weighted"``, the weights ``Lambda_jj = 1 / (2 max(y_j, 1))`` (else ``None``)."""

    y: Tensor
    weight: Tensor | None = None
    #: masks / the identity under Gaussian noise: ``-0.5 ||U^T y - s x0||^2`` on the pixel
    #: grid, with its gradient in closed form
    pixel: PixelGaussian | None = None
    #: linear operators under Gaussian noise: ``x0 -> (-0.5 ||y - A x0||^2, its gradient)``
    #: in closed form (the pixel form for masks / the identity), else ``None``
    fit: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None


@dataclass(frozen=True)
class DPSState:
    x: Tensor


@dataclass(frozen=True)
class DPSStep:
    """Per step: particles of each problem ``(B,)`` that skipped a non-finite gradient step."""

    dps_nonfinite: Tensor


@dataclass(frozen=True)
class DPS(Sampler):
    """Diffusion Posterior Sampling (Chung et al., ICLR 2023) with per-particle step sizes.

    Parameters
    ----------
    num_steps
        Number of steps (default 1000, as in the official configs).
    grid
        ``"uniform"`` or ``"ddpm"`` (inherited).
    scale
        ``zeta'`` of the paper (``"paper"`` rule) or the code's ``scale`` (``"code"`` rule).
    step_rule
        ``"paper"``: ``x -= scale / ||r|| * grad ||r||^2``; ``"code"``:
        ``x -= scale * grad ||r||``; both per particle.
    poisson
        Data fit for Poisson noise: ``"weighted"`` (paper's weighted norm) or ``"nll"``
        (half the Poisson deviance).
    eta
        DDIM parameter of the transition (1: DDPM ancestral, the paper's sampler).
    clamp_x0
        ``(low, high)`` to clamp ``x0_hat`` before the step and ``A(x0_hat)``, or ``None``.
    """

    requires = Requirements(likelihoods=frozenset({"gaussian", "poisson"}), differentiates=True)
    exact_start = True
    on_path = True

    num_steps: int = 1000
    scale: float = 1.0
    step_rule: str = "paper"
    poisson: str = "weighted"
    eta: float = 1.0
    clamp_x0: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        sc = self.scale
        if isinstance(sc, bool) or not isinstance(sc, int | float) or not 0 <= sc < math.inf:
            raise ValueError(f"scale must be a finite number >= 0, got {sc!r}")
        if self.step_rule not in _RULES:
            raise ValueError(f"step_rule must be one of {_RULES}, got {self.step_rule!r}")
        if self.poisson not in _POISSON:
            raise ValueError(f"poisson must be one of {_POISSON}, got {self.poisson!r}")
        if (
            isinstance(self.eta, bool)
            or not isinstance(self.eta, int | float)
            or not (0.0 <= self.eta <= 1.0)
        ):
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        check_clamp("clamp_x0", self.clamp_x0)

    # ------------------------------------------------------------------ data fit
    def distance(self, ctx: Context, setup: DPSSetup, x0: Tensor) -> Tensor:
        """``D(x0)`` per particle ``(B, N)``: the squared (weighted) residual norm."""
        problem = ctx.problem
        op = problem.operator
        y = setup.y
        if self.clamp_x0 is not None:
            x0 = x0.clamp(self.clamp_x0[0], self.clamp_x0[1])

        def flat_sum(v: Tensor) -> Tensor:
            return v.reshape(v.shape[:2] + (-1,)).sum(-1)

        if problem.noise == "gaussian":
            if setup.pixel is not None:  # masks: on the pixel grid, no gather / scatter
                return -2.0 * setup.pixel(x0)
            return flat_sum((y - op(x0)) ** 2)
        rate = problem.poisson_rate
        if self.poisson == "weighted":
            return flat_sum(setup.weight * (y - rate * op(x0)) ** 2)
        # half the Poisson deviance: mu - y + y log(y / mu), with 0 log 0 = 0
        mu = rate * op(x0)
        return flat_sum(mu - y + torch.xlogy(y, y) - torch.xlogy(y, mu))

    @staticmethod
    def _linear_gaussian(ctx: Context) -> bool:
        return ctx.problem.is_linear_gaussian

    @staticmethod
    def _linear_gaussian_fit(op: LinearOperator, y: Tensor):
        """``x0 -> (-0.5 ||y - A x0||^2, A^T (y - A x0))`` per particle."""

        def fit(x0: Tensor) -> tuple[Tensor, Tensor]:
            r = torch.sub(y, op(x0))
            return -0.5 * rowsq(op.flat_out(r)), op.adjoint(r)

        return fit

    # ------------------------------------------------------------------ the sampler
    def setup(self, ctx: Context) -> DPSSetup:
        y = ctx.y.unsqueeze(1)  # (B, 1, *out)
        weighted = ctx.problem.noise == "poisson" and self.poisson == "weighted"
        op = ctx.problem.operator
        pixels = ctx.problem.noise == "gaussian" and op.pixel_svd
        pixel = None
        if pixels:
            lin = cast(LinearOperator, op)
            s = lin.pixel_singular_values().to(dtype=y.dtype, device=y.device)  # (d,)
            pixel = PixelGaussian(lin, lin.pixel_observation(lin.Ut(y)), s)
        fit = pixel.value_and_grad if pixel is not None else None
        if fit is None and self._linear_gaussian(ctx):
            fit = self._linear_gaussian_fit(cast(LinearOperator, op), y)
        return DPSSetup(y, 0.5 / y.clamp_min(1.0) if weighted else None, pixel, fit)

    def init(self, ctx: Context, setup: DPSSetup) -> tuple[DPSState, None]:
        # x_T ~ N(0, sigma_T^2 I) (the code's x_start = randn at t = T).
        return DPSState(ctx.start()), None

    def move(
        self, ctx: Context, setup: DPSSetup, state: DPSState, k: int, t: Tensor, t_next: Tensor
    ) -> Move:
        x = state.x
        sch = ctx.prior.schedule
        # 1. x0_hat(x_t), D_i = ||y - A(x0_hat)||^2 per particle, and grad_{x_t} D_i (times
        #    gscale: on the pixel grid the gradient of -D / 2, in closed form, with autograd
        #    only through the network).
        if setup.fit is not None and self.clamp_x0 is None:
            # -0.5 ||y - A x0||^2 and its gradient A^T (y - A x0) in closed form: autograd
            # only through the network
            x0, half, grad, _ = ctx.denoise_backward(x, t, setup.fit, direction=True)
            dist, gscale = -2.0 * half, -2.0
        else:
            x0, dist, grad = ctx.denoise_with_grad(x, t, lambda x0: self.distance(ctx, setup, x0))
            gscale = 1.0
        if self.clamp_x0 is not None:
            x0 = x0.clamp(self.clamp_x0[0], self.clamp_x0[1])
        # 2. Ancestral (DDIM eta) step: x'_s = alpha_s x0_hat + c_eps eps_hat + std z.
        coef = ddim_coefficients(sch, t, t_next, self.eta)
        x_next = ddim_mean(x, x0, coef, sch.sigma(t))
        if bool(coef.std > 0):
            x_next = x_next.addcmul_(coef.std, ctx.randn())
        # 3. Per-particle step size: paper zeta_i = scale / ||r_i|| on grad ||r_i||^2, code
        #    scale on grad ||r_i|| = grad ||r_i||^2 / (2 ||r_i||).
        norm = dist.clamp_min(0).sqrt()
        zeta = self.scale / norm.clamp_min(torch.finfo(norm.dtype).tiny)
        if self.step_rule == "code":
            zeta = 0.5 * zeta
        # 4. Skip the gradient step of a particle whose data fit or step is not finite: the
        #    step's norm zeta ||grad|| bounds its entries, and ||grad||^2 is finite iff they
        #    are (barring an overflow of the squares, which skips the step too): one read of
        #    the gradient, no update array formed and tested.
        flat = grad.reshape(grad.shape[:2] + (-1,))
        size = gscale * zeta * rowsq(flat).sqrt()
        ok = torch.isfinite(dist) & torch.isfinite(size)  # (B, N)
        shape = ok.shape + (1,) * (x.dim() - 2)
        zeta = torch.where(ok, gscale * zeta, torch.zeros_like(zeta)).reshape(shape)
        # a skipped particle's gradient may hold inf / NaN, which 0 * grad would keep: its
        # rows are zeroed first (on the CPU only when there is one: asking costs a host sync
        # per step on an accelerator, so there the rows are always masked, in place)
        if grad.device.type != "cpu" or not bool(ok.all()):
            grad = grad.masked_fill_(~ok.reshape(shape), 0.0)
        # x_s = x'_s - zeta grad, in place (one pass)
        x_next = x_next.addcmul_(zeta, grad, value=-1.0)
        return Move(DPSState(x_next), None, DPSStep((~ok).sum(-1)))

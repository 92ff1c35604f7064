"""D-Flow: differentiating through flows for controlled generation (Ben-Hamu, Puny, Gat,
Karrer, Singer & Lipman, ICML 2024).

Reference: the paper, and the reimplementation annegnx/PnP-Flow ``pnpflow/methods/d_flow.py``
(``config/method_config/d_flow.yaml``); there is no official inverse-problem code. See
``docs/methods/dflow.md``.

D-Flow optimises the source noise ``z`` of the (deterministic) flow ODE so that the generated
sample explains the data::

    min_z  L(z) = ||A Phi(z) - y||^2 + lam R(z),    R(z) = ||z||^2 / 2 - (d - 1) log ||z||

1. ``Phi`` integrates the probability-flow ODE ``dx/dt = dalpha E[x0|x_t] + dsigma E[eps|x_t]``
   (the prior's velocity, every denoiser call through ``ctx.denoise``) from ``x_T = sigma_T z``
   at the first time ``T`` of its grid down to ``t = 0``, in ``ode_steps`` explicit steps
   (``solver``: ``"midpoint"``, 2 NFEs per step, or ``"euler"``) on the inherited ``grid``,
   backpropagating through the solver (``Result.info.backprop`` is ``True``);
2. initialisation ``z_0 = sqrt(a) z* + sqrt(1 - a) n``, ``a = init_blend``, ``n ~ N(0, I)``,
   ``z* = Phi^-1(A^T y) / sigma_T`` (``z_0 = n`` for nonlinear operators, which have no
   adjoint);
3. L-BFGS on ``L``, every sample its own (per-sample histories, scaling and Armijo
   backtracking line search, batched over ``(B, N)``; the samples are exactly independent),
   ``lbfgs_iters`` iterations per move of the shared loop, ``max_iters`` moves; the output
   is ``Phi(z)`` at the last accepted ``z``.

``R`` is ``-log chi_d(||z||)`` up to a constant: it keeps ``||z||`` near ``sqrt(d - 1)``.
:meth:`DFlow.time_grid` returns ``max_iters + 1`` placeholder times (not diffusion times);
``num_steps`` is unused. Each move reports a :class:`DFlowStep` (``Result.info.steps``):
the batched objective evaluations it made (one more is made before the first move), and per
sample the loss at its start and end and ``||z||`` at its end. NFEs count every velocity
evaluation (forward; the backward passes are not counted separately).

Defaults (PnP-Flow ``d_flow.yaml``): ``max_iters = 20``, ``lbfgs_iters = 20``,
``history_size = 100`` (``2 history_size`` signals of memory per sample), ``ode_steps = 5``
midpoint steps, ``init_blend = 0.1``; ``lam = 1e-3`` (PnP-Flow's benchmark scripts; the yaml
lists 0.01). The data term has no ``1 / (2 sigma_y^2)``: noise enters only through ``lam``
and the iteration budget, as in PnP-Flow.

Departures from PnP-Flow (details in the notes): the paper's sign of ``R`` (PnP-Flow's is
flipped); per-sample L-BFGS with an Armijo search instead of torch's L-BFGS with strong Wolfe
on the batch-summed loss; ``Phi^-1`` by ``ode_steps`` Euler steps (dopri5 there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from ..operators.base import LinearOperator
from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from ..schedules import x0_to_velocity
from .base import Context, Move, Requirements, Sampler

__all__ = ["DFlow"]


@dataclass(frozen=True)
class DFlowSetup:
    """The time grid of the ODE solver inside ``Phi`` (``ode_steps + 1`` points)."""

    ode_times: Tensor


@dataclass(frozen=True)
class DFlowState:
    """Per sample: the source noise ``z`` ``(B, N, D)``, ``x = Phi(z)``, the loss ``f`` and its
    gradient ``g``, and the L-BFGS memory (pairs ``S``, ``Y`` ``(B, N, H, D)``, ``rho = 1 /
    s^T y`` ``(B, N, H)``, zero in unused slots, and the initial scaling ``gamma``)."""

    z: Tensor
    x: Tensor
    f: Tensor
    g: Tensor
    S: Tensor
    Y: Tensor
    rho: Tensor
    gamma: Tensor


@dataclass(frozen=True)
class DFlowStep:
    """One move (``lbfgs_iters`` L-BFGS iterations): batched objective evaluations made, and
    per sample ``(B, N)`` the loss at its start and end and ``||z||`` at its end."""

    evaluations: int
    loss_start: Tensor
    loss: Tensor
    z_norm: Tensor


@dataclass(frozen=True)
class DFlow(Sampler):
    """D-Flow: per-sample L-BFGS on the source noise of the flow ODE.

    Parameters
    ----------
    max_iters
        Outer iterations (the shared loop's steps; default 20).
    lbfgs_iters
        L-BFGS iterations per outer iteration (default 20).
    ode_steps
        Steps of the ODE solver inside ``Phi`` (default 5).
    solver
        ``"midpoint"`` (default) or ``"euler"``.
    grid
        Time grid of the ODE solver (``"uniform"`` or ``"ddpm"``).
    lam
        Weight of the chi regulariser (default 1e-3).
    init_blend
        ``a`` in ``z_0 = sqrt(a) z* + sqrt(1 - a) n`` (default 0.1; 0: pure noise).
    history_size
        L-BFGS memory (default 100).
    max_ls
        Line-search trials per iteration (default 20).
    tol_grad
        Per-sample stopping tolerance on ``max |grad|`` (torch's default 1e-7).
    tol_change
        A sample stops moving while its predicted decrease ``-g^T d`` is below this
        (torch's ``tolerance_change``, 1e-9).
    num_steps
        Unused (the ODE has ``ode_steps`` steps; the loop runs ``max_iters`` steps).
    """

    requires = Requirements(likelihoods=frozenset({"gaussian"}), differentiates=True)

    max_iters: int = 20
    lbfgs_iters: int = 20
    ode_steps: int = 5
    solver: str = "midpoint"
    lam: float = 1e-3
    init_blend: float = 0.1
    history_size: int = 100
    max_ls: int = 20
    tol_grad: float = 1e-7
    tol_change: float = 1e-9

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_iters", "lbfgs_iters", "ode_steps", "history_size", "max_ls"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.solver not in ("midpoint", "euler"):
            raise ValueError(f"solver must be 'midpoint' or 'euler', got {self.solver!r}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if not 0.0 <= self.init_blend <= 1.0:
            raise ValueError(f"init_blend must be in [0, 1], got {self.init_blend!r}")
        if not self.tol_grad >= 0:
            raise ValueError(f"tol_grad must be >= 0, got {self.tol_grad!r}")
        if not self.tol_change >= 0:
            raise ValueError(f"tol_change must be >= 0, got {self.tol_change!r}")

    def time_grid(self, prior: DiffusionModel, problem: InverseProblem) -> Tensor:
        """``max_iters + 1`` placeholder points: one loop step per outer iteration."""
        y = problem.y
        return torch.linspace(1.0, 0.0, self.max_iters + 1, dtype=y.dtype, device=y.device)

    # ------------------------------------------------------------------ the flow map
    def _velocity(self, ctx: Context, x: Tensor, t: Tensor) -> Tensor:
        sch = ctx.prior.schedule
        x0 = ctx.denoise(x, t)
        return x0_to_velocity(x, x0, sch.alpha(t), sch.sigma(t), sch.dalpha(t), sch.dsigma(t))

    def _flow(self, ctx: Context, setup: DFlowSetup, z: Tensor) -> Tensor:
        """``Phi(z)``: the ODE from ``x_T = sigma_T z`` down to ``t = 0`` (differentiable)."""
        ts = setup.ode_times
        x = ctx.prior.schedule.sigma(ts[0]) * z
        for j in range(self.ode_steps):
            t, tn = ts[j], ts[j + 1]
            h = tn - t
            if self.solver == "euler":
                x = x + h * self._velocity(ctx, x, t)
            else:
                xm = x + 0.5 * h * self._velocity(ctx, x, t)
                x = x + h * self._velocity(ctx, xm, t + 0.5 * h)
        return x

    def _invert(self, ctx: Context, setup: DFlowSetup, x: Tensor) -> Tensor:
        """Approximate ``Phi^-1(x) / sigma_T`` (Euler upwards, velocity at the upper end)."""
        ts = setup.ode_times
        for j in range(self.ode_steps, 0, -1):
            t_lo, t_hi = ts[j], ts[j - 1]
            x = x + (t_hi - t_lo) * self._velocity(ctx, x, t_hi)
        return x / ctx.prior.schedule.sigma(ts[0])

    def _objective(
        self, ctx: Context, setup: DFlowSetup, z: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample loss ``(B, N)``, its gradient ``(B, N, D)`` and ``Phi(z)``."""
        op = ctx.problem.operator
        shape = ctx.shape
        d = math.prod(shape[2:])
        ctx.backprop = True
        with torch.enable_grad():
            zr = z.detach().reshape(shape).requires_grad_(True)
            x = self._flow(ctx, setup, zr)
            r = op(x) - ctx.y.unsqueeze(1)
            data = (r**2).reshape(shape[:2] + (-1,)).sum(-1)
            loss = data
            if self.lam > 0:
                nz = zr.reshape(shape[:2] + (-1,)).norm(dim=-1)
                reg = 0.5 * nz**2 - (d - 1) * torch.log(nz + 1e-5)
                loss = loss + self.lam * reg
            (g,) = torch.autograd.grad(loss.sum(), zr)
        return loss.detach(), g.reshape(shape[:2] + (-1,)), x.detach()

    # ------------------------------------------------------------------ sampler
    def setup(self, ctx: Context) -> DFlowSetup:
        return DFlowSetup(
            ctx.prior.schedule.time_grid(
                self.ode_steps, self.grid, dtype=ctx.dtype, device=ctx.device
            )
        )

    def init(self, ctx: Context, setup: DFlowSetup) -> tuple[DFlowState, None]:
        op = ctx.problem.operator
        n = ctx.randn()
        if op.is_linear and self.init_blend > 0:
            # 2. z_0 = sqrt(a) Phi^-1(A^T y) / sigma_T + sqrt(1 - a) n
            with torch.no_grad():
                x_adj = cast(LinearOperator, op).adjoint(ctx.y).unsqueeze(1).expand(ctx.shape)
                z_star = self._invert(ctx, setup, x_adj)
            z = math.sqrt(self.init_blend) * z_star + math.sqrt(1.0 - self.init_blend) * n
        else:
            z = n
        f, g, x = self._objective(ctx, setup, z)
        B, N = ctx.B, ctx.N
        D = g.shape[-1]
        H = self.history_size
        kw: dict[str, Any] = {"dtype": ctx.dtype, "device": ctx.device}
        state = DFlowState(
            z=z.reshape(B, N, D),
            x=x,
            f=f,
            g=g,
            S=torch.zeros(B, N, H, D, **kw),
            Y=torch.zeros(B, N, H, D, **kw),
            rho=torch.zeros(B, N, H, **kw),
            gamma=torch.ones(B, N, **kw),
        )
        return state, None

    def _direction(
        self, g: Tensor, S: Tensor, Y: Tensor, rho: Tensor, gamma: Tensor, count: int
    ) -> Tensor:
        """Two-loop recursion, per sample, over the ``min(count, H)`` stored slots."""
        H = self.history_size
        slots = [(count - 1 - k) % H for k in range(min(count, H))]  # newest first
        q = g
        alphas = []
        for j in slots:
            a = rho[..., j] * (S[..., j, :] * q).sum(-1)
            q = q - a[..., None] * Y[..., j, :]
            alphas.append(a)
        r = gamma[..., None] * q
        for j, a in zip(reversed(slots), reversed(alphas)):
            b = rho[..., j] * (Y[..., j, :] * r).sum(-1)
            r = r + (a - b)[..., None] * S[..., j, :]
        return -r

    def move(self, ctx: Context, setup: DFlowSetup, state: DFlowState, k: int, t, t_next) -> Move:
        # 3. lbfgs_iters L-BFGS iterations. The history is copied once per move, then
        # updated in place (the caller's state is kept).
        S, Y, rho = state.S.clone(), state.Y.clone(), state.rho.clone()
        z, x, f, g, gamma = state.z, state.x, state.f, state.g, state.gamma
        H = self.history_size
        c1 = 1e-4
        tiny = torch.finfo(ctx.dtype).tiny
        evaluations = 0
        for j in range(self.lbfgs_iters):
            count = k * self.lbfgs_iters + j  # pairs offered to the history so far
            frozen = g.abs().amax(-1) <= self.tol_grad
            has_hist = (rho > 0).any(-1)
            d = self._direction(g, S, Y, rho, gamma, count)
            gtd = (g * d).sum(-1)
            # Fall back to steepest descent where the direction is not a descent direction.
            bad = ~(gtd < 0) & ~frozen
            use_sd = bad | ~has_hist
            d = torch.where(bad[..., None], -g, d)
            gtd = torch.where(bad, -(g * g).sum(-1), gtd)
            frozen = frozen | (gtd > -self.tol_change)
            t0 = torch.where(use_sd, (1.0 / g.abs().sum(-1).clamp_min(tiny)).clamp_max(1.0), 1.0)
            # Armijo backtracking, per sample.
            step_t = t0
            acc = frozen.clone()
            t_acc = torch.zeros_like(f)
            f_acc, g_acc, x_acc = f, g, x
            for _ in range(self.max_ls):
                f_try, g_try, x_try = self._objective(ctx, setup, z + step_t[..., None] * d)
                evaluations += 1
                ok = ~acc & torch.isfinite(f_try) & (f_try <= f + c1 * step_t * gtd)
                okx = ok.reshape(ok.shape + (1,) * (x_try.dim() - 2))
                f_acc = torch.where(ok, f_try, f_acc)
                g_acc = torch.where(ok[..., None], g_try, g_acc)
                x_acc = torch.where(okx, x_try, x_acc)
                t_acc = torch.where(ok, step_t, t_acc)
                acc = acc | ok
                if bool(acc.all()):
                    break
                # Next trial: minimiser of the quadratic through f, gtd and f_try, kept in
                # [0.1 t, 0.5 t] (halving where f_try is not finite).
                curv = 2.0 * (f_try - f - gtd * step_t)
                t_q = -gtd * step_t**2 / curv.clamp_min(tiny)
                t_q = torch.minimum(torch.maximum(t_q, 0.1 * step_t), 0.5 * step_t)
                t_q = torch.where(torch.isfinite(f_try) & (curv > 0), t_q, 0.5 * step_t)
                step_t = torch.where(acc, step_t, t_q)
            # Curvature pair (kept where s^T y > 1e-10, as torch's LBFGS).
            s = t_acc[..., None] * d
            yv = g_acc - g
            ys = (s * yv).sum(-1)
            keep = ys > 1e-10
            slot = count % H
            S[..., slot, :] = torch.where(keep[..., None], s, 0.0)
            Y[..., slot, :] = torch.where(keep[..., None], yv, 0.0)
            rho[..., slot] = torch.where(keep, 1.0 / ys.clamp_min(tiny), 0.0)
            yy = (yv * yv).sum(-1)
            gamma = torch.where(keep, ys / yy.clamp_min(tiny), gamma)
            z, f, g, x = z + s, f_acc, g_acc, x_acc
        new = DFlowState(z=z, x=x, f=f, g=g, S=S, Y=Y, rho=rho, gamma=gamma)
        return Move(new, info=DFlowStep(evaluations, state.f, f, z.norm(dim=-1)))

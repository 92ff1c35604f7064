r"""The density of a diffusion model by the probability-flow ODE (Song et al., ICLR 2021).

Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-Based Generative Modeling through
Stochastic Differential Equations", ICLR 2021, Sec. 4.3 and App. D.2. With the probability
flow ``dx_t/dt = v(x_t, t)`` (``model.velocity``, ``v = dalpha E[x0|x_t] + dsigma
E[eps|x_t]``), which carries the marginals ``p_t``, the instantaneous change of variables
gives

    log p_{t_min}(x) = log p_{t_max}(x_{t_max}) + int_{t_min}^{t_max} div v(x_t, t) dt,

integrated forward from ``x_{t_min} = x`` on the joint state ``(x_t, int div v)`` by
``torchdiffeq`` (Chen et al., NeurIPS 2018): by default RK4 on a fixed grid of
``ode_steps`` steps, quadratic in ``t`` (uniform in ``sigma`` near ``t = 0``, where the flow
of a concentrated prior is stiffest; measured on the shipped moons prior: 20 quadratic steps
are within 0.04 nats of the converged density where 80 uniform steps are 0.3 off), or any
``torchdiffeq`` solver, adaptive ones with tolerances. :func:`ode_log_prob` computes it;
:meth:`bayesfilter_diff.DiffusionPrior.log_prob` calls it.

Gradients
---------
When ``x`` requires grad, the result is differentiable in ``x`` (Pyro's HMC / NUTS then see
the prior's gradient), two ways:

- *Through the solver* (``adjoint=False``, default): the divergence is computed with
  ``create_graph`` and autograd runs back through every step: the exact gradient of the
  value returned (tested against finite differences), as Hamiltonian Monte Carlo needs;
  memory grows with the number of steps.
- *Adjoint* (``adjoint=True``, ``torchdiffeq.odeint_adjoint``): memory independent of the
  number of steps, one more (backward) solve of the state and its adjoint. Its gradient is
  that of the continuous ODE, computed by that backward solve: accurate with an adaptive
  solver at tight tolerances (measured on the moons prior:
  ``dopri5`` at ``rtol = atol = 1e-6`` within 1.6e-3 relative of backpropagation through the
  same solver, at 9x its time) but not on a coarse fixed grid, where the backward solve
  through the stiff end is
  inaccurate (RK4, 80 quadratic steps: 13 against a gradient of 29). HMC stays exact with
  an inexact gradient (the leapfrog map is still reversible and volume preserving, and the
  acceptance uses the value), only less efficient.

Approximations
--------------
- *Terminal density.* ``p_T`` (``T = t_max``) is the data scaled by ``alpha = alpha(T)`` and
  convolved with ``N(0, sigma^2 I)``, ``sigma = sigma(T)``. Its cumulant expansion in
  ``alpha`` is used (:func:`terminal_log_prob`),

      log p_T(z) ~ log N(z; alpha m, sigma^2 I) + alpha / 2 (z'^T J z' / sigma^2 - tr J),
      z' = z - alpha m,

  with ``m = D(0)`` and ``J = dD/dx_T (0)`` from the denoiser ``D = E[x0 | x_T]`` at
  ``x_T = 0`` (``J = alpha Cov[x0 | x_T] / sigma^2``, so the correction is the second-order
  term ``alpha^2 / (2 sigma^2) (z'^T C z' / sigma^2 - tr C)`` of ``N(alpha m, alpha^2 C +
  sigma^2 I)``, ``C`` the data covariance). The neglected terms are ``O(alpha^3)``: linear
  VP ``alpha(1) = 6.6e-3``; flow ``alpha(1) = 0`` (exact). Cost: two network calls, ``d``
  VJPs for ``tr J`` (Hutchinson with ``num_probes`` probes unless ``exact``) and one
  batched VJP.
- *Start.* ``t_min > 0`` (``t = 0`` is singular for VP and flow paths): the density of
  ``p_{t_min}``, which differs from ``p_0`` by ``O(t_min)``.
- *Discretisation.* RK4's global error ``O(ode_steps^-4)``; an adaptive solver's
  ``rtol`` / ``atol`` (its step sizes are chosen for the whole batch of points at once).
- *Divergence.* Exact (``d`` vector-Jacobian products per velocity evaluation), or
  Hutchinson's unbiased estimator ``div v ~ mean_k z_k^T (dv/dx) z_k`` with ``num_probes``
  Rademacher probes ``z_k`` per point. On a fixed grid solved forward (the default, also
  when differentiating through the solver) they are drawn afresh at every evaluation: one
  evaluation's variance is ``2 (||J_s||_F^2 - sum_i J_ii^2) / num_probes`` (``J_s`` the
  symmetric part of ``dv/dx``) and the estimate of ``log p`` has variance ``sum_evals (c_e
  h)^2 Var_e`` (``c_e`` the solver's stage weights), about ``(10 / 36) h / num_probes``
  times the time-averaged single-probe variance for RK4 (measured: sd 0.74 nats in ``d =
  64``, 30 steps, one probe). With an adaptive solver or the adjoint, whose step control
  or backward solve need one smooth integrand, the probes are drawn once per call and kept
  over the solve (FFJORD, Grathwohl et al., ICLR 2019): ``log p`` is then estimated by
  ``z^T (int dv/dx dt) z``, unbiased but with the variance ``2 (||M_s||_F^2 - sum_i
  M_ii^2) / num_probes`` of ``M = int dv/dx dt``, far larger (measured: sd 5.5 nats in the
  same case).

Cost: ``4 ode_steps`` velocity (network) evaluations on ``x``'s batch (plus the two terminal
calls), each with ``d`` (exact) or ``num_probes`` (Hutchinson) vector-Jacobian products,
batched with ``torch.autograd.grad(..., is_grads_batched=True)`` (a loop if the network does
not support it, :func:`batched_vjp`). E.g. 100 steps in ``d = 8``: 402 network calls and
~3200 VJPs.
"""

from __future__ import annotations

import math

import torch
import torchdiffeq
from torch import Tensor
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.solvers import FixedGridODESolver

from ..errors import ODESolverError
from .base import DiffusionModel

__all__ = ["ode_log_prob", "terminal_log_prob", "batched_vjp", "rademacher", "FIXED_GRID_METHODS"]

# torchdiffeq's fixed-grid solvers (they take ode_steps); the others adapt their steps.
FIXED_GRID_METHODS = tuple(
    name for name, cls in SOLVERS.items() if issubclass(cls, FixedGridODESolver)
)

_LOG2PI = math.log(2 * math.pi)


def ode_log_prob(
    model: DiffusionModel,
    x: Tensor,
    *,
    t_min: float,
    t_max: float,
    ode_steps: int,
    exact: bool,
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    method: str = "rk4",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    adjoint: bool = False,
    ode_grid: str = "quadratic",
) -> Tensor:
    """``log p_{t_min}(x)`` of ``model`` by the probability-flow ODE (see the module).

    Parameters
    ----------
    model
        The diffusion model (its ``velocity``, ``denoise`` and ``schedule``).
    x
        Points of shape ``(*lead, *model.event_shape)`` (not checked here). When ``x``
        requires grad (and grad mode is on) the result is differentiable in ``x``.
    t_min, t_max
        Integration interval, ``0 <= t_min < t_max <= 1``.
    ode_steps
        Steps of a fixed-grid ``method``; ignored by adaptive ones.
    ode_grid
        The fixed grid: ``"quadratic"`` (``t = t_min + (t_max - t_min) u^2``, ``u``
        uniform: uniform in ``sigma`` near ``t = 0`` for VP paths, where the flow is
        stiffest) or ``"uniform"`` in ``t``.
    exact
        Exact divergence (``True``) or Hutchinson's estimator (``False``).
    num_probes
        Rademacher probes of Hutchinson's estimator per point (per evaluation on a fixed
        grid solved forward, once per call otherwise; see the module).
    generator
        Generator of the probes (``None``: torch's default generator).
    method
        A ``torchdiffeq`` solver: fixed-grid (``"rk4"``, ``"midpoint"``, ``"euler"``) or
        adaptive (``"dopri5"``, ``"bosh3"``, ...; ``rtol`` / ``atol``).
    adjoint
        Gradients by the adjoint method (memory independent of the number of solver steps;
        one more, backward, solve) instead of backpropagating through the solver.

    Returns
    -------
    Tensor
        ``(*lead)``, in ``x``'s dtype; detached unless ``x`` requires grad.
    """
    ev = tuple(model.event_shape)
    k = len(ev)
    d = math.prod(ev)
    lead = tuple(x.shape[: x.dim() - k])
    red = tuple(range(len(lead), x.dim()))
    track = torch.is_grad_enabled() and x.requires_grad
    # Hutchinson probes afresh at every evaluation on a fixed grid solved forward only
    # (7x less variance, see the module); fixed over the solve when an adaptive step control
    # or the adjoint's backward solve must see one smooth integrand.
    fresh = not exact and method in FIXED_GRID_METHODS and not (track and adjoint)
    if exact:
        # grad_outputs e_i (one-hot over the flattened event), batched over i.
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        probes = eye.reshape((d,) + (1,) * len(lead) + ev).expand((d,) + tuple(x.shape))
    elif not fresh:
        probes = rademacher((num_probes,) + tuple(x.shape), generator, x)

    def dynamics(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal probes
        z = state[0]
        grad = torch.is_grad_enabled() and z.requires_grad
        if fresh:
            probes = rademacher((num_probes,) + tuple(z.shape), generator, z)
        with torch.enable_grad():
            zr = z if grad else z.detach().requires_grad_(True)
            v = model.velocity(zr, t)
            vjp = batched_vjp(v, zr, probes, create_graph=grad)  # (P, *lead, *event)
        if exact:
            div = vjp.reshape((d,) + lead + (d,)).diagonal(dim1=0, dim2=-1).sum(-1)
        else:
            div = (vjp * probes).sum(tuple(r + 1 for r in red)).mean(0)
        if not grad:
            v, div = v.detach(), div.detach()
        return v, div

    t_span = torch.tensor([t_min, t_max], dtype=torch.float64, device=x.device).to(x.dtype)
    options: dict = {}
    if method in FIXED_GRID_METHODS:

        def grid(func, y0, t):
            # torchdiffeq runs a backward solve (the adjoint's) on -t: t = (-t_max, -t_min).
            g = torch.linspace(0, 1, ode_steps + 1, dtype=t.dtype, device=t.device)
            if ode_grid == "quadratic":  # u^2 from the t_min end: uniform in sigma near 0
                g = g**2 if t[0] >= 0 else 1 - (1 - g) ** 2
            g = t[0] + (t[-1] - t[0]) * g
            g[0], g[-1] = t[0], t[-1]
            return g

        options = {"grid_constructor": grid}
    else:
        # An adaptive step may pass the end of the interval and interpolate back; the
        # schedule is not defined below t = 0 (the adjoint's backward solve ends at t_min),
        # so every step is made to land on both ends.
        options = {"step_t": t_span}
    state0 = (x if track else x.detach(), torch.zeros(lead, dtype=x.dtype, device=x.device))
    try:
        if track and adjoint:
            sol = torchdiffeq.odeint_adjoint(
                dynamics,
                state0,
                t_span,
                rtol=rtol,
                atol=atol,
                method=method,
                options=options,
                adjoint_params=(),
            )
        else:
            with torch.set_grad_enabled(track):
                sol = torchdiffeq.odeint(
                    dynamics, state0, t_span, rtol=rtol, atol=atol, method=method, options=options
                )
    except AssertionError as e:  # torchdiffeq's "underflow in dt"
        raise ODESolverError(
            f"the probability-flow ODE solver {method!r} failed ({e}); use a fixed-grid "
            "solver ('rk4'), looser rtol / atol, or a larger t_min"
        ) from e
    z, integral = sol[0][-1], sol[1][-1]
    # Terminal density: N(alpha m, sigma^2 I) plus its second-order correction.
    tT = t_span[-1]
    sch = model.schedule
    a, s = sch.alpha(tT), sch.sigma(tT)
    with torch.set_grad_enabled(track):
        log_end = terminal_log_prob(model, z, a, s, tT, exact, num_probes, generator)
    out = log_end + integral
    return out if track else out.detach()


def rademacher(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Rademacher (+-1) draws of ``shape`` in ``like``'s dtype and device."""
    r = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return r.to(like.dtype) * 2 - 1


def terminal_log_prob(
    model: DiffusionModel,
    z: Tensor,
    a: Tensor,
    s: Tensor,
    tT: Tensor,
    exact: bool,
    num_probes: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Second-order Gaussian approximation of ``log p_T(z)`` (see the module), with
    ``a = alpha(T)``, ``s = sigma(T)`` and ``tT = T``; ``(*lead)``."""
    ev = tuple(model.event_shape)
    k = len(ev)
    d = math.prod(ev)
    lead = z.shape[: z.dim() - k]
    red = tuple(range(len(lead), z.dim()))
    track = torch.is_grad_enabled() and z.requires_grad
    with torch.enable_grad():
        # J = dD/dx_T at x_T = 0 (D = E[x0 | x_T]); J = (alpha / sigma^2) Cov[x0 | x_T = 0].
        zeros = torch.zeros(ev, dtype=z.dtype, device=z.device).requires_grad_(True)
        m = model.denoise(zeros, tT)
        if exact:
            probes = torch.eye(d, dtype=z.dtype, device=z.device).reshape((d,) + ev)
        else:
            probes = rademacher((num_probes,) + ev, generator, z)
        jp = batched_vjp(m, zeros, probes)
        trace_j = (jp * probes).sum(tuple(range(1, k + 1))).sum() / (1 if exact else num_probes)
        m = m.detach()
        zc = z - a * m  # x' = z - alpha m
        if not track:
            zc = zc.detach()
        zr = torch.zeros_like(zc).requires_grad_(True)
        mz = model.denoise(zr, tT)  # one row per point, so J^T x' comes out per point
        # With create_graph, J^T x' stays differentiable in x' (through grad_outputs).
        (jx,) = torch.autograd.grad(mz, zr, grad_outputs=zc, create_graph=track)
    r2 = (zc**2).sum(red)
    log_n = -0.5 * r2 / s**2 - d * (torch.log(s) + 0.5 * _LOG2PI)
    # log p_T = log N(z; alpha m, sigma^2 I) + alpha/2 (x'^T J x' / sigma^2 - tr J) + O(alpha^3)
    corr = 0.5 * a * ((zc * jx).sum(red) / s**2 - trace_j.detach())
    out = log_n + corr
    return out if track else out.detach()


def batched_vjp(v: Tensor, x: Tensor, probes: Tensor, create_graph: bool = False) -> Tensor:
    """``probes[k]^T dv/dx`` for every ``k``: one vmapped backward pass, or a loop.

    ``create_graph``: keep the result differentiable (for gradients of a divergence)."""
    try:
        (g,) = torch.autograd.grad(
            v,
            x,
            grad_outputs=probes,
            is_grads_batched=True,
            create_graph=create_graph,
            retain_graph=True,
        )
        return g
    except (RuntimeError, NotImplementedError):  # networks whose ops vmap cannot batch
        out = []
        for k in range(probes.shape[0]):
            (g,) = torch.autograd.grad(
                v, x, grad_outputs=probes[k], retain_graph=True, create_graph=create_graph
            )
            out.append(g)
        return torch.stack(out)

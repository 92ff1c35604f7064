"""DAPS: decoupled annealing posterior sampling (Zhang, Chu, Berner, Meng, Anandkumar & Song,
2024, "Improving Diffusion Inverse Problem Solving with Decoupled Noise Annealing").

Reference code: zhangbingliang2019/DAPS ``sampler.py::DAPS``, ``cores/scheduler.py``,
``cores/mcmc.py``, ``configs/sampler/edm_daps.yaml``, ``configs/task/*.yaml``. See
``docs/methods/daps.md``.

The code works in EDM (variance-exploding) form ``x = x0 + s eps``; in our notation the VE
variable is ``x_t / alpha_t`` with ``s(t) = sigma_t / alpha_t``. For each annealing level
``s_k`` (time ``t_k``), ``k = 0 .. K - 1``::

    1. x0_hat = PF-ODE(x_{t_k}: s_k -> s_ode_min)   (ode_steps Euler steps; x0_hat in VE units)
    2. x0_y  ~ p(x0 | x0_hat, y)
             propto exp(-||A x0 - y||^2 / (2 tau^2) - ||x0 - x0_hat||^2 / (2 r_k^2)),  r_k = s_k,
             by Langevin:  x <- x + eta_k grad log p + sqrt(2 eta_k) z
    3. x_{t_{k+1}} = alpha_{k+1} x0_y + sigma_{k+1} z     (s_K = 0: the output is x0_y)

Step 1: an Euler step in the VE variable on the poly-7 inner grid ``(s_k^(1/7) + r
(s_ode_min^(1/7) - s_k^(1/7)))^7``, ``r = j / ode_steps``, is in our variables the
deterministic DDIM step (:func:`.kernels.ddim_mean` with ``eta = 0``), one NFE each;
``x0_hat`` is the Euler state at ``s_ode_min`` divided by ``alpha``. Annealing grid
(:meth:`DAPS.time_grid`): poly-7 VE sigmas from ``sigma_max`` (capped at ``s(1)``) to
``sigma_min``, ``num_steps`` of them, then 0; start ``x_{t_0} = sigma_{t_0} z``. Langevin step
``eta_k = lr (1 + (k / (num_steps + 1)) (lr_min_ratio - 1))`` (the code's linear decay).

Defaults: ``num_steps = 200``, ``sigma_max = 100``, ``sigma_min = 0.1``, ``ode_steps = 5``,
``ode_sigma_min = 0.01`` (``edm_daps.yaml``), ``langevin_steps = 100``, ``lr = 1e-4``,
``lr_min_ratio = 0.01`` (``configs/task/*.yaml``, pixel SR x4); NFE = ``num_steps *
ode_steps`` = 1000 (DAPS-1K). ``tau = None`` uses ``tau = sigma_y`` (the actual likelihood;
the code's pixel tasks sharpen it to ``tau = 0.01`` with ``sigma_y = 0.05``). The step size is
absolute: stability needs roughly ``lr < 2 / (||A||^2 / tau^2 + 1 / sigma_min^2)``.

Departures from the code (details in the notes): ``tau_convention = "paper"`` (default)
keeps the ``1/2`` of the paper's data term, ``"code"`` drops it as the code does (effective
variance ``tau^2 / 2``); NaNs propagate (the code returns zeros); only the ``'gaussian'`` prior
term and plain Langevin are implemented.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from ..schedules import Schedule
from .base import Context, Move, Requirements, Sampler
from .kernels import ddim_coefficients, ddim_mean

__all__ = ["DAPS", "time_of_ve_sigma", "poly_sigmas"]


def time_of_ve_sigma(schedule: Schedule, s: Tensor, iters: int = 80) -> Tensor:
    """Times ``t`` in ``[0, 1]`` with ``sigma(t) / alpha(t) = s``, by bisection on the log-SNR.

    Values outside the schedule's range are clamped to ``t = 0`` or ``t = 1``. Computed in
    float64.
    """
    s = torch.as_tensor(s, dtype=torch.float64)
    target = -2.0 * torch.log(s)  # log-SNR = log(alpha^2 / sigma^2)
    lo = torch.zeros_like(s)
    hi = torch.ones_like(s)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = schedule.log_snr(mid) > target  # still too little noise: go right
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def poly_sigmas(s_max: float | Tensor, s_min: float | Tensor, n: int, rho: float = 7.0) -> Tensor:
    """EDM's poly-``rho`` grid of ``n + 1`` points from ``s_max`` down to ``s_min``."""
    a = torch.as_tensor(s_max, dtype=torch.float64) ** (1 / rho)
    b = torch.as_tensor(s_min, dtype=torch.float64, device=a.device) ** (1 / rho)
    r = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64, device=a.device)
    return (a[..., None] + r * (b[..., None] - a[..., None])) ** rho


def _ve_sigma(schedule: Schedule, t: Tensor) -> Tensor:
    """``sigma(t) / alpha(t)`` (``inf`` where ``alpha = 0``)."""
    return schedule.sigma(t) / schedule.alpha(t)


@dataclass(frozen=True)
class DAPSSetup:
    """The inner PF-ODE times of every level ``(K, ode_steps + 1)`` and the data term's
    coefficient ``1 / tau^2`` (``"paper"``) or ``2 / tau^2`` (``"code"``)."""

    inner_t: Tensor
    data_coef: float


@dataclass(frozen=True)
class DAPSState:
    x: Tensor


@dataclass(frozen=True)
class DAPS(Sampler):
    """Decoupled annealing posterior sampling (PF-ODE to ``x0_hat``, Langevin, re-noise).

    Parameters
    ----------
    num_steps
        Annealing levels ``K`` (default 200).
    sigma_max, sigma_min
        VE noise range of the annealing grid (default 100, 0.1).
    ode_steps
        Euler steps of the inner PF-ODE (default 5).
    ode_sigma_min
        VE noise level where the inner ODE stops (default 0.01).
    langevin_steps
        Langevin steps per level (default 100).
    lr
        Langevin step size ``eta`` at the first level (default 1e-4).
    lr_min_ratio
        Final step size as a fraction of ``lr`` (default 0.01).
    tau
        Likelihood temperature; ``None`` (default) uses ``noise_std``.
    tau_convention
        ``"paper"`` (``exp(-||Ax-y||^2 / (2 tau^2))``, default) or ``"code"``
        (``exp(-||Ax-y||^2 / tau^2)``).
    """

    requires = Requirements(likelihoods=frozenset({"gaussian"}))
    exact_start = True
    on_path = True

    num_steps: int = 200
    sigma_max: float = 100.0
    sigma_min: float = 0.1
    ode_steps: int = 5
    ode_sigma_min: float = 0.01
    langevin_steps: int = 100
    lr: float = 1e-4
    lr_min_ratio: float = 0.01
    tau: float | None = None
    tau_convention: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, lo in (("ode_steps", 1), ("langevin_steps", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not (0 < self.ode_sigma_min < self.sigma_min < self.sigma_max):
            raise ValueError(
                "need 0 < ode_sigma_min < sigma_min < sigma_max, got "
                f"ode_sigma_min={self.ode_sigma_min}, sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}"
            )
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 < self.lr_min_ratio < math.inf:
            raise ValueError(f"lr_min_ratio must be a finite number > 0, got {self.lr_min_ratio!r}")
        if self.tau is not None and not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"tau must be a finite number > 0 or None, got {self.tau!r}")
        if self.tau_convention not in ("paper", "code"):
            raise ValueError(
                f"tau_convention must be 'paper' or 'code', got {self.tau_convention!r}"
            )

    def requirements(self) -> Requirements:
        """Noise > 0 unless ``tau`` is set (the Langevin target's width)."""
        if self.tau is not None:
            return self.requires
        return dataclasses.replace(
            self.requires, noise_positive=True, remedy="or set tau > 0 (the Langevin width)"
        )

    def check(self, prior: DiffusionModel, problem: InverseProblem) -> None:
        """Gaussian noise (:attr:`requires`), ``tau > 0``, and ``ode_sigma_min`` in range."""
        super().check(prior, problem)
        s0 = float(_ve_sigma(prior.schedule, torch.zeros((), dtype=torch.float64)))
        if not self.ode_sigma_min >= s0:
            raise ValueError(
                f"DAPS: ode_sigma_min={self.ode_sigma_min} is below the schedule's smallest "
                f"VE noise level sigma(0)/alpha(0) = {s0:.4g}"
            )

    # ------------------------------------------------------------------ grids
    def _sigma_max(self, schedule: Schedule) -> float:
        s1 = float(_ve_sigma(schedule, torch.ones((), dtype=torch.float64)))
        return min(self.sigma_max, s1)

    def time_grid(self, prior: DiffusionModel, problem: InverseProblem) -> Tensor:
        """Annealing times: poly-7 VE sigmas ``sigma_max .. sigma_min`` (``num_steps``), then 0."""
        sch = prior.schedule
        sig = poly_sigmas(self._sigma_max(sch), self.sigma_min, self.num_steps)[:-1]
        t = time_of_ve_sigma(sch, sig)
        t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
        return t.to(dtype=problem.y.dtype, device=problem.y.device)

    # ------------------------------------------------------------------ the sampler
    def setup(self, ctx: Context) -> DAPSSetup:
        sch = ctx.prior.schedule
        times = ctx.times
        # Inner ODE grids for every level: poly-7 from s_k to ode_sigma_min, as times.
        s_levels = _ve_sigma(sch, times[:-1].double())
        inner = poly_sigmas(s_levels, self.ode_sigma_min, self.ode_steps)  # (K, ode_steps + 1)
        inner_t = time_of_ve_sigma(sch, inner)
        inner_t[:, 0] = times[:-1].double()
        tau = self.tau if self.tau is not None else ctx.problem.noise_std
        factor = 1.0 if self.tau_convention == "paper" else 2.0
        return DAPSSetup(inner_t.to(dtype=ctx.dtype, device=ctx.device), factor / tau**2)

    def init(self, ctx: Context, setup: DAPSSetup) -> tuple[DAPSState, None]:
        return DAPSState(ctx.start()), None

    def divergence_remedy(self, problem: InverseProblem) -> str | None:
        from ..operators.base import LinearOperator, spectral_norm

        op = problem.operator
        if not isinstance(op, LinearOperator):
            return None
        tau = self.tau if self.tau is not None else problem.min_noise_std
        if not tau > 0:
            return None
        factor = 1.0 if self.tau_convention == "paper" else 2.0
        bound = 2.0 / (factor * spectral_norm(op) ** 2 / tau**2 + 1.0 / self.sigma_min**2)
        return (
            f"DAPS's Langevin step lr = {self.lr:g} against its stability bound "
            f"2 / (||A||^2 / tau^2 + 1 / sigma_min^2) = {bound:.3g} here: a smaller lr "
            "(with more langevin_steps)"
        )

    def move(self, ctx: Context, setup: DAPSSetup, state: DAPSState, k: int, t, t_next) -> Move:
        sch = ctx.prior.schedule
        x = state.x
        # 1. x0_hat by the PF-ODE (Euler in the VE variable = DDIM eta=0 in ours).
        ts = setup.inner_t[k]
        for j in range(self.ode_steps):
            tj, tn = ts[j], ts[j + 1]
            d = ctx.denoise(x, tj)
            x = ddim_mean(x, d, ddim_coefficients(sch, tj, tn, 0.0), sch.sigma(tj))
        x0_hat = x / sch.alpha(ts[-1])
        # 2. Langevin on x0 targeting exp(-c ||A x - y||^2 / 2 - ||x - x0_hat||^2 / (2 r^2)),
        #    c = data_coef, r = s_k (the level's VE sigma).
        r2 = (_ve_sigma(sch, t)) ** 2
        lr = self.lr * (1.0 + (k / (self.num_steps + 1)) * (self.lr_min_ratio - 1.0))
        c = setup.data_coef
        noise_scale = math.sqrt(2.0 * lr)
        x0 = x0_hat
        for _ in range(self.langevin_steps):
            score = -c * ctx.problem.residual_gradient(x0) + (x0_hat - x0) / r2
            x0 = x0 + lr * score + noise_scale * ctx.randn()
        # 3. Re-noise to the next level (the last level returns x0_y itself).
        if k == len(ctx.times) - 2:
            return Move(DAPSState(x0))
        return Move(DAPSState(sch.alpha(t_next) * x0 + sch.sigma(t_next) * ctx.randn()))

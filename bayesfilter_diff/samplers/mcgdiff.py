"""MCGdiff: Monte Carlo guided diffusion for linear inverse problems.

Cardoso, Janati, Le Corff & Moulines, "Monte Carlo guided Denoising Diffusion models for
Bayesian linear inverse problems", ICLR 2024 (arXiv 2308.07983). Reference code: the
released package gabrielvc/mcg_diff (``mcg_diff/particle_filter.py``, called **R** below)
and the code of the paper's Gaussian-mixture experiment, Badr-MOUFAD/hackathon_starter_kit
``src/inverse_problem_with_diffusion_prior/ipwdp/optimal_particle_filter.py`` (**P**).

Setting
-------
A linear operator with an SVD ``A = U diag(s) V^T`` (``r`` singular values) and
``y = A x + sigma_y n``. In the spectral basis ``x_bar = V^T x`` the first ``r`` coordinates
are observed: ``y_bar_i = (U^T y)_i / s_i = x_bar0_i + (sigma_y / s_i) n_i``; the other
``d - r`` coordinates are unobserved. The whole filter runs on ``x_bar`` (the network sees
``V x_bar``).

*Time of each observed coordinate.* ``alpha_t y_bar_i = alpha_t x_bar0_i + alpha_t
(sigma_y / s_i) n_i`` has the law of the forward-noised coordinate ``x_bar_t^i`` when
``sigma_t / alpha_t = sigma_y / s_i`` (for VP paths ``abar_tau = s_i^2 / (s_i^2 +
sigma_y^2)``). As in the code (``utils.get_taus_from_singular_values``), ``tau_i`` is the
grid time of the run minimising ``|sigma_y^2 alpha_t^2 - s_i^2 sigma_t^2|`` (the code's
``|var abar_t - (1 - abar_t) s_i^2|``; grid times with ``alpha_t = 0`` are excluded); in the
noiseless case ``tau_i = 0``. The grid is the run's own (``num_steps``, ``grid``).

*Potentials.* Coordinate ``i`` is *active* while ``t >= tau_i``:

    g_t^i(x_bar_t^i) = N(x_bar_t^i; alpha_t y_bar_i, v_t^i),
    v_t^i = sigma_{t|tau_i}^2 + kappa (alpha_t / alpha_{tau_i})^2,
    sigma_{t|tau}^2 = sigma_t^2 - (alpha_t / alpha_tau)^2 sigma_tau^2,

i.e. ``N(x_tau; alpha_tau y_bar, kappa)`` pushed forward from ``tau_i`` to ``t`` by the
noising path (for VP: ``v_t = 1 - (1 - kappa) abar_t / abar_tau``, the code's form). ``kappa``
(field ``kappa2``) is a *variance* in the code (``gaussian_var``).

*Feynman-Kac model.* With the prior's DDIM kernel ``p(x_s | x_t) = N(mu_t(x_t), std_t^2 I)``
(``samplers/base.py``, field ``eta``) on the grid ``t_0 > ... > t_n`` and ``A_k = {i : t_k >=
tau_i}`` (``A_{k+1}`` is a subset of ``A_k``), the intermediate targets are

    gamma_k(x_{0:k}) = p(x_{0:k}) prod_{i in A_k} g_k^i(x_k^i)
                       prod_{i not in A_k} g_{tau_i}^i(x_{tau_i}^i):

a coordinate that leaves the active set keeps its last potential ``g_{tau_i}^i = N(.;
alpha_tau y_bar_i, kappa)``. The algorithm is the fully adapted auxiliary particle filter
for it (as implemented in R and P):

1. weight ``w_k = int p(x_{k+1} | x_k) prod_{A_{k+1}} g_{k+1}^i dx_{k+1} / prod_{A_{k+1}}
   g_k^i(x_k^i)``, i.e. per active coordinate ``N(mu^i; alpha_{k+1} y_bar_i, std^2 + v_{k+1}^i)
   / N(x_k^i; alpha_k y_bar_i, v_k^i)``;
2. resample (multinomially, at every step in the code);
3. move with the optimal kernel ``p(x_{k+1} | x_k) prod g_{k+1}^i``: for active ``i``,
   ``K = std^2 / (std^2 + v)``, ``x^i = K alpha_{k+1} y_bar_i + (1 - K) mu^i + sqrt(K v) z``;
   every other coordinate follows the prior kernel ``mu^i + std z``.

The first target samples ``x_{t_0}`` from ``N(0, sigma_{t_0}^2 I)`` times ``g_{t_0}`` (a
product of Gaussians per observed coordinate; its normaliser enters the evidence). In the
shared loop (weight -> resample -> move) step 1 is the look-ahead potential
(:meth:`MCGdiff.lookahead`); the prior mean ``mu_k`` it needs is computed at the end of the
previous move (or in ``init``) and kept in the state for the move, so the sampler costs one
network call per step, as DDIM.

*Final weight (derived here; differs from the code).* If the model's backward chain has the
forward process's joint law (exact denoiser, ``eta = 1``, fine grid), the ``x_bar^i_{tau_i}``
are independent given ``x0`` with law ``N(alpha_tau x_bar0^i, sigma_tau^2)``, so the
``x0``-marginal of ``gamma_n`` is

    p(x0) prod_i N(alpha_{tau_i} y_bar_i; alpha_{tau_i} x_bar0^i, sigma_{tau_i}^2 + kappa)
      ∝ p(x0) prod_i N(y_bar_i; x_bar0^i, c_i),   c_i = (sigma_{tau_i}^2 + kappa) / alpha_{tau_i}^2.

This is the posterior up to the observation variance: ``c_i`` instead of ``a_i =
sigma_y^2 / s_i^2`` (equal when ``tau_i`` solves ``sigma/alpha = sigma_y/s_i`` exactly and
``kappa -> 0``). The likelihood is thus already in the target and must not be applied again;
the exact final weight corrects only the variance:

    w_final(x0) = prod_{i <= r} N(y_bar_i; x_bar0^i, a_i) / N(y_bar_i; x_bar0^i, c_i),

which removes both the snapping of ``tau_i`` to the grid and the ``kappa`` inflation, so the
weighted particles target ``p(x0 | y)`` as ``N -> inf`` (up to the discretisation of the
backward chain). The constant ``sum_i (log alpha_{tau_i} - log s_i)`` and the component of
``y`` outside ``range(A)`` (``N(u_i^T y; 0, sigma_y^2)``, ``i > r``) are added to the last
increment, so ``Result.log_evidence`` estimates ``log p(y)``.

R instead returns ``log p(y | x0) - log g_{tau_min}(x_bar_{tau_min})`` (noisy case) or
``-log g_0(x_bar_0)`` (noiseless), which counts the likelihood twice and divides by a
sharply peaked potential (final ESS of a few particles in the research notes' toy); P ignores
the final weights and returns the cloud. R also divides by ``g_{tau_i}`` inside the loop when
coordinate ``i`` leaves the active set (its denominator runs over ``A_k``); we follow P
(denominator over ``A_{k+1}``), which is what the Feynman-Kac model above requires. R starts
from ``N(0, I)`` but still divides by ``g_T`` at the first step; we sample from
``N(0, sigma_T^2) g_T``.

Noiseless case (``sigma_y = 0``): every ``tau_i = 0``, the target is ``p(x0) N(x_bar0^{1:r};
y_bar, kappa)`` (no correction is possible) and, as in P, the observed coordinates are set to
``y_bar`` at the end, so ``A x0 = y`` holds to rounding error while the unobserved coordinates
keep their ``kappa``-relaxed law (error ``O(kappa)`` instead of ``O(sqrt(kappa))``).

Defaults and their source
-------------------------
- ``eta = 1.0`` (R's default). The paper's GMM experiment (P ``gmm.py``) uses ``eta = 0.6``
  at 20 steps and ``0.85`` at 100 steps. With ``eta < 1`` the backward chain has the right
  marginals but not the forward process's joint law of ``(x_tau, x0)``, which the noisy case
  relies on (the observation is moved to time ``tau``): the sampler is then biased even as
  the number of steps grows. The noiseless case only needs the marginal at ``t = 0`` and
  converges with any ``eta``. Closed form on the Gaussian test problem of
  ``tests/test_mcgdiff.py`` (``sigma_y = 0.5``, VP linear, uniform grid), largest relative
  error of a posterior variance: ``eta = 1``: 0.35 (50 steps), 0.068 (400);
  ``eta = 0.6``: 0.63 (50), 0.51 (400). The ``eta = 1`` error is the DDPM kernel's variance
  deficit on a coarse grid (``O(1 / steps)``; the prior chain alone loses 14% of the variance
  of ``N(0, 1)`` data at 50 uniform steps), concentrated below ``tau``, where few grid points
  lie; the posterior mean is barely affected (< 0.02 posterior sd at 50 steps).
- ``kappa2 = 1e-4``: the paper's value (as reported to us; the paper text was not
  available here) and R's default. The paper's GMM experiment ran with
  ``1e-2`` (P's ``particle_filter`` default, not overridden in ``gmm.py``); the toys in R and
  the benchmark B use ``1e-6`` / ``1e-8``. In the noiseless case the last move is
  deterministic on VP / flow paths, so its weight ``N(mu; y_bar, kappa)`` alone selects the
  particles: small ``kappa`` means few survivors (step ESS ~16 of 500 at 50 steps with
  ``1e-4`` on the test problem).
- ``resampling = "systematic"``, ``ess_threshold = 1.0``: resampling at every step as in the
  code, which resamples multinomially (``resampling="multinomial"`` reproduces it); we
  default to systematic resampling for the reason below. After the last coordinate leaves the active set the weights are
  uniform: R then stops resampling, P keeps resampling every step, as the shared loop does
  with ``ess_threshold = 1``. The target is unchanged but the genealogy collapses: on a 4-d
  Gaussian problem (N = 1000, replicate runs) the effective sample size of the posterior-mean
  estimate is only ~40-70 at 50 steps and ~10-20 at 200 steps, while the ESS of the final
  weights is ~N. ``resampling="systematic"`` (a no-op for uniform weights) gives 3-8x more
  (~130-450 at 50 steps, ~70-240 at 200) for the same cost, and is recommended.
- ``grid``: the run's grid (``"uniform"`` by default). The code's "adapted" grid (uniform in
  ``sqrt(abar)``) is not reproduced. The code means to insert the ``tau_i`` into the grid but
  the insertion has no effect (a ``torch.unique`` bug, see the research notes). We do insert
  them (``insert_tau``, default 8 extra grid times, so ``nfe = num_steps + inserted``): the
  exact ``tau_i`` solving ``sigma_t / alpha_t = sigma_y / s_i`` (bisection on the log-SNR)
  that fall strictly inside the grid, all of them when there are at most ``insert_tau``
  distinct values (one for a mask, a downsampling or denoising, ``d_y`` for the benchmark),
  otherwise ``insert_tau`` of them at evenly spaced ranks. Without it a small ``sigma_y``
  puts ``tau_i`` below the first positive grid time (``sigma_y = 0.05`` on a 50-step uniform
  VP grid), the coordinates snap to ``t = 0``, their potential is the ``kappa``-narrow one
  all along, and the particles collapse onto one (measured on digit inpainting:
  ``validation/results/imaging``). The final weight corrects any remaining snapping.
- Noisy problems with ``sigma_y > 0`` and noiseless ones are both supported; Gaussian noise
  and an operator with an SVD are required.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..schedules import Schedule
from .base import Context, Move, Requirements, SMCSampler
from .kernels import LOG2PI, ddim_coefficients, ddim_mean, log_normal

__all__ = ["MCGdiff", "exact_observation_times", "observation_time_indices"]


def observation_time_indices(
    schedule: Schedule, times: Tensor, singular_values: Tensor, noise_std: float
) -> Tensor:
    """Grid index of ``tau_i`` for each observed spectral coordinate.

    ``tau_i`` is the grid time minimising ``|sigma_y^2 alpha_t^2 - s_i^2 sigma_t^2|`` (where
    ``sigma_t / alpha_t = sigma_y / s_i``), among the times with ``alpha_t > 0``; for
    ``noise_std = 0`` it is the last grid time (``t = t_min``, normally 0).

    Parameters
    ----------
    schedule
        The noising path.
    times
        Decreasing grid ``(n + 1,)``.
    singular_values
        ``(r,)``, all positive.
    noise_std
        ``sigma_y >= 0``.

    Returns
    -------
    Tensor
        Long tensor ``(r,)`` of indices into ``times``.
    """
    n = times.numel() - 1
    r = singular_values.numel()
    if noise_std == 0:
        return torch.full((r,), n, dtype=torch.long, device=times.device)
    a, s = schedule.alpha(times), schedule.sigma(times)
    dist = (noise_std**2 * a**2 - singular_values[:, None] ** 2 * s**2).abs()
    dist = torch.where(a > 0, dist, torch.full_like(dist, math.inf))
    return dist.argmin(dim=1)


def exact_observation_times(
    schedule: Schedule, singular_values: Tensor, noise_std: float, t_min: Tensor, t_max: Tensor
) -> Tensor:
    """The times ``tau_i`` in ``[t_min, t_max]`` with ``sigma_t / alpha_t = sigma_y / s_i``.

    Bisection (64 halvings, batched over ``i``) on the decreasing log-SNR:
    ``log_snr(tau_i) = 2 log(s_i / sigma_y)``; clamped to the interval's ends.
    """
    target = 2 * (torch.log(singular_values) - math.log(noise_std))
    lo = torch.full_like(singular_values, float(t_min))
    hi = torch.full_like(singular_values, float(t_max))
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        above = schedule.log_snr(mid) > target  # tau is later than mid
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class MCGdiffSetup:
    """Per-run constants of MCGdiff (grid index ``k``, observed coordinate ``i <= r``)."""

    alpha: Tensor  # (n + 1,) alpha_{t_k}
    sigma: Tensor  # (n + 1,) sigma_{t_k}
    s: Tensor  # (r,) singular values
    k_tau: Tensor  # (r,) grid index of tau_i
    ybar: Tensor  # (B, r) y_bar = (U^T y)_{:r} / s
    v: Tensor  # (n + 1, r) potential variances v_k^i (1 where inactive)
    active: Tensor  # (n + 1, r) bool, t_k >= tau_i
    c: Tensor  # (r,) implicit observation variance of the target, c_i
    a: Tensor  # (r,) true observation variance a_i = sigma_y^2 / s_i^2
    const: Tensor  # (B,) log-evidence constant of the final weight

    @property
    def r(self) -> int:
        return self.s.numel()


@dataclass(frozen=True)
class MCGdiffState:
    """Spectral particles ``x_bar = V^T x`` and the prior mean ``mu_k`` of the next move."""

    xbar: Tensor
    mu: Tensor


@dataclass(frozen=True)
class MCGdiffInfo:
    """The observation time ``tau_i`` of every observed coordinate, and its grid index."""

    tau: Tensor
    tau_index: Tensor


@dataclass(frozen=True)
class MCGdiff(SMCSampler):
    """MCGdiff (Cardoso et al., ICLR 2024) for linear operators with an SVD.

    Parameters
    ----------
    num_steps, grid
        Time grid of the run (inherited).
    eta
        DDIM parameter of the prior's backward kernel in ``[0, 1]`` (``1``: ancestral / DDPM,
        the default). The noisy case is consistent only for ``eta = 1`` (module docstring).
    kappa2
        Variance ``kappa`` of the potential at ``t = tau_i`` (the code's ``gaussian_var``).
    resampling, ess_threshold
        Resampling scheme and ESS trigger; ``1.0`` resamples at every step (the code).
    insert_tau
        At most this many exact observation times ``tau_i`` are added to the grid (one
        network call each; ``0``: none). See the module docstring.
    """

    requires = Requirements(svd=True)
    exact = True

    resampling: str = "systematic"
    ess_threshold: float = 1.0
    eta: float = 1.0
    kappa2: float = 1e-4
    insert_tau: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        if not (math.isfinite(float(self.kappa2)) and float(self.kappa2) > 0):
            raise ValueError(f"kappa2 must be a finite number > 0, got {self.kappa2!r}")
        if isinstance(self.insert_tau, bool) or not isinstance(self.insert_tau, int):
            raise ValueError(f"insert_tau must be an integer >= 0, got {self.insert_tau!r}")
        if self.insert_tau < 0:
            raise ValueError(f"insert_tau must be an integer >= 0, got {self.insert_tau!r}")

    def time_grid(self, prior, problem) -> Tensor:
        """The run's grid with up to ``insert_tau`` exact observation times added."""
        base = super().time_grid(prior, problem)
        sy = float(problem.noise_std)
        if self.insert_tau == 0 or sy == 0:
            return base
        s = problem.operator.singular_values().to(base.dtype)
        tau = exact_observation_times(prior.schedule, s, sy, base[-1], base[0])
        # not already (to rounding) a grid time
        gap = (tau[:, None] - base[None, :]).abs().min(dim=1).values
        new = torch.unique(tau[gap > 1e-6 * (base[0] - base[-1])])  # ascending
        if new.numel() > self.insert_tau:
            pick = torch.linspace(0, new.numel() - 1, self.insert_tau, device=new.device)
            new = new[pick.round().long()]
        return torch.sort(torch.cat([base, new]), descending=True).values

    # ------------------------------------------------------------------ helpers
    def setup(self, ctx: Context) -> MCGdiffSetup:
        """The spectral data, the observation times and the potentials' variances."""
        op = ctx.problem.operator
        sch = ctx.prior.schedule
        times = ctx.times
        alpha, sigma = sch.alpha(times), sch.sigma(times)  # (n + 1,)
        s = op.singular_values().to(ctx.dtype)  # (r,)
        sy = float(ctx.problem.noise_std)
        k_tau = observation_time_indices(sch, times, s, sy)  # (r,)
        ytil = op.Ut(ctx.y)  # (B, m)
        r = s.numel()
        ybar = ytil[:, :r] / s  # (B, r)
        a_tau, s_tau = alpha[k_tau], sigma[k_tau]  # (r,)
        kap = float(self.kappa2)
        # v_k^i for every grid index k (meaningful where k <= k_tau_i): (n + 1, r)
        rho = alpha[:, None] / a_tau[None, :]
        v = (sigma[:, None] ** 2 - rho**2 * s_tau[None, :] ** 2).clamp_min(0) + kap * rho**2
        ks = torch.arange(times.numel(), device=times.device)
        active = ks[:, None] <= k_tau[None, :]  # (n + 1, r)
        v = torch.where(active, v, torch.ones_like(v))
        # final weight pieces: implicit variance c_i, true variance a_i, evidence constant
        c = (s_tau**2 + kap) / a_tau**2
        const = (torch.log(a_tau) - torch.log(s)).sum()
        if sy > 0:
            m = op.out_dim
            rest = (ytil**2).sum(-1) - (ytil[:, :r] ** 2).sum(-1)  # |(I - U_r U_r^T) y|^2
            const = (
                const - 0.5 * rest.clamp_min(0) / sy**2 - 0.5 * (m - r) * (math.log(sy**2) + LOG2PI)
            )
        return MCGdiffSetup(
            alpha, sigma, s, k_tau, ybar, v, active, c, (sy / s) ** 2, const.expand(ctx.B)
        )

    def _predict(self, ctx: Context, xb: Tensor, k: int) -> Tensor:
        """Prior DDIM mean ``mu_k(x_bar)`` ``(B, N, d)`` of the move ``k -> k+1``."""
        op = ctx.problem.operator
        sch = ctx.prior.schedule
        t, t_next = ctx.times[k], ctx.times[k + 1]
        x0b = op.Vt(ctx.denoise(op.V(xb), t))
        coef = ddim_coefficients(sch, t, t_next, float(self.eta))
        return ddim_mean(xb, x0b, coef, sch.sigma(t))

    # ------------------------------------------------------------------ interface
    def init(self, ctx: Context, setup: MCGdiffSetup) -> tuple[MCGdiffState, Tensor]:
        c = setup
        r, d = c.r, ctx.problem.operator.in_dim
        B, N = ctx.B, ctx.N
        # x_{t_0} ~ N(0, sigma_0^2 I) g_0: a Gaussian product on the observed coordinates
        s0sq = c.sigma[0] ** 2
        m0 = c.alpha[0] * c.ybar  # (B, r)
        v0 = c.v[0]  # (r,)  (every observed coordinate is active at t_0)
        var = s0sq * v0 / (s0sq + v0)
        mean = m0 * s0sq / (s0sq + v0)
        z = ctx.randn((B, N, d))
        xb = c.sigma[0] * z
        xb = torch.cat([mean[:, None, :] + var.sqrt() * z[..., :r], xb[..., r:]], dim=-1)
        log_norm = log_normal(m0, torch.zeros_like(m0), s0sq + v0).sum(-1)  # (B,)
        return MCGdiffState(xb, self._predict(ctx, xb, 0)), log_norm[:, None].expand(B, N)

    def lookahead(self, ctx: Context, setup: MCGdiffSetup, state: MCGdiffState, k: int) -> Tensor:
        """Step 1: ``log int p(x'|x) g_{k+1}(x') dx' - log g_k(x)`` over ``A_{k+1}``."""
        c = setup
        r = c.r
        t, t_next = ctx.times[k], ctx.times[k + 1]
        std = ddim_coefficients(ctx.prior.schedule, t, t_next, float(self.eta)).std
        act = c.active[k + 1]  # (r,)
        ybar = c.ybar[:, None, :]  # (B, 1, r)
        num = log_normal(state.mu[..., :r], c.alpha[k + 1] * ybar, std**2 + c.v[k + 1])
        den = log_normal(state.xbar[..., :r], c.alpha[k] * ybar, c.v[k])
        return torch.where(act, num - den, torch.zeros_like(num)).sum(-1)

    def move(self, ctx: Context, setup: MCGdiffSetup, state: MCGdiffState, k: int, t, t_next):
        c = setup
        r = c.r
        n = ctx.times.numel() - 1
        xb, mu = state.xbar, state.mu
        std = ddim_coefficients(ctx.prior.schedule, t, t_next, float(self.eta)).std
        # Step 3: move k -> k+1 with the optimal kernel on the active coordinates (step 2,
        # the ancestors, was done by the loop from the look-ahead weights of step 1).
        z = ctx.randn(xb.shape)
        x_new = mu + std * z
        act = c.active[k + 1]
        v = c.v[k + 1]
        m = c.alpha[k + 1] * c.ybar[:, None, :]
        K = std**2 / (std**2 + v)
        obs = K * m + (1 - K) * mu[..., :r] + (K * v).sqrt() * z[..., :r]
        x_new = torch.cat([torch.where(act, obs, x_new[..., :r]), x_new[..., r:]], dim=-1)
        # the prior mean of the next move (one network call), read by its look-ahead
        mu_new = mu if k + 1 == n else self._predict(ctx, x_new, k + 1)
        return Move(MCGdiffState(x_new, mu_new))

    def finalize(
        self, ctx: Context, setup: MCGdiffSetup, state: MCGdiffState
    ) -> tuple[Tensor, Tensor]:
        c = setup
        r = c.r
        xb = state.xbar
        ybar = c.ybar[:, None, :]
        B, N = xb.shape[:2]
        if ctx.problem.noise_std > 0:
            # Final weight: the target carries N(y_bar; x_bar0, c_i); swap in a_i.
            lw = (log_normal(ybar, xb[..., :r], c.a) - log_normal(ybar, xb[..., :r], c.c)).sum(-1)
        else:
            # Noiseless: set the observed coordinates to y_bar (A x0 = y exactly).
            xb = torch.cat([ybar.expand(B, N, r), xb[..., r:]], dim=-1)
            lw = torch.zeros((B, N), dtype=xb.dtype, device=xb.device)
        return ctx.problem.operator.V(xb), lw + c.const[:, None]

    def run_info(self, ctx: Context, setup: MCGdiffSetup) -> MCGdiffInfo:
        return MCGdiffInfo(ctx.times[setup.k_tau], setup.k_tau)

"""MCGdiff: Monte Carlo guided diffusion for linear inverse problems.

Cardoso, Janati, Le Corff & Moulines, "Monte Carlo guided Denoising Diffusion models for
Bayesian linear inverse problems", ICLR 2024 (arXiv 2308.07983). Reference code: the
released package gabrielvc/mcg_diff (``mcg_diff/particle_filter.py``, called **R** below)
and the code of the paper's Gaussian-mixture experiment, Badr-MOUFAD/hackathon_starter_kit
``src/inverse_problem_with_diffusion_prior/ipwdp/optimal_particle_filter.py`` (**P**). See
``docs/methods/mcgdiff.md``.

Update
------
For ``y = A x + sigma_y n`` with ``A = U diag(s) V^T`` (``r`` singular values) the filter runs
on the spectral coordinates ``x_bar = V^T x`` (the network sees ``V x_bar``); the first ``r``
are observed through ``y_bar_i = (U^T y)_i / s_i = x_bar0_i + (sigma_y / s_i) n_i``
(:mod:`.spectral`). ``alpha_t y_bar_i`` has the law of the noised ``x_bar_t^i`` when
``sigma_t / alpha_t = sigma_y / s_i``: ``tau_i`` is the grid time minimising
``|sigma_y^2 alpha_t^2 - s_i^2 sigma_t^2|`` (``0`` when noiseless). Coordinate ``i`` is
*active* while ``t >= tau_i``, with the potential::

    g_t^i(x_bar_t^i) = N(x_bar_t^i; alpha_t y_bar_i, v_t^i),
    v_t^i = sigma_{t|tau_i}^2 + kappa (alpha_t / alpha_{tau_i})^2,
    sigma_{t|tau}^2 = sigma_t^2 - (alpha_t / alpha_tau)^2 sigma_tau^2.

With the prior's DDIM kernel ``p(x_s | x_t) = N(mu_t(x_t), std_t^2 I)`` (:mod:`.kernels`, field
``eta``) on the grid ``t_0 > ... > t_n`` and ``A_k = {i : t_k >= tau_i}``, the targets are
``gamma_k(x_{0:k}) = p(x_{0:k}) prod_{i in A_k} g_k^i(x_k^i) prod_{i not in A_k}
g_{tau_i}^i(x_{tau_i}^i)``, and the sampler is their fully adapted auxiliary particle
filter. Start: ``x_{t_0} ~ N(0, sigma_{t_0}^2 I) g_{t_0}`` (a Gaussian product per observed
coordinate; its normaliser enters the evidence). Then for each ``k``:

1. weight (:meth:`MCGdiff.lookahead`): per coordinate of ``A_{k+1}``,
   ``N(mu^i; alpha_{k+1} y_bar_i, std^2 + v_{k+1}^i) / N(x_k^i; alpha_k y_bar_i, v_k^i)``;
2. resample;
3. move with the optimal kernel ``p(x_{k+1} | x_k) prod g_{k+1}^i``
   (:func:`.spectral.gaussian_product`): for active ``i``, ``K = std^2 / (std^2 + v)``,
   ``x^i = K alpha_{k+1} y_bar_i + (1 - K) mu^i + sqrt(K v) z``; every other coordinate
   ``mu^i + std z``. The prior mean of the next move is computed here (one network call
   per step).
4. Final weight (derived here; differs from the code): the target's ``x0``-marginal carries
   ``N(y_bar_i; x_bar0^i, c_i)``, ``c_i = (sigma_{tau_i}^2 + kappa) / alpha_{tau_i}^2``, in
   place of the likelihood's ``a_i = sigma_y^2 / s_i^2``; the last weight swaps them::

       w_final(x0) = prod_{i <= r} N(y_bar_i; x_bar0^i, a_i) / N(y_bar_i; x_bar0^i, c_i),

   with the constant ``sum_i (log alpha_{tau_i} - log s_i)`` and the part of ``y`` outside
   ``range(A)``, so that ``Result.log_evidence`` estimates ``log p(y)``. Noiseless
   (``sigma_y = 0``): no correction; the observed coordinates are set to ``y_bar`` at the
   end (``A x0 = y``), as P.

Defaults and departures
-----------------------
- ``eta = 1`` (R's default): the noisy case is consistent only for ``eta = 1`` (the paper's
  GMM experiment used 0.6 / 0.85).
- ``kappa2 = 1e-4`` (the paper and R; the code's ``gaussian_var``, a variance).
- ``resampling = "systematic"`` at every step (``ess_threshold = 1``); the code resamples
  multinomially (``resampling="multinomial"``).
- ``insert_tau = 8``: up to 8 exact ``tau_i`` are added to the grid (the code means to, but
  does not), so ``nfe = num_steps + inserted``.
- The final weight of 4 (R counts the likelihood twice, P returns the unweighted cloud), the
  weight's denominator over ``A_{k+1}`` (as P; R's over ``A_k``), the start from
  ``N(0, sigma_T^2) g_T`` (R: ``N(0, I)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ..operators.base import LinearOperator
from .base import Context, Move, Requirements, SMCSampler
from .kernels import DDIMCoefficients, ddim_coefficients, log_normal, refine_in_log_snr, rowsq
from .spectral import (
    exact_observation_times,
    gaussian_product,
    observation_time_indices,
    out_of_range_log_likelihood,
    spectral_observation,
)

__all__ = ["MCGdiff", "exact_observation_times", "observation_time_indices"]


@dataclass(frozen=True)
class Layout:
    """Where the filter's coordinates live.

    In general the spectral coordinates ``x_bar = V^T x``, the observed ones first (the
    first ``r``): the network sees ``V x_bar``. For an operator whose SVD is diagonal in
    pixels (``op.pixel_svd``: masks, the identity) the pixel grid itself, the observed
    coordinates being the observed pixels: no ``V`` / ``V^T`` gathers of the full signal
    per step. The per-coordinate constants of the filter are kept on the *observed part*,
    ``part(x)``: the first ``r`` spectral coordinates, or every pixel (those off the range
    carry placeholders that ``observed`` masks out).
    """

    op: LinearOperator
    r: int
    pixels: bool
    coord: Tensor | None = None  # (d,) the spectral coordinate of each pixel (pixel layout)
    #: bool mask of the observed part (``None``: all of it is observed)
    observed: Tensor | None = None

    @staticmethod
    def of(op: LinearOperator, r: int, device: torch.device) -> Layout:
        if not op.pixel_svd:
            return Layout(op, r, False)
        d = op.in_dim
        idx = torch.arange(d, dtype=torch.float64, device=device)
        coord = op.flat_in(op.V(idx)).round().long()
        return Layout(op, r, True, coord, coord < r)

    def part(self, x: Tensor) -> Tensor:
        """The observed part ``(..., R)`` of coordinates ``(..., d)``."""
        return x if self.pixels else x[..., : self.r]

    def merge(self, part: Tensor, full: Tensor) -> Tensor:
        """Coordinates with ``part`` on the observed part and ``full`` elsewhere."""
        return part if self.pixels else torch.cat([part, full[..., self.r :]], dim=-1)

    def spread(self, v: Tensor, fill: float | bool, inv: Tensor | None = None) -> Tensor:
        """Per-coordinate values ``(..., r)`` on the observed part, ``fill`` elsewhere; with
        ``inv`` ``(r,)``, ``v`` ``(..., u)`` holds them per class and coordinate ``i`` reads
        ``v[..., inv[i]]`` (one gather, no ``(..., r)`` intermediate)."""
        if self.coord is None or self.observed is None:
            return v if inv is None else v.index_select(-1, inv)
        idx = self.coord.clamp(max=self.r - 1)
        out = v.index_select(-1, idx if inv is None else inv.index_select(0, idx))
        return torch.where(self.observed, out, torch.full_like(out, fill))

    def labels(self, inv: Tensor, u: int) -> Tensor:
        """``(R,)``: the class ``inv[i]`` of each coordinate of the observed part, and ``u``
        (a class of its own) for the pixels off the range."""
        if self.coord is None or self.observed is None:
            return inv
        return torch.where(self.observed, inv.index_select(0, self.coord.clamp(max=self.r - 1)), u)

    def to_signal(self, xb: Tensor) -> Tensor:
        if self.pixels:
            return xb.reshape(xb.shape[:-1] + tuple(self.op.in_shape))
        return self.op.V(xb)

    def from_signal(self, x: Tensor) -> Tensor:
        return self.op.flat_in(x) if self.pixels else self.op.Vt(x)


@dataclass(frozen=True)
class MCGdiffSetup:
    """Per-run constants of MCGdiff (grid index ``k``; the per-coordinate ones on the
    layout's observed part, ``R`` = ``r`` spectral coordinates or ``d`` pixels)."""

    alpha: Tensor  # (n + 1,) alpha_{t_k}
    sigma: Tensor  # (n + 1,) sigma_{t_k}
    s: Tensor  # (r,) singular values
    k_tau: Tensor  # (r,) grid index of tau_i
    ybar: Tensor  # (B, R) y_bar = (U^T y)_{:r} / s (0 off the range)
    v0: Tensor  # (R,) the first potentials' variances v_0^i (1 off the range)
    c: Tensor  # (R,) implicit observation variance of the target, c_i (1 off the range)
    a: Tensor  # (R,) true observation variance a_i = sigma_y^2 / s_i^2 (1 off the range)
    const: Tensor  # (B,) log-evidence constant of the final weight
    layout: Layout
    step: DDIMCoefficients[Tensor]  # the prior kernel of every step k -> k+1, (n,) each
    tables: MCGdiffTables  # every step's coefficients per class of coordinates

    @property
    def r(self) -> int:
        return self.s.numel()


@dataclass(frozen=True)
class MCGdiffTables:
    """Every step's per-coordinate coefficients, once per class of coordinates (the
    coordinates of one singular value share them; a mask has one class, and its pixels off
    the range a class of their own): ``(n, u + 1)`` each, read per step by one gather
    through ``label`` ``(R,)``. Step ``k`` (``times[k] -> times[k + 1]``, prior kernel std
    ``std_k``, potentials' variances ``v_k``, active set ``A_{k+1}``):

    - the move: ``gain = K = std_k^2 / (std_k^2 + v_{k+1})`` and ``sd = sqrt(K v_{k+1})`` on
      ``A_{k+1}``; ``K = 0`` and ``sd`` the tail std (observed, past ``tau_i``) or ``std_k``
      (off the range) elsewhere; ``gain_y = K alpha_{k+1}`` (the weight of ``y_bar``);
    - ``log g_k`` over ``A_{k+1}``: ``g0 = sqrt(1_A / v_k)``, ``g0_y = -alpha_k g0``;
    - the look-ahead: ``g1 = sqrt(1_A / (std_k^2 + v_{k+1}))``, ``g1_y = -alpha_{k+1} g1``,
      and its constant ``const`` ``(n,)``: ``-0.5 sum_{A_{k+1}} log((std_k^2 + v_{k+1}) /
      v_k)`` (per class times its size)."""

    label: Tensor
    gain: Tensor
    gain_y: Tensor
    sd: Tensor
    g0: Tensor
    g0_y: Tensor
    g1: Tensor
    g1_y: Tensor
    const: Tensor

    def at(self, k: int, *tables: Tensor) -> tuple[Tensor, ...]:
        """Step ``k``'s row of each of ``tables``, per coordinate ``(R,)`` (``index_select``:
        several times faster on the CPU than indexing with ``label``)."""
        return tuple(t[k].index_select(0, self.label) for t in tables)


@dataclass(frozen=True)
class MCGdiffState:
    """The prior mean ``mu_k`` of the next move and ``log g_k(x_bar_k)`` over ``A_{k+1}``
    (the look-ahead's denominator, ``(B, N)``, read when the particles are drawn); the
    particles ``x_bar = V^T x`` themselves only after the last move: between steps nothing
    reads them, so resampling does not copy them."""

    mu: Tensor
    log_g: Tensor
    xbar: Tensor | None = None


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
        the default). The noisy case is consistent only for ``eta = 1`` (docs/methods/mcgdiff.md).
    kappa2
        Variance ``kappa`` of the potential at ``t = tau_i`` (the code's ``gaussian_var``),
        at most ``kappa_rel sigma_y^2 / s_max^2`` (noisy case).
    kappa_rel
        Cap of ``kappa`` relative to the sharpest observation variance ``sigma_y^2 / s_max^2``
        (default 1e-2; inactive on the benchmark's noise levels, decisive below
        ``sigma_y / s_max = 1e-2``).
    resampling, ess_threshold
        Resampling scheme and ESS trigger; ``1.0`` resamples at every step (the code).
    insert_tau
        At most this many exact observation times ``tau_i`` are added to the grid (one
        network call each; ``0``: none). See docs/methods/mcgdiff.md.
    max_log_snr_step
        Above the smallest observation time, no grid step spans more than this in log-SNR
        ``log(alpha^2 / sigma^2)``: times are inserted (one network call each) where the
        run's grid is coarser, which it is near ``t = 0`` on a uniform grid when
        ``sigma_y`` is small. ``0`` disables it. See docs/methods/mcgdiff.md.
    tail_variance
        The backward kernel's variance for an observed coordinate after its time ``tau_i``:
        ``"flat"`` (default) the exact reverse variance of a locally flat prior,
        ``alpha_s^2 (sigma_t^2 / alpha_t^2 - sigma_s^2 / alpha_s^2)``; ``"ddpm"`` the
        ancestral (DDIM ``eta``) variance of the reference code, which drops the term
        ``b^2 Var[x0 | x_t]`` and so loses a fraction of the posterior variance that does
        not vanish with the grid below ``tau`` (docs/methods/mcgdiff.md, "Tail variance").
    """

    requires = Requirements(svd=True)
    exact = True

    resampling: str = "systematic"
    ess_threshold: float = 1.0
    eta: float = 1.0
    kappa2: float = 1e-4
    kappa_rel: float = 1e-2
    insert_tau: int = 8
    tail_variance: str = "flat"
    max_log_snr_step: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        if not (math.isfinite(float(self.kappa2)) and float(self.kappa2) > 0):
            raise ValueError(f"kappa2 must be a finite number > 0, got {self.kappa2!r}")
        if not (math.isfinite(float(self.kappa_rel)) and float(self.kappa_rel) > 0):
            raise ValueError(f"kappa_rel must be a finite number > 0, got {self.kappa_rel!r}")
        if isinstance(self.insert_tau, bool) or not isinstance(self.insert_tau, int):
            raise ValueError(f"insert_tau must be an integer >= 0, got {self.insert_tau!r}")
        if self.insert_tau < 0:
            raise ValueError(f"insert_tau must be an integer >= 0, got {self.insert_tau!r}")
        if not (math.isfinite(float(self.max_log_snr_step)) and self.max_log_snr_step >= 0):
            raise ValueError(
                f"max_log_snr_step must be a finite number >= 0, got {self.max_log_snr_step!r}"
            )
        if self.tail_variance not in ("flat", "ddpm"):
            raise ValueError(f"tail_variance must be 'flat' or 'ddpm', got {self.tail_variance!r}")

    def time_grid(self, prior, problem) -> Tensor:
        """The run's grid with up to ``insert_tau`` exact observation times added, refined
        in log-SNR above the smallest of them (``max_log_snr_step``)."""
        base = super().time_grid(prior, problem)
        sy = float(problem.noise_std)
        if sy == 0:
            return base
        s = problem.operator.singular_values().to(base.dtype)
        tau = exact_observation_times(prior.schedule, s, sy, base[-1], base[0])
        times = base
        if self.insert_tau > 0:
            # not already (to rounding, in log-SNR: tau may lie within 1e-9 of t = 0) a
            # grid time
            tau_u = torch.unique(tau)  # ascending (a mask: one time, not d)
            lt, lb = prior.schedule.log_snr(tau_u), prior.schedule.log_snr(base)
            gap = (lt[:, None] - lb[None, :]).abs().nan_to_num(nan=math.inf).min(dim=1).values
            new = tau_u[gap > 1e-6]
            if new.numel() > self.insert_tau:
                pick = torch.linspace(0, new.numel() - 1, self.insert_tau, device=new.device)
                new = new[pick.round().long()]
            times = torch.sort(torch.cat([base, new]), descending=True).values
        if self.max_log_snr_step > 0:
            times = self._refine(prior.schedule, times, float(tau.min()))
        return times

    def _refine(self, schedule, times: Tensor, tau_min: float) -> Tensor:
        """Refine (``refine_in_log_snr``) the steps at or above ``tau_min``, where the
        potentials are active, to ``max_log_snr_step`` in log-SNR: an informative
        coordinate's potential sharpens with the log-SNR, and a step across much of it
        degenerates the look-ahead weights."""
        return refine_in_log_snr(schedule, times, times[1:] >= tau_min, self.max_log_snr_step)

    # ------------------------------------------------------------------ helpers
    def potential_variance(self, singular_values: Tensor, noise_std: float) -> float:
        """``kappa = min(kappa2, kappa_rel sigma_y^2 / s_max^2)``: the potentials' variance,
        never wider than a fraction of the sharpest observation's variance (the final weight
        swaps ``kappa`` for the observation variance and cannot narrow the cloud: with a
        fixed ``1e-4`` it degenerates as soon as ``sigma_y / s_max < 1e-2``)."""
        kap = float(self.kappa2)
        if noise_std > 0:
            kap = min(kap, float(self.kappa_rel) * noise_std**2 / float(singular_values.max()) ** 2)
        return kap

    def setup(self, ctx: Context) -> MCGdiffSetup:
        """The spectral data, the observation times and the potentials' variances."""
        op = cast(LinearOperator, ctx.problem.operator)
        sch = ctx.prior.schedule
        times = ctx.times
        alpha, sigma = sch.alpha(times), sch.sigma(times)  # (n + 1,)
        obs = spectral_observation(op, ctx.y, ctx.dtype)  # s (r,), U^T y (B, m), y_bar (B, r)
        s, ybar, r = obs.s, obs.y_bar, obs.r
        sy = float(ctx.problem.noise_std)
        k_tau = observation_time_indices(sch, times, s, sy)  # (r,)
        a_tau = alpha[k_tau]  # (r,)
        kap = self.potential_variance(s, sy)
        # the per-coordinate tables depend on s_i only through tau_i: computed once per
        # distinct singular value (a mask's are all 1) and read through `inv`
        su, inv, counts = torch.unique(s, return_inverse=True, return_counts=True)
        k_u = k_tau.new_zeros(su.numel()).scatter_(0, inv, k_tau)  # (u,) tau's index
        au, su_tau = alpha[k_u], sigma[k_u]
        # v_k^i for every grid index k (meaningful where k <= k_tau_i): (n + 1, u)
        rho = alpha[:, None] / au[None, :]
        v = (sigma[:, None] ** 2 - rho**2 * su_tau[None, :] ** 2).clamp_min(0) + kap * rho**2
        ks = torch.arange(times.numel(), device=times.device)
        active = ks[:, None] <= k_u[None, :]  # (n + 1, u)
        v = torch.where(active, v, torch.ones_like(v))
        # final weight pieces: implicit variance c_i, true variance a_i, evidence constant
        c = (su_tau**2 + kap) / au**2
        const = (torch.log(a_tau) - torch.log(s)).sum()
        if sy > 0:
            # the part of y outside range(A): N(u_i^T y; 0, sigma_y^2), i > r
            const = const + out_of_range_log_likelihood(obs.y_tilde, r, sy**2)
        lay = Layout.of(op, r, ybar.device)
        # the prior kernel and the tail std of every step, once (not per step and call)
        step = ddim_coefficients(sch, times[:-1], times[1:], float(self.eta))
        tail = self._tail_std(ctx, times[:-1], times[1:]) if self.tail_variance == "flat" else None
        tables = self._tables(lay.labels(inv, su.numel()), counts, alpha, v, active, step, tail)
        return MCGdiffSetup(
            alpha,
            sigma,
            s,
            k_tau,
            lay.spread(ybar, 0.0),
            lay.spread(v[0], 1.0, inv),
            lay.spread(c, 1.0, inv),
            lay.spread((sy / su) ** 2, 1.0, inv),
            const.expand(ctx.B),
            lay,
            step,
            tables,
        )

    @staticmethod
    def _tables(
        label: Tensor,
        counts: Tensor,
        alpha: Tensor,
        v: Tensor,
        active: Tensor,
        step: DDIMCoefficients[Tensor],
        tail: Tensor | None,
    ) -> MCGdiffTables:
        """:class:`MCGdiffTables` from the per-class ``v`` and ``active`` ``(n + 1, u)``."""
        std2 = step.std[:, None] ** 2  # (n, 1)
        act = active[1:].to(v.dtype)  # (n, u): A_{k+1}
        v1, v0 = v[1:], v[:-1]
        gain = std2 / (std2 + v1)
        flat = (step.std if tail is None else tail)[:, None].expand_as(gain)
        K = torch.where(active[1:], gain, torch.zeros_like(gain))
        sd = torch.where(active[1:], (gain * v1).sqrt(), flat)
        g0 = (act / v0).sqrt()
        w1 = std2 + v1
        g1 = (act / w1).sqrt()
        const = -0.5 * (counts.to(v.dtype) * act * torch.log(w1 / v0)).sum(-1)

        def off(t: Tensor, fill: Tensor | float) -> Tensor:  # column u: pixels off the range
            col = torch.as_tensor(fill, dtype=t.dtype, device=t.device).expand(t.shape[0], 1)
            return torch.cat([t, col], dim=1)

        a1, a0 = alpha[1:, None], alpha[:-1, None]
        return MCGdiffTables(
            label,
            off(K, 0.0),
            off(K * a1, 0.0),
            off(sd, step.std[:, None]),
            off(g0, 0.0),
            off(-a0 * g0, 0.0),
            off(g1, 0.0),
            off(-a1 * g1, 0.0),
            const,
        )

    def _predict(self, ctx: Context, setup: MCGdiffSetup, xb: Tensor, k: int) -> Tensor:
        """Prior DDIM mean ``mu_k(x_bar)`` ``(B, N, d)`` of the move ``k -> k+1``."""
        lay = setup.layout
        coef = DDIMCoefficients(*(v[k] for v in setup.step))
        # the DDIM mean is linear in (x, x0_hat), so it commutes with the basis change; from
        # the network's own output (no eps -> x0 -> eps round trip)
        x = lay.to_signal(xb)
        return lay.from_signal(ctx.denoise_mean(x, ctx.times[k], coef, setup.sigma[k]))

    # ------------------------------------------------------------------ interface
    def init(self, ctx: Context, setup: MCGdiffSetup) -> tuple[MCGdiffState, Tensor]:
        c, lay = setup, setup.layout
        d = ctx.problem.operator.in_dim
        B, N = ctx.B, ctx.N
        # x_{t_0} ~ N(0, sigma_0^2 I) g_0: a Gaussian product on the observed coordinates
        # (every observed coordinate is active at t_0), N(x; 0, sigma_0^2) N(alpha_0 y_bar; x, v_0)
        m0 = c.alpha[0] * c.ybar  # (B, R)
        p = gaussian_product(0.0, c.sigma[0] ** 2, m0, c.v0)
        z = ctx.randn((B, N, d))
        xb = c.sigma[0] * z
        part = p.mean[:, None, :] + p.var.sqrt() * lay.part(z)
        lp = log_normal(m0, torch.zeros_like(m0), p.pred_var)  # (B, R)
        obs = lay.observed
        if obs is not None:  # pixels off the range keep the prior draw
            part = torch.where(obs, part, lay.part(xb))
            lp = torch.where(obs, lp, torch.zeros_like(lp))
        xb = lay.merge(part, xb)
        log_norm = lp.sum(-1)  # (B,)
        state = MCGdiffState(self._predict(ctx, c, xb, 0), self._log_potential(c, xb, 0))
        return state, log_norm[:, None].expand(B, N)

    @staticmethod
    def _log_potential(setup: MCGdiffSetup, xb: Tensor, k: int) -> Tensor:
        """``log g_k(x_bar_k)`` summed over ``A_{k+1}`` up to its log-variances, ``(B, N)``:
        the look-ahead's denominator at step ``k``."""
        tab = setup.tables
        g0, g0_y = tab.at(k, tab.g0, tab.g0_y)  # (R,): sqrt(1_A / v_k), -alpha_k times it
        # the residual written once, already weighted, and read once by a row-wise dot
        r0 = torch.addcmul(g0_y * setup.ybar[:, None, :], g0, setup.layout.part(xb))
        return -0.5 * rowsq(r0)

    def lookahead(self, ctx: Context, setup: MCGdiffSetup, state: MCGdiffState, k: int) -> Tensor:
        """Step 1: ``log int p(x'|x) g_{k+1}(x') dx' - log g_k(x)`` over ``A_{k+1}``."""
        tab = setup.tables
        # sum over A_{k+1} of log N(mu; alpha_{k+1} y_bar, w1) - log N(x; alpha_k y_bar, w0),
        # w1 = std_k^2 + v_{k+1}, w0 = v_k: two weighted sums of squares per particle (the
        # second, state.log_g, taken when x_k was drawn), the log-variances in the table's
        # constant (the residual written once, already weighted, and read once by a dot)
        g1, g1_y = tab.at(k, tab.g1, tab.g1_y)  # (R,): sqrt(1_A / w1), -alpha_{k+1} times it
        r1 = torch.addcmul(g1_y * setup.ybar[:, None, :], g1, setup.layout.part(state.mu))
        return -0.5 * rowsq(r1) - state.log_g + tab.const[k]

    @staticmethod
    def _tail_std(ctx: Context, t: Tensor, t_next: Tensor) -> Tensor:
        """``alpha_s sqrt(sig~_t^2 - sig~_s^2)``: the variance of ``x_s | x_t`` when the prior
        is flat on the scale ``sig~_t`` (the exact reverse transition then has the forward
        increment's variance; ``Var[x0 | x_t] = sig~_t^2``)."""
        sch = ctx.prior.schedule
        a_t, a_s = sch.alpha(t), sch.alpha(t_next)
        vt = (sch.sigma(t) / a_t) ** 2
        vs = (sch.sigma(t_next) / a_s) ** 2
        return a_s * (vt - vs).clamp_min(0).sqrt()

    def move(self, ctx: Context, setup: MCGdiffSetup, state: MCGdiffState, k: int, t, t_next):
        c, lay = setup, setup.layout
        n = ctx.times.numel() - 1
        mu = state.mu
        std = c.step.std[k]
        # Step 3: move k -> k+1 with the optimal kernel on the active coordinates (step 2,
        # the ancestors, was done by the loop from the look-ahead weights of step 1). Per
        # coordinate of the observed part, x = mu + K (alpha_{k+1} y_bar - mu) + sd z with:
        # - active: N(x; mu, std^2) N(alpha_{k+1} y_bar; x, v), K = std^2 / (std^2 + v),
        #   sd^2 = K v;
        # - observed, past its tau_i: the prior kernel, K = 0, with the locally flat reverse
        #   variance alpha_s^2 (sig~_t^2 - sig~_s^2), sig~ = sigma / alpha ("flat"), or std;
        # - off the range (pixel layout): the prior kernel, K = 0, sd = std.
        z = ctx.randn(mu.shape)
        tab = c.tables  # K, K alpha_{k+1} and sd per coordinate (MCGdiffTables)
        K, K_y, sd = tab.at(k, tab.gain, tab.gain_y, tab.sd)
        mu_o = lay.part(mu)
        # (1 - K) mu + K alpha y_bar + sd z
        target = K_y * c.ybar[:, None, :]  # (B, 1, R)
        if lay.pixels:  # in the noise's array, read here only: three passes in place
            x_new = lay.part(z).mul_(sd).addcmul_(1 - K, mu_o).add_(target)
        else:  # the prior kernel off the observed part, written over by it there (no cat)
            part = torch.addcmul(target, 1 - K, mu_o).addcmul_(sd, lay.part(z))
            x_new = torch.addcmul(mu, std, z)
            x_new[..., : lay.r] = part
        if k + 1 == n:  # the particles, for the final weight
            return Move(MCGdiffState(mu, state.log_g, x_new))
        # the prior mean of the next move (one network call) and log g_{k+1}(x_new), both
        # read by its look-ahead
        mu_new = self._predict(ctx, c, x_new, k + 1)
        return Move(MCGdiffState(mu_new, self._log_potential(c, x_new, k + 1)))

    def finalize(
        self, ctx: Context, setup: MCGdiffSetup, state: MCGdiffState
    ) -> tuple[Tensor, Tensor]:
        c, lay = setup, setup.layout
        xb = state.xbar
        assert xb is not None  # (the last move keeps the particles)
        ybar = c.ybar[:, None, :]
        B, N = xb.shape[:2]
        obs = lay.observed
        if ctx.problem.noise_std > 0:
            # Final weight: the target carries N(y_bar; x_bar0, c_i); swap in a_i.
            x_o = lay.part(xb)
            lw_i = log_normal(ybar, x_o, c.a) - log_normal(ybar, x_o, c.c)
            if obs is not None:
                lw_i = lw_i * obs.to(lw_i.dtype)
            lw = lw_i.sum(-1)
        else:
            # Noiseless: set the observed coordinates to y_bar (A x0 = y exactly).
            part = ybar.expand(B, N, ybar.shape[-1])
            if obs is not None:
                part = torch.where(obs, part, lay.part(xb))
            xb = lay.merge(part, xb)
            lw = torch.zeros((B, N), dtype=xb.dtype, device=xb.device)
        return lay.to_signal(xb), lw + c.const[:, None]

    def run_info(self, ctx: Context, setup: MCGdiffSetup) -> MCGdiffInfo:
        return MCGdiffInfo(ctx.times[setup.k_tau], setup.k_tau)

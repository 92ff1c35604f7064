"""DDNM and DDNM+: denoising diffusion null-space models (Wang, Yu & Zhang, ICLR 2023).

Code followed: wyhuai/DDNM ``functions/svd_ddnm.py`` (``ddnm_diffusion``,
``ddnm_plus_diffusion``) and ``functions/svd_operators.py`` (``Lambda``, ``Lambda_noise``).
Notation: ``a = alpha(t_next)``, ``c = sigma(t_next)`` (VP: ``sqrt(abar_next)``,
``sqrt(1 - abar_next)``), ``eps_hat = (x_t - alpha_t x0_hat) / sigma_t`` the model's noise,
``A = U S V^T``, ``ybar_i = (U^T y)_i / s_i``.

DDNM (:class:`DDNM`, noiseless ``y = A x0``; code ``ddnm_diffusion``)::

    x0_hat' = x0_hat - A^+ (A x0_hat - y)                     # range-null-space projection
    x_next  = a x0_hat' + c (eta z + sqrt(1 - eta^2) eps_hat)

DDNM+ (:class:`DDNMPlus`, ``y = A x0 + sigma_y n``; code ``ddnm_plus_diffusion``, whose
comments cite the paper's eqs. 12, 17 and 51), per spectral coordinate ``i``::

    x0_hat' = x0_hat - V Lambda V^T A^+ (A x0_hat - y)
    lambda_i = 1                                 if c >= a sigma_y / s_i
             = s_i c sqrt(1 - eta^2) / (a sigma_y)  otherwise
    x_next  = a x0_hat' + V (d1 . zbar) + V (d2 . epsbar),  zbar ~ N(0, I)
    (d1, d2) = (c eta, 0)                          if c < a sigma_y / s_i
             = (sqrt(c^2 - a^2 sigma_y^2 / s_i^2), 0) if c > a sigma_y / s_i
             = (c eta, c sqrt(1 - eta^2))          if s_i = 0 (i >= rank) or on a tie

The ``sqrt(1 - eta^2)`` in ``lambda`` is the code's (the paper's eq. 19, per the literature
notes, has none: its ``eta = 0`` case); it makes the noise carried in through ``A^+ y``,
``lambda_i sigma_y / s_i = c sqrt(1 - eta^2) / a``, add up with ``d1`` to variance ``c^2``.
For ``sigma_y = 0`` (or ``a = 0``) the code skips these rules, so DDNM+ equals DDNM; the
same holds here.

Shared by both (as in the code):

- Defaults: ``eta = 0.85`` (``--eta``), 100 steps (``time_travel.T_sampling``) on the
  code's respaced DDPM grid (``grid="ddpm"``: indices ``990, 980, ..., 0`` at times
  ``(k + 1) / 1000``, then ``0``).
- Initialisation ``x_T = sigma_T z`` (the code's ``x_T ~ N(0, I)``; not y-informed).
- The last step (``t_next = 0``: ``a = 1``, ``c = 0``) returns ``x0_hat'``: for DDNM (and
  DDNM+ with ``sigma_y = 0``) ``A x = y`` exactly (up to the projection of ``y`` on the range
  of ``A``); for DDNM+ with ``sigma_y > 0`` ``lambda = 0`` there, so it returns ``x0_hat``.
- Time travel (RePaint's ``get_schedule_jump`` with ``travel_length`` L and
  ``travel_repeat`` R; the configs' default ``L = R = 1`` is off, and so it is here): after
  arriving at the grid point whose DDPM index ``k = num_steps - 1 - position`` satisfies
  ``k % L == 0`` and ``k < num_steps - L``, the code jumps back ``L`` grid points ``R - 1``
  times by re-noising the last *unprojected* ``x0_hat``,
  ``x_{t+L} = alpha x0_hat + sigma z`` (not ``q(x_{t+L} | x_t)``), and re-runs the ``L``
  reverse steps. These extra steps run inside :meth:`step` (each is one more NFE); the
  shared loop still sees one step per grid interval.

On a standard normal prior (exact chain moments, ``tests/test_ddnm.py``) DDNM(+) is not a
consistent posterior sampler: the ``c eta z`` noise is a fixed fraction of the noise level,
so the null-space variance tends to about 0.76 of the prior's (0.63 / 0.73 / 0.76 at
20 / 100 / 1000 steps). Per spectral coordinate DDNM+ is the same chain as DDRM with
``eta_b = 1`` ("before" <-> ``lambda = 1``, "after" <-> ``lambda < 1``), apart from the
initialisation (pure noise here, y-informed in DDRM) and ties.

The paper's simplified (SVD-free) DDNM+ path is not implemented: both samplers need an
operator with an SVD. DDNM ignores ``noise_std`` (use DDNM+ for noisy ``y``). NFE: one
network call per step (times ``R`` where travelling), no backpropagation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Context, Sampler

__all__ = ["DDNM", "DDNMPlus"]


@dataclass(frozen=True)
class _NullSpaceSampler(Sampler):
    """Shared DDNM machinery: spectral correction, noise, time travel."""

    num_steps: int = 100
    grid: str = "ddpm"
    eta: float = 0.85
    travel_length: int = 1
    travel_repeat: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        for name in ("travel_length", "travel_repeat"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.travel_repeat > 1 and self.travel_length >= self.num_steps:
            raise ValueError(
                f"travel_length ({self.travel_length}) must be smaller than num_steps "
                f"({self.num_steps}) when travel_repeat > 1"
            )

    def check(self, prior, problem) -> None:
        self._require_svd(problem)
        self._require_gaussian(problem)

    def init(self, ctx: Context):
        op = ctx.problem.operator
        s = op.singular_values()
        ctx.cache["ybar"] = (op.Ut(ctx.y)[..., : s.numel()] / s).unsqueeze(1)  # (B, 1, r)
        return {"x": ctx.prior.schedule.sigma(ctx.times[0]) * ctx.randn()}, None

    # ------------------------------------------------------------------ per-method rule
    def _coefficients(
        self, s: Tensor, a: Tensor, c: Tensor, sigma_y: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(lambda, d1, d2)`` on the ``r`` observed spectral coordinates."""
        raise NotImplementedError

    # ------------------------------------------------------------------ one reverse step
    def _reverse(self, ctx: Context, x: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        """One reverse step ``t -> t_next``; returns ``(x_next, x0_hat)`` (unprojected)."""
        sch = ctx.prior.schedule
        op = ctx.problem.operator
        s = op.singular_values()
        r = s.numel()
        # 1. x0_hat and the model's eps_hat.
        x0 = ctx.denoise(x, t)
        eps = (x - sch.alpha(t) * x0) / sch.sigma(t)
        a, c = sch.alpha(t_next), sch.sigma(t_next)
        lam, d1, d2 = self._coefficients(s, a, c, ctx.problem.noise_std)
        # 2. x0_hat' = x0_hat - V Lambda V^T A^+ (A x0_hat - y): in spectral coordinates the
        #    observed part moves by lambda_i (ybar_i - x0bar_i), the null space is unchanged.
        x0b = op.Vt(x0)
        corr = lam * (ctx.cache["ybar"] - x0b[..., :r])
        x0p = x0 + op.V(op.pad_in(corr))
        # 3. noise: c (eta z + sqrt(1 - eta^2) eps_hat) on the null space, (d1, d2) on the
        #    observed coordinates.
        zb = ctx.randn(x0b.shape)
        epsb = op.Vt(eps)
        c_eta, c_det = c * self.eta, c * (1.0 - self.eta**2) ** 0.5
        noise = torch.cat(
            [d1 * zb[..., :r] + d2 * epsb[..., :r], c_eta * zb[..., r:] + c_det * epsb[..., r:]],
            dim=-1,
        )
        return a * x0p + op.V(noise), x0

    def step(self, ctx: Context, state, i, t, t_next):
        x, x0 = self._reverse(ctx, state["x"], t, t_next)
        # Time travel (RePaint schedule): at DDPM index k = n - 1 - (i + 1) with k % L == 0
        # and k < n - L, jump back L grid points R - 1 times and redo the L reverse steps.
        n, L, R = self.num_steps, self.travel_length, self.travel_repeat
        p = i + 1
        k = n - 1 - p
        if R > 1 and k >= 0 and k % L == 0 and k < n - L:
            sch = ctx.prior.schedule
            times = ctx.times
            for _ in range(R - 1):
                tb = times[p - L]
                # re-noise the last unprojected x0_hat (code: x0_preds[-1]) to times[p - L]
                x = sch.alpha(tb) * x0 + sch.sigma(tb) * ctx.randn()
                for q in range(p - L, p):
                    x, x0 = self._reverse(ctx, x, times[q], times[q + 1])
        return {"x": x}, None


@dataclass(frozen=True)
class DDNM(_NullSpaceSampler):
    """DDNM (Wang et al., ICLR 2023) for noiseless problems: null-space projection + DDIM.

    Parameters
    ----------
    num_steps
        Reverse steps (code default ``T_sampling = 100``).
    grid
        ``"ddpm"`` (default, the code's respaced indices) or ``"uniform"``.
    eta
        Noise mixing of the step (code default 0.85).
    travel_length, travel_repeat
        RePaint-style time travel ``L`` and ``R`` (default 1, 1: off).
    """

    def _coefficients(self, s, a, c, sigma_y):
        one = torch.ones_like(s)
        return one, c * self.eta * one, c * (1.0 - self.eta**2) ** 0.5 * one


@dataclass(frozen=True)
class DDNMPlus(_NullSpaceSampler):
    """DDNM+ (Wang et al., ICLR 2023) for noisy problems: per-singular-value scaling.

    Parameters
    ----------
    num_steps
        Reverse steps (code default ``T_sampling = 100``).
    grid
        ``"ddpm"`` (default, the code's respaced indices) or ``"uniform"``.
    eta
        Noise mixing of the step (code default 0.85).
    travel_length, travel_repeat
        RePaint-style time travel ``L`` and ``R`` (default 1, 1: off).
    """

    def _coefficients(self, s, a, c, sigma_y):
        c_eta, c_det = c * self.eta, c * (1.0 - self.eta**2) ** 0.5
        lam = torch.ones_like(s)
        d1 = c_eta * torch.ones_like(s)
        d2 = c_det * torch.ones_like(s)
        if sigma_y == 0 or float(a) == 0:
            return lam, d1, d2
        thr = a * sigma_y / s  # c compared with a sigma_y / s_i
        noisy = c < thr  # y noisier than x_next: shrink the correction, all noise fresh
        lam = torch.where(noisy, s * c_det / (a * sigma_y), lam)
        d1 = torch.where(noisy, c_eta, d1)
        d2 = torch.where(noisy, torch.zeros_like(d2), d2)
        clean = c > thr  # x_next noisier than y: top the noise of A^+ y up to c^2
        d1 = torch.where(clean, (c**2 - thr**2).clamp_min(0).sqrt(), d1)
        d2 = torch.where(clean, torch.zeros_like(d2), d2)
        return lam, d1, d2

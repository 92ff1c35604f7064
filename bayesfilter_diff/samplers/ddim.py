"""Unconditional DDIM / ancestral sampling from the prior (Song, Meng & Ermon, ICLR 2021).

``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - std^2) eps_hat + std z`` with
``std = eta * sqrt(sigma_{t|s}^2 sigma_s^2 / sigma_t^2)`` (see ``samplers/base.py``):
``eta = 1`` (default) is DDPM's ancestral sampler, ``eta = 0`` deterministic DDIM.
The observation is ignored: this draws from the prior, the reference every conditional
sampler departs from (and what :class:`bayesfilter_diff.DiffusionPrior` samples with).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Context, Sampler, ddim_coefficients


@dataclass(frozen=True)
class DDIM(Sampler):
    """Prior sampling with the DDIM kernel; ``eta = 1`` is ancestral DDPM sampling."""

    eta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")

    def init(self, ctx: Context):
        t0 = ctx.times[0]
        sch = ctx.prior.schedule
        # x_T ~ N(0, (alpha_T^2 c + sigma_T^2) I) is unknown for a general prior: start from
        # the noise distribution N(0, sigma_T^2 I) (+ alpha_T x0 negligible at t = 1).
        return {"x": sch.sigma(t0) * ctx.randn()}, None

    def step(self, ctx: Context, state, i, t, t_next):
        x = state["x"]
        x0 = ctx.denoise(x, t)
        a_s, c_eps, std, a_t = ddim_coefficients(ctx.prior.schedule, t, t_next, self.eta)
        eps = (x - a_t * x0) / ctx.prior.schedule.sigma(t)
        x_next = a_s * x0 + c_eps * eps + std * ctx.randn()
        return {"x": x_next}, None

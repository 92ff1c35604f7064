"""Unconditional DDIM / ancestral sampling from the prior (Song, Meng & Ermon, ICLR 2021).

``x_s = alpha_s x0_hat + c_eps eps_hat + std z`` (:func:`.kernels.ddim_coefficients`):
``eta = 1`` (default) is DDPM's ancestral sampler, ``eta = 0`` deterministic DDIM.
The observation is ignored: this draws from the prior, the reference every conditional
sampler departs from (and what :class:`bayesfilter_diff.DiffusionPrior` samples with).
See ``docs/methods/ddim.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Context, Move, Requirements, Sampler
from .kernels import ddim_coefficients


@dataclass(frozen=True)
class DDIMState:
    x: Tensor


@dataclass(frozen=True)
class DDIM(Sampler):
    """Prior sampling with the DDIM kernel; ``eta = 1`` is ancestral DDPM sampling."""

    requires = Requirements(likelihoods=frozenset({"gaussian", "poisson", "custom"}))
    exact_start = True
    on_path = True

    eta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")

    def check(self, prior, problem) -> None:
        """Any problem: the observation is ignored."""

    def init(self, ctx: Context, setup: None) -> tuple[DDIMState, None]:
        # x_T ~ N(0, (alpha_T^2 c + sigma_T^2) I) is unknown for a general prior: start from
        # the noise distribution N(0, sigma_T^2 I) (+ alpha_T x0 negligible at t = 1).
        return DDIMState(ctx.start()), None

    def move(self, ctx: Context, setup: None, state: DDIMState, k: int, t, t_next) -> Move:
        coef = ddim_coefficients(ctx.prior.schedule, t, t_next, self.eta)
        mean = ctx.denoise_mean(state.x, t, coef, ctx.prior.schedule.sigma(t))
        return Move(DDIMState(mean + coef.std * ctx.randn()))

"""Classifier guidance and classifier-free guidance as :class:`DiffusionModel` wrappers.

Both return a :class:`DiffusionModel` (same schedule and event shape as the input models),
so any sampler of the toolkit can draw from the guided model, with or without an
observation (DDIM draws from it directly; TDS / DPS condition it further on ``y``).

Classifier guidance -- Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis",
NeurIPS 2021 (Algorithms 1 and 2; openai/guided-diffusion ``scripts/classifier_sample.py``,
``cond_fn``). The guided score is

    grad log p_t(x_t | c) ~= grad log p_t(x_t) + s grad log p_t(c | x_t),

and by Tweedie (``x0_hat = (x_t + sigma^2 score) / alpha``) the guided denoiser is

    x0_hat_s(x_t) = x0_hat(x_t) + s (sigma_t^2 / alpha_t) grad_{x_t} log p_t(c | x_t).

Algorithm 1 (ancestral) shifts the DDPM mean by ``s Sigma grad log p(c | x_t)`` and
Algorithm 2 (DDIM) uses ``eps_hat - s sqrt(1 - abar) grad log p(c | x_t)``; both are this
score shift (exactly for DDIM, to first order in the step for the mean shift).
With ``s = 1`` and the exact ``p_t(c | x_t)`` the guided model is exactly the diffusion of
``p(x0 | c)``. Where ``alpha_t = 0`` (a flow path at ``t = 1``) the shift is ``0 / 0``;
it is taken as 0 there (``x_t`` is pure noise, the classifier's gradient vanishes).

Classifier-free guidance -- Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022
(Algorithm 2). With a conditional and an unconditional model,

    eps_w = eps_u + w (eps_c - eps_u),     equivalently  x0_w = x0_u + w (x0_c - x0_u)

(``eps`` and ``x0`` are affine in each other at fixed ``x_t`` with coefficients that do not
depend on the model, and the weights sum to one). ``w = 1`` is the conditional model,
``w = 0`` the unconditional one; Ho & Salimans write ``(1 + w') eps_c - w' eps_u``, so
their ``w'`` is our ``w - 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from .base import DiffusionModel

__all__ = ["ClassifierGuidance", "ClassifierFreeGuidance"]

LogProbFn = Callable[[Tensor, Tensor], Tensor]


def _check_model(name: str, model: object) -> None:
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"{name} must be a DiffusionModel, got {type(model).__name__}")


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class _ClassifierGuidedDenoiser(nn.Module):
    """``x0_hat + s sigma^2 / alpha grad log p(c | x_t)`` on flat batches ``(M, *event)``."""

    def __init__(self, prior: DiffusionModel, log_prob_fn: LogProbFn, scale: float) -> None:
        super().__init__()
        self.prior = prior
        self.log_prob_fn = log_prob_fn  # registered as a sub-module if it is one
        self.scale = scale

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        x0 = self.prior.denoise(x, t)
        if self.scale == 0.0:
            return x0
        # Differentiable when the caller differentiates through the denoiser (TDS, DPS):
        # then x already requires grad and the gradient keeps its graph (create_graph).
        outer = torch.is_grad_enabled() and x.requires_grad
        with torch.enable_grad():
            xr = x if outer else x.detach().requires_grad_(True)
            lp = self.log_prob_fn(xr, t)
            if lp.shape != x.shape[:1]:
                raise ValueError(
                    f"log_prob_fn must return one log-probability per row, shape "
                    f"{tuple(x.shape[:1])}, got {tuple(lp.shape)}"
                )
            (g,) = torch.autograd.grad(lp.sum(), xr, create_graph=outer)
        tt = t.reshape(t.shape + (1,) * (x.dim() - 1))
        sch = self.prior.schedule
        a, s = sch.alpha(tt), sch.sigma(tt)
        coef = torch.where(a > 0, s**2 / a.clamp_min(torch.finfo(a.dtype).tiny), 0.0 * a)
        return x0 + self.scale * coef * g


class ClassifierGuidance(DiffusionModel):
    """Classifier guidance (Dhariwal & Nichol 2021) as a :class:`DiffusionModel`.

    Parameters
    ----------
    prior
        The unconditional diffusion model.
    log_prob_fn
        ``log_prob_fn(x_t, t) -> log p_t(c | x_t)``, one value per row: ``x_t`` of shape
        ``(M, *event_shape)``, ``t`` of shape ``(M,)``, result ``(M,)``; differentiable in
        ``x_t`` (a noise-aware classifier with the class baked in, or an exact one).
    scale
        Guidance scale ``s``: the guided score is ``score + s grad log p(c | x_t)``
        (``s = 1``: the exact conditional model when the classifier is exact).
    """

    def __init__(self, prior: DiffusionModel, log_prob_fn: LogProbFn, scale: float = 1.0) -> None:
        _check_model("prior", prior)
        if not callable(log_prob_fn):
            raise TypeError(f"log_prob_fn must be callable, got {type(log_prob_fn).__name__}")
        scale = _check_number("scale", scale)
        super().__init__(
            _ClassifierGuidedDenoiser(prior, log_prob_fn, scale),
            prior.schedule,
            prior.event_shape,
            chunk_size=prior.chunk_size,
        )
        self.scale = scale

    @property
    def prior(self) -> DiffusionModel:
        return cast(_ClassifierGuidedDenoiser, self.net).prior


class _CFGDenoiser(nn.Module):
    def __init__(self, cond: DiffusionModel, uncond: DiffusionModel, weight: float) -> None:
        super().__init__()
        self.cond = cond
        self.uncond = uncond
        self.weight = weight

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if self.weight == 1.0:
            return self.cond.denoise(x, t)
        x0_u = self.uncond.denoise(x, t)
        if self.weight == 0.0:
            return x0_u
        return x0_u + self.weight * (self.cond.denoise(x, t) - x0_u)


class ClassifierFreeGuidance(DiffusionModel):
    """Classifier-free guidance (Ho & Salimans 2022) as a :class:`DiffusionModel`.

    Parameters
    ----------
    cond, uncond
        Conditional and unconditional models sharing the schedule and the event shape.
    weight
        ``w`` in ``eps = eps_u + w (eps_c - eps_u)`` (``1``: ``cond``; ``0``: ``uncond``;
        Ho & Salimans' guidance strength is ``w - 1``).
    """

    def __init__(self, cond: DiffusionModel, uncond: DiffusionModel, weight: float = 1.0) -> None:
        _check_model("cond", cond)
        _check_model("uncond", uncond)
        weight = _check_number("weight", weight)
        if cond.schedule != uncond.schedule:
            raise ValueError(
                "cond and uncond must share the schedule, got "
                f"{cond.schedule} and {uncond.schedule}"
            )
        if tuple(cond.event_shape) != tuple(uncond.event_shape):
            raise ValueError(
                f"cond and uncond must share the event shape, got {tuple(cond.event_shape)} "
                f"and {tuple(uncond.event_shape)}"
            )
        super().__init__(_CFGDenoiser(cond, uncond, weight), cond.schedule, cond.event_shape)
        self.weight = weight

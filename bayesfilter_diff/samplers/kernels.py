"""The transition maths every sampler shares, written once.

Notation of the samplers' docstrings: a Gaussian path ``x_t = alpha_t x0 + sigma_t eps``
(``schedules``), a clean-data estimate ``x0_hat = E[x0 | x_t]`` from the denoiser, and a
step from grid time ``t`` to ``s < t``.

- ``eps <-> x0``: ``eps = (x_t - alpha_t x0) / sigma_t``, ``x0 = (x_t - sigma_t eps) / alpha_t``
  (:func:`~bayesfilter_diff.schedules.x0_to_eps`, ``eps_to_x0``, re-exported here).
- DDIM kernel for any Gaussian path (Song, Meng & Ermon 2021, eq. 12, written for general
  paths)::

      x_s = alpha_s x0 + c_eps eps + std z,
      std = eta * sqrt(sigma_{t|s}^2 sigma_s^2 / sigma_t^2),  c_eps = sqrt(sigma_s^2 - std^2),
      sigma_{t|s}^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2;

  ``eta = 1`` is the DDPM ancestral step (the exact Gaussian ``q(x_s | x_t, x0)``),
  ``eta = 0`` the deterministic DDIM step.
- Tweedie shift (conditional Tweedie): ``x0~ = x0_hat + (sigma_t^2 / alpha_t) grad_{x_t}
  log p~(y | x_t)``, zero where ``alpha_t = 0``.
- Gaussian log-densities: elementwise :func:`log_normal`, and :func:`gaussian_log_density`
  summed over the event axes.
"""

from __future__ import annotations

import math
from typing import Generic, NamedTuple, TypeVar

import torch
from torch import Tensor

from ..schedules import Schedule, eps_to_x0, x0_to_eps

__all__ = [
    "LOG2PI",
    "DDIMCoefficients",
    "ddim_coefficients",
    "ddim_mean",
    "x0_to_eps",
    "eps_to_x0",
    "tweedie_shift",
    "log_normal",
    "gaussian_log_density",
    "time_at_log_snr",
]

LOG2PI = math.log(2 * math.pi)

#: Coefficient type of :class:`DDIMCoefficients`: tensors, or Python floats (FPS's grid).
_C = TypeVar("_C", Tensor, float)


class DDIMCoefficients(NamedTuple, Generic[_C]):
    """``x_s = alpha_s x0 + c_eps eps + std z`` for the step ``t -> s``; ``alpha_t`` too."""

    alpha_s: _C
    c_eps: _C
    std: _C
    alpha_t: _C


def ddim_coefficients(
    schedule: Schedule, t: Tensor, t_next: Tensor, eta: float
) -> DDIMCoefficients[Tensor]:
    """The DDIM step ``t -> s = t_next`` with parameter ``eta`` (module docstring)."""
    a_t, s_t = schedule.alpha(t), schedule.sigma(t)
    a_s, s_s = schedule.alpha(t_next), schedule.sigma(t_next)
    var_ts = (s_t**2 - (a_t / a_s) ** 2 * s_s**2).clamp_min(0)
    anc = var_ts * s_s**2 / s_t**2
    std = eta * anc.sqrt()
    c_eps = (s_s**2 - std**2).clamp_min(0).sqrt()
    return DDIMCoefficients(a_s, c_eps, std, a_t)


def ddim_mean(
    x: Tensor,
    x0: Tensor,
    coef: DDIMCoefficients[Tensor] | DDIMCoefficients[float],
    sigma_t: Tensor | float,
) -> Tensor:
    """Mean of the DDIM step: ``alpha_s x0 + c_eps (x_t - alpha_t x0) / sigma_t``."""
    return coef.alpha_s * x0 + coef.c_eps * x0_to_eps(x, x0, coef.alpha_t, sigma_t)


def tweedie_shift(x0: Tensor, grad: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """``x0 + (sigma_t^2 / alpha_t) grad``; the shift is zero where ``alpha_t = 0``."""
    coef = torch.where(alpha_t > 0, sigma_t**2 / alpha_t, torch.zeros_like(alpha_t))
    return x0 + coef * grad


def log_normal(x: Tensor, mean: Tensor | float, var: Tensor | float) -> Tensor:
    """Elementwise ``log N(x; mean, var)`` (``var`` a tensor or a number, broadcast)."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    return -0.5 * ((x - mean) ** 2 / var + torch.log(var) + LOG2PI)


def gaussian_log_density(x: Tensor, mean: Tensor, var: Tensor | float, event_dim: int) -> Tensor:
    """``log N(x; mean, var I)`` summed over the last ``event_dim`` axes (``var`` broadcasts)."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    red = tuple(range(x.dim() - event_dim, x.dim()))
    k = math.prod(x.shape[x.dim() - event_dim :])
    # (x - mean)^2 / var + log var broadcasts to the full shape before the sum
    return -0.5 * (((x - mean) ** 2 / var + torch.log(var)).sum(red) + LOG2PI * k)


def time_at_log_snr(
    schedule: Schedule, target: Tensor, t_min: Tensor | float, t_max: Tensor | float
) -> Tensor:
    """The times in ``[t_min, t_max]`` where ``log(alpha^2 / sigma^2)`` equals ``target``.

    ``t_min`` and ``t_max`` are numbers or tensors broadcasting with ``target``. Bisection
    (64 halvings, batched over ``target``) on the decreasing log-SNR; a target
    outside the interval's range gives the nearest end.
    """
    lo = torch.as_tensor(t_min, dtype=target.dtype, device=target.device).expand_as(target)
    hi = torch.as_tensor(t_max, dtype=target.dtype, device=target.device).expand_as(target)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        above = schedule.log_snr(mid) > target  # the time sought is later than mid
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)

"""Normal scores of an observation under a draw's likelihood: the posterior predictive check
for any noise model.

For an observation entry ``y_j`` with conditional law ``F_j(. | x)``, its *normal score* is
``z_j = Phi^{-1}(u_j)`` with the probability integral transform ``u_j = F_j(y_j | x)`` (for a
discrete law the randomised one, ``u_j = P(Y_j < y_j) + V_j P(Y_j = y_j)`` with ``V_j``
uniform and independent of everything else). If ``(x, y)`` is a draw of the joint law (``x``
an exact posterior draw of an observation the model produced), the ``u_j`` are independent
uniforms given ``x``, so ``sum_j z_j^2`` is ``chi^2_{d_y}`` whatever the prior and the
likelihood: the law :func:`~bayesfilter_diff.samplers.quality.residual_line` and
``residual_low_line`` are drawn from. For Gaussian noise ``z_j = (y_j - A(x)_j) / sigma_y``,
the residual check's own statistic.

Every tail is computed from the side it is small on (``z = Phi^{-1}(lower)`` or
``-Phi^{-1}(upper)``), so a draw far from ``y`` gets a large score rather than a rounded
``u = 1``; probabilities below ``1e-300`` are clamped (``|z| <= 37``).

Supported laws (``torch`` / Pyro classes, possibly wrapped in ``Independent`` / ``to_event``):
Normal, LogNormal, Laplace, Cauchy, StudentT, Exponential, Gamma, Poisson, Bernoulli.
Others (and masked or scaled sites) return ``None``: no check, as before.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Cauchy,
    Distribution,
    Exponential,
    Gamma,
    Independent,
    Laplace,
    LogNormal,
    Normal,
    Poisson,
    StudentT,
)

__all__ = ["normal_scores", "poisson_scores", "uniforms_for"]

_TINY = 1e-300


def uniforms_for(y: Tensor, stream: int = 0) -> Tensor:
    """``V`` of ``y``'s shape, float64, on ``y``'s device: fixed (a private generator seeded
    by a constant and ``stream``, one stream per observed site), so the check is
    reproducible and draws nothing from the caller's generator; independent of ``(x, y)``,
    which is all the randomised transform needs."""
    g = torch.Generator().manual_seed(0x5C0E + 7919 * stream)
    return torch.rand(tuple(y.shape), generator=g, dtype=torch.float64).to(y.device)


def _from_tails(lower: Tensor, upper: Tensor) -> Tensor:
    """``Phi^{-1}(u)`` from ``u = lower`` and ``1 - u = upper``, each tail from its own side."""
    lo = torch.special.ndtri(lower.clamp(_TINY, 1.0))
    hi = -torch.special.ndtri(upper.clamp(_TINY, 1.0))
    return torch.where(lower <= upper, lo, hi)


def _symmetric(t: Tensor, tail: Tensor) -> Tensor:
    """Scores of a law symmetric about 0: ``t`` standardised, ``tail = P(T > |t|)``."""
    return -torch.sign(t) * torch.special.ndtri(tail.clamp(_TINY, 0.5))


def _discrete(below: Tensor, above: Tensor, pmf: Tensor, v: Tensor) -> Tensor:
    """Randomised transform of a discrete law: ``P(Y < y)``, ``P(Y > y)``, ``P(Y = y)``."""
    return _from_tails(below + v * pmf, above + (1 - v) * pmf)


def poisson_scores(rate: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """Scores of counts ``y`` under ``Poisson(rate)`` (broadcast), uniforms ``v``."""
    lam = rate.double().clamp_min(_TINY)
    k = y.double()
    below = torch.where(
        k > 0, torch.special.gammaincc(k.clamp_min(1.0), lam), torch.zeros_like(lam)
    )
    above = torch.special.gammainc(k + 1, lam)
    pmf = torch.exp(k * torch.log(lam) - lam - torch.lgamma(k + 1))
    return _discrete(below, above, pmf, v)


def _elementwise(fn: Distribution, y: Tensor, v: Tensor) -> Tensor | None:
    if isinstance(fn, Normal):
        return (y - fn.loc.double()) / fn.scale.double()
    if isinstance(fn, LogNormal):
        return (torch.log(y) - fn.loc.double()) / fn.scale.double()
    if isinstance(fn, Laplace):
        t = (y - fn.loc.double()) / fn.scale.double()
        return _symmetric(t, 0.5 * torch.exp(-t.abs()))
    if isinstance(fn, Cauchy):
        t = (y - fn.loc.double()) / fn.scale.double()
        return _symmetric(t, torch.atan(1 / t.abs()) / math.pi)
    if isinstance(fn, StudentT):
        from scipy import special

        t = (y - fn.loc.double()) / fn.scale.double()
        df = fn.df.double().expand_as(t)
        tail = special.stdtr(df.detach().cpu().numpy(), -t.abs().detach().cpu().numpy())
        return _symmetric(t, torch.as_tensor(tail, device=t.device))
    if isinstance(fn, Exponential):
        s = fn.rate.double() * y
        return _from_tails(-torch.expm1(-s), torch.exp(-s))
    if isinstance(fn, Gamma):
        c, s = fn.concentration.double(), fn.rate.double() * y
        c = c.expand_as(s)
        return _from_tails(torch.special.gammainc(c, s), torch.special.gammaincc(c, s))
    if isinstance(fn, Poisson):
        return poisson_scores(fn.rate, y, v)
    if isinstance(fn, Bernoulli):
        logit = fn.logits.double()
        p1, p0 = torch.sigmoid(logit), torch.sigmoid(-logit)
        one = y > 0.5
        zero = torch.zeros_like(p1)
        below = torch.where(one, p0, zero)
        above = torch.where(one, zero, p1)
        return _discrete(below, above, torch.where(one, p1, p0), v)
    return None


def normal_scores(fn: Distribution, y: Tensor, v: Tensor) -> Tensor | None:
    """Elementwise normal scores of ``y`` under ``fn`` (``Independent`` unwrapped), float64,
    of the broadcast of ``fn``'s batch and event shape with ``y``'s; ``v`` uniforms of
    ``y``'s shape (:func:`uniforms_for`) for the discrete laws. ``None`` for a law not
    listed in the module's docstring."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    with torch.no_grad():
        return _elementwise(fn, y.double(), v)

"""A Pyro Gaussian site whose mean is affine in the signal, read as a linear operator.

A model written as ``pyro.sample("y", dist.Normal(x @ M.T + c, sigma), obs=y)`` has the
linear-Gaussian likelihood ``N(y - c; M x, sigma^2 I)``, but replaying the model gives only
a differentiable black box. :func:`linearize` materialises the map: its value at ``0`` and
at the ``d`` basis vectors (one replay of ``d + 1`` particles per problem) give ``c`` and
``M``; the affine fit is then checked at random probes of several scales (``+-z``,
``100 z``, ``0.01 z``), which a polynomial, piecewise-linear (``relu``, ``abs``) or clipped
map fails. A map that passes becomes a :class:`~bayesfilter_diff.operators.Dense` operator
(one matrix for all problems, with its SVD: every linear-Gaussian sampler, TDS's
conditioned proposal by default) or a :class:`~bayesfilter_diff.operators.PerProblemDense` (one matrix per
problem: an operator parameter per theta-particle of SMC^2), with ``y - c`` as the data.

:func:`check_linearization` compares the linear likelihood with the model's own at the
returned draws, so a map that fooled the probes raises instead of returning a wrong
posterior. ``bfd.infer(..., linearize=False)`` keeps the black-box forward model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..operators.base import LinearOperator
from ..operators.dense import Dense, PerProblemDense
from .forward import PyroForward
from .structure import ModelStructure

__all__ = ["MAX_LINEARIZED_ENTRIES", "check_linearization", "linearize"]

#: Materialise at most this many matrix entries (``B m d``), and signals of at most
#: 4096 coordinates (``d + 1`` replays' worth of particles per problem).
MAX_LINEARIZED_ENTRIES = 2**22
MAX_LINEARIZED_DIM = 4096


def _tolerance(dtype: torch.dtype, d: int) -> float:
    return max(1e3, 10.0 * d) * torch.finfo(dtype).eps


def linearize(
    st: ModelStructure, forward: PyroForward, y: Tensor
) -> tuple[LinearOperator, Tensor] | None:
    """``(operator, y - c)`` if the site's mean is affine in ``x`` (module docstring), else
    ``None``. ``y`` is in the problem layout (``(B, *out)``, or ``out`` unbatched)."""
    d, m = forward.in_dim, forward.out_dim
    B = st.B if st.batched else 1
    if d > MAX_LINEARIZED_DIM or B * m * d > MAX_LINEARIZED_ENTRIES:
        return None
    dtype, device = st.prior.dtype, st.prior.device
    if not dtype.is_floating_point:
        return None
    ev = tuple(st.event_shape)
    g = torch.Generator(device="cpu").manual_seed(20261203)
    z = torch.randn(4, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    probes = torch.stack([z[0], -z[0], 100 * z[1], -100 * z[2], 0.01 * z[3]])  # (5, d)
    basis = torch.cat(
        [
            torch.zeros(1, d, dtype=dtype, device=device),
            torch.eye(d, dtype=dtype, device=device),
            probes,
        ]
    )  # (d + 6, d)
    x = basis.expand(B, -1, -1).reshape((B, basis.shape[0]) + ev)
    try:
        with torch.no_grad():
            F = forward(x if st.batched else x[0])
    except (RuntimeError, ValueError):
        return None
    F = F.reshape(B, basis.shape[0], m).to(torch.float64)
    if not bool(torch.isfinite(F).all()):
        return None
    c = F[:, 0]  # (B, m)
    M = (F[:, 1 : d + 1] - c[:, None]).transpose(-1, -2)  # (B, m, d)
    pred = c[:, None] + probes.double() @ M.transpose(-1, -2)  # (B, 5, m)
    got = F[:, d + 1 :]
    scale = (
        got.norm(dim=-1)
        + c.norm(dim=-1, keepdim=True)
        + probes.double().norm(dim=-1) * torch.linalg.matrix_norm(M)[:, None]
    )
    if not bool(((got - pred).norm(dim=-1) <= _tolerance(dtype, d) * scale).all()):
        return None
    shared = B == 1 or bool((M == M[:1]).all())
    op: LinearOperator
    if shared:
        op = Dense(M[0].to(dtype), in_shape=ev)
    else:
        op = PerProblemDense(M.to(dtype), in_shape=ev)
    out = tuple(forward.out_shape)
    shift = c.to(dtype).reshape((B,) + out)
    y_new = y - (shift if st.batched else shift[0])
    return op, y_new


def check_linearization(st: ModelStructure, problem, x: Tensor) -> None:
    """Raise ``ValueError`` if the linearised likelihood differs from the model's own at the
    draws ``x`` (``(B, N, *event)``): the site's mean was not affine after all."""
    with torch.no_grad():
        ll_lin = problem.log_likelihood(x).double()
        ll_model = st.observed_log_prob(x).double()
    m = problem.operator.out_dim
    tol = math.sqrt(_tolerance(x.dtype, problem.operator.in_dim)) * (ll_model.abs() + m)
    bad = (ll_lin - ll_model).abs() > tol
    if bool(bad.any()):
        worst = float((ll_lin - ll_model).abs().max())
        raise ValueError(
            f"the observed site {list(st.observed)} was read as a linear-Gaussian likelihood "
            "(its mean passed an affine test at random probes), but at the sampled draws the "
            f"model's log-likelihood differs from the linear one by up to {worst:.3g}: the "
            "forward model is not affine. Run bfd.infer(..., linearize=False) to keep it as "
            "a differentiable black box"
        )

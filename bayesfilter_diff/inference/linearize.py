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

:func:`check_linearization` repeats the affine test at the returned draws (the model's mean
against ``M x + c``, to the probes' tolerance), so a map that fooled the probes raises
instead of returning a wrong posterior. The test is on the mean, not on the
log-likelihoods: with a small noise scale ``sigma`` these differ by the rounding of the
residual ``y - mean`` times ``|y - mean| / sigma^2`` (in float32, by more than 2 nats at
``sigma = 1e-6`` for an affine mean, the SMC^2 theta-particles of a noise scale whose
posterior reaches 0). ``bfd.infer(..., linearize=False)`` keeps the black-box forward model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..operators.base import LinearOperator
from ..operators.dense import Dense, PerProblemDense
from .forward import PyroForward
from .structure import ModelStructure

__all__ = ["MAX_LINEARIZED_ENTRIES", "Affine", "check_linearization", "linearize"]

#: Materialise at most this many matrix entries (``B m d``), and signals of at most
#: 4096 coordinates (``d + 1`` replays' worth of particles per problem).
MAX_LINEARIZED_ENTRIES = 2**22
MAX_LINEARIZED_DIM = 4096


def _tolerance(dtype: torch.dtype, d: int) -> float:
    return max(1e3, 10.0 * d) * torch.finfo(dtype).eps


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the affine test runs in: a 16-bit prior's particles are float32 (the run
    upcasts it), and a thousand 16-bit rounding units are the whole signal (float16's
    tolerance was 0.98 of the mean's norm: ``sin(3 x_1) + 0.2 x_2`` passed as affine)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class Affine:
    """A Gaussian site's mean read as ``M x + c``: the linear-Gaussian problem's operator
    ``M`` and data ``y - c``, and what :func:`check_linearization` needs (the replayed mean,
    ``c`` and ``||M||_F`` per problem)."""

    operator: LinearOperator
    data: Tensor  # y - c, in the problem layout
    forward: PyroForward  # the model's mean, by replay
    shift: Tensor  # c, (B, m) float64
    matrix_norm: Tensor  # ||M_b||_F, (B,) float64
    # a 16-bit prior's operator holds M rounded to 16 bits: M in the test's dtype (float32)
    # for the check at the draws, which tests the model's mean, not that rounding
    check_operator: LinearOperator | None = None


def linearize(st: ModelStructure, forward: PyroForward, y: Tensor) -> Affine | None:
    """The site's mean as an :class:`Affine` map if it is affine in ``x`` (module
    docstring), else ``None``. ``y`` is in the problem layout (``(B, *out)``, or ``out``
    unbatched)."""
    d, m = forward.in_dim, forward.out_dim
    B = st.B if st.batched else 1
    if d > MAX_LINEARIZED_DIM or B * m * d > MAX_LINEARIZED_ENTRIES:
        return None
    prior_dtype, device = st.prior.dtype, st.prior.device
    if not prior_dtype.is_floating_point:
        return None
    dtype = _work_dtype(prior_dtype)
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
    m_norm = torch.linalg.matrix_norm(M)  # (B,)
    if not _affine_within_rounding(got, pred, c, probes.double().norm(dim=-1), m_norm, dtype, d):
        return None
    shared = B == 1 or bool((M == M[:1]).all())

    def operator(dt: torch.dtype) -> LinearOperator:
        if shared:
            return Dense(M[0].to(dt), in_shape=ev)
        return PerProblemDense(M.to(dt), in_shape=ev)

    op = operator(prior_dtype)
    check_op = operator(dtype) if dtype != prior_dtype else None
    out = tuple(forward.out_shape)
    shift = c.to(prior_dtype).reshape((B,) + out)
    y_new = y - (shift if st.batched else shift[0])
    # the matrix acts on the flattened output (repeated observations of shape (n, k) give m
    # = n k rows), so the data are flattened to match
    y_new = y_new.reshape(((B,) if st.batched else ()) + (m,))
    return Affine(op, y_new, forward, c, m_norm, check_op)


def _affine_within_rounding(
    got: Tensor, pred: Tensor, c: Tensor, x_norm: Tensor, m_norm: Tensor, dtype, d: int
) -> bool:
    """``||mean(x) - (M x + c)|| <= tol * (||mean(x)|| + ||c|| + ||x|| ||M||_F)`` for every
    problem ``b`` and point ``x`` (``got``, ``pred``: ``(B, n, m)``; ``c``: ``(B, m)``;
    ``x_norm``: ``(n,)`` or ``(B, n)``; ``m_norm``: ``(B,)``): the rounding of a
    ``d``-term matrix product in ``dtype``, with room, and nothing more."""
    scale = got.norm(dim=-1) + c.norm(dim=-1, keepdim=True) + x_norm * m_norm[:, None]
    return bool(((got - pred).norm(dim=-1) <= _tolerance(dtype, d) * scale).all())


def _operator_dtype(op: LinearOperator, default: torch.dtype) -> torch.dtype:
    ref = op._ref()
    return ref.dtype if ref is not None else default


def check_linearization(st: ModelStructure, problem, x: Tensor) -> None:
    """Raise ``ValueError`` if the model's mean differs from the linearised one at the
    draws ``x`` (``(B, N, *event)``) by more than rounding: the site's mean was not affine
    after all (module docstring)."""
    aff = st.affine
    assert aff is not None, "check_linearization needs a structure read as affine_gaussian"
    B, N = x.shape[0], x.shape[1]
    op = problem.operator
    work = _work_dtype(x.dtype)
    if work != x.dtype:
        # 16-bit draws: the model runs on float32 particles, and float16's tolerance hid a
        # mean 5% off linear at the draws (a bump the probes missed); the draws' rounding
        # is exact input here, and M is the float32 one (the problem's is rounded to 16 bits)
        x = x.to(work)
        op = aff.check_operator if aff.check_operator is not None else op
    with torch.no_grad():
        got = aff.forward(x if st.batched else x[0]).reshape(B, N, -1).double()
        Mx = op.forward(x.to(_operator_dtype(op, x.dtype))).reshape(B, N, -1).double()
    pred = Mx + aff.shift[:, None]
    x_norm = x.reshape(B, N, -1).double().norm(dim=-1)
    if not _affine_within_rounding(
        got, pred, aff.shift, x_norm, aff.matrix_norm, x.dtype, problem.operator.in_dim
    ):
        worst = float(((got - pred).norm(dim=-1) / (got.norm(dim=-1) + 1e-300)).max())
        raise ValueError(
            f"the observed site {list(st.observed)} was read as a linear-Gaussian likelihood "
            "(its mean passed an affine test at random probes), but at the sampled draws the "
            f"model's mean differs from the linear one by up to {worst:.3g} of its norm: the "
            "forward model is not affine. Run bfd.infer(..., linearize=False) to keep it as "
            "a differentiable black box"
        )

"""Forward models ``A``: the operator contract.

An :class:`Operator` maps signals of shape ``(..., *in_shape)`` to observations of shape
``(..., *out_shape)``, batched over any leading dimensions, without side effects.
A :class:`LinearOperator` adds the adjoint ``A^T`` and, where it has one, a singular value
decomposition ``A = U diag(s) V^T`` applied implicitly, in the manner of DDRM's
``H_functions`` (bahjat-kawar/ddrm ``functions/svd_replacement.py``):

- ``Vt(x)``: ``(..., *in_shape) -> (..., d)``, spectral coordinates, the first ``r`` paired
  with ``singular_values()`` (shape ``(r,)``, all ``> 0``);
- ``V(z)``: the inverse, ``(..., d) -> (..., *in_shape)``;
- ``Ut(y)``: ``(..., *out_shape) -> (..., m)``, the first ``r`` paired with ``s``;
- ``U(z)``: ``(..., m) -> (..., *out_shape)``.

``U`` and ``V`` are orthogonal, so ``A x = U(pad(s * Vt(x)[..., :r], m))`` and the
pseudo-inverse is ``A^+ y = V(pad(Ut(y)[..., :r] / s, d))``. Every operator is checked in
the tests for ``<A x, y> = <x, A^T y>`` and, where it has an SVD, ``U S V^T x = A x`` and
``A A^+ A = A``.

Linear solves live here too (deepinv's ``LinearPhysics.prox_l2`` / ``A_dagger``): the
Gram solve ``(r2 A A^T + s2 I)^-1 y``, the damped pseudo-inverse ``A^T (r2 A A^T + s2 I)^-1 y``
and the proximal map ``argmin_x ||A x - y||^2 + rho ||x - z||^2``, exact in the SVD where
the operator has one, otherwise by :func:`conjugate_gradient` (``cg_iters`` iterations,
batched over the leading dimensions) or, with ``cg_iters=None``, a dense solve of the
``matrix()`` (small operators only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Operator",
    "LinearOperator",
    "adjointness_error",
    "svd_error",
    "conjugate_gradient",
    "spectral_norm",
]


def _shape(shape: Sequence[int] | int, name: str) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {shape}")
    return shape


class OperatorMatrix(Tensor):
    """An operator's dense matrix: a tensor (``A.matrix @ x``, ``A.matrix.T``) that can
    also be called, ``A.matrix()``, returning it as a plain tensor. Every operation on it
    returns plain tensors."""

    @staticmethod
    def of(t: Tensor) -> OperatorMatrix:
        return t.as_subclass(OperatorMatrix)  # shares t's storage, no copy

    def __call__(self) -> Tensor:
        return self.as_subclass(Tensor)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        # an op that returns its input (``.double()`` of a float64 matrix) returns a plain view
        if isinstance(out, OperatorMatrix):
            return out.as_subclass(Tensor)
        if isinstance(out, tuple | list) and any(isinstance(o, OperatorMatrix) for o in out):
            items = [o.as_subclass(Tensor) if isinstance(o, OperatorMatrix) else o for o in out]
            return type(out)(items) if type(out) in (tuple, list) else tuple(items)
        return out


class Operator(nn.Module):
    """A (possibly nonlinear) forward model ``x -> A(x)``.

    Parameters
    ----------
    in_shape
        Event shape of the signal ``x``.
    out_shape
        Event shape of the observation ``A(x)``.
    """

    is_linear: bool = False
    has_svd: bool = False
    is_mask: bool = False
    #: One forward model per problem of a batch (signals carry the problems' axis first).
    per_problem: bool = False
    #: The SVD is diagonal in pixel coordinates (``V`` a permutation, ``U = I``, rank =
    #: ``out_dim``): conditioning can run elementwise on the signal grid, without the
    #: permutation gathers of ``V`` / ``V^T`` (:meth:`pixel_singular_values`,
    #: :meth:`pixel_observation`).
    pixel_svd: bool = False
    #: :meth:`Vt_range` / :meth:`V_range` are products with the range's ``r`` right singular
    #: vectors, far cheaper than ``V^T`` / ``V`` (``r`` much smaller than ``d``): conditioning
    #: can run on the signal grid with ``r``-dimensional corrections.
    thin_range: bool = False

    def __init__(self, in_shape: Sequence[int] | int, out_shape: Sequence[int] | int) -> None:
        super().__init__()
        self.in_shape = _shape(in_shape, "in_shape")
        self.out_shape = _shape(out_shape, "out_shape")

    @property
    def in_dim(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_dim(self) -> int:
        return math.prod(self.out_shape)

    def _lead(self, x: Tensor, shape: tuple[int, ...], what: str) -> torch.Size:
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        k = len(shape)
        if x.dim() < k or tuple(x.shape[x.dim() - k :]) != shape:
            raise ValueError(
                f"{type(self).__name__}: {what} must end with shape {shape}, got {tuple(x.shape)}"
            )
        return x.shape[: x.dim() - k]

    def flat_in(self, x: Tensor) -> Tensor:
        lead = self._lead(x, self.in_shape, "x")
        return x.reshape(lead + (self.in_dim,))

    def flat_out(self, y: Tensor) -> Tensor:
        lead = self._lead(y, self.out_shape, "y")
        return y.reshape(lead + (self.out_dim,))

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}"

    def float32_copy(self) -> Operator:
        """A float32 copy for running a 16-bit problem in float32 (the loop's upcast).
        Operators whose factors are computed at construction recompute them (``Dense``)."""
        import copy

        return copy.deepcopy(self).to(torch.float32)

    @staticmethod
    def _as(t: Tensor, x: Tensor) -> Tensor:
        """``t`` (a factor of the operator) in ``x``'s dtype: the result's dtype follows
        the input's, as the elementwise operators' does by promotion (a float32 matrix
        applied to float64 signals gave torch's raw dtype error)."""
        return t if t.dtype == x.dtype else t.to(x.dtype)

    def _ref(self) -> Tensor | None:
        """A buffer giving the operator's device and dtype (None if it has none)."""
        for b in self.buffers():
            if b.is_floating_point():
                return b
        return None


class LinearOperator(Operator):
    """A linear forward model with ``forward``, ``adjoint`` and optionally an implicit SVD."""

    is_linear = True

    def adjoint(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- SVD (implemented by operators with has_svd = True) --------------------------
    def singular_values(self) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no SVD")

    def Vt(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no SVD")

    def V(self, z: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no SVD")

    def Ut(self, y: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no SVD")

    def U(self, z: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no SVD")

    def pixel_singular_values(self) -> Tensor:
        """(``pixel_svd`` operators) ``(d,)``: each pixel's singular value, 0 off the range."""
        raise NotImplementedError(f"{type(self).__name__} is not diagonal in pixel coordinates")

    def pixel_observation(self, y_tilde: Tensor) -> Tensor:
        """(``pixel_svd`` operators) ``U^T y`` coordinates ``(..., m)`` placed at their
        pixels, ``(..., d)``, 0 elsewhere."""
        raise NotImplementedError(f"{type(self).__name__} is not diagonal in pixel coordinates")

    @property
    def rank(self) -> int:
        return int(self.singular_values().numel())

    def Vt_range(self, x: Tensor) -> Tensor:
        """``(V^T x)[..., :r]``: the coordinates of ``x`` along the right singular vectors of
        the range (``r`` = :attr:`rank`). Operators that hold those vectors override it with
        one product instead of the full ``V^T`` (:class:`~.dense.Dense`)."""
        return self.Vt(x)[..., : self.rank]

    def V_range(self, w: Tensor) -> Tensor:
        """``V [w; 0]`` for ``w`` of shape ``(..., r)``: a combination of the right singular
        vectors of the range, on the signal grid (as :meth:`Vt_range`)."""
        return self.V(self.pad_in(w))

    def pad_in(self, z: Tensor) -> Tensor:
        """Zero-pad spectral coordinates ``(..., r)`` to ``(..., d)``."""
        return nn.functional.pad(z, (0, self.in_dim - z.shape[-1]))

    def pad_out(self, z: Tensor) -> Tensor:
        """Zero-pad spectral coordinates ``(..., r)`` to ``(..., m)``."""
        return nn.functional.pad(z, (0, self.out_dim - z.shape[-1]))

    def pinv(self, y: Tensor) -> Tensor:
        """Moore-Penrose pseudo-inverse ``A^+ y``."""
        if not self.has_svd:
            return self._pinv_dense(y)
        s = self.singular_values()
        return self.V_range(self.Ut(y)[..., : s.numel()] / s)

    def _pinv_dense(self, y: Tensor) -> Tensor:
        lead = self._lead(y, self.out_shape, "y")
        Ap = torch.linalg.pinv(self.matrix().double()).to(y.dtype)
        return (self.flat_out(y) @ Ap.T).reshape(lead + self.in_shape)

    @property
    def matrix(self) -> OperatorMatrix:
        """The dense ``(m, d)`` matrix of the operator, a tensor: ``A.matrix @ x``. Calling
        it, ``A.matrix()``, also gives the matrix (the method form of earlier versions)."""
        return OperatorMatrix.of(self._matrix())

    def _matrix(self) -> Tensor:
        """The matrix, built by applying the operator to a basis (operators that store
        theirs return it)."""
        ref = self._ref()
        kw: dict[str, Any] = {} if ref is None else {"dtype": ref.dtype, "device": ref.device}
        eye = torch.eye(self.in_dim, **kw).reshape((self.in_dim,) + self.in_shape)
        return self.flat_out(self.forward(eye)).T.contiguous()

    def gram_solve(
        self,
        y: Tensor,
        r2: Tensor | float,
        s2: Tensor | float,
        *,
        cg_iters: int | None = None,
        cg_tol: float = 1e-10,
    ) -> Tensor:
        """``(r2 A A^T + s2 I)^-1 y`` for observations ``y`` ``(..., *out_shape)``.

        Through the SVD where the operator has one; otherwise by at most ``cg_iters``
        conjugate-gradient iterations (:func:`conjugate_gradient`, per leading index), or a
        dense solve of ``matrix()`` when ``cg_iters`` is ``None``. ``r2`` and ``s2`` are
        numbers or tensors broadcasting against the leading dimensions of ``y``.
        """
        lead = self._lead(y, self.out_shape, "y")
        if self.has_svd:
            s = self.singular_values()
            z = self.Ut(y)
            r = s.numel()
            r2t = torch.as_tensor(r2, dtype=y.dtype, device=y.device)
            s2t = torch.as_tensor(s2, dtype=y.dtype, device=y.device)
            denom = torch.cat(
                [
                    (r2t[..., None] * s**2 + s2t[..., None]).expand(z.shape[:-1] + (r,)),
                    s2t[..., None].expand(z.shape[:-1] + (self.out_dim - r,)),
                ],
                dim=-1,
            )
            return self.U(z / denom)
        if cg_iters is not None:
            k = len(self.out_shape)
            r2e, s2e = _event(r2, k), _event(s2, k)
            return conjugate_gradient(
                lambda v: r2e * self(self.adjoint(v)) + s2e * v, y, k, cg_iters, cg_tol
            )
        M = self.matrix()
        G = torch.as_tensor(r2, dtype=y.dtype, device=y.device)[..., None, None] * (M @ M.T)
        G = G + torch.as_tensor(s2, dtype=y.dtype, device=y.device)[..., None, None] * torch.eye(
            self.out_dim, dtype=y.dtype, device=y.device
        )
        sol = torch.linalg.solve(G, self.flat_out(y).unsqueeze(-1)).squeeze(-1)
        return sol.reshape(lead + self.out_shape)

    def damped_pinv(
        self,
        y: Tensor,
        r2: Tensor | float = 1.0,
        s2: Tensor | float = 0.0,
        *,
        cg_iters: int | None = None,
        cg_tol: float = 1e-10,
    ) -> Tensor:
        """``A^T (r2 A A^T + s2 I)^-1 y``: the pseudo-inverse ``A^+ y / r2`` for ``s2 = 0``.

        In the SVD this is ``V diag(s / (r2 s^2 + s2)) U^T y``, which never divides by zero
        (``r2 > 0`` or ``s2 > 0``), even for ``s2 = 0``. Without an SVD:
        ``A^T`` :meth:`gram_solve` (CG or dense, as there; ``s2 = 0`` needs ``y`` in the range
        of ``A`` for CG to converge). The damped ``A^T (A A^T + s2 I)^-1 y`` does not amplify
        the noise along tiny singular values as ``A^+`` does.
        """
        if self.has_svd:
            s = self.singular_values()
            z = self.Ut(y)[..., : s.numel()]
            return self.V_range(s * z / (_event(r2, 1) * s**2 + _event(s2, 1)))
        return self.adjoint(self.gram_solve(y, r2, s2, cg_iters=cg_iters, cg_tol=cg_tol))

    def prox_l2(
        self,
        z: Tensor,
        y: Tensor,
        rho: Tensor | float,
        *,
        cg_iters: int | None = None,
        cg_tol: float = 1e-10,
    ) -> Tensor:
        """``argmin_x ||A x - y||^2 + rho ||x - z||^2 = (A^T A + rho I)^-1 (A^T y + rho z)``.

        Parameters
        ----------
        z
            Signals ``(..., *in_shape)``, the centre of the proximal term.
        y
            Observations ``(..., *out_shape)`` broadcasting against ``A(z)``.
        rho
            ``rho >= 0`` (a number or a tensor broadcasting against the leading dimensions);
            ``rho = 0`` gives the projection ``z - A^+ (A z - y)`` onto ``{A x = y}``
            (for ``y`` in the range of ``A``).
        cg_iters, cg_tol
            Without an SVD: conjugate gradients started at ``z`` (at most ``cg_iters``
            iterations, relative residual ``cg_tol``); ``None``: a dense solve.

        In the SVD the map is closed form in spectral coordinates:
        ``xbar_i = (s_i (U^T y)_i + rho zbar_i) / (s_i^2 + rho)`` for ``i < r``, ``zbar_i``
        otherwise.
        """
        if self.has_svd:
            s = self.singular_values()
            r = s.numel()
            rho1 = _event(rho, 1)
            uty = self.Ut(y)[..., :r]
            zb = self.Vt(z)
            head = (s * uty + rho1 * zb[..., :r]) / (s**2 + rho1)
            lead = torch.broadcast_shapes(head.shape[:-1], zb.shape[:-1])
            tail = zb[..., r:].expand(lead + (zb.shape[-1] - r,))
            return self.V(torch.cat([head.expand(lead + (r,)), tail], dim=-1))
        k = len(self.in_shape)
        rho_e = _event(rho, k)
        b = self.adjoint(y) + rho_e * z
        if cg_iters is not None:
            return conjugate_gradient(
                lambda v: self.adjoint(self(v)) + rho_e * v, b, k, cg_iters, cg_tol, x0=z
            )
        lead = self._lead(b, self.in_shape, "z")
        M = self.matrix()
        G = M.T @ M + torch.as_tensor(rho, dtype=z.dtype, device=z.device)[
            ..., None, None
        ] * torch.eye(self.in_dim, dtype=z.dtype, device=z.device)
        sol = torch.linalg.solve(G, self.flat_in(b).unsqueeze(-1)).squeeze(-1)
        return sol.reshape(lead + self.in_shape)


def _event(c: Tensor | float, event_dim: int) -> Tensor | float:
    """A coefficient broadcasting against the leading dimensions, widened over the events."""
    if isinstance(c, Tensor) and c.dim() > 0:
        return c.reshape(c.shape + (1,) * event_dim)
    return c


def spectral_norm(op: LinearOperator, iterations: int = 50) -> float:
    """The largest singular value ``s_max`` of a linear operator: from its SVD where it has
    one, else by power iteration on ``A^T A`` (``iterations`` steps from a fixed
    pseudo-random start, so the value is deterministic; it can only underestimate)."""
    if op.has_svd:
        return float(op.singular_values().max())
    per_problem = getattr(op, "max_singular_value", None)
    if per_problem is not None:  # per-problem matrices: the largest over the problems
        return float(per_problem())
    ref = op._ref()
    kw: dict[str, Any] = {} if ref is None else {"dtype": ref.dtype, "device": ref.device}
    g = torch.Generator().manual_seed(0)
    v = torch.randn(op.in_shape, generator=g, dtype=torch.float64).to(**kw)
    v = v / v.norm()
    s2 = 0.0
    for _ in range(iterations):
        w = op.adjoint(op(v))
        s2 = float(w.norm())
        if s2 == 0:
            return 0.0
        v = w / s2
    return math.sqrt(s2)


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    event_dim: int,
    iters: int,
    tol: float = 1e-10,
    x0: Tensor | None = None,
) -> Tensor:
    """Batched conjugate gradients for ``M u = b`` (``M`` symmetric positive semi-definite).

    Every leading index of ``b`` (``(..., *event)``, the last ``event_dim`` axes one system)
    is an independent system: its step sizes use its own inner products, and it stops
    updating once its residual ``||b - M u||`` is at most ``tol ||b||`` (so one system's
    convergence never depends on the others). At most ``iters`` iterations; the loop ends
    early when every system has converged (one host synchronisation per iteration).

    Parameters
    ----------
    matvec
        ``v -> M v`` on tensors shaped like ``b`` (batched over the leading dimensions).
    b
        Right-hand sides.
    event_dim
        Number of trailing axes forming one vector.
    iters
        Maximum number of iterations.
    tol
        Relative residual at which a system stops (at least 10 times the dtype's epsilon).
    x0
        Starting point (default zero), e.g. the centre of a proximal map.

    Returns
    -------
    Tensor
        The approximate solution, shaped like ``b`` (broadcast with ``x0``).
    """
    red = tuple(range(b.dim() - event_dim, b.dim()))
    tiny = torch.finfo(b.dtype).tiny
    # a relative residual below the dtype's rounding is out of reach: on a singular system
    # (noiseless, no SVD) float32 CG would otherwise iterate on rounding noise and blow up
    tol = max(tol, 10 * torch.finfo(b.dtype).eps)

    def dot(u: Tensor, v: Tensor) -> Tensor:
        return (u * v).sum(red, keepdim=True)

    if x0 is None:
        u = torch.zeros_like(b)
        r = b
    else:
        u = x0
        r = b - matvec(x0)
    p = r
    rr = dot(r, r)
    stop = tol**2 * dot(b, b)
    for _ in range(iters):
        active = rr > stop
        if not bool(active.any()):
            break
        Mp = matvec(p)
        pMp = dot(p, Mp)
        # a direction with p^T M p = 0 (M singular) makes no step
        a = torch.where(active & (pMp > 0), rr / pMp.clamp_min(tiny), 0.0)
        u = u + a * p
        r = r - a * Mp
        rr_new = dot(r, r)
        beta = torch.where(active, rr_new / rr.clamp_min(tiny), 0.0)
        p = torch.where(active, r + beta * p, p)
        rr = torch.where(active, rr_new, rr)
    return u


def adjointness_error(
    op: LinearOperator, generator: torch.Generator | None = None, dtype=torch.float64
) -> float:
    """Relative error of ``<A x, y> = <x, A^T y>`` on random ``x``, ``y``."""
    x = torch.randn(op.in_shape, generator=generator, dtype=dtype)
    y = torch.randn(op.out_shape, generator=generator, dtype=dtype)
    lhs = (op(x) * y).sum()
    rhs = (x * op.adjoint(y)).sum()
    return float((lhs - rhs).abs() / (lhs.abs() + rhs.abs() + 1e-30))


def svd_error(
    op: LinearOperator, generator: torch.Generator | None = None, dtype=torch.float64
) -> float:
    """Relative error of ``U S V^T x = A x`` on a random ``x``."""
    x = torch.randn((3,) + op.in_shape, generator=generator, dtype=dtype)
    s = op.singular_values()
    usv = op.U(op.pad_out(s * op.Vt(x)[..., : s.numel()]))
    ax = op(x)
    return float((usv - ax).norm() / ax.norm().clamp_min(1e-30))

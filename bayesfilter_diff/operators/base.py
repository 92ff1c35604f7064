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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Operator", "LinearOperator", "adjointness_error", "svd_error"]


def _shape(shape: Sequence[int] | int, name: str) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {shape}")
    return shape


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

    @property
    def rank(self) -> int:
        return int(self.singular_values().numel())

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
        return self.V(self.pad_in(self.Ut(y)[..., : s.numel()] / s))

    def _pinv_dense(self, y: Tensor) -> Tensor:
        lead = self._lead(y, self.out_shape, "y")
        Ap = torch.linalg.pinv(self.matrix().double()).to(y.dtype)
        return (self.flat_out(y) @ Ap.T).reshape(lead + self.in_shape)

    def matrix(self) -> Tensor:
        """The dense ``(m, d)`` matrix of the operator (built by applying it to a basis)."""
        ref = self._ref()
        kw = {} if ref is None else {"dtype": ref.dtype, "device": ref.device}
        eye = torch.eye(self.in_dim, **kw).reshape((self.in_dim,) + self.in_shape)
        return self.flat_out(self.forward(eye)).T.contiguous()

    def gram_solve(self, y: Tensor, r2: Tensor | float, s2: Tensor | float) -> Tensor:
        """``(r2 A A^T + s2 I)^-1 y`` for observations ``y`` (through the SVD or densely)."""
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
        M = self.matrix()
        G = torch.as_tensor(r2, dtype=y.dtype, device=y.device)[..., None, None] * (M @ M.T)
        G = G + torch.as_tensor(s2, dtype=y.dtype, device=y.device)[..., None, None] * torch.eye(
            self.out_dim, dtype=y.dtype, device=y.device
        )
        sol = torch.linalg.solve(G, self.flat_out(y).unsqueeze(-1)).squeeze(-1)
        return sol.reshape(lead + self.out_shape)


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

"""Operators that average disjoint groups of entries: Downsample and Colorize.

For groups of ``g`` entries, each row of ``A`` is ``1/g`` on its group, so the rows are
orthogonal with norm ``1/sqrt(g)``: ``s = 1/sqrt(g)``, ``U = I``, and ``V`` is, within each
group, an orthonormal ``g x g`` matrix whose first column is ``1/sqrt(g)`` (a Householder
reflection). ``Vt`` lists the ``G`` group-mean coordinates first, then the ``G (g - 1)``
within-group ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import LinearOperator


def _householder_basis(g: int) -> Tensor:
    """Symmetric orthogonal ``g x g`` matrix ``H`` with ``H e_1 = 1/sqrt(g)``."""
    u = torch.full((g,), 1 / math.sqrt(g), dtype=torch.float64)
    v = torch.zeros(g, dtype=torch.float64)
    v[0] = 1.0
    v = v - u
    if v.norm() < 1e-12:
        return torch.eye(g, dtype=torch.float64)
    return torch.eye(g, dtype=torch.float64) - 2 * torch.outer(v, v) / (v @ v)


class BlockAverage(LinearOperator):
    """Average the entries of each group; ``groups`` is a ``(G, g)`` index tensor."""

    has_svd = True

    groups: Tensor
    H: Tensor
    _s: Tensor

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        groups: Tensor,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_shape, out_shape)
        G, g = groups.shape
        if G != self.out_dim or G * g != self.in_dim:
            raise ValueError("groups must partition the input into out_dim groups")
        dt = dtype or torch.get_default_dtype()
        self.group_size = g
        self.register_buffer("groups", groups)
        self.register_buffer("H", _householder_basis(g).to(dt))
        self.register_buffer("_s", torch.full((G,), 1 / math.sqrt(g), dtype=dt))

    def forward(self, x: Tensor) -> Tensor:
        xg = self.flat_in(x)[..., self.groups]  # (..., G, g)
        return xg.mean(-1).reshape(xg.shape[:-2] + self.out_shape)

    def adjoint(self, y: Tensor) -> Tensor:
        lead = self._lead(y, self.out_shape, "y")
        yf = self.flat_out(y) / self.group_size
        out = y.new_empty(lead + (self.in_dim,))
        out[..., self.groups] = yf.unsqueeze(-1).expand(lead + tuple(self.groups.shape))
        return out.reshape(lead + self.in_shape)

    def singular_values(self) -> Tensor:
        return self._s

    def Vt(self, x: Tensor) -> Tensor:
        c = self.flat_in(x)[..., self.groups] @ self.H  # (..., G, g); H symmetric
        return torch.cat([c[..., 0], c[..., 1:].flatten(-2)], dim=-1)

    def V(self, z: Tensor) -> Tensor:
        G, g = self.groups.shape
        c = torch.cat([z[..., :G, None], z[..., G:].unflatten(-1, (G, g - 1))], dim=-1)
        vals = c @ self.H  # H^-1 = H
        out = z.new_empty(z.shape[:-1] + (self.in_dim,))
        out[..., self.groups] = vals
        return out.reshape(z.shape[:-1] + self.in_shape)

    def Ut(self, y: Tensor) -> Tensor:
        return self.flat_out(y)

    def U(self, z: Tensor) -> Tensor:
        return z.reshape(z.shape[:-1] + self.out_shape)


class Downsample(BlockAverage):
    """Average pooling by an integer ``factor`` over the last two axes (super-resolution).

    ``in_shape`` is ``(H, W)`` or ``(C, H, W)`` with ``H`` and ``W`` divisible by ``factor``.
    """

    def __init__(self, in_shape: Sequence[int], factor: int, dtype: torch.dtype | None = None):
        in_shape = tuple(in_shape)
        if len(in_shape) not in (2, 3):
            raise ValueError(f"in_shape must be (H, W) or (C, H, W), got {in_shape}")
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor!r}")
        H, W = in_shape[-2:]
        if H % factor or W % factor:
            raise ValueError(f"image size {(H, W)} is not divisible by factor {factor}")
        C = in_shape[0] if len(in_shape) == 3 else 1
        h, w = H // factor, W // factor
        idx = torch.arange(C * H * W).reshape(C, h, factor, w, factor)
        groups = idx.permute(0, 1, 3, 2, 4).reshape(C * h * w, factor * factor)
        out_shape = in_shape[:-2] + (h, w)
        super().__init__(in_shape, out_shape, groups, dtype)
        self.factor = factor


class Colorize(BlockAverage):
    """RGB to grey: the mean over the channel axis of ``(C, H, W)`` images (colourisation)."""

    def __init__(self, in_shape: Sequence[int], dtype: torch.dtype | None = None):
        in_shape = tuple(in_shape)
        if len(in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W), got {in_shape}")
        C, H, W = in_shape
        groups = torch.arange(C * H * W).reshape(C, H * W).T.contiguous()
        super().__init__(in_shape, (1, H, W), groups, dtype)

"""Dense operator: any ``(m, d)`` matrix, its SVD computed once (float64, then cast)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import LinearOperator


class Dense(LinearOperator):
    """``A x = M x`` for a matrix ``M`` of shape ``(m, d)``.

    Parameters
    ----------
    matrix
        ``(m, d)`` floating-point tensor.
    in_shape
        Event shape of ``x`` (default ``(d,)``); the matrix acts on ``x`` flattened.
    rtol
        Singular values below ``rtol * max(s)`` count as zero (default: 1e3 x the dtype's
        machine epsilon).
    """

    has_svd = True

    def __init__(
        self, matrix: Tensor, in_shape: Sequence[int] | None = None, rtol: float | None = None
    ) -> None:
        if not isinstance(matrix, Tensor) or matrix.dim() != 2:
            raise ValueError(
                f"matrix must be a 2-D tensor (m, d), got {getattr(matrix, 'shape', matrix)}"
            )
        if not matrix.is_floating_point():
            raise TypeError(f"matrix must be floating point, got {matrix.dtype}")
        if not torch.isfinite(matrix).all():
            raise ValueError("matrix must be finite (no NaN or inf)")
        m, d = matrix.shape
        in_shape = (d,) if in_shape is None else tuple(in_shape)
        super().__init__(in_shape, (m,))
        if self.in_dim != d:
            raise ValueError(
                f"in_shape {in_shape} has {self.in_dim} entries, matrix has d={d} columns"
            )
        U, s, Vh = torch.linalg.svd(matrix.double(), full_matrices=True)
        rtol = rtol if rtol is not None else 1e3 * torch.finfo(matrix.dtype).eps
        r = int((s > rtol * s.max().clamp_min(1e-300)).sum())
        dt = matrix.dtype
        self.register_buffer("M", matrix)
        self.register_buffer("_U", U.to(dt))
        self.register_buffer("_s", s[:r].to(dt))
        self.register_buffer("_Vh", Vh.to(dt))

    def forward(self, x: Tensor) -> Tensor:
        return self.flat_in(x) @ self.M.T

    def adjoint(self, y: Tensor) -> Tensor:
        lead = self._lead(y, self.out_shape, "y")
        return (y @ self.M).reshape(lead + self.in_shape)

    def matrix(self) -> Tensor:
        return self.M

    def singular_values(self) -> Tensor:
        return self._s

    def Vt(self, x: Tensor) -> Tensor:
        return self.flat_in(x) @ self._Vh.T

    def V(self, z: Tensor) -> Tensor:
        return (z @ self._Vh).reshape(z.shape[:-1] + self.in_shape)

    def Ut(self, y: Tensor) -> Tensor:
        return self.flat_out(y) @ self._U

    def U(self, z: Tensor) -> Tensor:
        return z @ self._U.T


def gmm_benchmark_operator(
    dim: int,
    obs_dim: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Dense, float]:
    """The random operator and noise level of the Gaussian-mixture benchmark.

    Following Cardoso et al. (MCGdiff, ICLR 2024, appendix): draw a ``(d_y, d)`` standard
    normal matrix, take its SVD, replace the singular values by sorted ``U[0, 1]`` draws,
    ``A = U diag(s) V^T``; then ``sigma_y ~ U[0, max(s)]``.

    Returns
    -------
    (operator, sigma_y)
    """
    if obs_dim < 1 or dim < obs_dim:
        raise ValueError(f"need 1 <= obs_dim <= dim, got obs_dim={obs_dim}, dim={dim}")
    G = torch.randn(obs_dim, dim, generator=generator, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    s = torch.sort(
        torch.rand(obs_dim, generator=generator, dtype=torch.float64), descending=True
    ).values
    A = U @ torch.diag(s) @ Vh
    sigma_y = float(torch.rand((), generator=generator, dtype=torch.float64) * s.max())
    return Dense(A.to(dtype)), sigma_y

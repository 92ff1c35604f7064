"""Identity operator (denoising): ``A = I``, ``U = V = I``, ``s = 1``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import LinearOperator


class Identity(LinearOperator):
    """``A x = x`` on signals of shape ``shape``."""

    has_svd = True
    pixel_svd = True

    _s: Tensor

    def __init__(self, shape: Sequence[int] | int, dtype: torch.dtype | None = None) -> None:
        super().__init__(shape, shape)
        self.register_buffer(
            "_s", torch.ones(self.in_dim, dtype=dtype or torch.get_default_dtype())
        )

    def forward(self, x: Tensor) -> Tensor:
        self._lead(x, self.in_shape, "x")
        return x

    def adjoint(self, y: Tensor) -> Tensor:
        self._lead(y, self.out_shape, "y")
        return y

    def singular_values(self) -> Tensor:
        return self._s

    def pixel_singular_values(self) -> Tensor:
        return self._s

    def pixel_observation(self, y_tilde: Tensor) -> Tensor:
        return y_tilde

    def Vt(self, x: Tensor) -> Tensor:
        return self.flat_in(x)

    def V(self, z: Tensor) -> Tensor:
        return z.reshape(z.shape[:-1] + self.in_shape)

    def Ut(self, y: Tensor) -> Tensor:
        return self.flat_in(y)

    def U(self, z: Tensor) -> Tensor:
        return z.reshape(z.shape[:-1] + self.out_shape)

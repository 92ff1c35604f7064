"""Masking operator (inpainting): keep the observed entries of ``x``.

``A x`` is the vector of observed entries (length ``m``), so ``A`` has full row rank,
``A A^T = I``, ``s = 1``, ``U = I`` and ``V^T`` is the permutation that lists the observed
entries first. :meth:`Mask.embed` puts an observation back on the signal grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import LinearOperator


class Mask(LinearOperator):
    """Observe the entries where ``mask`` is true.

    Parameters
    ----------
    mask
        Boolean tensor of the signal's shape (``(d,)`` or ``(C, H, W)``); ``True`` marks an
        observed entry. At least one entry must be observed.
    dtype
        Floating dtype of the operator (its singular values); default torch's default.
    """

    has_svd = True
    is_mask = True
    pixel_svd = True

    mask: Tensor
    obs_idx: Tensor
    perm: Tensor
    inv_perm: Tensor
    _s: Tensor

    def __init__(self, mask: Tensor, dtype: torch.dtype | None = None) -> None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a boolean torch.Tensor")
        flat = mask.reshape(-1)
        obs = torch.nonzero(flat).squeeze(-1)
        if obs.numel() == 0:
            raise ValueError("mask must observe at least one entry")
        unobs = torch.nonzero(~flat).squeeze(-1)
        super().__init__(tuple(mask.shape), (int(obs.numel()),))
        perm = torch.cat([obs, unobs])
        self.register_buffer("mask", mask)
        self.register_buffer("obs_idx", obs)
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))
        self.register_buffer(
            "_s", torch.ones(obs.numel(), dtype=dtype or torch.get_default_dtype())
        )

    @classmethod
    def random(
        cls,
        shape: Sequence[int],
        observed_fraction: float,
        generator: torch.Generator | None = None,
        per_pixel: bool = True,
        dtype: torch.dtype | None = None,
    ) -> Mask:
        """Observe a random ``observed_fraction`` of the entries.

        For image shapes ``(C, H, W)`` with ``per_pixel=True`` the same pixels are observed
        in every channel.
        """
        if not 0 < observed_fraction <= 1:
            raise ValueError(f"observed_fraction must be in (0, 1], got {observed_fraction}")
        shape = tuple(shape)
        base = shape[1:] if (per_pixel and len(shape) == 3) else shape
        n = int(torch.tensor(base).prod())
        k = max(1, round(observed_fraction * n))
        idx = torch.randperm(n, generator=generator)[:k]
        m = torch.zeros(n, dtype=torch.bool)
        m[idx] = True
        m = m.reshape(base)
        if base != shape:
            m = m.expand(shape).clone()
        return cls(m, dtype=dtype)

    @classmethod
    def box(
        cls,
        shape: Sequence[int],
        top: int,
        left: int,
        height: int,
        width: int,
        dtype: torch.dtype | None = None,
    ) -> Mask:
        """Hide the box ``[top:top+height, left:left+width]`` of every channel of an image."""
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(f"box masks need an image shape (H, W) or (C, H, W), got {shape}")
        H, W = shape[-2:]
        if not (0 <= top < H and 0 <= left < W and height > 0 and width > 0):
            raise ValueError(
                f"box {(top, left, height, width)} does not fit an image of size {(H, W)}"
            )
        m = torch.ones(shape, dtype=torch.bool)
        m[..., top : top + height, left : left + width] = False
        return cls(m, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.flat_in(x)[..., self.obs_idx]

    def adjoint(self, y: Tensor) -> Tensor:
        lead = self._lead(y, self.out_shape, "y")
        out = y.new_zeros(lead + (self.in_dim,))
        out[..., self.obs_idx] = y
        return out.reshape(lead + self.in_shape)

    def embed(self, y: Tensor, fill: float = 0.0) -> Tensor:
        """Observation ``y`` placed on the signal grid, ``fill`` elsewhere."""
        lead = self._lead(y, self.out_shape, "y")
        out = y.new_full(lead + (self.in_dim,), fill)
        out[..., self.obs_idx] = y
        return out.reshape(lead + self.in_shape)

    def singular_values(self) -> Tensor:
        return self._s

    def pixel_singular_values(self) -> Tensor:
        return self.mask.reshape(-1).to(self._s.dtype)

    def pixel_observation(self, y_tilde: Tensor) -> Tensor:
        out = y_tilde.new_zeros(y_tilde.shape[:-1] + (self.in_dim,))
        out[..., self.obs_idx] = y_tilde
        return out

    def Vt(self, x: Tensor) -> Tensor:
        return self.flat_in(x)[..., self.perm]

    def V(self, z: Tensor) -> Tensor:
        return z[..., self.inv_perm].reshape(z.shape[:-1] + self.in_shape)

    def Ut(self, y: Tensor) -> Tensor:
        return self.flat_out(y)

    def U(self, z: Tensor) -> Tensor:
        return z

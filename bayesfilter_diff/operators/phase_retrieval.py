"""Phase retrieval: ``A(x) = |F pad(x)|``, the Fourier magnitude of the zero-padded image.

Nonlinear, forward only; the gradient-based samplers (DPS, TDS) differentiate it with
autograd. ``oversampling`` is the padded size over the image size per axis (2 by default,
as in DPS's phase-retrieval experiments); the FFT is orthonormal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Operator


class PhaseRetrieval(Operator):
    """Fourier magnitude of an ``(H, W)`` or ``(C, H, W)`` image zero-padded by ``oversampling``."""

    def __init__(self, in_shape: Sequence[int], oversampling: float = 2.0) -> None:
        in_shape = tuple(in_shape)
        if len(in_shape) not in (2, 3):
            raise ValueError(f"in_shape must be (H, W) or (C, H, W), got {in_shape}")
        if oversampling < 1:
            raise ValueError(f"oversampling must be >= 1, got {oversampling}")
        H, W = in_shape[-2:]
        Hp, Wp = int(round(H * oversampling)), int(round(W * oversampling))
        super().__init__(in_shape, in_shape[:-2] + (Hp, Wp))
        self.pad = (0, Wp - W, 0, Hp - H)

    def forward(self, x: Tensor) -> Tensor:
        self._lead(x, self.in_shape, "x")
        # (16-bit signals in float32: torch's FFT takes no Half on the CPU)
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        xp = torch.nn.functional.pad(xs, self.pad)
        return torch.fft.fft2(xp, norm="ortho").abs().to(x.dtype)

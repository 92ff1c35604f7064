"""Blur: circular convolution with a kernel, diagonalised by the FFT.

``A x = F^-1 (D . F x)`` with ``D = F k`` (the kernel zero-padded and centred at the
origin), applied per channel. The real SVD follows from ``D = |D| e^{i phi}``: the filter
with response ``|D|`` is real, even and therefore diagonal in the (real, orthonormal,
self-inverse) discrete Hartley basis ``Hx = Re(F x) - Im(F x)``, and the all-pass filter
``e^{i phi}`` is orthogonal. So ``A = U S V^T`` with ``V = Hartley``, ``S = |D|`` and
``U = allpass o Hartley``, all applied with FFTs in ``O(d log d)``; no dense matrix is ever
formed. Singular values below ``rtol * max`` count as zero (unobserved directions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import LinearOperator

__all__ = ["Blur", "gaussian_kernel", "motion_kernel"]


def gaussian_kernel(size: int, std: float, dtype: torch.dtype | None = None) -> Tensor:
    """Normalised ``size x size`` Gaussian kernel with standard deviation ``std`` (pixels)."""
    if size < 1 or std <= 0:
        raise ValueError(f"need size >= 1 and std > 0, got size={size}, std={std}")
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / std) ** 2)
    k = torch.outer(g, g)
    return (k / k.sum()).to(dtype or torch.get_default_dtype())


def motion_kernel(
    size: int,
    angle: float | None = None,
    length: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """A linear motion-blur kernel: a line of ``length`` pixels at ``angle`` (radians).

    A random angle is drawn with ``generator`` when ``angle`` is None.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if angle is None:
        angle = float(torch.rand((), generator=generator, dtype=torch.float64) * math.pi)
    length = float(size) if length is None else float(length)
    c = (size - 1) / 2
    k = torch.zeros(size, size, dtype=torch.float64)
    for r in torch.linspace(-length / 2, length / 2, 8 * size, dtype=torch.float64):
        i = int(round(c + float(r) * math.sin(angle)))
        j = int(round(c + float(r) * math.cos(angle)))
        if 0 <= i < size and 0 <= j < size:
            k[i, j] += 1.0
    return (k / k.sum()).to(dtype or torch.get_default_dtype())


def _dht2(x: Tensor) -> Tensor:
    f = torch.fft.fft2(x, norm="ortho")
    return f.real - f.imag


class Blur(LinearOperator):
    """Circular convolution of ``(H, W)`` or ``(C, H, W)`` images with ``kernel``.

    Parameters
    ----------
    kernel
        ``(kh, kw)`` tensor (not necessarily normalised), ``kh <= H``, ``kw <= W``.
    in_shape
        Image shape.
    rtol
        Relative threshold under which a singular value counts as zero (default 1e3 times
        the machine epsilon of the computation's dtype: the kernel's own, float32 for a
        16-bit kernel, whose problems run in float32). ``dropped_singular_value`` is the
        largest one counted as zero: :class:`~bayesfilter_diff.InverseProblem` refuses a
        Gaussian noise level at which that direction would still be informative.
    """

    has_svd = True

    kernel: Tensor
    D: Tensor
    phase: Tensor
    order: Tensor
    inv_order: Tensor
    _s: Tensor

    def __init__(self, kernel: Tensor, in_shape: Sequence[int], rtol: float | None = None) -> None:
        in_shape = tuple(in_shape)
        if len(in_shape) not in (2, 3):
            raise ValueError(f"in_shape must be (H, W) or (C, H, W), got {in_shape}")
        if not isinstance(kernel, Tensor) or kernel.dim() != 2 or not kernel.is_floating_point():
            raise ValueError("kernel must be a 2-D floating-point tensor")
        if not torch.isfinite(kernel).all():
            raise ValueError("kernel must be finite")
        H, W = in_shape[-2:]
        kh, kw = kernel.shape
        if kh > H or kw > W:
            raise ValueError(f"kernel {tuple(kernel.shape)} is larger than the image {(H, W)}")
        super().__init__(in_shape, in_shape)
        dt = kernel.dtype
        kpad = torch.zeros(H, W, dtype=torch.float64)
        kpad[:kh, :kw] = kernel.double()
        kpad = torch.roll(kpad, shifts=(-(kh // 2), -(kw // 2)), dims=(0, 1))
        D = torch.fft.fft2(kpad)
        mag = D.abs()
        phase = torch.where(mag > 0, D / mag.clamp_min(1e-300), torch.ones_like(D))
        C = in_shape[0] if len(in_shape) == 3 else 1
        s_full = mag.expand(C, H, W).reshape(-1)
        order = torch.argsort(s_full, descending=True, stable=True)
        if rtol is None:
            rtol = 1e3 * torch.finfo(dt if torch.finfo(dt).bits > 16 else torch.float32).eps
        self.rtol = float(rtol)
        keep = s_full > self.rtol * s_full.max()
        r = int(keep.sum())
        #: the largest singular value counted as zero (0.0 if none)
        self.dropped_singular_value = float(s_full[~keep].max()) if r < s_full.numel() else 0.0
        if r == 0:
            raise ValueError("kernel must not be all zeros")
        cdt = torch.complex128 if dt == torch.float64 else torch.complex64
        self.register_buffer("kernel", kernel)
        self.register_buffer("D", D.to(cdt))
        self.register_buffer("phase", phase.to(cdt))
        self.register_buffer("order", order)
        self.register_buffer("inv_order", torch.argsort(order))
        self.register_buffer("_s", s_full[order[:r]].to(dt))

    def float32_copy(self) -> Blur:
        """The operator in float32, its spectrum recomputed from the kernel (with the rank
        decided as for the kernel's own dtype)."""
        return Blur(self.kernel.float(), self.in_shape, rtol=self.rtol).to(self.kernel.device)

    def _filter(self, x: Tensor, response: Tensor) -> Tensor:
        # (16-bit signals in float32: torch's FFT takes no Half on the CPU; the result in
        # the input's dtype)
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return torch.fft.ifft2(torch.fft.fft2(xs) * response).real.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        self._lead(x, self.in_shape, "x")
        return self._filter(x, self.D)

    def adjoint(self, y: Tensor) -> Tensor:
        self._lead(y, self.out_shape, "y")
        return self._filter(y, self.D.conj())

    def singular_values(self) -> Tensor:
        return self._s

    def Vt(self, x: Tensor) -> Tensor:
        self._lead(x, self.in_shape, "x")
        return self.flat_in(_dht2(x))[..., self.order]

    def V(self, z: Tensor) -> Tensor:
        return _dht2(z[..., self.inv_order].reshape(z.shape[:-1] + self.in_shape))

    def Ut(self, y: Tensor) -> Tensor:
        self._lead(y, self.out_shape, "y")
        return self.Vt(self._filter(y, self.phase.conj()))

    def U(self, z: Tensor) -> Tensor:
        return self._filter(self.V(z), self.phase)

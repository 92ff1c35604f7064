"""Image metrics: PSNR, SSIM, pixel-wise coverage and the posterior moments they read.

For posterior samples of images ``(..., C, H, W)`` against a ground truth:

- :func:`psnr`: peak signal-to-noise ratio per image, in dB;
- :func:`ssim`: the structural similarity index of Wang, Bovik, Sheikh & Simoncelli (IEEE
  TIP 2004), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, with a Gaussian window of std 1
  truncated to 5x5 by default (the usual 11x11, std 1.5 window does not fit an 8x8 image),
  on reflect-padded images, averaged over all pixels and channels;
- :func:`coverage90`: the fraction of pixels whose true value lies in the draws' central 90%
  interval (per image; unlike :func:`~bayesfilter_diff.diagnostics.coverage`, which pools
  many problems per statistic);
- :func:`weighted_moments`: the posterior mean and pixel-wise standard deviation of a
  (weighted) :class:`~bayesfilter_diff.Result`.

The data range ``L`` defaults to 2, for pixels in ``[-1, 1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..operators import gaussian_kernel
from ..result import Result

__all__ = ["DATA_RANGE", "psnr", "ssim", "coverage90", "weighted_moments"]

#: Data range of pixels in ``[-1, 1]``.
DATA_RANGE = 2.0


def psnr(x: Tensor, ref: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    Parameters
    ----------
    x, ref
        Images ``(..., C, H, W)`` (``ref`` broadcast against ``x``).
    data_range
        ``L``: ``PSNR = 10 log10(L^2 / MSE)``.

    Returns
    -------
    Tensor
        ``x.shape[:-3]`` (the leading dimensions are kept).
    """
    mse = ((x - ref) ** 2).flatten(-3).mean(-1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def ssim(
    x: Tensor, ref: Tensor, data_range: float = DATA_RANGE, size: int = 5, std: float = 1.0
) -> Tensor:
    """Structural similarity (Wang et al. 2004) per image of ``(..., C, H, W)`` tensors.

    Local statistics with a normalised ``size x size`` Gaussian window of standard
    deviation ``std`` on reflect-padded images; the SSIM map is averaged over all pixels
    and channels. ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with ``L = data_range``.
    With ``size = 2 int(3.5 std + 0.5) + 1`` this is ``torchmetrics``' SSIM with a Gaussian
    kernel (tested equal; it picks that window from ``std``); the default 5x5 window for
    ``std = 1`` is smaller than its 9x9, which would be wider than the toolkit's 8x8 digits.

    Returns
    -------
    Tensor
        ``x.shape[:-3]``, float64.
    """
    lead = x.shape[:-3]
    C, H, W = x.shape[-3:]
    a = x.reshape(-1, C, H, W).double()
    b = ref.expand_as(x).reshape(-1, C, H, W).double()
    w = gaussian_kernel(size, std, dtype=torch.float64)
    w = w.expand(C, 1, size, size)
    p = size // 2

    def filt(z: Tensor) -> Tensor:
        return F.conv2d(F.pad(z, (p, p, p, p), mode="reflect"), w, groups=C)

    mu_a, mu_b = filt(a), filt(b)
    saa = filt(a * a) - mu_a**2
    sbb = filt(b * b) - mu_b**2
    sab = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return m.flatten(1).mean(1).reshape(lead)


def coverage90(draws: Tensor, truth: Tensor) -> Tensor:
    """Fraction of pixels (per image) whose truth lies in the draws' central 90% interval.

    Parameters
    ----------
    draws
        ``(B, N, *event)``: ``N`` equally weighted draws per image.
    truth
        ``(B, *event)``.

    Returns
    -------
    Tensor
        ``(B,)`` float64; the interval is between the empirical 5% and 95% quantiles
        (``torch.quantile``'s linear interpolation) of each pixel's draws.
    """
    q = torch.quantile(
        draws.flatten(2).double(), torch.tensor([0.05, 0.95], dtype=torch.float64), dim=1
    )
    t = truth.flatten(1).double()
    return ((t >= q[0]) & (t <= q[1])).double().mean(1)


def weighted_moments(res: Result) -> tuple[Tensor, Tensor]:
    """Posterior mean and pixel-wise standard deviation ``(B, *event)`` (weighted).

    ``res`` must be batched (``samples`` of shape ``(B, N, *event)``); weighted samplers'
    particles count with their normalised weights, unweighted ones equally.
    """
    W = res.weights().to(res.samples.dtype)
    Wx = W.reshape(W.shape + (1,) * (res.samples.dim() - W.dim()))
    mean = (Wx * res.samples).sum(1)
    var = (Wx * (res.samples - mean.unsqueeze(1)) ** 2).sum(1)
    return mean, var.clamp_min(0).sqrt()

"""Conditioning in an operator's SVD basis, written once (FPS, MCGdiff, SMCDiff, DDRM, DDNM).

Notation of the samplers' docstrings: a linear operator ``A = U diag(s) V^T`` with ``r``
positive singular values ``s`` (the operators list only those), ``d = in_dim``,
``m = out_dim``, and ``y = A x + sigma_y n``. In the spectral coordinates
``x_bar = V^T x`` and ``y~ = U^T y``:

- the first ``r`` coordinates are observed: ``y~_i = s_i x_bar_i + sigma_y n_i``, i.e. the
  *spectral observation* ``y_bar_i = y~_i / s_i = x_bar_i + (sigma_y / s_i) n_i``
  (:func:`spectral_observation`); the other ``d - r`` coordinates of ``x_bar`` (the null
  space of ``A``) are unobserved;
- the last ``m - r`` coordinates of ``y~`` (outside the range of ``A``) are pure noise,
  ``y~_i ~ N(0, sigma_y^2)``, the same for every ``x`` (:func:`out_of_range_log_likelihood`);
- a Gaussian prior ``N(mu, v)`` on a coordinate times a Gaussian observation of it is a
  Gaussian product (:func:`gaussian_product`); over all coordinates, the draw from
  ``N(x; mu, v I) N(y; A x, r2 I)`` with its predictive likelihood (:func:`condition`);
- the *observation time* ``tau_i`` of coordinate ``i``: ``alpha_t y_bar_i`` has the law of
  the noised ``x_bar_t^i`` when ``sigma_t / alpha_t = sigma_y / s_i``
  (:func:`exact_observation_times`, :func:`observation_time_indices`);
- the pseudo-inverse correction ``-Lambda V^T A^+ (A x0 - y)``, which on the observed
  coordinates is ``lambda_i (y_bar_i - x_bar0_i)`` (:func:`pinv_correction`), and the
  fresh noise that tops up the noise ``y_bar`` carries to a given level
  (:func:`residual_std`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, cast

import torch
from torch import Tensor

from ..operators.base import LinearOperator, Operator, spectral_norm
from ..schedules import Schedule
from .kernels import (
    extend_to_log_snr,
    gaussian_log_density,
    log_normal,
    refine_in_log_snr,
    rowsq,
    time_at_log_snr,
)

__all__ = [
    "SpectralObservation",
    "spectral_observation",
    "out_of_range_log_likelihood",
    "GaussianProduct",
    "gaussian_product",
    "condition",
    "condition_pixels",
    "PixelClasses",
    "pixel_classes",
    "PixelObservation",
    "observe_on_pixels",
    "condition_range",
    "PixelGaussian",
    "observation_time_indices",
    "exact_observation_times",
    "pinv_correction",
    "residual_std",
    "informative_time_grid",
]


class SpectralObservation(NamedTuple):
    """``s`` ``(r,)``, ``y~ = U^T y`` ``(B, m)`` and ``y_bar = y~_{:r} / s`` ``(B, r)``."""

    s: Tensor
    y_tilde: Tensor
    y_bar: Tensor

    @property
    def r(self) -> int:
        return self.s.numel()


def spectral_observation(
    op: LinearOperator, y: Tensor, dtype: torch.dtype | None = None
) -> SpectralObservation:
    """The observation in the SVD basis of ``op``.

    Parameters
    ----------
    op
        A linear operator with an SVD.
    y
        Observations ``(B, *out_shape)``.
    dtype
        Cast the singular values to this dtype (and ``y``'s device); default: as stored.
    """
    s = op.singular_values()
    if dtype is not None:
        s = s.to(dtype=dtype, device=y.device)
    y_tilde = op.Ut(y)
    return SpectralObservation(s, y_tilde, y_tilde[..., : s.numel()] / s)


def out_of_range_log_likelihood(y_tilde: Tensor, r: int, var: Tensor | float) -> Tensor:
    """``log N(y~_{r:}; 0, var I)``: the part of ``y`` outside the range of ``A``, ``(...)``.

    ``y~ = U^T y`` ``(..., m)``; zero when ``r = m``. The same for every ``x``: it enters an
    evidence, never the relative weights.
    """
    yn = y_tilde[..., r:]
    return gaussian_log_density(yn, torch.zeros_like(yn), var, event_dim=1)


class GaussianProduct(NamedTuple):
    """``N(x; mu, v) N(y; s x, r2) = N(y; s mu, pred_var) N(x; mean, var)``, per coordinate."""

    mean: Tensor
    var: Tensor
    pred_var: Tensor


def gaussian_product(
    mu: Tensor | float,
    v: Tensor | float,
    y: Tensor,
    r2: Tensor | float,
    s: Tensor | None = None,
) -> GaussianProduct:
    """Condition the prior ``N(x; mu, v)`` on the observation ``y ~ N(s x, r2)``, per coordinate.

    ::

        pred_var = r2 + s^2 v,   mean = (r2 mu + v s y) / pred_var,   var = v r2 / pred_var;

    for an observation of the coordinate itself (``s = None``, i.e. 1) this is
    ``mean = K y + (1 - K) mu``, ``var = K r2`` with ``K = v / (v + r2)``. Everything
    broadcasts; ``pred_var`` must be positive. The normaliser is the predictive
    ``N(y; s mu, pred_var)``.
    """
    vs = v if s is None else v * s
    den = r2 + (v if s is None else v * s**2)
    # callers pass a tensor for at least one of v, r2 and s, so var and den are tensors
    return GaussianProduct((r2 * mu + vs * y) / den, cast(Tensor, v * r2 / den), cast(Tensor, den))


def condition(
    op: LinearOperator,
    s: Tensor,
    mu_bar: Tensor,
    v: Tensor | float,
    r2: Tensor | float,
    y_tilde: Tensor,
    z: Tensor,
) -> tuple[Tensor, Tensor]:
    """Draw ``x ~ N(x; mu, v I) N(y; A x, r2 I)`` (normalised) and return ``log p(y)``.

    Per observed coordinate :func:`gaussian_product` with ``s_i``; the null space keeps
    ``N(mu_bar_i, v)``; the predictive likelihood is ``log N(y; A mu, r2 I + v A A^T)``,
    including the out-of-range part of ``y`` (for ``r2 > 0``).

    Parameters
    ----------
    op
        The operator (for ``V``).
    s
        Singular values ``(r,)``.
    mu_bar
        ``V^T mu``, ``(B, N, d)``.
    v, r2
        Prior and observation variances (``r2 + v s_i^2 > 0``).
    y_tilde
        ``U^T y``, ``(B, P, m)`` with ``P`` = 1 (shared by the particles) or ``N``.
    z
        Standard normal ``(B, N, d)`` (spectral coordinates).

    Returns
    -------
    (x, log_pred)
        ``x = V x_bar`` of shape ``(B, N, *in_shape)`` and ``log N(y; A mu, r2 I + v A A^T)``,
        ``(B, N)``.
    """
    r = s.numel()
    mr, yr = mu_bar[..., :r], y_tilde[..., :r]
    p = gaussian_product(mr, v, yr, r2, s)
    # the null space's N(mu_bar_i, v) in one pass, the observed coordinates written over it
    x_bar = torch.add(mu_bar, z, alpha=math.sqrt(v))
    x_bar[..., :r] = p.mean + torch.sqrt(p.var) * z[..., :r]
    log_pred = log_normal(yr, s * mr, p.pred_var).sum(-1)
    if y_tilde.shape[-1] > r and r2 > 0:
        log_pred = log_pred + out_of_range_log_likelihood(y_tilde, r, r2)
    return op.V(x_bar), log_pred


def condition_range(
    op: LinearOperator,
    s: Tensor,
    mu: Tensor,
    v: Tensor | float,
    r2: Tensor | float,
    y_tilde: Tensor,
    z: Tensor,
) -> tuple[Tensor, Tensor]:
    """:func:`condition` on the signal grid for an operator with ``thin_range`` (a wide
    ``Dense``): ``x = mu + sqrt(v) z + V_r (m - V_r^T (mu + sqrt(v) z))`` with ``m`` the
    observed coordinates' conditional draw, so only the range's ``r`` coordinates are
    transformed (two ``(d, r)`` products) instead of the full ``V^T mu`` and ``V x_bar``.
    The same law as :func:`condition` (with ``z`` on the signal grid: ``condition`` with
    spectral noise ``z'`` equals this with ``z = V z'``).

    Parameters
    ----------
    mu
        Prior mean on the signal grid, ``(B, N, *in_shape)``.
    z
        Standard normal ``(B, N, d)`` on the signal grid.
    """
    r = s.numel()
    sv = math.sqrt(v)
    mr, zr, yr = op.Vt_range(mu), op.Vt_range(z.reshape(mu.shape)), y_tilde[..., :r]
    p = gaussian_product(mr, v, yr, r2, s)
    part = p.mean + torch.sqrt(p.var) * zr
    # the prior kernel's draw, its range coordinates replaced by the conditional ones
    x = torch.add(op.flat_in(mu), z, alpha=sv)
    x = x.reshape(mu.shape).add_(op.V_range(part - torch.add(mr, zr, alpha=sv)))
    log_pred = log_normal(yr, s * mr, p.pred_var).sum(-1)
    if y_tilde.shape[-1] > r and r2 > 0:
        log_pred = log_pred + out_of_range_log_likelihood(y_tilde, r, r2)
    return x, log_pred


class PixelClasses(NamedTuple):
    """The pixels of an operator whose SVD is diagonal in pixels (``op.pixel_svd``) grouped
    by singular value: the distinct values ``(u,)`` (0 off the range), each pixel's class
    ``(d,)`` and the classes' sizes ``(u,)``. A mask has two classes, the identity one, so
    per-pixel coefficients are computed per class and read by one gather each."""

    values: Tensor
    label: Tensor
    counts: Tensor


def pixel_classes(op: LinearOperator, dtype: torch.dtype, device: torch.device) -> PixelClasses:
    """:class:`PixelClasses` of ``op`` (a sort of its ``d`` pixel singular values: once per
    run, not per step)."""
    s = op.pixel_singular_values().to(dtype=dtype, device=device)
    values, label, counts = torch.unique(s, return_inverse=True, return_counts=True)
    return PixelClasses(values, label, counts.to(dtype))


def condition_pixels(
    op: LinearOperator,
    mu: Tensor,
    v: Tensor | float,
    r2: Tensor | float,
    y_pix: Tensor,
    z: Tensor,
    classes: PixelClasses,
) -> tuple[Tensor, Tensor]:
    """:func:`condition` for an operator whose SVD is diagonal in pixel coordinates
    (``op.pixel_svd``: masks, the identity), elementwise on the signal grid.

    With each pixel's singular value ``s_j`` (0 off the range) the Gaussian product is, per
    pixel, ``x_j = a_j mu_j + b_j y_j + c_j z_j`` with ``(d,)`` coefficient vectors
    (``a = r2 / pred``, ``b = v s / pred``, ``c^2 = v r2 / pred``, ``pred = r2 + v s^2``;
    ``a = 1``, ``b = 0``, ``c^2 = v`` off the range) and ``log_pred`` a weighted sum of
    squares: no ``V`` / ``V^T`` gathers. The same law as :func:`condition` (with ``z`` in
    pixel coordinates: ``condition`` with spectral noise ``z'`` equals this with
    ``z = V z'``).

    Parameters
    ----------
    mu
        Prior mean on the signal grid, ``(B, N, *in_shape)``.
    y_pix
        ``op.pixel_observation(U^T y)``, ``(B, P, d)`` with ``P`` = 1 or ``N``.
    z
        Standard normal ``(B, N, d)``; consumed (the draw is written into it).
    classes
        ``pixel_classes(op, ...)``: the coefficients are computed per class of pixels.
    """
    s, idx = classes.values, classes.label  # (u,) distinct singular values, (d,) classes
    obs = s > 0
    pred = r2 + v * s**2
    safe = torch.where(obs, pred, torch.ones_like(pred))
    a = torch.where(obs, r2 / safe, torch.ones_like(pred))
    b = torch.where(obs, v * s / safe, torch.zeros_like(pred))
    c = torch.where(obs, v * r2 / safe, v * torch.ones_like(pred)).sqrt()
    sw = torch.where(obs, safe.rsqrt(), torch.zeros_like(pred))
    const = -0.5 * (classes.counts * torch.where(obs, torch.log(2 * math.pi * safe), 0.0)).sum()
    # per pixel (index_select: several times faster on the CPU than indexing with idx)
    a, b, c, sw, sws = (w.index_select(-1, idx) for w in (a, b, c, sw, sw * s))
    m = op.flat_in(mu)
    # c z + a mu + b y (b y is (B, 1, d) for a shared y), in the noise's array (consumed)
    x = z.mul_(c).addcmul_(a, m).add_(b * y_pix)
    # log_pred: one pass writes sqrt(w) (y - s mu), w = 1 / pred on the range (0 off it), and a
    # row-wise dot product reads it (no squared copy)
    resid = torch.addcmul(sw * y_pix, sws, m, value=-1.0)
    log_pred = -0.5 * rowsq(resid) + const
    return x.reshape(mu.shape), log_pred


class PixelObservation(NamedTuple):
    """An observation on the pixel grid of an operator whose SVD is diagonal in pixels
    (``op.pixel_svd``), once per run: the pixels by singular value (:class:`PixelClasses`),
    every pixel's singular value ``s`` ``(d,)`` and ``U^T y`` at its pixels ``y`` ``(B, 1,
    d)`` (0 off the range)."""

    classes: PixelClasses
    s: Tensor
    y: Tensor

    def residual(self, x: Tensor) -> Tensor:
        """``U^T y - s x`` on the pixel grid, ``(..., d)``, 0 off the range: its squares
        summed are ``||y - A x||^2`` without the gather of the observed entries or the
        scatter of its gradient."""
        return torch.addcmul(self.y, self.s, x, value=-1.0)


def observe_on_pixels(op: LinearOperator, y: Tensor) -> PixelObservation:
    """:class:`PixelObservation` of ``y`` ``(B, 1, *out)`` through ``op``."""
    classes = pixel_classes(op, y.dtype, y.device)
    s = classes.values.index_select(0, classes.label)
    return PixelObservation(classes, s, op.pixel_observation(op.Ut(y)))


class PixelGaussian:
    """``x0 -> -0.5 ||y_w - s_w x0||^2`` per particle ``(B, N)``: a Gaussian log-density
    (up to its constant) diagonal on the pixel grid (operators with ``op.pixel_svd``: masks,
    the identity), ``y_w`` ``(B, 1, d)`` and ``s_w`` ``(d,)`` or ``(B, 1, d)`` weighted
    observations and singular values, 0 off the range. :meth:`value_and_grad` gives its
    gradient ``s_w (y_w - s_w x0)`` in closed form, so that a sampler differentiating it
    through the network runs autograd only through the network (``J^T u``), not through the
    residual and its squares."""

    def __init__(self, op: LinearOperator, y_w: Tensor, s_w: Tensor) -> None:
        self.op, self.y_w, self.s_w = op, y_w, s_w

    def _residual(self, x0: Tensor) -> Tensor:
        return torch.addcmul(self.y_w, self.s_w, self.op.flat_in(x0), value=-1.0)

    def __call__(self, x0: Tensor) -> Tensor:
        r = self._residual(x0)  # written once, read by a row-wise dot (no r * r)
        return -0.5 * rowsq(r)

    def value_and_grad(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        r = self._residual(x0)
        value = -0.5 * rowsq(r)
        return value, (r.mul_(self.s_w)).reshape(x0.shape)


def observation_time_indices(
    schedule: Schedule, times: Tensor, singular_values: Tensor, noise_std: float
) -> Tensor:
    """Grid index of ``tau_i`` for each observed spectral coordinate.

    ``tau_i`` is the grid time minimising ``|sigma_y^2 alpha_t^2 - s_i^2 sigma_t^2|`` (where
    ``sigma_t / alpha_t = sigma_y / s_i``), among the times with ``alpha_t > 0``; for
    ``noise_std = 0`` it is the last grid time (``t = t_min``, normally 0).

    Parameters
    ----------
    schedule
        The noising path.
    times
        Decreasing grid ``(n + 1,)``.
    singular_values
        ``(r,)``, all positive.
    noise_std
        ``sigma_y >= 0``.

    Returns
    -------
    Tensor
        Long tensor ``(r,)`` of indices into ``times``.
    """
    n = times.numel() - 1
    r = singular_values.numel()
    if noise_std == 0:
        return torch.full((r,), n, dtype=torch.long, device=times.device)
    a, s = schedule.alpha(times), schedule.sigma(times)
    # once per distinct singular value (a mask's are all 1: one row, not d)
    su, inv = torch.unique(singular_values, return_inverse=True)
    dist = (noise_std**2 * a**2 - su[:, None] ** 2 * s**2).abs()
    dist = torch.where(a > 0, dist, torch.full_like(dist, math.inf))
    return dist.argmin(dim=1)[inv]


def exact_observation_times(
    schedule: Schedule, singular_values: Tensor, noise_std: float, t_min: Tensor, t_max: Tensor
) -> Tensor:
    """The times ``tau_i`` in ``[t_min, t_max]`` with ``sigma_t / alpha_t = sigma_y / s_i``.

    Bisection (64 halvings, batched over the distinct ``s_i``) on the decreasing log-SNR:
    ``log_snr(tau_i) = 2 log(s_i / sigma_y)``; clamped to the interval's ends.
    """
    su, inv = torch.unique(singular_values, return_inverse=True)
    target = 2 * (torch.log(su) - math.log(noise_std))
    return time_at_log_snr(schedule, target, t_min, t_max)[inv]


def pinv_correction(x0_bar: Tensor, y_bar: Tensor, lam: Tensor | float) -> Tensor:
    """``lambda_i (y_bar_i - x_bar0_i)`` on the ``r`` observed coordinates, ``(..., r)``.

    ``-Lambda V^T A^+ (A x0 - y)`` in spectral coordinates (zero on the null space):
    ``lambda = 1`` gives the range-null-space projection ``x0 - A^+ (A x0 - y)`` (DDNM),
    a smaller ``lambda_i`` moves ``x_bar0_i`` only part of the way to ``y_bar_i`` (DDNM+,
    DDRM's "after" case). ``x0_bar = V^T x0`` ``(..., d)``, ``y_bar`` broadcasting.
    """
    return lam * (y_bar - x0_bar[..., : y_bar.shape[-1]])


def residual_std(total: Tensor | float, carried: Tensor | float) -> Tensor:
    """``sqrt(max(total^2 - carried^2, 0))``: the fresh noise that brings a coordinate whose
    value already carries noise of std ``carried`` (e.g. ``alpha sigma_y / s_i`` from
    ``alpha y_bar_i``) up to the noise level ``total``."""
    return torch.as_tensor(total**2 - carried**2).clamp_min(0).sqrt()


def informative_time_grid(
    schedule: Schedule, times: Tensor, op: Operator, noise_std: float, max_step: float
) -> Tensor:
    """``times`` refined where a Gaussian potential through the linear operator ``op`` (spectral
    norm ``s_max``) is informative and extended before the last step.

    Steps beyond log-SNR ``log(s_max^2 / sigma_y^2)`` wider than ``max_step`` are split
    (:func:`~.kernels.refine_in_log_snr`), and times are inserted past the last positive one up
    to log-SNR ``log(s_max^2 / sigma_y^2) + log(100)`` (:func:`~.kernels.extend_to_log_snr`),
    where a twist's inflation ``~ s_max^2 sigma_t^2 / alpha_t^2`` is at most 1% of
    ``sigma_y^2``: the last step, which swaps the twist for the likelihood, then no longer
    sharpens it many-fold (TDS, DDSMC, FilteringSMC; docs/methods/tds.md). ``times`` as they
    are for ``max_step = 0``, a nonlinear operator, ``noise_std = 0`` or ``s_max = 0``.
    """
    if max_step == 0 or not op.is_linear or noise_std == 0:
        return times
    s_max = spectral_norm(cast(LinearOperator, op))
    if not s_max > 0:
        return times
    informative = math.log(s_max**2 / noise_std**2)
    times = refine_in_log_snr(schedule, times, schedule.log_snr(times[1:]) >= informative, max_step)
    return extend_to_log_snr(schedule, times, informative + math.log(100.0), max_step)

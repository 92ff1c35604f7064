"""The transition maths every sampler shares, written once.

Notation of the samplers' docstrings: a Gaussian path ``x_t = alpha_t x0 + sigma_t eps``
(``schedules``), a clean-data estimate ``x0_hat = E[x0 | x_t]`` from the denoiser, and a
step from grid time ``t`` to ``s < t``.

- ``eps <-> x0``: ``eps = (x_t - alpha_t x0) / sigma_t``, ``x0 = (x_t - sigma_t eps) / alpha_t``
  (:func:`~bayesfilter_diff.schedules.x0_to_eps`, ``eps_to_x0``, re-exported here).
- DDIM kernel for any Gaussian path (Song, Meng & Ermon 2021, eq. 12, written for general
  paths)::

      x_s = alpha_s x0 + c_eps eps + std z,
      std = eta * sqrt(sigma_{t|s}^2 sigma_s^2 / sigma_t^2),  c_eps = sqrt(sigma_s^2 - std^2),
      sigma_{t|s}^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2;

  ``eta = 1`` is the DDPM ancestral step (the exact Gaussian ``q(x_s | x_t, x0)``),
  ``eta = 0`` the deterministic DDIM step.
- Tweedie shift (conditional Tweedie): ``x0~ = x0_hat + (sigma_t^2 / alpha_t) grad_{x_t}
  log p~(y | x_t)``, zero where ``alpha_t = 0``.
- Gaussian log-densities: elementwise :func:`log_normal`, and :func:`gaussian_log_density`
  summed over the event axes.
- Gaussian smoothing of a log-likelihood (:func:`smoothed_log_likelihood`): the Laplace
  approximation of ``log int p(y | x) N(x; x0, v I) dx``, the twist of TDS for
  non-Gaussian and nonlinear likelihoods.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Collection
from typing import Any, Generic, NamedTuple, TypeVar

import torch
from torch import Tensor

from ..schedules import Schedule, eps_to_x0, x0_to_eps

__all__ = [
    "LOG2PI",
    "DDIMCoefficients",
    "ddim_coefficients",
    "ddim_mean",
    "ddim_weights",
    "tweedie_coefficient",
    "x0_to_eps",
    "eps_to_x0",
    "tweedie_shift",
    "log_normal",
    "gaussian_log_density",
    "time_at_log_snr",
    "refine_in_log_snr",
    "extend_to_log_snr",
    "SmoothedLogLikelihood",
    "smoothed_log_likelihood",
]

LOG2PI = math.log(2 * math.pi)

#: Coefficient type of :class:`DDIMCoefficients`: tensors, or Python floats (FPS's grid).
_C = TypeVar("_C", Tensor, float)


class DDIMCoefficients(NamedTuple, Generic[_C]):
    """``x_s = alpha_s x0 + c_eps eps + std z`` for the step ``t -> s``; ``alpha_t`` too."""

    alpha_s: _C
    c_eps: _C
    std: _C
    alpha_t: _C


def ddim_coefficients(
    schedule: Schedule, t: Tensor, t_next: Tensor, eta: float
) -> DDIMCoefficients[Tensor]:
    """The DDIM step ``t -> s = t_next`` with parameter ``eta`` (module docstring)."""
    a_t, s_t = schedule.alpha(t), schedule.sigma(t)
    a_s, s_s = schedule.alpha(t_next), schedule.sigma(t_next)
    var_ts = (s_t**2 - (a_t / a_s) ** 2 * s_s**2).clamp_min(0)
    anc = var_ts * s_s**2 / s_t**2
    std = eta * anc.sqrt()
    c_eps = (s_s**2 - std**2).clamp_min(0).sqrt()
    return DDIMCoefficients(a_s, c_eps, std, a_t)


def ddim_mean(
    x: Tensor,
    x0: Tensor,
    coef: DDIMCoefficients[Tensor] | DDIMCoefficients[float],
    sigma_t: Tensor | float,
) -> Tensor:
    """Mean of the DDIM step: ``alpha_s x0 + c_eps (x_t - alpha_t x0) / sigma_t``, computed
    as ``c_x x_t + c_x0 x0`` (:func:`ddim_weights`, two passes, the second in place)."""
    c_x, c_x0 = ddim_weights(coef, sigma_t)
    out = x * c_x
    if out.shape == torch.broadcast_shapes(out.shape, x0.shape):
        return out.addcmul_(x0, torch.as_tensor(c_x0))
    return torch.addcmul(out, x0, torch.as_tensor(c_x0))


def ddim_weights(
    coef: DDIMCoefficients[Tensor] | DDIMCoefficients[float], sigma_t: Tensor | float
) -> tuple[Any, Any]:
    """``(c_x, c_x0)``: the DDIM mean is ``c_x x_t + c_x0 x0_hat`` with ``c_x = c_eps /
    sigma_t`` and ``c_x0 = alpha_s - c_eps alpha_t / sigma_t`` (the weight of ``x0`` that
    the reverse variance and a twisted ``x0`` scale by)."""
    c_x = coef.c_eps / sigma_t
    return c_x, coef.alpha_s - c_x * coef.alpha_t


def tweedie_coefficient(alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """``sigma_t^2 / alpha_t``, the step of conditional Tweedie ``x0 + (sigma_t^2 / alpha_t)
    grad``; zero where ``alpha_t = 0``."""
    return torch.where(alpha_t > 0, sigma_t**2 / alpha_t, torch.zeros_like(alpha_t))


def tweedie_shift(x0: Tensor, grad: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """``x0 + (sigma_t^2 / alpha_t) grad``; the shift is zero where ``alpha_t = 0``."""
    return x0 + tweedie_coefficient(alpha_t, sigma_t) * grad


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_j a_j b_j`` over the last dimension, ``(...)``: the weighted sums of squares of
    the samplers' log-weights, read without writing a product.

    ``torch.linalg.vecdot``, not ``torch.einsum("...d,...d->...")``: for a batch of
    problems (``(B, N, d)``, ``B > 1``) or a 2-D operand, einsum takes a batched
    matrix-product path whose float32 error reached 1e-5 of the sum at ``d = 196 608``
    (two nats of a log-weight ~2e5 in magnitude) and ran about 2x slower; vecdot's is
    ~1e-7 whatever the layout (measured in one process, one thread, 2026-12-05)."""
    return torch.linalg.vecdot(a, b)


#: the longest row :func:`rowsq` reduces in one float32 accumulation
_ROW_BLOCK = 2048


@functools.lru_cache(maxsize=64)
def _row_split(d: int) -> int:
    """A divisor ``k`` of ``d`` with ``k`` and ``d / k`` at most :data:`_ROW_BLOCK` (the
    largest such), ``d`` itself for a short row, 0 if there is none."""
    if d <= _ROW_BLOCK:
        return d
    for k in range(_ROW_BLOCK, 0, -1):
        if d % k == 0:
            return k if d // k <= _ROW_BLOCK else 0
    return 0  # pragma: no cover (k = 1 divides d)


def rowsq(a: Tensor) -> Tensor:
    """``sum_j a_j^2`` over the last dimension, ``(...)``: :func:`rowdot` of ``a`` with
    itself, as squared norms (``torch.linalg.vector_norm``, which reads ``a`` once at the
    speed of a sum; ``vecdot(a, a)`` ran 3.5-4.6x slower on the CPU, float32, one thread:
    0.95 against 3.7 ms on ``(1, 8192, 800)``, 0.93 against 3.1 ms on ``(4, 8, 196608)``).
    A float32 norm accumulates the row in one sum, whose error grows with its length (3.4e-6
    of the sum at ``d = 196 608``, against ~1e-7 for vecdot): rows longer than 2048 are
    reduced in two levels of at most 2048 (the norms of blocks, then their norm; ~2e-7),
    and a row with no such split (a prime length above 2048) by ``vecdot``
    (measured 2026-12-05)."""
    d = a.shape[-1]
    k = _row_split(d)
    if k == d:
        return torch.linalg.vector_norm(a, dim=-1).square()
    if k == 0:
        return torch.linalg.vecdot(a, a)
    blocks = torch.linalg.vector_norm(a.reshape(a.shape[:-1] + (d // k, k)), dim=-1)
    return torch.linalg.vector_norm(blocks, dim=-1).square()


def log_normal(x: Tensor, mean: Tensor | float, var: Tensor | float) -> Tensor:
    """Elementwise ``log N(x; mean, var)`` (``var`` a tensor or a number, broadcast)."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    return -0.5 * ((x - mean) ** 2 / var + torch.log(var) + LOG2PI)


def gaussian_log_density(x: Tensor, mean: Tensor, var: Tensor | float, event_dim: int) -> Tensor:
    """``log N(x; mean, var I)`` summed over the last ``event_dim`` axes (``var`` broadcasts)."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    red = tuple(range(x.dim() - event_dim, x.dim()))
    k = math.prod(x.shape[x.dim() - event_dim :])
    # (x - mean)^2 / var + log var broadcasts to the full shape before the sum
    return -0.5 * (((x - mean) ** 2 / var + torch.log(var)).sum(red) + LOG2PI * k)


def time_at_log_snr(
    schedule: Schedule, target: Tensor, t_min: Tensor | float, t_max: Tensor | float
) -> Tensor:
    """The times in ``[t_min, t_max]`` where ``log(alpha^2 / sigma^2)`` equals ``target``.

    ``t_min`` and ``t_max`` are numbers or tensors broadcasting with ``target``. Bisection
    (64 halvings, batched over ``target``) on the decreasing log-SNR; a target
    outside the interval's range gives the nearest end.
    """
    lo = torch.as_tensor(t_min, dtype=target.dtype, device=target.device).expand_as(target)
    hi = torch.as_tensor(t_max, dtype=target.dtype, device=target.device).expand_as(target)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        above = schedule.log_snr(mid) > target  # the time sought is later than mid
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def refine_in_log_snr(schedule: Schedule, times: Tensor, active: Tensor, max_step: float) -> Tensor:
    """Insert times, evenly in log-SNR, into every step ``times[j] -> times[j + 1]`` with
    ``active[j]`` whose log-SNR gap exceeds ``max_step`` (batched over the steps): a
    potential that sharpens with the log-SNR degenerates the weights of a step across much
    of it. Steps with an infinite end (``t = 0``) are left alone."""
    lam = schedule.log_snr(times)
    t, s = times[:-1], times[1:]
    lt, ls = lam[:-1], lam[1:]
    ok = active & torch.isfinite(lt) & torch.isfinite(ls)
    gap = torch.where(ok, ls - lt, torch.zeros_like(lt))
    count = torch.ceil(gap / max_step).clamp_min(1).long() - 1  # per step
    if int(count.sum()) == 0:
        return times
    # the inserted log-SNR targets, batched: step j gets count_j evenly spaced points
    j = torch.repeat_interleave(torch.arange(count.numel(), device=times.device), count)
    first = torch.cumsum(count, 0) - count
    rank = torch.arange(j.numel(), device=times.device) - first[j] + 1
    target = lt[j] + (ls[j] - lt[j]) * rank.to(lt.dtype) / (count[j] + 1).to(lt.dtype)
    new = time_at_log_snr(schedule, target, s[j], t[j])
    return torch.sort(torch.cat([times, new]), descending=True).values


def extend_to_log_snr(schedule: Schedule, times: Tensor, target: float, max_step: float) -> Tensor:
    """Insert times between the last two grid points, ``max_step`` apart in log-SNR, up to
    log-SNR ``target`` (below the last point's): the final step then starts where the
    potentials are already as sharp as ``target`` says, instead of jumping from the grid's
    last positive time straight to ``t = 0``."""
    lam = schedule.log_snr(times[-2:])
    start, end = float(lam[0]), float(lam[1])
    top = min(target, end - 1e-6) if math.isfinite(end) else target
    if not top > start:
        return times
    k = math.ceil((top - start) / max_step)
    levels = torch.linspace(start, top, k + 1, dtype=times.dtype, device=times.device)[1:]
    new = time_at_log_snr(schedule, levels, times[-1], times[-2])
    return torch.cat([times[:-1], new, times[-1:]])


class SmoothedLogLikelihood(NamedTuple):
    """:func:`smoothed_log_likelihood`'s output: the value ``(B, N)``, its gradient in the
    centre (``x0``'s shape), the curvature kind, the Newton iterations taken and the mode
    ``x*`` (``x0``'s shape; ``x0`` itself at ``v = 0``; NaN where Newton stopped at a point
    that is not one, e.g. on a kink), a start for the next evaluation of the same particle
    (``start``)."""

    value: Tensor
    direction: Tensor
    curvature: str
    iterations: int
    mode: Tensor
    #: with ``quadratic=True``: a second-order model of the log-likelihood at ``x0``
    #: (:class:`SiteQuadratic`)
    quadratic: SiteQuadratic | None = None


class SiteQuadratic(NamedTuple):
    """A log-likelihood's second-order model per particle, ``log p(y | x) ~ f + g^T (x - p)
    - 1/2 (x - p)^T H (x - p)``, with ``H = V diag(lam) V^T`` (``lam >= 0``; zero off
    ``V``'s span): ``point`` ``p`` and ``grad`` ``g`` ``(B, N, d)``, ``vectors`` ``V``
    ``(B, N, d, k)`` orthonormal columns (``None``: the coordinate axes, ``H`` diagonal) and
    ``values`` ``lam`` ``(B, N, k)`` (``(B, N, 1)``: isotropic on every coordinate), in
    float64. :func:`smoothed_log_likelihood` makes it at the centre ``p = x0`` with ``H``
    the curvature at the mode ``x*`` and ``g = (I + v H) (x* - x0) / v``: the quadratic
    whose smoothing by ``N(0, v I)`` has the twist's own gradient at ``x0`` (the envelope
    theorem's ``(x* - x0) / v``), for a linear-Gaussian likelihood the likelihood itself.
    (The likelihood's Taylor model at ``x*`` would be wrong at a kink, e.g. a Laplace site:
    curvature 0 and the one-sided slope.) TDS's conditioned proposal for the Laplace twist
    reads it."""

    point: Tensor
    grad: Tensor
    vectors: Tensor | None
    values: Tensor


def _site_quadratic(x0: Tensor, direction: Tensor, v: Tensor, D: _Derivatives) -> SiteQuadratic:
    """The :class:`SiteQuadratic` at the centre ``x0`` ``(B, N, d)`` from the twist's
    gradient ``direction`` there, the smoothing variance ``v`` and the derivatives ``D`` at
    the mode: the value's curvature (``H`` with its negative eigenvalues set to 0),
    eigendecomposed where it is a matrix, less the rounding shift :func:`_psd_parts` gave it
    (``d`` rounding units of ``x0``'s dtype times the largest eigenvalue: harmless in a
    log-determinant, where it telescopes, but in float32 at ``sigma_y = 1e-4`` a curvature
    along the likelihood's null directions of a few 1e-7 of the largest, which bent the
    proposal there and cost three quarters of the lineages); non-finite entries (a particle
    whose likelihood is not finite) become 0."""
    vectors: Tensor | None = None
    if D.H is None:
        assert D.h is not None
        values = D.h.double()
    else:
        H = D.H.double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        values, W = torch.linalg.eigh(0.5 * (H + H.transpose(-1, -2)))
        vectors = W if D.U is None else D.U.double() @ W
        unit = 2 * H.shape[-1] * torch.finfo(x0.dtype).eps
        values = values - unit * values.amax(-1, keepdim=True).clamp_min(0.0)
    values = values.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    d = direction.double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    v64 = v.double()
    if vectors is None:
        g = d * (1 + v64 * values)
    else:  # d + v H d
        along = (vectors.transpose(-1, -2) @ d.unsqueeze(-1)).squeeze(-1)
        g = d + (vectors @ (v64 * values * along).unsqueeze(-1)).squeeze(-1)
    return SiteQuadratic(x0.double(), g, vectors, values)


class _Derivatives(NamedTuple):
    """The log-likelihood's value, gradient and curvature ``H = -grad^2 log p`` at a point,
    per particle: the full ``H``; ``U C U^T`` (``U`` and ``C`` in the ``H`` field) where
    ``H`` has a small rank; or ``h``, its diagonal ``(B, N, d)`` where ``H`` is diagonal, an
    isotropic estimate ``(B, N, 1)`` otherwise (:func:`_curvature`)."""

    f: Tensor  # (B, N)
    g: Tensor  # (B, N, d)
    # (B, N, d, d) the curvature, PSD, float64, or (B, N, r, r) in U's basis (None: h)
    H: Tensor | None
    h: Tensor | None  # (B, N, d) or (B, N, 1) the curvature, >= 0 (None: H)
    # the Newton step's curvature: H's eigenvalues by their absolute values, not clamped at
    # 0 (None: the same as H / h)
    H_step: Tensor | None = None
    h_step: Tensor | None = None
    kind: str = "hessian"  # "hessian", "diagonal", "lowrank" or "isotropic"
    # a low-rank curvature U H U^T: U (B, N, d, r) orthonormal columns (zero columns past a
    # particle's rank), float64
    U: Tensor | None = None


class _CurvatureSpec(NamedTuple):
    """How :func:`_curvature` measures the curvature: its diagonal where two probes find it
    diagonal; else the full Hessian up to ``max_dim`` coordinates; above, a low-rank one
    from at most ``max_dim`` Hessian-vector products where ``H``'s rank is small enough
    (:func:`_low_rank`), an isotropic estimate from the probes otherwise."""

    max_dim: int
    #: ``(z1, z2)``: the probes (:func:`_probes`)
    probes: tuple[Tensor, Tensor]
    #: what earlier evaluations of the same run found of the rank (:func:`_low_rank`):
    #: ``"probes"``, the number of range probes that sufficed; ``"saturated"``, ``True`` once
    #: ``max_dim`` probes did not; ``None``: nothing remembered
    memo: dict[str, Any] | None = None
    #: one :func:`smoothed_log_likelihood` call's state: the low-rank basis found at an
    #: earlier Newton point, tried again at the next (``None``: nothing kept)
    state: dict[str, Any] | None = None


@functools.lru_cache(maxsize=16)
def _probes_on_cpu(d: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(20261205)
    z1 = (2 * torch.randint(0, 2, (d,), generator=g) - 1).to(dtype)
    return z1, torch.randn(d, generator=g, dtype=dtype)


def _probes(d: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The curvature's probes for ``d`` coordinates: ``z1`` Rademacher and ``z2`` Gaussian
    ``(d,)``, fixed pseudo-random draws (a seed of their own): the curvature is one
    deterministic function of the point, the same through all Newton steps and across runs,
    and the sampler's generator is not consumed (a custom likelihood draws what the built-in
    one does)."""
    z1, z2 = _probes_on_cpu(d, dtype)
    return z1.to(device), z2.to(device)


@functools.lru_cache(maxsize=16)
def _range_probes_on_cpu(d: int, k: int, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(20261206)
    return torch.randn(k, d, generator=g, dtype=dtype)


def _range_probes(d: int, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``k`` Gaussian probes ``(k, d)`` for the low-rank curvature's range finder
    (:func:`_low_rank`): fixed pseudo-random draws of their own seed, like :func:`_probes`;
    the first ``j`` of them are the same for every ``k >= j``."""
    return _range_probes_on_cpu(d, k, dtype).to(device)


def _psd_part(H: Tensor, rounding: torch.dtype | None = None) -> Tensor:
    """``H`` ``(..., d, d)`` symmetric with its negative eigenvalues set to 0 (see
    :func:`_psd_parts`)."""
    return _psd_parts(H, rounding)[0]


def _psd_parts(H: Tensor, rounding: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``H`` ``(..., d, d)`` symmetric with its negative eigenvalues set to 0, and with its
    eigenvalues replaced by their absolute values (the same tensor where none is negative).

    A Cholesky factorisation (10-20x cheaper than ``eigh`` on CPU for small matrices) tells
    which matrices already are positive semi-definite: those where ``H + delta I`` factors,
    ``delta`` = ``d`` rounding units of the largest diagonal entry (the shift Cholesky needs
    for a singular one), are kept as ``H + delta I``; only the others are decomposed.
    ``rounding``: the dtype ``H`` was computed in, if coarser than its own. A float32
    Hessian stored in float64 carries float32's rounding, so a singular one has eigenvalues
    of either sign at that level: those that fail the test with ``H``'s own unit are tested
    again with that of ``rounding`` before any is decomposed. Those that pass it are kept
    shifted by it for the log-determinant (the first result: about 100x the rounding's own
    eigenvalues, a nearly common offset that telescopes through the weights; unshifted, the
    rounding's eigenvalues of either sign, clamped, made the values of the high noise levels
    noisy and a run degenerate), but with ``H``'s own unit for the Newton step (the second):
    the coarse shift there shortens the step by ``1 / (1 + v delta)`` along the
    likelihood's null directions, where only the ``1 / v`` pull to the centre acts (11x at
    ``v = 2.3e4`` on a Poisson GLM: Newton had not converged in 12 steps).
    """
    d = H.shape[-1]
    eye = torch.eye(d, dtype=H.dtype, device=H.device)
    fi = torch.finfo(H.dtype)
    scale = d * H.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
    shifted = H + (fi.eps * scale + fi.tiny)[..., None, None] * eye
    _, info = torch.linalg.cholesky_ex(shifted)
    indefinite = info != 0
    coarse = fi.eps if rounding is None else torch.finfo(rounding).eps
    step = shifted  # the Newton step's curvature
    if coarse > fi.eps and bool(indefinite.any()):
        # the failed ones' shift raised to the coarser unit in place (masked copies of the
        # failed matrices cost more than factoring the whole batch again)
        bump = ((coarse - fi.eps) * scale * indefinite).unsqueeze(-1)
        shifted.diagonal(dim1=-2, dim2=-1).add_(bump)
        _, info = torch.linalg.cholesky_ex(shifted)
        indefinite = info != 0
        step = shifted.clone()
        step.diagonal(dim1=-2, dim2=-1).sub_(bump)
    if not bool(indefinite.any()):
        return shifted, step
    lam, Q = torch.linalg.eigh(H[indefinite])
    clamped, absolute = shifted.clone(), step.clone() if step is shifted else step
    clamped[indefinite] = (Q * lam.clamp_min(0).unsqueeze(-2)) @ Q.transpose(-1, -2)
    absolute[indefinite] = (Q * lam.abs().unsqueeze(-2)) @ Q.transpose(-1, -2)
    return clamped, absolute


def _derivatives(
    log_likelihood: Callable[[Tensor], Tensor], x: Tensor, spec: _CurvatureSpec
) -> _Derivatives:
    """Value, gradient and curvature ``H = -grad^2 log p`` (negative eigenvalues set to 0)
    of the log-likelihood at ``x`` ``(B, N, *event)``, per particle; non-finite particles
    get value ``-inf`` and zero derivatives. See :class:`_Derivatives` for the curvature's
    forms and :func:`_curvature` for which is used."""
    B, N = x.shape[:2]
    d = math.prod(x.shape[2:])
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        f = log_likelihood(xr)
        (g,) = torch.autograd.grad(f.sum(), xr, create_graph=True)
        return _curvature(f.detach(), g.reshape(B, N, d), xr, spec)


def _full_hessian(f: Tensor, g: Tensor, xr: Tensor) -> _Derivatives:
    """The full Hessian, the Jacobian of ``g`` (``(B, N, d)``, attached to ``xr``;
    :func:`_gradient_jacobian`), its negative eigenvalues set to 0 (and their absolute
    values for the step)."""
    B, N, d = g.shape
    H = -_gradient_jacobian(g, xr).detach()
    g = g.detach()
    ok = torch.isfinite(f) & torch.isfinite(g).all(-1) & torch.isfinite(H).all((-1, -2))
    # the curvature's linear algebra in float64 (in float32, I + v H loses the identity at
    # large v); where the positive semi-definite test fails at float64's rounding, again at
    # that of H's own dtype (a singular float32 H has eigenvalues of either sign at that
    # level: each would be an eigh)
    H = torch.where(ok[..., None, None], 0.5 * (H + H.transpose(-1, -2)), 0.0)
    H, H_step = _psd_parts(H.to(torch.float64), rounding=H.dtype)
    return _finite(f, g, ok, _Derivatives(f, g, H, None, None if H_step is H else H_step))


#: the most entries of ``(rows, B, N, d)`` one batched backward pass writes; where fewer
#: than two rows fit, one pass per row (larger chunks ran up to 2.7x slower than one pass
#: per row on a likelihood with wide intermediates: benchmarks/hessian_rows.py)
_HESSIAN_CHUNK = 1 << 16


def _gradient_jacobian(g: Tensor, xr: Tensor) -> Tensor:
    """The Jacobian ``J[..., j, i] = d g_j / d x_i`` ``(B, N, d, d)`` of ``g`` ``(B, N, d)``
    attached to ``xr`` (for a gradient, the Hessian: symmetric up to rounding), row by row
    from vector-Jacobian products of the basis vectors (:func:`_vjp_rows`)."""
    d = g.shape[-1]
    return _vjp_rows(g, xr, torch.eye(d, dtype=g.dtype, device=g.device))


def _vjp_rows(g: Tensor, xr: Tensor, V: Tensor) -> Tensor:
    """The vector-Jacobian products ``V_j^T d g / d x`` ``(B, N, k, d)`` of ``g``
    ``(B, N, d)`` attached to ``xr``, for ``k`` vectors ``V``: ``(k, d)`` shared by the
    particles or ``(B, N, k, d)`` their own. Batched backward passes (``is_grads_batched``;
    each pass as many vectors as fit :data:`_HESSIAN_CHUNK` entries, written into one
    contiguous array), one pass per vector where the graph holds an operation the batched
    pass cannot run."""
    B, N, d = g.shape
    k = V.shape[-2]
    Vk = V[:, None, None, :].expand(k, B, N, d) if V.dim() == 2 else V.permute(2, 0, 1, 3)
    step = max(1, min(k, _HESSIAN_CHUNK // max(1, B * N * d)))
    J = g.new_empty(B, N, k, d)
    if step > 1:
        try:
            with warnings.catch_warnings():  # vmap's note on a slower fallback for some op
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                for j in range(0, k, step):
                    rows = _grad_or_zeros(g, xr, Vk[j : j + step], batched=True)
                    J[:, :, j : j + step] = rows.reshape(-1, B, N, d).permute(1, 2, 0, 3)
            return J
        except RuntimeError:  # an operation without a batching rule: one row at a time
            pass
    for j in range(k):
        J[:, :, j] = _grad_or_zeros(g, xr, Vk[j]).reshape(B, N, d)
    return J


def _grad_or_zeros(g: Tensor, xr: Tensor, u: Tensor, batched: bool = False) -> Tensor:
    """The vector-Jacobian product ``u^T d g / d x`` (``u``'s shape, or with a leading batch
    of vectors when ``batched``), zeros where ``g`` does not depend on ``xr`` (a likelihood
    linear in ``x``)."""
    out = None
    if g.requires_grad:
        (out,) = torch.autograd.grad(
            g, xr, grad_outputs=u, retain_graph=True, allow_unused=True, is_grads_batched=batched
        )
    return u.new_zeros(u.shape[:-1] + xr.shape[2:]) if out is None else out


def _curvature(f: Tensor, g: Tensor, xr: Tensor, spec: _CurvatureSpec) -> _Derivatives:
    """:func:`_derivatives`' curvature, from Hessian-vector products of ``g`` (the gradient
    ``(B, N, d)``, still attached to ``xr``).

    Two probes first (:func:`_probes`, shared by the particles), ``z1`` Rademacher and ``z2``
    Gaussian: where ``H z2 = (z1 * H z1) * z2`` for every finite particle (relative error
    below ``sqrt(eps)``; with a Rademacher ``z2`` a 2 x 2 ``H`` would pass half the time),
    ``H`` is diagonal (a likelihood that factors over coordinates: pixel-wise Poisson or
    Student-t noise, a mask; a Laplace site's 0), and ``z1 * H z1`` is its diagonal,
    exactly: 2 products instead of ``d``, at any ``d``. Otherwise the full Hessian
    (:func:`_full_hessian`) up to ``max_dim`` coordinates; above, a low-rank one where the
    Hessian's rank is small enough (:func:`_low_rank`), else the isotropic ``h I`` with
    ``h = (z1^T H z1 + z2^T H z2) / (|z1|^2 + |z2|^2)``."""
    B, N, d = g.shape
    dt = g.dtype
    ok = torch.isfinite(f) & torch.isfinite(g).all(-1)

    def hvp(u: Tensor) -> Tensor:
        """``H u`` for ``u`` ``(d,)``, non-finite entries zeroed."""
        hu = _grad_or_zeros(g, xr, u.expand(B, N, d))
        return (-hu.detach().reshape(B, N, d)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)

    z1, z2 = spec.probes
    Hz1, Hz2 = hvp(z1), hvp(z2)
    diag = z1 * Hz1
    err = (Hz2 - diag * z2).norm(dim=-1)
    rel = math.sqrt(torch.finfo(dt).eps)  # a product's error relative to its size, at most
    if bool(((err <= rel * Hz2.norm(dim=-1) + torch.finfo(dt).tiny) | ~ok).all()):
        h, kind = diag, "diagonal"
    elif d <= spec.max_dim:
        return _full_hessian(f, g, xr)
    elif (low := _low_rank(f, g, xr, ok, (Hz1, Hz2), spec)) is not None:
        return low
    else:
        h = ((z1 * Hz1).sum(-1) + (z2 * Hz2).sum(-1)) / (z1.square().sum() + z2.square().sum())
        h, kind = h.unsqueeze(-1), "isotropic"
    gd = g.detach()
    D = _Derivatives(f, gd, None, h.clamp_min(0), h_step=h.abs(), kind=kind)
    return _finite(f, gd, ok, D)


#: the low-rank curvature's range finder: its first number of probes, and the fewest probes
#: past the rank found (a rank closer to the probes' number counts as not found)
_RANK_PROBES = 16
_RANK_MARGIN = 8


def _low_rank(
    f: Tensor,
    g: Tensor,
    xr: Tensor,
    ok: Tensor,
    checks: tuple[Tensor, Tensor],
    spec: _CurvatureSpec,
) -> _Derivatives | None:
    """The curvature ``H = U C U^T`` of a likelihood whose Hessian has a rank well below
    ``d`` (a GLM of fewer observations than coordinates), or ``None`` where ``max_dim``
    probes do not find its range (:func:`_hessian_range`). ``C = U^T H U`` from ``r``
    Hessian-vector products with the basis (``r`` its columns), in float64, with its
    negative eigenvalues set to 0 for the log-determinant and their absolute values for the
    step (:func:`_psd_parts`). The basis of the previous Newton point (``spec.state``) is
    kept where ``H``'s products with the diagonal test's probes (``checks``) still lie in
    its span: one range finder per Newton run for a GLM, whose range does not move.

    No rounding shift (the full float32 Hessian's, :func:`_psd_parts`): off the basis the
    curvature is 0 exactly, along it ``C``'s rounding is ``eps`` of its largest eigenvalue;
    a ``C`` that fails float64's positive semi-definite test has its negative eigenvalues
    set to 0 (until 2026-12-06 it took float32's shift, ``r`` units of its largest diagonal
    entry on every eigenvalue: 0.1-0.2 on the float32 GLM at d = 400, where at ``v`` = 2.3e4
    the particles that failed the test, 3-15 of 256, had values 43-44 nats low; their sd
    about float64's 10.2 nats against 0.55 now).
    On the d = 100 Poisson GLM of docs/methods/tds.md (float32, 50 counts) the Laplace values
    are the float64 full Hessian's within 0.1 nats per particle (``v`` = 300 and 10); in
    TDS runs (N = 32, seeds 0 / 1) 101 / 101 network calls and log-evidence -172.1 / -170.8
    (the full Hessian: 101 / 101, -175.8 / -171.1; reference -168.8). Measured before it and
    not kept, each with the full Hessian's shift on every direction and a cut at ``d``
    rounding units (:func:`_hessian_range`): a fresh basis at every Newton point, 105-111
    calls and -173.6 (seed 0), twice the time; the basis kept while it spans at ``d`` units
    of the earlier point's scale, 133 / 500 calls and -185.5 / -368.1; at ``sqrt(eps)`` of
    ``|H z|``, 308 calls and -197.5."""
    memo = spec.memo if spec.memo is not None else {}
    if memo.get("saturated", False):
        return None
    B, N, d = g.shape
    state = spec.state if spec.state is not None else {}
    gd = g.detach()

    def along(U: Tensor) -> Tensor:
        """``U^T H U`` ``(B, N, r, r)``, float64."""
        HU = -_vjp_rows(g, xr, U.transpose(-1, -2).to(g.dtype)).detach()  # (B, N, r, d)
        HU = torch.where(ok[..., None, None], HU, 0.0).nan_to_num(0.0, 0.0, 0.0).double()
        C = HU @ U
        return 0.5 * (C + C.transpose(-1, -2))

    U = state.get("basis")
    C = None
    if U is not None and U.shape[:2] == (B, N) and U.shape[-1] > 0:
        # the earlier point's basis, if it still spans H here at the rounding of H's own
        # scale here (its largest diagonal entry along the basis: at most the largest
        # eigenvalue, so the line errs towards a fresh range)
        C = along(U)
        if not _spans(U, C.diagonal(dim1=-2, dim2=-1).abs().amax(-1), checks, ok, spec):
            C = None
    if C is None:
        found = _hessian_range(g, xr, ok, checks, spec, memo)
        if found is None:
            return None
        U = state["basis"] = found
        if U.shape[-1] == 0:  # no curvature above the rounding
            zero = f.new_zeros(B, N, 1)
            return _finite(f, gd, ok, _Derivatives(f, gd, None, zero, kind="lowrank"))
        C = along(U)
    C, C_step = _psd_parts(C)
    D = _Derivatives(f, gd, C, None, None if C_step is C else C_step, kind="lowrank", U=U)
    return _finite(f, gd, ok, D)


def _spans(
    U: Tensor, top: Tensor, checks: tuple[Tensor, Tensor], ok: Tensor, spec: _CurvatureSpec
) -> bool:
    """Whether ``H z`` lies in ``U``'s span for both probes ``z`` and their products
    ``checks``, for every finite particle: within ``4 sqrt(d)`` rounding units of
    ``top |z|`` (``top`` ``(B, N)``: ``H``'s largest eigenvalue, about), 4x the level below
    which the range finder leaves singular values out as rounding. No looser: at the high
    noise levels the Laplace value reads eigenvalues far below ``top`` (``log(1 + v lam)``
    with ``v top`` up to ``1e6``), and a basis kept from an earlier point that misses some of
    them (a Poisson GLM's rates near 0 at one point and not at the next) makes the
    particles' values inconsistent (:func:`_low_rank`)."""
    eps = torch.finfo(checks[0].dtype).eps
    d = U.shape[-2]
    for z, Hz in zip(spec.probes, checks, strict=True):
        Hz64 = Hz.double()
        off = Hz64 - (U @ (U.transpose(-1, -2) @ Hz64.unsqueeze(-1))).squeeze(-1)
        line = 4 * math.sqrt(d) * eps * top * float(z.norm()) + torch.finfo(Hz.dtype).tiny
        if not bool(((off.norm(dim=-1) <= line) | ~ok).all()):
            return False
    return True


def _hessian_range(
    g: Tensor,
    xr: Tensor,
    ok: Tensor,
    checks: tuple[Tensor, Tensor],
    spec: _CurvatureSpec,
    memo: dict[str, Any],
) -> Tensor | None:
    """An orthonormal basis ``(B, N, d, r)`` of the Hessian's range, or ``None``
    (``memo["saturated"]`` set) where ``max_dim`` probes do not find it.

    A randomised range finder (Halko, Martinsson & Tropp 2011, algorithm 4.1): ``Y = H
    Omega`` for fixed Gaussian probes ``Omega`` ``(d, k)`` (:func:`_range_probes`);
    ``Y = Q S W^T`` and the range is spanned by the columns of ``Q`` whose singular values
    exceed ``sqrt(d)`` rounding units (of ``H``'s dtype) of the largest, ``r`` of them per
    particle (the others zeroed; ``r`` columns in all, the largest ``r`` of the batch). On a
    float32 Poisson GLM the rounding's singular values sat at ``2e-8`` of the largest, its
    smallest real ones at ``2e-6``; a cut at ``d`` units (``1.2e-5`` at d = 100) dropped
    real eigenvalues that the Laplace value reads at large ``v``. It
    is found where every particle's ``r <= k - 8`` and ``H``'s products with the diagonal
    test's probes lie in the span (:func:`_spans`). ``k`` starts at 16 (or the number that
    sufficed earlier in the run, ``memo["probes"]``) and doubles, earlier products kept, up
    to ``max_dim``."""
    B, N, d = g.shape
    eps = torch.finfo(g.dtype).eps
    cap = spec.max_dim
    k = min(cap, max(_RANK_PROBES, int(memo.get("probes", 0))))
    if k <= _RANK_MARGIN:
        return None
    rows: Tensor | None = None  # (B, N, k, d): (H omega_j)^T
    while True:
        Omega = _range_probes(d, k, g.dtype, g.device)
        have = 0 if rows is None else rows.shape[2]
        new = -_vjp_rows(g, xr, Omega[have:]).detach()
        rows = new if rows is None else torch.cat([rows, new], 2)
        Yt = torch.where(ok[..., None, None], rows, 0.0).nan_to_num(0.0, 0.0, 0.0).double()
        _, S, Qt = torch.linalg.svd(Yt, full_matrices=False)  # Y^T = W S Q^T
        keep = S > math.sqrt(d) * eps * S[..., :1]  # (B, N, k), leading entries
        r = int(keep.sum(-1).max())
        if r <= k - _RANK_MARGIN:
            U = (Qt.transpose(-1, -2) * keep.unsqueeze(-2))[..., :r]
            top = S[..., 0] / math.sqrt(d)  # Omega's columns have norm ~sqrt(d)
            if _spans(U, top, checks, ok, spec):
                memo["probes"] = k
                return U
        if k >= cap:
            memo["saturated"] = True
            return None
        k = min(cap, 2 * k)


def _finite(f: Tensor, g: Tensor, ok: Tensor, D: _Derivatives) -> _Derivatives:
    """``D`` with value ``-inf``, zero gradient and zero curvature where ``ok`` is false."""
    f = torch.where(ok, f, torch.full_like(f, -math.inf))
    g = torch.where(ok.unsqueeze(-1), g, 0.0)
    o3 = ok.unsqueeze(-1)
    h = None if D.h is None else torch.where(o3, D.h, 0.0)
    h_step = None if D.h_step is None else torch.where(o3, D.h_step, 0.0)
    return D._replace(f=f, g=g, h=h, h_step=h_step)


class _Factor(NamedTuple):
    """``I + v H`` factored: ``L L^T`` (Cholesky) where that succeeds; at the ``failed``
    positions (a boolean mask) the eigendecomposition ``H = Q diag(lam) Q^T`` instead."""

    L: Tensor  # (B, N, d, d)
    failed: Tensor  # (B, N)
    lam: Tensor  # (F, d)
    Q: Tensor  # (F, d, d)


def _curvature_factor(H: Tensor | None, v: Tensor) -> _Factor | None:
    """``I + v H`` factored (None for an isotropic curvature), in float64 (``H`` is stored
    so). ``I + v H >= I``, but with ``v |H|`` near the inverse of the rounding unit the
    computed matrix can fail to factor; those few go through the eigenvalues of ``H``."""
    if H is None:
        return None
    M = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device) + v.to(H.dtype) * H
    L, info = torch.linalg.cholesky_ex(M)
    failed = info != 0
    if bool(failed.any()):
        lam, Q = torch.linalg.eigh(H[failed])
    else:
        lam = H.new_zeros((0, H.shape[-1]))
        Q = H.new_zeros((0, H.shape[-1], H.shape[-1]))
    return _Factor(L, failed, lam.clamp_min(0), Q)


def _curvature_solve(D: _Derivatives, r: Tensor, v: Tensor, F: _Factor | None = None) -> Tensor:
    """``(C + I / v)^{-1} r = v (I + v C)^{-1} r`` for ``r`` ``(B, N, d)``, ``C`` the Newton
    step's curvature (``H`` with its eigenvalues' absolute values: a direction where the
    log-likelihood is convex gets a step as short as its curvature asks, not the ``v``-long
    step of a clamped 0, which overshoots when ``v`` is large). ``F``: that matrix's factor,
    if already made."""
    if D.U is not None:
        # a low-rank curvature U C U^T: v r off U's span, the r x r system along it
        r64 = r.to(D.U.dtype)
        c = (D.U.transpose(-1, -2) @ r64.unsqueeze(-1)).squeeze(-1)  # (B, N, r)
        along = _curvature_solve(D._replace(U=None), c, v, F)
        off = r64 - (D.U @ c.unsqueeze(-1)).squeeze(-1)
        return (v.to(D.U.dtype) * off + (D.U @ along.unsqueeze(-1)).squeeze(-1)).to(r.dtype)
    H = D.H if D.H_step is None else D.H_step
    F = _curvature_factor(H, v) if F is None else F
    if F is None:
        h = D.h if D.h_step is None else D.h_step
        assert h is not None
        return v / (1 + v * h) * r
    v64, r64 = v.to(F.L.dtype), r.to(F.L.dtype)
    sol = v64 * torch.cholesky_solve(r64.unsqueeze(-1), F.L).squeeze(-1)
    if F.Q.shape[0]:
        c = torch.einsum("fij,fi->fj", F.Q, r64[F.failed])
        sol[F.failed] = torch.einsum("fij,fj->fi", F.Q, v64 / (1 + v64 * F.lam) * c)
    return sol.to(r.dtype)


def _log_det(D: _Derivatives, v: Tensor, F: _Factor | None = None) -> Tensor:
    """``log det(I + v H)`` ``(B, N)`` (``F``: its factor, if already made)."""
    F = _curvature_factor(D.H, v) if F is None else F  # for U C U^T: det(I + v C)
    if F is None:
        assert D.h is not None
        rest = torch.log1p(v * D.h)  # diagonal, or isotropic on all d coordinates
        return rest.sum(-1) if D.h.shape[-1] > 1 else rest.squeeze(-1) * D.g.shape[-1]
    out = 2 * F.L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    if F.Q.shape[0]:
        out[F.failed] = torch.log1p(v.to(F.lam.dtype) * F.lam).sum(-1)
    return out.to(D.f.dtype)


def _newton_mode(
    loglik: Callable[[Tensor], Tensor],
    x: Tensor,
    D: _Derivatives,
    x0: Tensor,
    v: Tensor,
    iterations: int,
    measure: Callable[[Tensor], _Derivatives],
) -> tuple[Tensor, _Derivatives, Tensor, int, bool, Tensor]:
    """Damped Newton ascent of ``phi(x) = log p(y | x) - |x - x0|^2 / (2 v)`` from ``x``
    (flattened ``(B, N, d)``, ``D`` its derivatives; ``measure`` takes them at a new
    point): each step tries the fractions ``s, s/2, .., s/16`` of ``(C + I / v)^{-1} grad
    phi`` (``C``: :func:`_curvature_solve`) and keeps the best that increases ``phi``.
    ``s`` is per particle, 1 at first: a particle none of whose fractions increases ``phi``
    while its Newton decrement ``grad phi^T (C + I / v)^{-1} grad phi`` is not yet negligible
    tries ``s / 32, .., s / 512`` next (where
    the log-likelihood is far from quadratic, e.g. a heavy tail's convex flank, the full step
    can overshoot by orders of magnitude; stopping there would leave the particle at a point
    that is not a mode, whose Laplace value is too large). ``s`` grows back 4x per step that
    succeeds. A particle whose steps are damped or fail while gaining less than
    ``_SLOW_GAIN`` nats, twice in a row (a kink, e.g. of a Laplace site, where the gradient
    never vanishes and the walk is first-order), stops holding the loop open. Returns the
    point, its derivatives, ``phi``, the steps taken, whether the loop ended before
    ``iterations`` with every particle converged, and the step scales."""
    B, N, d = x.shape
    phi = D.f - ((x - x0) ** 2).sum(-1) / (2 * v)
    fractions = torch.tensor((1.0, 0.5, 0.25, 0.125, 0.0625), dtype=x.dtype, device=x.device)
    S = fractions.numel()
    scale = torch.ones_like(phi)
    slow = torch.zeros_like(phi, dtype=torch.int64)  # consecutive slow iterations
    taken = 0
    converged = False
    for _ in range(iterations):
        grad_phi = D.g - (x - x0) / v
        delta = _curvature_solve(D, grad_phi, v)
        # the Newton decrement: the increase of phi a full step would give on the quadratic
        decrement = rowdot(grad_phi, delta)
        open_ = torch.isfinite(phi) & (decrement > _newton_tol(x.dtype) * (1 + phi.abs()))
        steps = (scale.unsqueeze(0) * fractions.reshape(-1, 1, 1)).unsqueeze(-1)  # (S,B,N,1)
        cand = x.unsqueeze(0) + steps * delta.unsqueeze(0)  # (S,B,N,d)
        with torch.no_grad():
            fc = loglik(cand.permute(1, 0, 2, 3).reshape(B, S * N, d))
        phic = fc.reshape(B, S, N).permute(1, 0, 2) - ((cand - x0) ** 2).sum(-1) / (2 * v)
        phic = torch.where(torch.isnan(phic), torch.full_like(phic, -math.inf), phic)
        best, arg = phic.max(0)
        better = best > phi
        taken += 1
        # a particle that failed at every fraction shrinks its steps; one that succeeded with
        # the largest fraction lets them grow back (never above a full Newton step)
        stuck = ~better & open_ & (scale > _MIN_STEP)
        # a particle whose steps are damped (or fail) and gain little, twice in a row, sits
        # where the quadratic model does not hold and progress is first-order at best (a
        # kink); it no longer keeps the loop going
        damped = stuck | (better & (scale * fractions[arg] < 1))
        gained = torch.where(better & torch.isfinite(phi), best - phi, 0.0)
        slow = torch.where(~open_ | (damped & (gained < _SLOW_GAIN)), slow + 1, 0)
        live = slow < 2
        scale = torch.where(stuck, scale / 32, scale)
        scale = torch.where(better & (arg == 0), (4 * scale).clamp_max(1.0), scale)
        stuck = stuck & live
        any_stuck = bool(stuck.any())  # one host sync for both tests below
        if not bool((better & live).any()):
            if any_stuck:
                continue
            converged = True
            break
        gain = float(torch.where(live, gained, 0.0).max())
        pick = cand.gather(0, arg[None, ..., None].expand(1, B, N, d))[0]
        x = torch.where(better.unsqueeze(-1), pick, x)
        D = measure(x)
        phi = D.f - ((x - x0) ** 2).sum(-1) / (2 * v)
        if gain < 1e-6 and not any_stuck:
            converged = True
            break
    return x, D, phi, taken, converged, scale


def _decrement(
    D: _Derivatives, x: Tensor, x0: Tensor, v: Tensor, F: _Factor | None = None
) -> Tensor:
    """The Newton decrement ``grad phi^T (C + I / v)^{-1} grad phi`` ``(B, N)`` at ``x``
    (``D`` its derivatives; ``F``: the Newton step's factor, if already made)."""
    grad_phi = D.g - (x - x0) / v
    return rowdot(grad_phi, _curvature_solve(D, grad_phi, v, F))


def _settled(phi: Tensor, decrement: Tensor, scale: Tensor, tol: float) -> Tensor:
    """Per particle ``(B, N)``: whether a point is a mode of ``phi`` (its Newton
    ``decrement`` below ``tol`` of ``1 + |phi|``; a non-finite particle or one whose steps
    shrank to nothing counts as one). ``scale``: :func:`_newton_mode`'s step scales."""
    small = decrement <= tol * (1 + phi.abs())
    return small | ~torch.isfinite(phi) | (scale <= _MIN_STEP)


def _select(mask: Tensor, a: _Derivatives, b: _Derivatives) -> _Derivatives | None:
    """``a`` where ``mask`` ``(B, N)`` holds, ``b`` elsewhere, field by field; ``None``
    where their forms differ (curvature kinds, or a low-rank basis of another width)."""
    if a.kind != b.kind:
        return None
    fields: dict[str, Any] = {"kind": a.kind}
    for name in ("f", "g", "H", "h", "H_step", "h_step", "U"):
        ta, tb = getattr(a, name), getattr(b, name)
        if name in ("H_step", "h_step") and (ta is None) != (tb is None):
            base = name[0]  # a missing step curvature is the curvature itself
            ta = getattr(a, base) if ta is None else ta
            tb = getattr(b, base) if tb is None else tb
        if ta is None and tb is None:
            fields[name] = None
            continue
        if ta is None or tb is None or ta.shape != tb.shape:
            return None
        fields[name] = torch.where(mask.reshape(mask.shape + (1,) * (ta.dim() - 2)), ta, tb)
    return _Derivatives(**fields)


def _polish(
    x: Tensor,
    D: _Derivatives,
    x0: Tensor,
    v: Tensor,
    measure: Callable[[Tensor], _Derivatives],
    gradient: Callable[[Tensor], tuple[Tensor, Tensor]],
) -> tuple[Tensor, _Derivatives, Tensor, int, Tensor]:
    """Full Newton steps from the modes :func:`_newton_mode` found in a coarse dtype, each
    kept where it at least halves the Newton decrement (the new gradient's, in the old
    point's curvature: one backward pass per trial, ``gradient`` giving the value and
    gradient) and gains ``phi`` by the trapezoid rule of the gradients (``(grad phi(x) +
    grad phi(x'))^T (x' - x) / 2``, exact for a quadratic), until the decrement is below
    ``_NEWTON_TOL`` of ``1 + |phi|`` or no step helps (at most ``_POLISH_STEPS``; the
    derivatives are measured again where a step was kept, and a particle whose decrement
    in its new point's own curvature did not fall goes back and stops). Returns the point,
    its derivatives, ``phi``, the steps tried and the point's Newton decrement (float64).

    Why: a float32 ``phi`` is a sum whose rounding is that of its terms (1e-3 to 5e-3 on a
    Poisson GLM of 50 counts at ``phi = -86``, where the float64 gains of these steps were
    1e-5 to 2e-4), so the line search stops where the decrement is still ~1e-3. Along a
    direction of small curvature that is far from the mode: at the high noise levels (``v``
    = 2.3e4) the rates of the zero counts, whose ``log(1 + v lam)`` the Laplace value reads,
    were still a factor ``e^{0.8 .. 3}`` off, and the particles' values (within 0.09 nats of
    each other in float64) spread by 2.6 nats. The gradient's rounding is that of its own
    terms, far below ``phi``'s there, so the decrement and the trapezoid gain can decide.
    (At float32's floor of the decrement a step lowers it by chance: the factor 2 keeps
    such steps from running to the cap.) Measured in docs/methods/tds.md."""

    def state(D: _Derivatives, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        phi = D.f - ((x - x0) ** 2).sum(-1) / (2 * v)
        grad_phi = D.g - (x - x0) / v
        delta = _curvature_solve(D, grad_phi, v)
        return phi, grad_phi, delta, rowdot(grad_phi.double(), delta.double())

    phi, grad_phi, delta, dec = state(D, x)
    taken = 0
    frozen = torch.zeros_like(phi, dtype=torch.bool)
    for _ in range(_POLISH_STEPS):
        todo = ~frozen & torch.isfinite(phi) & (dec > _NEWTON_TOL * (1 + phi.abs().double()))
        if not bool(todo.any()):
            break
        xn = torch.where(todo.unsqueeze(-1), x + delta, x)
        fn, gn = gradient(xn)
        taken += 1
        phin = fn - ((xn - x0) ** 2).sum(-1) / (2 * v)
        gradn = gn - (xn - x0) / v
        decn = rowdot(gradn.double(), _curvature_solve(D, gradn, v).double())
        gain = 0.5 * rowdot((grad_phi + gradn).double(), (xn - x).double())
        keep = todo & torch.isfinite(phin) & (decn < _POLISH_RATE * dec) & (gain > 0)
        if not bool(keep.any()):
            break
        x_prev, D_prev, dec_prev = x, D, dec
        x = torch.where(keep.unsqueeze(-1), xn, x)
        D = measure(x)
        phi, grad_phi, delta, dec = state(D, x)
        # a kept step whose decrement in its own point's curvature did not fall went where
        # the curvature changed (e.g. to a Student-t's convex flank, clamped to 0, where
        # the Laplace value is phi's alone): back, and no further steps for it
        back = keep & ~(dec < dec_prev)
        if bool(back.any()):
            frozen = frozen | back
            x = torch.where(back.unsqueeze(-1), x_prev, x)
            merged = _select(back, D_prev, D)
            D = measure(x) if merged is None else merged
            phi, grad_phi, delta, dec = state(D, x)
    return x, D, phi, taken, dec


# A particle's Newton decrement below this (relative to 1 + |phi|) counts as converged, or
# below _NEWTON_TOL_UNITS rounding units of the point's dtype where that is more (float32:
# phi's own rounding, ~1e-4 at |phi| = 500, is above 1e-10 of it; no step can be told to
# gain below it, and Newton ran to its cap of iterations wandering in the rounding); the
# smallest step scale tried before a particle is left where it is; the gain (nats) below
# which a damped or failed step counts as slow.
_NEWTON_TOL = 1e-10
_NEWTON_TOL_UNITS = 64
_MIN_STEP = 1e-12
_SLOW_GAIN = 1e-3
# where a point's dtype makes _NEWTON_TOL_UNITS coarser than _NEWTON_TOL: the most full
# Newton steps by the decrement after the line search (_polish), and the factor by which
# such a step must lower it (at float32's floor of the decrement, ~1e-7 .. 1e-5 on a GLM,
# "lower" alone kept a random half of the particles stepping to the cap)
_POLISH_STEPS = 8
_POLISH_RATE = 0.5
# the Newton decrement (relative to 1 + |phi|) below which a point is offered as the next
# evaluation's start (SmoothedLogLikelihood.mode): loose, since Newton goes on from it; it
# keeps out the points where the steps stopped far from a mode (a kink's decrement is of
# order v |grad|^2), not float32's decrements at the high noise levels (1e-4 .. 1e-2 of
# 1 + |phi| on a Poisson GLM at v ~ 1e4, where the strict tolerance turned 10-56% of the
# particles away)
_START_TOL = 1e-3


def _newton_tol(dtype: torch.dtype) -> float:
    """The Newton decrement's tolerance relative to ``1 + |phi|`` for points in ``dtype``."""
    return max(_NEWTON_TOL, _NEWTON_TOL_UNITS * torch.finfo(dtype).eps)


def most_general_curvature(kinds: Collection[str]) -> str:
    """The most general of the curvature kinds ``kinds`` (``"isotropic"`` over
    ``"hessian"`` over ``"lowrank"`` over ``"diagonal"``; ``"none"`` if empty): what a run of several
    :func:`smoothed_log_likelihood` evaluations reports."""
    for kind in ("isotropic", "hessian", "lowrank", "diagonal"):
        if kind in kinds:
            return kind
    return "none"


_SEGMENT_POINTS = 8


def _one_basin(
    loglik: Callable[[Tensor], Tensor],
    x0: Tensor,
    start: Tensor,
    v: Tensor,
    f0: Tensor,
    phi_s: Tensor,
) -> Tensor:
    """Per particle ``(B, N)``: whether ``phi`` has no valley on the segment from ``x0`` to
    ``start`` (``(B, N, d)``; ``f0 = phi(x0)``, ``phi_s = phi(start)``), at
    ``_SEGMENT_POINTS - 1`` interior points (forward passes only): once ``phi`` falls along it
    it never rises again (above rounding). A concave ``phi`` (a log-concave site: Poisson or
    logistic GLMs, Gaussian or Laplace noise through a linear operator) always passes, so a
    start there costs nothing; where a start lies across a valley from ``x0``, on another
    mode of a multimodal site (a sign or a phase: ``(a . x)^2``, ``sin(3 x_1)``), Newton
    from it would keep the particle's value on its parent's mode, below the mode next to
    ``x0_hat``: a path-dependent twist that stays exact, but whose undervalued particles are
    the rare heavy weights that the last steps need (log-evidence 0.65 nats low and
    posterior means 17 standard errors off on two squared projections, nothing warned;
    docs/methods/tds.md, "A start across a valley is not taken")."""
    B, N, d = x0.shape
    K = _SEGMENT_POINTS
    lam = torch.arange(1, K, dtype=x0.dtype, device=x0.device) / K
    pts = x0.unsqueeze(2) + lam.reshape(1, 1, -1, 1) * (start - x0).unsqueeze(2)  # (B,N,K-1,d)
    with torch.no_grad():
        f = loglik(pts.reshape(B, N * (K - 1), d)).reshape(B, N, K - 1)
    pen = (lam**2).reshape(1, 1, -1) * ((start - x0) ** 2).sum(-1, keepdim=True) / (2 * v)
    phi = torch.cat([f0.unsqueeze(-1), f - pen, phi_s.unsqueeze(-1)], -1)  # (B, N, K+1)
    phi = torch.where(torch.isnan(phi), torch.full_like(phi, -math.inf), phi)
    tol = 64 * torch.finfo(x0.dtype).eps * (1 + phi.abs().amax(-1, keepdim=True))
    step = phi[..., 1:] - phi[..., :-1]
    fell = torch.cumsum((step < -tol).to(torch.int64), -1) > 0
    rose_after = fell[..., :-1] & (step[..., 1:] > tol)
    return ~rose_after.any(-1)


def smoothed_log_likelihood(
    log_likelihood: Callable[[Tensor], Tensor],
    x0: Tensor,
    v: Tensor,
    *,
    max_dim: int = 64,
    iterations: int = 12,
    anchors: int = 4,
    first_steps: int = 4,
    memo: dict[str, Any] | None = None,
    start: Tensor | None = None,
    quadratic: bool = False,
) -> SmoothedLogLikelihood:
    """Laplace approximation of ``log int p(y | x) N(x; x0, v I) dx`` per particle.

    The integrand's mode ``x*`` (maximiser of ``phi(x) = log p(y | x) - |x - x0|^2 / (2 v)``)
    is found by damped Newton steps ``(H + I / v)^{-1} grad phi`` (``H = -grad^2 log p`` with
    its negative eigenvalues set to 0, so the system is positive definite; the step is halved
    until ``phi`` increases; at most ``iterations`` steps), and the Gaussian integral at the
    mode is done in closed form::

        phi(x*) - 1/2 log det(I + v H(x*)),

    exact for a linear-Gaussian likelihood (one Newton step: ``log N(y; A x0, sigma^2 I +
    v A A^T)``), the likelihood itself at ``v = 0``. Expanding at the mode rather than at
    ``x0`` keeps the value bounded where the likelihood saturates or has heavy tails (a
    logistic or Student-t site far from the data: a second-order expansion at ``x0`` there
    extrapolates a linear log-likelihood to infinity). Newton from ``x0`` can stop at a
    local mode in a heavy tail, far below the mass near the data: the ``anchors`` modes of
    each problem's particles with the highest likelihood are tried as starting points too
    (where their ``phi`` is higher), and the larger Laplace value is kept: the value of a
    particle then depends on the cloud (an adaptive twist; the weights stay exact because
    each particle's value is stored and divided out at its next step). The anchors are
    consulted after ``first_steps`` Newton steps (with ``anchors = 0`` Newton runs on to
    ``iterations``), and every particle then continues from
    the better of its own point and the best anchor (up to ``iterations`` more steps): a
    particle walking in from a heavy tail (damped steps where the curvature is clamped to
    0) joins the data's mode at once instead of walking on.

    ``direction = (x* - x0) / v`` is the value's gradient in ``x0`` (envelope theorem,
    curvature held fixed). ``H`` is its diagonal where two fixed probes find it diagonal
    (2 Hessian-vector products), else the full Hessian (its ``d`` rows from backward passes,
    :func:`_gradient_jacobian`) for ``d <= max_dim``; above, ``U C U^T`` from a randomised
    range finder of at most ``max_dim`` products where ``H``'s rank is at most
    ``max_dim - 8`` (:func:`_low_rank`), an isotropic ``h I`` otherwise (``h`` from the
    probes; :func:`_curvature`). ``curvature`` says which, ``"diagonal"``, ``"hessian"``,
    ``"lowrank"`` or ``"isotropic"`` (kinds mixed over the Newton points: the most general).
    ``memo``: a dict kept over one sampler run, in which the range finder remembers how many
    probes sufficed or that ``max_dim`` did not (later calls then skip it). In float32,
    whose ``phi`` hides the last gains from the line search, full Newton steps judged by
    the gradient follow it (:func:`_polish`). Particles whose likelihood is not finite get
    value ``-inf``. ``x0`` is ``(B, N, *event)``; ``v`` a
    finite 0-d tensor ``>= 0``.

    ``start`` (``x0``'s shape, optional): a point per particle to start Newton from
    instead of ``x0`` where its ``phi`` is higher and no valley of ``phi`` lies between
    the two (:func:`_one_basin`; always so for a concave ``phi``). TDS passes the parent's
    mode, returned as ``mode`` (the mode moves little from one step to the next, and Newton
    from it takes fewer steps). The value then depends on the particle's path, not only on ``x0``,
    where ``phi`` has several modes; the weights stay exact (the value is stored and
    divided out at the next step, like the anchors' dependence on the cloud).

    ``quadratic=True`` also returns a second-order model of the log-likelihood at ``x0``
    (:class:`SiteQuadratic`: the curvature where Newton stopped, eigendecomposed, and the
    gradient whose smoothing is the value's ``direction``), from which TDS's conditioned
    proposal draws.
    """
    B, N = x0.shape[:2]
    d = math.prod(x0.shape[2:])
    spec = _CurvatureSpec(max_dim, _probes(d, x0.dtype, x0.device), memo, {})
    x0f = x0.detach().reshape(B, N, d)
    kinds: set[str] = set()

    def loglik(xf: Tensor) -> Tensor:
        return log_likelihood(xf.reshape((xf.shape[0], xf.shape[1]) + tuple(x0.shape[2:])))

    def measured(x: Tensor) -> _Derivatives:
        D = _derivatives(loglik, x, spec)
        kinds.add(D.kind)
        return D

    if float(v) == 0:
        D = measured(x0f)
        quad = _site_quadratic(x0f, D.g, v, D) if quadratic else None
        return SmoothedLogLikelihood(D.f, D.g.reshape(x0.shape), D.kind, 0, x0, quad)
    if start is None:
        D = measured(x0f)
        x_init = x0f
    else:
        # the better of x0 and the given start (phi by forward passes), then derivatives
        # there only
        sf = start.detach().reshape(B, N, d).to(x0f.dtype)
        # (a start with non-finite entries, e.g. the mode of a parent whose x0_hat was not
        # finite, is not evaluated: a likelihood may refuse NaN arguments)
        sf = torch.where(torch.isfinite(sf).all(-1, keepdim=True), sf, x0f)
        with torch.no_grad():
            f0, fs = loglik(x0f), loglik(sf)
        phi_s = fs - ((sf - x0f) ** 2).sum(-1) / (2 * v)
        use_s = (phi_s > f0) & torch.isfinite(phi_s) & _one_basin(loglik, x0f, sf, v, f0, phi_s)
        x_init = torch.where(use_s.unsqueeze(-1), sf, x0f)
        D = measured(x_init)

    def laplace(D: _Derivatives, phi: Tensor, F: _Factor | None = None) -> Tensor:
        val = phi - 0.5 * _log_det(D, v, F)
        return torch.where(torch.isfinite(val), val, torch.full_like(val, -math.inf))

    K = min(anchors, N)
    first = min(iterations, first_steps) if K > 0 else iterations
    x, D, phi, taken, done, scale = _newton_mode(loglik, x_init, D, x0f, v, first, measured)
    F = _curvature_factor(D.H, v)
    value = laplace(D, phi, F)
    # a dtype whose phi hides the last gains from the line search (float32): the
    # derivatives at x (None: to be measured) for the decrement's full steps (_polish)
    coarse = _newton_tol(x.dtype) > _NEWTON_TOL
    at_x: _Derivatives | None = D
    # phi at x and its Newton decrement (whether x is a mode; None: not yet computed)
    phi_x: Tensor = phi
    dec_x: Tensor | None = None
    if K > 0:
        top = D.f.topk(K, dim=1).indices  # (B, K): the particles' best modes
        a = x.gather(1, top.unsqueeze(-1).expand(B, K, d))
        fa = D.f.gather(1, top)
        phi_a = fa.unsqueeze(1) - ((a.unsqueeze(1) - x0f.unsqueeze(2)) ** 2).sum(-1) / (2 * v)
        best_a, arg = phi_a.max(-1)  # (B, N)
        switch = best_a > phi + 1e-9
        if bool(switch.any()) or not done:
            x_start = torch.where(
                switch.unsqueeze(-1), a.gather(1, arg.unsqueeze(-1).expand(B, N, d)), x
            )
            D2 = measured(x_start) if bool(switch.any()) else D
            x2, D2, phi2, t2, _, _ = _newton_mode(loglik, x_start, D2, x0f, v, iterations, measured)
            taken += t2
            F2 = _curvature_factor(D2.H, v)
            value2 = laplace(D2, phi2, F2)
            # the larger of two modes' values; a first-pass point that is not a mode has no
            # Laplace value to speak of (its clamped curvature makes it too large)
            dec_x = _decrement(D, x, x0f, v, F if D.H_step is None else None)
            settled = _settled(phi, dec_x, scale, _newton_tol(x.dtype))
            use = (value2 > value) | ~settled
            x = torch.where(use.unsqueeze(-1), x2, x)
            value = torch.where(use, value2, value)
            phi_x = torch.where(use, phi2, phi)
            if coarse or quadratic:  # the derivatives at x (None: forms differ)
                at_x = _select(use, D2, D)
            if not coarse:  # (coarse: the decrement comes from _polish's last point)
                dec2 = _decrement(D2, x2, x0f, v, F2 if D2.H_step is None else None)
                dec_x = torch.where(use, dec2, dec_x)
    if coarse:

        def gradient(xf: Tensor) -> tuple[Tensor, Tensor]:
            with torch.enable_grad():
                xr = xf.detach().requires_grad_(True)
                f = loglik(xr)
                (g,) = torch.autograd.grad(f.sum(), xr)
            return f.detach(), g

        D = measured(x) if at_x is None else at_x
        x, D, phi_x, polished, dec_x = _polish(x, D, x0f, v, measured, gradient)
        taken += polished
        value = laplace(D, phi_x)
    direction = (x - x0f) / v
    # x is offered as the next evaluation's start only where it is near a mode
    # (_START_TOL): where Newton stopped short (a kink, where the steps are first-order and
    # stop on slow gains), a start there would stop again at once, at a point that is not
    # this phi's mode
    if dec_x is None:  # x is the first pass's point, D its derivatives, F their factor
        dec_x = _decrement(D, x, x0f, v, F if D.H_step is None else None)
    at_mode = _settled(phi_x, dec_x.to(phi_x.dtype), torch.ones_like(phi_x), _START_TOL)
    mode = torch.where(at_mode.unsqueeze(-1), x, torch.full_like(x, math.nan))
    quad = None
    if quadratic:
        # the derivatives at x: _polish's last, else the first pass's or the selected
        # pass's (None where the two passes' forms differ: measured again)
        at = D if coarse else at_x
        quad = _site_quadratic(x0f, direction, v, measured(x) if at is None else at)
    return SmoothedLogLikelihood(
        value,
        direction.reshape(x0.shape),
        most_general_curvature(kinds),
        taken,
        mode.reshape(x0.shape),
        quad,
    )

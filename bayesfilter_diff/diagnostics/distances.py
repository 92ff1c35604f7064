"""Distances between a sampler's draws and a reference: sliced / exact Wasserstein, MMD.

All functions take sample sets ``(N, d)`` or ``(B, N, d)`` (``B`` independent problems, or a
:class:`~bayesfilter_diff.Result`), broadcast a single set against a batch, and return a
``(B,)`` tensor, or a scalar when neither input is batched. Results are float64, on the
inputs' device (:func:`wasserstein2_exact` solves on the CPU with scipy and moves back).

- :func:`sliced_wasserstein`: ``SW_p(mu, nu) = (E_theta W_p^p(theta#mu, theta#nu))^(1/p)``
  over directions ``theta`` uniform on the sphere (Rabin et al. 2011; the metric of the
  MCGdiff Gaussian-mixture benchmark; POT's ``ot.sliced_wasserstein_distance``). The
  expectation is a Monte Carlo average over ``num_projections`` random directions; each
  1-D distance between (weighted) empirical measures is computed *exactly* by
  :func:`wasserstein_1d`: ``W_p^p = int_0^1 |F^-1(u) - G^-1(u)|^p du``, a finite sum over
  the merged grid of both cumulative weights, on which both quantile functions are
  piecewise constant.
- :func:`wasserstein2_exact`: the exact ``W_2`` between two small point sets (an optimal
  assignment for equal sizes and uniform weights; the transport linear programme
  otherwise).
- :func:`mmd`: the unbiased estimate of the squared maximum mean discrepancy with a
  Gaussian kernel (Gretton et al., JMLR 2012), median-heuristic bandwidth by default.
- :func:`gaussian_w2`: the Bures-Wasserstein distance between moment-matched Gaussians.
- :func:`exact_floor`: the same metric between two independent *exact* sample sets of the
  same sizes: the value an exact sampler would get, against which a reported number is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..priors.gmm import GaussianMixture
from ..result import Result
from ._utils import (
    broadcast_pair,
    check_positive_int,
    random_directions,
    sample_set,
    uniform_or,
)

__all__ = [
    "wasserstein_1d",
    "sliced_wasserstein",
    "wasserstein2_exact",
    "median_bandwidth",
    "mmd",
    "gaussian_w2",
    "exact_floor",
    "Floor",
    "random_directions",
]

#: Largest transport plan (N * M variables) :func:`wasserstein2_exact` hands to ``linprog``.
MAX_LP_VARIABLES = 250_000
#: With POT: the largest cost matrix ``N * M`` of :func:`wasserstein2_exact` (float64, 200 MB).
MAX_EMD_ENTRIES = 25_000_000
#: Elements of the largest intermediate tensor built at once (projections, kernel matrices).
_CHUNK_ELEMENTS = 1 << 24


def _finish(out: Tensor, batched: bool) -> Tensor:
    return out if batched else out[0]


# ---------------------------------------------------------------------------------- 1-D
# torch's CPU sort always builds indices and is several times slower than numpy's; CPU
# tensors are therefore sorted with numpy (the distances are not differentiable anyway).
def _sort_values(t: Tensor) -> Tensor:
    if t.device.type == "cpu":
        return torch.from_numpy(np.sort(t.detach().numpy(), axis=-1))
    return torch.sort(t, dim=-1).values


def _argsort_stable(t: Tensor) -> Tensor:
    if t.device.type == "cpu":
        return torch.from_numpy(np.argsort(t.detach().numpy(), axis=-1, kind="stable"))
    return torch.sort(t, dim=-1, stable=True).indices


def _w1d_pow(u: Tensor, v: Tensor, wu: Tensor | None, wv: Tensor | None, p: float) -> Tensor:
    """``W_p^p`` along the last axis between ``u (..., N)`` and ``v (..., M)`` (float64).

    ``wu`` / ``wv``: normalised weights broadcastable to ``u`` / ``v``, or ``None`` (uniform).
    """
    u, v = u.double().contiguous(), v.double().contiguous()
    N, M = u.shape[-1], v.shape[-1]
    # 1. Equal sizes and uniform weights: the sorted samples are matched one to one.
    if wu is None and wv is None and N == M:
        return (_sort_values(u) - _sort_values(v)).abs().pow(p).mean(-1)
    # 2. Otherwise sort each sample with its weights; F_i = cumulative weight of the i
    #    smallest values (the last is exactly 1).
    # (a set shared by every problem arrives with a leading 1: it is sorted once)
    lead = torch.broadcast_shapes(u.shape[:-1], v.shape[:-1])
    iu, iv = _argsort_stable(u), _argsort_stable(v)
    us, vs = torch.gather(u, -1, iu), torch.gather(v, -1, iv)
    iu, us = iu.expand(lead + (N,)), us.expand(lead + (N,))
    iv, vs = iv.expand(lead + (M,)), vs.expand(lead + (M,))

    def cdf(w, idx, n, ref):
        if w is None:
            c = torch.arange(1, n + 1, dtype=torch.float64, device=ref.device) / n
            return c.expand(ref.shape)
        c = torch.cumsum(torch.gather(w.expand(ref.shape), -1, idx), dim=-1)
        return c / c[..., -1:]

    cu, cv = cdf(wu, iu, N, us), cdf(wv, iv, M, vs)
    # 3. On the merged grid 0 = g_0 <= g_1 <= ... <= g_{N+M} = 1 of both cumulative weights
    #    both quantile functions are constant on every (g_{k-1}, g_k], where
    #    F^-1 = x_(i), i = min{i : F_i >= g_k} = #{i : F_i < g_k}. A stable sort of [F, G]
    #    (F first on ties) gives these counts as running counts of each kind: a point of F
    #    has i = (F-points up to it) - 1, a point of G has i = (F-points before it).
    merged = torch.cat([cu, cv], dim=-1)
    order = _argsort_stable(merged)
    grid = torch.gather(merged, -1, order)
    is_u = order < N
    cnt_u = torch.cumsum(is_u, dim=-1)
    cnt_v = torch.cumsum(~is_u, dim=-1)
    ju = (cnt_u - is_u.long()).clamp_(max=N - 1)
    jv = (cnt_v - (~is_u).long()).clamp_(max=M - 1)
    dg = torch.diff(grid, dim=-1, prepend=torch.zeros_like(grid[..., :1]))
    qu, qv = torch.gather(us, -1, ju), torch.gather(vs, -1, jv)
    return (dg * (qu - qv).abs().pow(p)).sum(-1)


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, int | float) or not p >= 1 or not math.isfinite(p):
        raise ValueError(f"p must be a finite number >= 1, got {p!r}")
    return float(p)


def wasserstein_1d(
    u: Tensor,
    v: Tensor,
    p: float = 2,
    u_weights: Tensor | None = None,
    v_weights: Tensor | None = None,
) -> Tensor:
    """Exact ``W_p`` between 1-D (weighted) empirical measures, along the last axis.

    Parameters
    ----------
    u, v
        ``(..., N)`` and ``(..., M)`` values with broadcastable leading shapes.
    p
        Order, ``p >= 1``.
    u_weights, v_weights
        Non-negative weights of the shape of ``u`` / ``v`` (normalised here), or ``None``.

    Returns
    -------
    Tensor
        ``(...)`` float64, ``W_p = (int_0^1 |F^-1 - G^-1|^p)^(1/p)``.
    """
    p = _check_p(p)
    for name, t in (("u", u), ("v", v)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() < 1:
            raise TypeError(f"{name} must be a floating-point tensor with at least one axis")
    lead = torch.broadcast_shapes(u.shape[:-1], v.shape[:-1])
    u = u.expand(lead + u.shape[-1:])
    v = v.expand(lead + v.shape[-1:])

    def norm(w, ref, name):
        if w is None:
            return None
        w = w.double()
        if w.shape != ref.shape:
            w = w.expand(ref.shape)
        if (w < 0).any() or not torch.isfinite(w).all() or (w.sum(-1) <= 0).any():
            raise ValueError(f"{name} must be finite, non-negative and not all zero")
        return w / w.sum(-1, keepdim=True)

    wu, wv = norm(u_weights, u, "u_weights"), norm(v_weights, v, "v_weights")
    return _w1d_pow(u, v, wu, wv, p).pow(1.0 / p)


# ---------------------------------------------------------------------------------- sliced
def sliced_wasserstein(
    x: Tensor | Result,
    y: Tensor | Result,
    num_projections: int = 256,
    p: float = 2,
    weights_x: Tensor | None = None,
    weights_y: Tensor | None = None,
    generator: torch.Generator | None = None,
    directions: Tensor | None = None,
) -> Tensor:
    """Sliced ``p``-Wasserstein distance, batched over problems.

    ``SW_p = ((1/P) sum_j W_p^p(theta_j^T x, theta_j^T y))^(1/p)`` with ``P`` directions
    drawn uniformly on the unit sphere with ``generator`` (the same directions for every
    problem of the batch). Each 1-D term is exact (:func:`wasserstein_1d`); the only
    approximation is the Monte Carlo average over directions. For ``p = 2`` and
    ``y = x + m`` (a shift) the population value is ``SW_2^2 = ||m||^2 / d``.

    Parameters
    ----------
    x, y
        Sample sets ``(N, d)`` / ``(B, N, d)`` and ``(M, d)`` / ``(B, M, d)``, or Results
        (their weights are used). A single set is broadcast against a batch.
    num_projections
        Number ``P`` of random directions.
    p
        Order, ``p >= 1``.
    weights_x, weights_y
        Non-negative sample weights ``(N,)`` / ``(B, N)`` (normalised here), or ``None``.
    generator
        Draws the directions (on the inputs' device).
    directions
        Optional fixed directions ``(P, d)`` used instead of random ones (not normalised).

    Returns
    -------
    Tensor
        ``(B,)`` float64, or a scalar when neither input is batched.
    """
    p = _check_p(p)
    X, WX, bx = sample_set(x, weights_x, "x")
    Y, WY, by = sample_set(y, weights_y, "y")
    X, WX, Y, WY, batched = broadcast_pair(X, WX, bx, Y, WY, by)
    B, N, d = X.shape
    M = Y.shape[1]
    if directions is None:
        check_positive_int("num_projections", num_projections)
        theta = random_directions(num_projections, d, generator, X.device, X.dtype)
    else:
        if not isinstance(directions, Tensor) or directions.dim() != 2 or directions.shape[1] != d:
            raise ValueError(f"directions must be a (P, {d}) tensor")
        theta = directions.to(device=X.device, dtype=X.dtype)
    P = theta.shape[0]
    wx = None if WX is None else WX[:, None, :]
    wy = None if WY is None else WY[:, None, :]
    total = torch.zeros(B, dtype=torch.float64, device=X.device)
    # Chunk the directions so that a (B, chunk, N + M) tensor stays bounded.
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * (N + M)))
    # a set broadcast over the problems (stride 0) is projected and sorted once
    X1 = X[:1] if B > 1 and X.stride(0) == 0 else X
    Y1 = Y[:1] if B > 1 and Y.stride(0) == 0 else Y
    for th in theta.split(chunk):
        px = (X1 @ th.T).transpose(1, 2)  # (B or 1, c, N)
        py = (Y1 @ th.T).transpose(1, 2)  # (B or 1, c, M)
        total += _w1d_pow(px, py, wx, wy, p).sum(-1)
    return _finish((total / P).pow(1.0 / p), batched)


# ---------------------------------------------------------------------------------- exact W2
def _transport_lp(C, a, b) -> float:
    """Optimal transport cost ``min <C, P>`` s.t. ``P 1 = a``, ``P^T 1 = b``, ``P >= 0``."""
    import numpy as np
    import scipy.sparse as sp
    from scipy.optimize import linprog

    N, M = C.shape
    rows = sp.kron(sp.eye(N), np.ones((1, M)), format="csr")  # sum_j P_ij = a_i
    cols = sp.kron(np.ones((1, N)), sp.eye(M), format="csr")[
        :-1
    ]  # sum_i P_ij = b_j; one is redundant
    A_eq = sp.vstack([rows, cols]).tocsr()
    b_eq = np.concatenate([a, b[:-1]])
    res = linprog(C.ravel(), A_eq=A_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"the transport linear programme failed: {res.message}")
    return float(res.fun)


def wasserstein2_exact(
    x: Tensor | Result,
    y: Tensor | Result,
    weights_x: Tensor | None = None,
    weights_y: Tensor | None = None,
) -> Tensor:
    """Exact ``W_2`` between two (weighted) point sets.

    With POT installed (``pip install pot``, the extra ``bayesfilter-diff[ot]``): the
    transport problem by ``ot.emd2`` (network simplex in C++), any sizes and weights up to
    ``N M <= MAX_EMD_ENTRIES`` (the cost matrix in memory: tens of thousands of points).
    Without it, scipy: equal sizes with uniform weights by
    ``scipy.optimize.linear_sum_assignment`` (the optimal coupling is a permutation), else
    the transport linear programme by ``scipy.optimize.linprog`` (HiGHS), limited to
    ``N M <= MAX_LP_VARIABLES`` (a few hundred points each). Problems of a batch are
    solved one after the other on the CPU.

    Returns
    -------
    Tensor
        ``(B,)`` float64 on the inputs' device, or a scalar when neither input is batched.
    """
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    X, WX, bx = sample_set(x, weights_x, "x")
    Y, WY, by = sample_set(y, weights_y, "y")
    X, WX, Y, WY, batched = broadcast_pair(X, WX, bx, Y, WY, by)
    B, N, _ = X.shape
    M = Y.shape[1]
    ot = _pot()
    assignment = WX is None and WY is None and N == M
    if ot is not None:
        if N * M > MAX_EMD_ENTRIES:
            raise ValueError(
                f"wasserstein2_exact: the cost matrix would have N * M = {N * M} > "
                f"{MAX_EMD_ENTRIES} entries; subsample, or use sliced_wasserstein"
            )
    elif not assignment and N * M > MAX_LP_VARIABLES:
        raise ValueError(
            f"wasserstein2_exact with unequal sizes or weights solves a linear programme with "
            f"N * M = {N * M} > {MAX_LP_VARIABLES} variables; install POT (pip install pot) "
            "for larger sets, subsample, or use sliced_wasserstein"
        )
    Xn = X.detach().double().cpu().numpy()
    Yn = Y.detach().double().cpu().numpy()
    Wx = uniform_or(WX, X.shape[:2], X.device).cpu().numpy()
    Wy = uniform_or(WY, Y.shape[:2], Y.device).cpu().numpy()
    out = np.empty(B)
    for b in range(B):  # the exact solvers are not batched
        C = cdist(Xn[b], Yn[b], "sqeuclidean")
        if ot is not None:
            wx, wy = Wx[b] / Wx[b].sum(), Wy[b] / Wy[b].sum()
            cost = float(ot.emd2(wx, wy, C, numItermax=max(100_000, 50 * (N + M))))
        elif assignment:
            r, c = linear_sum_assignment(C)
            cost = C[r, c].mean()
        else:
            cost = _transport_lp(C, Wx[b], Wy[b])
        out[b] = math.sqrt(max(cost, 0.0))
    return _finish(torch.as_tensor(out, dtype=torch.float64, device=X.device), batched)


def _pot():
    """The POT module (``ot``) if installed, else ``None``."""
    try:
        import ot
    except ImportError:
        return None
    return ot


# ---------------------------------------------------------------------------------- MMD
def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``(B, n, m)`` in float64."""
    a, b = a.double(), b.double()
    d2 = (a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2 * a @ b.transpose(1, 2)
    return d2.clamp_min_(0)


def median_bandwidth(x: Tensor | Result, y: Tensor | Result) -> Tensor:
    """Median heuristic: the median distance ``||z_i - z_j||`` over pairs ``i != j`` of the
    pooled sample ``z = x ∪ y`` (Gretton et al. 2012, section 8). ``(B,)`` or a scalar."""
    X, _, bx = sample_set(x, None, "x")
    Y, _, by = sample_set(y, None, "y")
    X, _, Y, _, batched = broadcast_pair(X, None, bx, Y, None, by)
    return _finish(_median_bandwidth(torch.cat([X, Y], dim=1)), batched)


def _median_bandwidth(Z: Tensor) -> Tensor:
    B, L, _ = Z.shape
    out = []
    step = max(1, _CHUNK_ELEMENTS // (L * L))
    eye = torch.eye(L, dtype=torch.bool, device=Z.device)
    for z in Z.split(step):
        D = _sq_dists(z, z).sqrt().masked_fill_(eye, float("nan"))
        out.append(D.reshape(z.shape[0], -1).nanmedian(-1).values)
    return torch.cat(out)


def mmd(x: Tensor | Result, y: Tensor | Result, bandwidth: float | Tensor | None = None) -> Tensor:
    """Unbiased estimate of the squared MMD with a Gaussian kernel.

    ``k(a, b) = exp(-||a - b||^2 / (2 h^2))`` and

        MMD_u^2 = sum_{i != j} k(x_i, x_j) / (N (N-1)) + sum_{i != j} k(y_i, y_j) / (M (M-1))
                  - 2 sum_{i, j} k(x_i, y_j) / (N M),

    the U-statistic of Gretton et al. (JMLR 2012, eq. 3): its mean is the population
    ``MMD^2`` exactly, so it can be slightly negative when both sets come from the same
    distribution. Weighted samples are not supported (a weighted Result is refused):
    resample them first with ``Result.draws``.

    Parameters
    ----------
    x, y
        Sample sets ``(N, d)`` / ``(B, N, d)`` and ``(M, d)`` / ``(B, M, d)``, ``N, M >= 2``.
    bandwidth
        ``h > 0`` (a float, or ``(B,)``); ``None`` uses the median heuristic
        (:func:`median_bandwidth`: the median pairwise distance in the pooled sample,
        computed per problem).

    Returns
    -------
    Tensor
        ``MMD_u^2``: ``(B,)`` float64, or a scalar when neither input is batched.
    """
    for name, s in (("x", x), ("y", y)):
        if isinstance(s, Result) and s.log_weights is not None:
            raise ValueError(f"{name} is a weighted Result: pass {name}.draws(n) to mmd")
    X, _, bx = sample_set(x, None, "x")
    Y, _, by = sample_set(y, None, "y")
    X, _, Y, _, batched = broadcast_pair(X, None, bx, Y, None, by)
    B, N, _ = X.shape
    M = Y.shape[1]
    if N < 2 or M < 2:
        raise ValueError(f"mmd needs at least two samples in each set, got N={N}, M={M}")
    if bandwidth is None:
        h = _median_bandwidth(torch.cat([X, Y], dim=1))
    else:
        h = torch.as_tensor(bandwidth, dtype=torch.float64, device=X.device)
        if h.dim() > 1 or (h.dim() == 1 and h.shape[0] not in (1, B)):
            raise ValueError(
                f"bandwidth must be a float or a ({B},) tensor, got shape {tuple(h.shape)}"
            )
        h = h.expand(B)
    if not (torch.isfinite(h).all() and (h > 0).all()):
        raise ValueError(f"bandwidth must be finite and positive, got {h}")
    out = []
    step = max(1, _CHUNK_ELEMENTS // ((N + M) ** 2))
    for xb, yb, hb in zip(X.split(step), Y.split(step), h.split(step)):
        g = -0.5 / hb[:, None, None] ** 2
        kxx = torch.exp(g * _sq_dists(xb, xb))
        kyy = torch.exp(g * _sq_dists(yb, yb))
        kxy = torch.exp(g * _sq_dists(xb, yb))
        sxx = (kxx.sum((1, 2)) - kxx.diagonal(dim1=1, dim2=2).sum(-1)) / (N * (N - 1))
        syy = (kyy.sum((1, 2)) - kyy.diagonal(dim1=1, dim2=2).sum(-1)) / (M * (M - 1))
        out.append(sxx + syy - 2 * kxy.mean((1, 2)))
    return _finish(torch.cat(out), batched)


# ---------------------------------------------------------------------------------- Gaussian
def _psd_sqrt_eigs(S: Tensor) -> Tensor:
    return torch.linalg.eigvalsh(0.5 * (S + S.transpose(-1, -2))).clamp_min(0).sqrt()


def _psd_sqrt(S: Tensor) -> Tensor:
    lam, Q = torch.linalg.eigh(0.5 * (S + S.transpose(-1, -2)))
    return (Q * lam.clamp_min(0).sqrt().unsqueeze(-2)) @ Q.transpose(-1, -2)


def weighted_moments(X: Tensor, W: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean ``(B, d)`` and covariance ``(B, d, d)`` (float64) of ``X (B, N, d)``.

    The covariance is ``sum_i W_i (x_i - m)(x_i - m)^T / (1 - sum_i W_i^2)``: unbiased
    (``1 / (N - 1)``) for uniform weights.
    """
    X = X.double()
    W = uniform_or(W, X.shape[:2], X.device)
    m = (W.unsqueeze(-1) * X).sum(1)
    r = X - m.unsqueeze(1)
    denom = (1 - (W**2).sum(-1)).clamp_min(torch.finfo(torch.float64).eps)
    C = (W.unsqueeze(-1) * r).transpose(1, 2) @ r / denom[:, None, None]
    return m, 0.5 * (C + C.transpose(-1, -2))


def _gaussian_params(obj, weights, name: str) -> tuple[Tensor, Tensor, bool]:
    """``(mean (B, d), cov (B, d, d), batched)`` float64 from samples / mixture / (m, C)."""
    if isinstance(obj, GaussianMixture):
        m, C = obj.mean().double(), obj.covariance().double()
        batched = len(obj.batch_shape) > 0
        if len(obj.batch_shape) > 1:
            raise ValueError(f"{name}: a mixture with more than one batch axis is not supported")
        return (m, C, True) if batched else (m[None], C[None], False)
    if isinstance(obj, tuple | list):
        if len(obj) != 2:
            raise ValueError(f"{name} as a tuple must be (mean, covariance)")
        m, C = (torch.as_tensor(t).double() for t in obj)
        if m.dim() == 1 and C.dim() == 2 and C.shape == (m.shape[0],) * 2:
            return m[None], C[None], False
        if m.dim() == 2 and C.dim() == 3 and C.shape == (m.shape[0], m.shape[1], m.shape[1]):
            return m, C, True
        raise ValueError(
            f"{name}: mean and covariance must have shapes (d,), (d, d) or (B, d), (B, d, d); "
            f"got {tuple(m.shape)} and {tuple(C.shape)}"
        )
    X, W, batched = sample_set(obj, weights, name)
    if X.shape[1] < 2:
        raise ValueError(f"{name}: a covariance estimate needs at least two samples")
    m, C = weighted_moments(X, W)
    return m, C, batched


def gaussian_w2(
    x,
    y,
    weights_x: Tensor | None = None,
    weights_y: Tensor | None = None,
) -> Tensor:
    """``W_2`` between Gaussians (the Bures-Wasserstein distance).

    ``W_2^2 = ||m_1 - m_2||^2 + tr(S_1 + S_2 - 2 (S_1^(1/2) S_2 S_1^(1/2))^(1/2))``.

    Each of ``x``, ``y`` is a sample set (tensor or Result; its weighted mean and
    covariance are used), a :class:`~bayesfilter_diff.GaussianMixture` (its exact mean and
    covariance), or a tuple ``(mean, covariance)`` of shapes ``(d,), (d, d)`` or
    ``(B, d), (B, d, d)``. On samples this compares the first two moments only: it is
    zero for any two distributions that share them.

    Returns
    -------
    Tensor
        ``(B,)`` float64, or a scalar when neither input is batched.
    """
    m1, S1, b1 = _gaussian_params(x, weights_x, "x")
    m2, S2, b2 = _gaussian_params(y, weights_y, "y")
    if m1.shape[-1] != m2.shape[-1]:
        raise ValueError(
            f"x and y must have the same dimension, got {m1.shape[-1]} and {m2.shape[-1]}"
        )
    if m1.device != m2.device:
        raise ValueError(f"x is on {m1.device} but y is on {m2.device}; move one")
    if m1.shape[0] != m2.shape[0] and 1 not in (m1.shape[0], m2.shape[0]):
        raise ValueError(
            f"x and y have different numbers of problems: {m1.shape[0]} and {m2.shape[0]}"
        )
    R1 = _psd_sqrt(S1)
    cross = _psd_sqrt_eigs(R1 @ S2 @ R1).sum(-1)
    tr = torch.diagonal(S1, dim1=-2, dim2=-1).sum(-1) + torch.diagonal(S2, dim1=-2, dim2=-1).sum(-1)
    w2 = ((m1 - m2) ** 2).sum(-1) + tr - 2 * cross
    return _finish(w2.clamp_min(0).sqrt(), b1 or b2)


# ---------------------------------------------------------------------------------- floor
class Floor(NamedTuple):
    """The distance between two independent exact sample sets (see :func:`exact_floor`)."""

    mean: Tensor  #: ``(B,)`` or scalar: mean over repeats
    std: Tensor  #: ``(B,)`` or scalar: standard deviation over repeats
    values: Tensor  #: ``(repeats, B)`` or ``(repeats,)``


_METRICS: dict[str, Callable] = {
    "sliced_wasserstein": sliced_wasserstein,
    "wasserstein2_exact": wasserstein2_exact,
    "mmd": mmd,
    "gaussian_w2": gaussian_w2,
}


def exact_floor(
    reference: GaussianMixture,
    n: int,
    m: int | None = None,
    metric: str | Callable[..., Tensor] = "sliced_wasserstein",
    generator: torch.Generator | None = None,
    repeats: int = 10,
    **metric_kwargs,
) -> Floor:
    """The metric between two independent exact sample sets of sizes ``n`` and ``m``.

    A sampler compared with ``m`` exact draws through its ``n`` draws cannot be expected to
    score below this floor: it is what an exact sampler scores (finite-sample bias of the
    metric plus the Monte Carlo error of its directions). Report a sampler's distance next
    to ``floor.mean`` (and ``floor.std``).

    Parameters
    ----------
    reference
        The exact posterior (batched over ``B`` problems or not).
    n, m
        Sample sizes of the sampler and of the reference set (``m`` defaults to ``n``).
    metric
        ``"sliced_wasserstein"`` (default), ``"wasserstein2_exact"``, ``"mmd"``,
        ``"gaussian_w2"``, or a callable ``metric(x, y, **metric_kwargs)``.
    generator
        Draws the samples (and the directions of the sliced distance).
    repeats
        Independent repetitions.
    **metric_kwargs
        Passed to the metric (e.g. ``num_projections``).
    """
    if not isinstance(reference, GaussianMixture):
        raise TypeError(f"reference must be a GaussianMixture, got {type(reference).__name__}")
    if len(reference.batch_shape) > 1:
        raise ValueError("reference may have at most one batch axis")
    check_positive_int("n", n)
    m = n if m is None else check_positive_int("m", m)
    check_positive_int("repeats", repeats)
    if isinstance(metric, str):
        if metric not in _METRICS:
            raise ValueError(
                f"metric must be one of {sorted(_METRICS)} or a callable, got {metric!r}"
            )
        if metric == "sliced_wasserstein":
            metric_kwargs = {"generator": generator, **metric_kwargs}
        fn = _METRICS[metric]
    elif callable(metric):
        fn = metric
    else:
        raise TypeError(f"metric must be a name or a callable, got {type(metric).__name__}")
    vals = []
    for _ in range(repeats):
        a = reference.sample(n, generator)
        b = reference.sample(m, generator)
        vals.append(torch.as_tensor(fn(a, b, **metric_kwargs), dtype=torch.float64))
    values = torch.stack(vals)
    std = values.std(0) if repeats > 1 else torch.zeros_like(values[0])
    return Floor(values.mean(0), std, values)

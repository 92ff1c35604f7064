"""Diagnostic figures (matplotlib). Every function returns the Figure and never shows it.

Figures are built with ``matplotlib.figure.Figure`` (not pyplot) unless an ``ax`` is
given, so no global figure state is touched and they work under any backend (Agg in
tests); notebooks display a returned Figure, scripts call ``fig.savefig(path)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..priors.gmm import GaussianMixture
from ..result import Result
from .calibration import binomial_interval
from .mixture import marginal_mixture
from .smc import ess_trace, resampling_events

__all__ = [
    "plot_samples_vs_posterior",
    "plot_ess",
    "plot_distance_vs_particles",
    "plot_rank_histogram",
    "plot_coverage",
    "log_axis_errors",
]


def _figure_and_ax(ax, figsize=(5.0, 4.0)):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _np(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _hpd_levels(density: np.ndarray, cell: float, masses=(0.5, 0.9, 0.99)) -> list[float]:
    """Density thresholds whose super-level sets hold ``masses`` of the grid's mass."""
    v = np.sort(density.ravel())[::-1]
    cum = np.cumsum(v) * cell
    cum /= cum[-1]
    lv = [float(v[min(np.searchsorted(cum, m), v.size - 1)]) for m in masses]
    return sorted(set(lv))


def plot_samples_vs_posterior(
    samples: Tensor | Result,
    posterior: GaussianMixture,
    dims: tuple[int, int] = (0, 1),
    ax=None,
    index: int = 0,
    max_points: int = 2000,
    grid_size: int = 120,
    legend: bool = True,
):
    """Scatter of the draws over the exact posterior's 2-D marginal density.

    The marginal of the mixture on ``dims`` is the mixture with the sub-means and
    sub-covariances (:func:`~bayesfilter_diff.diagnostics.marginal_mixture`); its density
    is evaluated on a grid and drawn as the contours enclosing 50%, 90% and 99% of its mass.

    Parameters
    ----------
    samples
        ``(N, d)`` or ``(B, N, d)`` draws, or a Result (weighted particles are resampled
        to equal weights for the scatter).
    posterior
        The exact posterior mixture (batched or not).
    dims
        The two coordinates shown.
    index
        Which problem of a batch to show.
    max_points
        At most this many points are drawn (the first ones).
    legend
        Draw the legend (``False`` for all but one panel of a grid).
    """
    if not isinstance(posterior, GaussianMixture):
        raise TypeError(f"posterior must be a GaussianMixture, got {type(posterior).__name__}")
    if len(dims) != 2:
        raise ValueError(f"dims must be two coordinates, got {dims!r}")
    if isinstance(samples, Result):
        gen = torch.Generator(device=samples.samples.device).manual_seed(0)
        x = (
            samples.draws(samples.num_samples, generator=gen)
            if samples.log_weights is not None
            else samples.samples
        )
        x = x.reshape(*x.shape[: 2 if samples.batched else 1], -1)
    else:
        x = samples
    if not isinstance(x, Tensor) or x.dim() not in (2, 3):
        raise ValueError("samples must have shape (N, d) or (B, N, d)")
    if x.dim() == 3:
        x = x[index]
    marg = marginal_mixture(posterior, dims)
    if len(marg.batch_shape):
        cov = marg.covariances[index] if marg._cov_batched else marg.covariances
        marg = GaussianMixture(marg.weights[index], marg.means[index], cov, validate=False)
    pts = _np(x[:max_points][:, list(dims)])
    fig, ax = _figure_and_ax(ax)
    # Grid covering the draws and every component with non-negligible weight (+- 4 std).
    w = _np(marg.weights)
    mu = _np(marg.means)
    sd = np.sqrt(np.diagonal(_np(marg.covariance_matrices()), axis1=-2, axis2=-1))
    sd = np.broadcast_to(sd, mu.shape)
    keep = w > 1e-3 * w.max()
    lo = np.minimum((mu - 4 * sd)[keep].min(0), pts.min(0))
    hi = np.maximum((mu + 4 * sd)[keep].max(0), pts.max(0))
    gx = np.linspace(lo[0], hi[0], grid_size)
    gy = np.linspace(lo[1], hi[1], grid_size)
    X, Y = np.meshgrid(gx, gy)
    grid = torch.as_tensor(np.stack([X, Y], -1), dtype=marg.means.dtype, device=marg.means.device)
    dens = _np(torch.exp(marg.log_prob(grid.reshape(-1, 2))).reshape(X.shape))
    ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.4, color="C0", label="samples", rasterized=True)
    cell = (gx[1] - gx[0]) * (gy[1] - gy[0])
    levels = _hpd_levels(dens, cell)
    if len(levels) > 1 or (levels and levels[0] > 0):
        ax.contour(X, Y, dens, levels=levels, colors="C3", linewidths=1.0)
        ax.plot([], [], color="C3", lw=1.0, label="exact posterior (50/90/99% HPD)")
    ax.set_xlabel(f"x[{dims[0]}]")
    ax.set_ylabel(f"x[{dims[1]}]")
    if legend:
        ax.legend(loc="best", fontsize="small")
    return fig


def log_axis_errors(values, errors, floor_fraction: float = 0.01) -> np.ndarray:
    """``(2, n)`` lower / upper error lengths for bars on a log axis: a symmetric interval
    whose lower end is at or below 0 cannot be drawn there (it runs off the axis), so its
    lower end is clipped to ``floor_fraction`` of the value (say so in the caption)."""
    v, e = np.asarray(values, dtype=float), np.asarray(errors, dtype=float)
    lower = np.minimum(e, (1 - floor_fraction) * np.abs(v))
    return np.stack([lower, e])


def plot_ess(result: Result, ax=None, relative: bool = True, max_problems: int = 10):
    """ESS after each step (one line per problem), resampling events marked."""
    e = _np(ess_trace(result, relative=relative))
    r = resampling_events(result).cpu().numpy()
    if e.ndim == 1:
        e, r = e[:, None], r[:, None]
    fig, ax = _figure_and_ax(ax)
    steps = np.arange(1, e.shape[0] + 1)
    shown = min(e.shape[1], max_problems)
    for b in range(shown):
        (line,) = ax.plot(steps, e[:, b], lw=1.0, label=f"problem {b}" if e.shape[1] > 1 else None)
        ax.plot(steps[r[:, b]], e[r[:, b], b], "v", ms=4, color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("ESS / N" if relative else "ESS")
    if relative:
        ax.set_ylim(0, 1.05)
    more = f", first {shown} of {e.shape[1]} problems" if shown < e.shape[1] else ""
    ax.set_title(f"effective sample size (triangles: resampled{more})")
    if e.shape[1] > 1:
        ax.legend(fontsize="small")
    return fig


def plot_distance_vs_particles(
    ns: Sequence[int],
    dists,
    floor=None,
    ax=None,
    ylabel: str = "distance to the exact posterior",
):
    """Distance against the number of particles (log-log), with the exact floor.

    Parameters
    ----------
    ns
        Particle counts ``(n,)``.
    dists
        ``(n,)`` values, ``(n, R)`` repeats (mean and min-max band drawn), or a mapping
        ``label -> such an array`` (one curve per sampler).
    floor
        The exact-vs-exact distance (:func:`~bayesfilter_diff.diagnostics.exact_floor`):
        a scalar or ``(n,)``, drawn dashed.
    """
    n = _np(ns)
    curves = dists if isinstance(dists, Mapping) else {None: dists}
    fig, ax = _figure_and_ax(ax)
    for label, dv in curves.items():
        v = _np(dv)
        if v.shape[0] != n.shape[0]:
            raise ValueError(f"dists must have len(ns)={n.shape[0]} rows, got {v.shape}")
        if v.ndim == 1:
            ax.plot(n, v, "o-", label=label)
        else:
            (line,) = ax.plot(n, v.mean(1), "o-", label=label)
            ax.fill_between(n, v.min(1), v.max(1), alpha=0.2, color=line.get_color())
    if floor is not None:
        f = np.broadcast_to(_np(floor), n.shape)
        ax.plot(n, f, "k--", lw=1.0, label="exact floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of particles N")
    ax.set_ylabel(ylabel)
    if any(k is not None for k in curves) or floor is not None:
        ax.legend(fontsize="small")
    return fig


def plot_rank_histogram(
    ranks: Tensor,
    N: int,
    bins: int | None = None,
    ax=None,
    prob: float = 0.99,
    max_panels: int = 12,
):
    """SBC rank histogram(s) with the band a uniform histogram stays in.

    The grey band is the central ``prob`` interval of each bin's count under uniform ranks
    (``Binomial(B, p_bin)``). For ``(B, S)`` ranks one panel per statistic (at most
    ``max_panels``); ``ax`` is only used for 1-D ranks or a single column.
    """
    r = ranks.reshape(ranks.shape[0], -1).cpu().numpy().astype(np.int64)
    B, S = r.shape
    if bins is None:
        bins = min(N + 1, max(2, B // 10))
    S = min(S, max_panels)
    size = np.bincount(np.arange(N + 1) * bins // (N + 1), minlength=bins)
    p = size / (N + 1)
    lo, hi = binomial_interval(B, p, prob)
    lo, hi = lo.numpy() * B, hi.numpy() * B
    if S == 1:
        fig, ax = _figure_and_ax(ax)
        axes = [ax]
    else:
        from matplotlib.figure import Figure

        cols = min(S, 4)
        rows = -(-S // cols)
        fig = Figure(figsize=(3.0 * cols, 2.4 * rows), layout="constrained")
        axes = list(np.atleast_1d(fig.subplots(rows, cols)).ravel())
        for a in axes[S:]:
            a.set_visible(False)
    edges = np.arange(bins + 1)
    for j in range(S):
        a = axes[j]
        counts = np.bincount(r[:, j] * bins // (N + 1), minlength=bins)
        a.fill_between(edges, np.r_[lo, lo[-1]], np.r_[hi, hi[-1]], step="post", color="0.85")
        a.stairs(counts, edges, fill=True, alpha=0.7, color="C0")
        a.axhline(B / bins, color="0.4", lw=0.8)
        a.set_xlabel(f"rank bin (N = {N})")
        a.set_title(f"statistic {j}", fontsize="small")
    axes[0].set_ylabel("count")
    return fig


def plot_coverage(levels, observed, n: int | None = None, ax=None, prob: float = 0.99, labels=None):
    """Observed coverage against the nominal level, with the diagonal.

    Parameters
    ----------
    levels
        Nominal levels ``(L,)``.
    observed
        ``(L,)`` or ``(L, S)`` observed coverages (from
        :func:`~bayesfilter_diff.diagnostics.coverage`).
    n
        Number of problems behind each fraction: draws the binomial ``prob`` band.
    """
    lv = _np(levels)
    ob = _np(observed)
    ob = ob[:, None] if ob.ndim == 1 else ob
    if ob.shape[0] != lv.shape[0]:
        raise ValueError(f"observed must have len(levels)={lv.shape[0]} rows, got {ob.shape}")
    fig, ax = _figure_and_ax(ax)
    ax.plot([0, 1], [0, 1], color="0.4", lw=0.8)
    if n is not None:
        lo, hi = binomial_interval(n, lv, prob)
        ax.fill_between(lv, lo.numpy(), hi.numpy(), color="0.85", label=f"{prob:.0%} band (n={n})")
    for j in range(ob.shape[1]):
        lab = labels[j] if labels is not None else (None if ob.shape[1] == 1 else f"statistic {j}")
        ax.plot(lv, ob[:, j], "o-", ms=3, lw=1.0, label=lab)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("nominal level")
    ax.set_ylabel("observed coverage")
    if n is not None or labels is not None or ob.shape[1] > 1:
        ax.legend(fontsize="small")
    return fig

"""Calibration over many problems: SBC ranks, rank-uniformity tests, coverage, PIT.

Simulation-based calibration (Talts, Betancourt, Simpson, Vehtari & Gelman 2018): draw
``x* ~ p(x)``, ``y ~ p(y | x*)``, then ``N`` posterior draws ``x_1..x_N`` from the sampler.
For any scalar statistic ``f``, the rank ``#{i : f(x_i) < f(x*)}`` is uniform on
``{0, ..., N}`` when the sampler is exact (``x*`` and the draws are then exchangeable given
``y``). The statistics used here, in this column order:

1. the ``d`` coordinates;
2. ``P`` projections ``theta_j^T x`` (random unit directions, or given ones);
3. optionally the posterior log-density ``log p(x | y)`` (pass ``posterior=``): a
   statistic that sees the whole joint, and whose central-interval counterpart is the
   highest-posterior-density (HPD) region.

An overconfident sampler puts ``x*`` in the tails of its draws too often: its rank
histogram is U-shaped and its coverage falls below nominal; an underconfident one gives a
hump. Ranks assume *independent* draws; resampled particles (duplicates) thin the
effective number of draws (Talts et al. recommend thinning to an effective size first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..priors.gmm import GaussianMixture
from ._utils import check_positive_int, log_prob_fn, random_directions

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "sbc_ranks",
    "rank_uniformity_test",
    "RankTest",
    "coverage",
    "pit_values",
    "binomial_interval",
]

Posterior = GaussianMixture | Callable[[Tensor], Tensor]


def _statistics(
    truth: Tensor,
    samples: Tensor,
    projections: int | Tensor | None,
    generator: torch.Generator | None,
    posterior: Posterior | None,
) -> tuple[Tensor, Tensor]:
    """Truth statistics ``(B, S)`` and draw statistics ``(B, N, S)``."""
    for name, t in (("truth", truth), ("samples", samples)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if truth.dim() != 2 or samples.dim() != 3 or samples.shape[0] != truth.shape[0]:
        raise ValueError(
            f"truth must have shape (B, d) and samples (B, N, d) with the same B and d, got "
            f"{tuple(truth.shape)} and {tuple(samples.shape)}"
        )
    if samples.shape[2] != truth.shape[1]:
        raise ValueError(f"truth has d={truth.shape[1]} but samples have d={samples.shape[2]}")
    if truth.device != samples.device:
        raise ValueError(f"truth is on {truth.device} but samples are on {samples.device}")
    if samples.shape[1] < 1:
        raise ValueError("samples must hold at least one draw per problem")
    d = truth.shape[1]
    samples = samples.to(truth.dtype)
    ts, ss = [truth], [samples]
    if projections is not None:
        if isinstance(projections, Tensor):
            if projections.dim() != 2 or projections.shape[1] != d:
                raise ValueError(f"projections must be an int or a (P, {d}) tensor")
            theta = projections.to(device=truth.device, dtype=truth.dtype)
        else:
            check_positive_int("projections", projections)
            theta = random_directions(projections, d, generator, truth.device, truth.dtype)
        ts.append(truth @ theta.T)
        ss.append(samples @ theta.T)
    if posterior is not None:
        lp = log_prob_fn(posterior)
        dt = posterior.means.dtype if isinstance(posterior, GaussianMixture) else truth.dtype
        ts.append(lp(truth.to(dt)).to(truth.dtype).reshape(-1, 1))
        ss.append(lp(samples.to(dt)).to(truth.dtype).unsqueeze(-1))
    return torch.cat(ts, -1), torch.cat(ss, -1)


def sbc_ranks(
    truth: Tensor,
    samples: Tensor,
    projections: int | Tensor | None = None,
    generator: torch.Generator | None = None,
    posterior: Posterior | None = None,
) -> Tensor:
    """SBC ranks of the true values among the posterior draws.

    Parameters
    ----------
    truth
        ``(B, d)``: the ``x*`` of ``B`` simulated problems.
    samples
        ``(B, N, d)``: ``N`` equally weighted posterior draws per problem
        (``Result.draws(N)`` for weighted samplers).
    projections
        ``None`` (coordinates only), a number ``P`` of random unit directions drawn with
        ``generator``, or fixed directions ``(P, d)``.
    posterior
        Optional exact posterior (a GaussianMixture batched over ``B``, or a callable
        ``log p(x)`` on ``(B, ..., d)``): adds the log-density as a last statistic.

    Returns
    -------
    Tensor
        ``(B, S)`` int64 ranks in ``{0, ..., N}``, ``S = d + P (+ 1)``.
    """
    t, s = _statistics(truth, samples, projections, generator, posterior)
    return (s < t.unsqueeze(1)).sum(1)


def pit_values(
    truth: Tensor,
    samples: Tensor,
    projections: int | Tensor | None = None,
    generator: torch.Generator | None = None,
    posterior: Posterior | None = None,
) -> Tensor:
    """Probability integral transforms ``F_hat(f(x*)) = (1/N) #{i : f(x_i) <= f(x*)}``.

    Same statistics and arguments as :func:`sbc_ranks`; uniform on ``[0, 1]`` (up to the
    ``1/N`` discretisation) for an exact sampler. Returns ``(B, S)`` float64.
    """
    t, s = _statistics(truth, samples, projections, generator, posterior)
    return (s <= t.unsqueeze(1)).double().mean(1)


@dataclass(frozen=True)
class RankTest:
    """Uniformity tests of SBC ranks, one per statistic (column)."""

    chi2: Tensor  #: ``(S,)`` Pearson statistics on the binned ranks
    chi2_pvalue: Tensor  #: ``(S,)``
    ks: Tensor  #: ``(S,)`` Kolmogorov-Smirnov statistics of the randomised PIT
    ks_pvalue: Tensor  #: ``(S,)``
    bins: int  #: number of rank bins of the chi-square test

    @property
    def pvalue(self) -> float:
        """Bonferroni-combined p-value over both tests and all statistics:
        ``min(1, 2 S min_j p_j)``; reject uniformity at level ``a`` when below ``a``."""
        p = torch.cat([self.chi2_pvalue, self.ks_pvalue])
        return float(min(1.0, p.numel() * float(p.min())))


def rank_uniformity_test(
    ranks: Tensor,
    N: int,
    bins: int | None = None,
    generator: torch.Generator | None = None,
) -> RankTest:
    """Test SBC ranks for uniformity on ``{0, ..., N}`` (chi-square and Kolmogorov-Smirnov).

    - Chi-square (``scipy.stats.chisquare``): the ``N + 1`` rank values are grouped into
      ``bins`` contiguous bins (value ``r`` into bin ``floor(r * bins / (N + 1))``), with
      expected counts ``B * (values in the bin) / (N + 1)``, exact also when ``bins`` does
      not divide ``N + 1``. Default ``bins = min(N + 1, max(2, B // 10))`` (about ten
      expected counts per bin; Talts et al. suggest ``B / 20``).
    - KS (``scipy.stats.kstest`` against U(0, 1)) on the randomised PIT
      ``u = (r + V) / (N + 1)``, ``V ~ U(0, 1)`` drawn with ``generator``: exactly uniform
      on ``[0, 1]`` when the ranks are uniform, so the test has its nominal size for any
      ``N``.

    Parameters
    ----------
    ranks
        ``(B,)`` or ``(B, S)`` integer ranks in ``{0, ..., N}``.
    N
        Number of posterior draws per problem.
    """
    import numpy as np
    from scipy import stats

    check_positive_int("N", N)
    if not isinstance(ranks, Tensor):
        raise TypeError(f"ranks must be a torch.Tensor, got {type(ranks).__name__}")
    r = ranks.reshape(ranks.shape[0], -1) if ranks.dim() in (1, 2) else None
    if r is None or r.shape[0] < 2:
        raise ValueError(
            f"ranks must have shape (B,) or (B, S) with B >= 2, got {tuple(ranks.shape)}"
        )
    if r.is_floating_point() and not torch.equal(r, r.round()):
        raise ValueError("ranks must be integers")
    r = r.long()
    if (r < 0).any() or (r > N).any():
        raise ValueError(f"ranks must lie in {{0, ..., N={N}}}")
    B, S = r.shape
    if bins is None:
        bins = min(N + 1, max(2, B // 10))
    check_positive_int("bins", bins, 2)
    if bins > N + 1:
        raise ValueError(f"bins must be at most N + 1 = {N + 1}, got {bins}")
    rn = r.cpu().numpy()
    group = rn * bins // (N + 1)  # (B, S)
    counts = np.stack([(group == g).sum(0) for g in range(bins)])  # (bins, S)
    size = np.bincount(np.arange(N + 1) * bins // (N + 1), minlength=bins)
    expected = np.broadcast_to((B * size / (N + 1))[:, None], counts.shape)
    chi = stats.chisquare(counts, f_exp=expected, axis=0)
    dev = generator.device if generator is not None else torch.device("cpu")
    v = torch.rand(r.shape, generator=generator, dtype=torch.float64, device=dev).cpu()
    u = ((r.cpu().double() + v) / (N + 1)).numpy()
    ks = [stats.kstest(u[:, j], "uniform") for j in range(S)]

    def t(a):
        return torch.as_tensor(np.asarray(a, dtype=np.float64))

    return RankTest(
        chi2=t(chi.statistic),
        chi2_pvalue=t(chi.pvalue),
        ks=t([k.statistic for k in ks]),
        ks_pvalue=t([k.pvalue for k in ks]),
        bins=int(bins),
    )


def _quantiles(s: Tensor, q: Tensor) -> Tensor:
    """Quantiles of ``s (B, N, S)`` along N at the plotting positions ``q (N + 1)``
    (numpy's ``"weibull"`` method: 1-based order statistic ``q (N + 1)``, linearly
    interpolated, clamped to ``[1, N]``). Returns ``(Q, B, S)``.

    A new exchangeable draw falls between the ``i``-th and ``j``-th order statistics with
    probability ``(j - i) / (N + 1)``, so these positions make the central interval cover
    it with probability ``a`` (the default linear method gives ``a (N - 1) / (N + 1)``).
    """
    N = s.shape[1]
    srt = torch.sort(s, dim=1).values
    pos = (q.to(s.dtype) * (N + 1) - 1).clamp(0, N - 1)
    lo = pos.floor().long().clamp(0, N - 1)
    hi = (lo + 1).clamp(max=N - 1)
    frac = (pos - lo.to(s.dtype)).reshape(-1, 1, 1)
    a, b = srt[:, lo].movedim(1, 0), srt[:, hi].movedim(1, 0)
    return a + frac * (b - a)


def coverage(
    truth: Tensor,
    samples: Tensor,
    levels: Sequence[float] = (0.5, 0.8, 0.9, 0.95),
    projections: int | Tensor | None = None,
    generator: torch.Generator | None = None,
    posterior: Posterior | None = None,
) -> Tensor:
    """Fraction of true values inside the sampler's credible regions, per level and statistic.

    For each coordinate / projection the region at level ``a`` is the central interval
    between the empirical ``(1 - a)/2`` and ``(1 + a)/2`` quantiles of the draws, taken at
    the plotting positions ``q (N + 1)`` so that an exact sampler's expected coverage is
    ``a`` even for small ``N`` (see ``_quantiles``).

    With ``posterior`` the last column is the HPD-type region ``{x : log p(x | y) >= c_a}``,
    ``c_a`` the empirical ``1 - a`` quantile of the draws' log-densities: ``x*`` is inside
    iff the fraction of draws with a higher density is at most ``a`` (for an exact sampler
    this has probability ``(floor(a N) + 1) / (N + 1)``).

    For an exact sampler every entry is ``a`` up to the binomial error
    ``sqrt(a (1 - a) / B)`` (see :func:`binomial_interval`) and an ``O(1/N)``
    discretisation.

    Returns
    -------
    Tensor
        ``(L, S)`` float64: levels by statistics (columns as in :func:`sbc_ranks`).
    """
    lv = torch.as_tensor(list(levels), dtype=torch.float64)
    if lv.dim() != 1 or lv.numel() < 1 or not ((lv > 0) & (lv < 1)).all():
        raise ValueError(f"levels must be numbers in (0, 1), got {levels!r}")
    t, s = _statistics(truth, samples, projections, generator, posterior)
    lv = lv.to(t.device)
    cols = t.shape[1] - (posterior is not None)
    tc, sc = t[:, :cols].double(), s[..., :cols].double()
    lo = _quantiles(sc, (1 - lv) / 2)  # (L, B, S)
    hi = _quantiles(sc, (1 + lv) / 2)
    inside = (lo <= tc) & (tc <= hi)
    out = inside.double().mean(1)
    if posterior is not None:
        above = (s[..., -1] > t[:, -1:]).double().mean(1)  # (B,)
        hpd = (above[None, :] <= lv[:, None]).double().mean(1, keepdim=True)
        out = torch.cat([out, hpd], dim=1)
    return out


def binomial_interval(
    n: int, p: float | Sequence[float] | Tensor | np.ndarray, prob: float = 0.99
) -> tuple[Tensor, Tensor]:
    """Central ``prob`` interval of ``Binomial(n, p) / n``: the range an observed fraction
    (a coverage, a histogram bin's share) falls in with probability ``prob``.

    Returns ``(lo, hi)`` float64 tensors of the shape of ``p``.
    """
    from scipy import stats

    check_positive_int("n", n)
    if not 0 < prob < 1:
        raise ValueError(f"prob must be in (0, 1), got {prob!r}")
    pp = torch.as_tensor(p, dtype=torch.float64).cpu().numpy()
    a = (1 - prob) / 2
    lo = stats.binom.ppf(a, n, pp) / n
    hi = stats.binom.ppf(1 - a, n, pp) / n
    return torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)

"""Diagnostics against exact answers: closed-form distances, exact posteriors, calibration.

Tolerances are a few Monte Carlo standard errors of the quantity checked; every random
draw uses a fixed generator, so each test is deterministic.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.linalg  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import bayesfilter_diff as bfd  # noqa: E402
import bayesfilter_diff.diagnostics as diag  # noqa: E402
from bayesfilter_diff.result import Result  # noqa: E402
from bayesfilter_diff.samplers.base import Move, SMCSampler  # noqa: E402

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gmm_2d() -> bfd.GaussianMixture:
    w = torch.tensor([0.5, 0.3, 0.2], dtype=DT)
    mu = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, 3.0]], dtype=DT)
    cov = torch.tensor(
        [[[1.0, 0.3], [0.3, 0.5]], [[0.6, -0.2], [-0.2, 0.8]], [[0.4, 0.0], [0.0, 0.4]]], dtype=DT
    )
    return bfd.GaussianMixture(w, mu, cov)


@pytest.fixture(scope="module")
def calib():
    """B simulated problems (x*, y) under a 2-D mixture prior, exact posterior draws."""
    g = gen(0)
    gmm = _gmm_2d()
    A = bfd.operators.Dense(torch.tensor([[1.0, 0.5]], dtype=DT))
    B, N, sigma = 400, 99, 0.7
    truth = gmm.sample(B, g)
    y = A(truth) + sigma * torch.randn(B, 1, generator=g, dtype=DT)
    problem = bfd.InverseProblem(A, y, noise_std=sigma)
    post = gmm.posterior(problem)
    draws = post.sample(N, g)  # (B, N, d)
    shrunk = post.mean()[:, None, :] + 0.5 * (draws - post.mean()[:, None, :])
    dirs = diag.random_directions(2, 2, gen(1))
    return dict(gmm=gmm, truth=truth, post=post, draws=draws, shrunk=shrunk, N=N, B=B, dirs=dirs)


# ------------------------------------------------------------------------------ 1-D / sliced
def test_wasserstein_1d_matches_scipy_weighted_unequal_sizes():
    g = gen(2)
    u = torch.randn(37, generator=g, dtype=DT)
    v = torch.randn(23, generator=g, dtype=DT) + 0.3
    wu = torch.rand(37, generator=g, dtype=DT)
    wv = torch.rand(23, generator=g, dtype=DT)
    for a, b in ((None, None), (wu, wv), (wu, None)):
        ours = float(diag.wasserstein_1d(u, v, p=1, u_weights=a, v_weights=b))
        ref = scipy.stats.wasserstein_distance(
            u.numpy(), v.numpy(), None if a is None else a.numpy(), None if b is None else b.numpy()
        )
        assert ours == pytest.approx(ref, rel=1e-12, abs=1e-14)
    # In d = 1 every direction is +-1: the sliced distance is the exact 1-D one, and the
    # exact W2 (transport LP) agrees with the quantile formula.
    sw = diag.sliced_wasserstein(
        u[:, None], v[:, None], 3, p=2, weights_x=wu, weights_y=wv, generator=g
    )
    w2 = diag.wasserstein2_exact(u[:, None], v[:, None], weights_x=wu, weights_y=wv)
    assert float(sw) == pytest.approx(float(diag.wasserstein_1d(u, v, 2, wu, wv)), rel=1e-12)
    assert float(w2) == pytest.approx(float(sw), rel=1e-7)


def test_sliced_w2_of_a_shift_is_exact_and_matches_norm_over_d():
    # y = x + m: every projection is the same sample shifted by theta^T m, so
    # SW2^2 = mean_j (theta_j^T m)^2 exactly; its expectation over directions is ||m||^2/d
    # with Var((theta^T m)^2) = ||m||^4 * 2 (d - 1) / (d^2 (d + 2)).
    d, P = 4, 2000
    m = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=DT)
    x = torch.randn(2, 300, d, generator=gen(3), dtype=DT)
    sw = diag.sliced_wasserstein(x, x + m, P, generator=gen(4))
    theta = diag.random_directions(P, d, gen(4))
    exact_given_dirs = ((theta @ m) ** 2).mean()
    torch.testing.assert_close(sw**2, exact_given_dirs.expand(2), rtol=1e-10, atol=0)
    se = math.sqrt(float(m.norm()) ** 4 * 2 * (d - 1) / (d**2 * (d + 2)) / P)
    assert abs(float(exact_given_dirs) - float(m.norm()) ** 2 / d) < 4 * se


def test_sliced_w2_between_independent_gaussian_samples():
    # N(0, I) vs N(m, I): given the directions, E[W2^2] = (theta^T m)^2 + O(log N / N);
    # the sampling error of the mean shift term is about 2 |theta^T m| sqrt(2 / N).
    d, N, P = 4, 2000, 500
    m = torch.tensor([1.0, -1.0, 1.0, 0.0], dtype=DT)
    x = torch.randn(2, N, d, generator=gen(5), dtype=DT)
    y = torch.randn(2, N, d, generator=gen(6), dtype=DT) + m
    sw = diag.sliced_wasserstein(x, y, P, generator=gen(7))
    theta = diag.random_directions(P, d, gen(7))
    target = ((theta @ m) ** 2).mean()
    se = 2 * math.sqrt(float(target)) * math.sqrt(2 / N)
    assert ((sw**2 - target).abs() < 4 * se + 0.01).all(), (sw**2, target, se)
    assert abs(float(target) - float(m.norm()) ** 2 / d) < 0.15  # directions' MC error


def test_sliced_identical_sets_and_weighted_equals_duplicated():
    g = gen(8)
    x = torch.randn(2, 30, 3, generator=g, dtype=DT)
    y = torch.randn(2, 41, 3, generator=g, dtype=DT) + 0.5
    assert (diag.sliced_wasserstein(x, x, 64, generator=gen(9)) == 0).all()
    k = torch.randint(1, 4, (30,), generator=g)
    ky = torch.randint(1, 4, (41,), generator=g)
    x_dup = x.repeat_interleave(k, dim=1)
    y_dup = y.repeat_interleave(ky, dim=1)
    for p in (1, 2, 3.5):
        a = diag.sliced_wasserstein(x, y, 64, p=p, weights_x=k.double(), generator=gen(9))
        b = diag.sliced_wasserstein(x_dup, y, 64, p=p, generator=gen(9))
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        a = diag.sliced_wasserstein(
            x, y, 64, p=p, weights_x=k.double(), weights_y=ky.double(), generator=gen(9)
        )
        b = diag.sliced_wasserstein(x_dup, y_dup, 64, p=p, generator=gen(9))
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # Uniform weights given explicitly take the merged-grid path: same as the sorted path.
    z = torch.randn(2, 30, 3, generator=g, dtype=DT)
    a = diag.sliced_wasserstein(x, z, 64, weights_x=torch.ones(30, dtype=DT), generator=gen(9))
    torch.testing.assert_close(
        a, diag.sliced_wasserstein(x, z, 64, generator=gen(9)), rtol=1e-12, atol=0
    )
    # A weighted Result carries its weights; a single set broadcasts against a batch.
    res = Result(samples=x, log_weights=torch.log(k.double() / k.sum()).expand(2, 30), batched=True)
    torch.testing.assert_close(
        diag.sliced_wasserstein(res, y, 64, generator=gen(9)),
        diag.sliced_wasserstein(x_dup, y, 64, generator=gen(9)),
        rtol=1e-12,
        atol=1e-14,
    )
    one = diag.sliced_wasserstein(x[0], y, 64, generator=gen(9))
    assert one.shape == (2,)
    assert diag.sliced_wasserstein(x[0], y[0], 64, generator=gen(9)).shape == ()


def test_sliced_errors():
    x = torch.randn(10, 3, dtype=DT)
    with pytest.raises(ValueError, match="dimension"):
        diag.sliced_wasserstein(x, torch.randn(10, 4, dtype=DT))
    with pytest.raises(ValueError, match="p must"):
        diag.sliced_wasserstein(x, x, p=0.5)
    with pytest.raises(ValueError, match="weights"):
        diag.sliced_wasserstein(x, x, weights_x=-torch.ones(10, dtype=DT))
    with pytest.raises(ValueError, match="problems"):
        diag.sliced_wasserstein(torch.randn(2, 5, 3), torch.randn(3, 5, 3))


# ------------------------------------------------------------------------------ exact W2
@pytest.mark.parametrize("backend", ["pot", "scipy"])
def test_wasserstein2_exact_closed_forms(backend, monkeypatch):
    from bayesfilter_diff.diagnostics import distances

    if backend == "pot":
        pytest.importorskip("ot")
    else:
        monkeypatch.setattr(distances, "_pot", lambda: None)
    g = gen(10)
    x = torch.randn(2, 40, 3, generator=g, dtype=DT)
    perm = torch.randperm(40, generator=g)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    # A translation is the gradient of a convex function: it is the optimal map.
    torch.testing.assert_close(diag.wasserstein2_exact(x, x[:, perm] + c), c.norm().expand(2))
    assert (diag.wasserstein2_exact(x, x[:, perm]) < 1e-12).all()
    # So is a positive scaling about the origin: W2^2 = (1 - a)^2 mean ||x||^2.
    a = 0.3
    ref = (1 - a) * (x**2).sum(-1).mean(-1).sqrt()
    torch.testing.assert_close(diag.wasserstein2_exact(x, a * x[:, perm]), ref)
    # One point against a set: everything moves to it, W2^2 = mean_j ||x - y_j||^2 (LP path).
    y = torch.randn(7, 3, generator=g, dtype=DT)
    w2 = diag.wasserstein2_exact(x[0, :1], y)
    assert float(w2) ** 2 == pytest.approx(float(((y - x[0, 0]) ** 2).sum(-1).mean()), rel=1e-8)
    # The transport LP agrees with the assignment on equal sizes / uniform weights, and
    # integer weights equal duplicated points.
    z = torch.randn(40, 3, generator=g, dtype=DT)
    lp = diag.wasserstein2_exact(x[0], z, weights_x=torch.ones(40, dtype=DT))
    assert float(lp) == pytest.approx(float(diag.wasserstein2_exact(x[0], z)), rel=1e-7)
    k = torch.randint(1, 4, (20,), generator=g)
    xs = x[0, :20]
    zz = torch.randn(int(k.sum()), 3, generator=g, dtype=DT)
    lp = diag.wasserstein2_exact(xs, zz, weights_x=k.double())
    assert float(lp) == pytest.approx(
        float(diag.wasserstein2_exact(xs.repeat_interleave(k, 0), zz)), rel=1e-7
    )
    if backend == "scipy":
        with pytest.raises(ValueError, match="linear programme"):
            diag.wasserstein2_exact(torch.randn(600, 2), torch.randn(601, 2))
    else:
        with pytest.raises(ValueError, match="cost matrix"):
            diag.wasserstein2_exact(torch.randn(5001, 2), torch.randn(5001, 2))


# ------------------------------------------------------------------------------ Gaussian W2
def test_gaussian_w2_closed_forms():
    g = gen(11)
    d = 3
    G1 = torch.randn(d, d, generator=g, dtype=DT)
    G2 = torch.randn(d, d, generator=g, dtype=DT)
    S1, S2 = G1 @ G1.T + 0.1 * torch.eye(d, dtype=DT), G2 @ G2.T + 0.1 * torch.eye(d, dtype=DT)
    m1, m2 = torch.randn(d, generator=g, dtype=DT), torch.randn(d, generator=g, dtype=DT)
    r1 = scipy.linalg.sqrtm(S1.numpy())
    cross = np.real(np.trace(scipy.linalg.sqrtm(r1 @ S2.numpy() @ r1)))
    ref = float(((m1 - m2) ** 2).sum() + torch.trace(S1) + torch.trace(S2)) - 2 * cross
    assert float(diag.gaussian_w2((m1, S1), (m2, S2))) ** 2 == pytest.approx(ref, rel=1e-10)
    # Commuting (diagonal) covariances: ||m1 - m2||^2 + sum (sqrt(s1) - sqrt(s2))^2.
    s1, s2 = torch.tensor([1.0, 4.0, 0.25], dtype=DT), torch.tensor([9.0, 1.0, 1.0], dtype=DT)
    ref = float(((m1 - m2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum())
    w = diag.gaussian_w2((m1, torch.diag(s1)), (m2, torch.diag(s2)))
    assert float(w) ** 2 == pytest.approx(ref, rel=1e-12)
    # Batched (mean, cov) and a mixture (its exact moments); samples vs themselves.
    gmm = _gmm_2d()
    assert float(diag.gaussian_w2(gmm, (gmm.mean(), gmm.covariance()))) < 1e-7
    x = gmm.sample(500, g)
    assert float(diag.gaussian_w2(x, x)) < 1e-7
    mb = torch.stack([m1, m2])
    Sb = torch.stack([S1, S2])
    out = diag.gaussian_w2((mb, Sb), (m2, S2))
    assert out.shape == (2,) and float(out[1]) < 1e-7


# ------------------------------------------------------------------------------ MMD
def _mmd_population(h: float, d: int, m2: float) -> float:
    c = (h**2 / (h**2 + 2)) ** (d / 2)
    return 2 * c * (1 - math.exp(-m2 / (2 * (h**2 + 2))))


def test_mmd_unbiased_matches_population_value():
    # Gaussian kernel, X ~ N(0, I), Y ~ N(m, I): E k(X, X') = (h^2 / (h^2 + 2))^(d/2) and
    # E k(X, Y) = the same times exp(-||m||^2 / (2 (h^2 + 2))); the U-statistic is unbiased.
    d, B, N, h = 3, 20, 200, 1.5
    m = torch.tensor([1.0, 0.0, 0.0], dtype=DT)
    x = torch.randn(B, N, d, generator=gen(12), dtype=DT)
    y0 = torch.randn(B, N, d, generator=gen(13), dtype=DT)
    null = diag.mmd(x, y0, bandwidth=h)
    alt = diag.mmd(x, y0 + m, bandwidth=h)
    for est, pop in ((null, 0.0), (alt, _mmd_population(h, d, 1.0))):
        se = float(est.std()) / math.sqrt(B)
        assert abs(float(est.mean()) - pop) < 4 * se, (float(est.mean()), pop, se)
    assert (null < 0).any()  # unbiased: slightly negative values happen under the null
    assert (alt > 0).all()
    # Brute-force U-statistic on a small case; the median heuristic is the default.
    xs, ys = x[0, :15], y0[0, :11] + m
    hm = diag.median_bandwidth(xs, ys)
    z = torch.cat([xs, ys])
    D = torch.cdist(z, z)
    off = ~torch.eye(26, dtype=torch.bool)
    assert float(hm) == pytest.approx(float(np.median(D[off].numpy())), rel=1e-10)
    K = torch.exp(-(D**2) / (2 * hm**2))
    ref = (
        K[:15, :15][off[:15, :15]].mean()
        + K[15:, 15:][off[15:, 15:]].mean()
        - 2 * K[:15, 15:].mean()
    )
    assert float(diag.mmd(xs, ys)) == pytest.approx(float(ref), rel=1e-10)


# ------------------------------------------------------------------------------ floor
def test_exact_floor():
    gmm = _gmm_2d()
    small = diag.exact_floor(gmm, 100, generator=gen(14), repeats=4, num_projections=64)
    large = diag.exact_floor(gmm, 1600, generator=gen(15), repeats=4, num_projections=64)
    assert small.values.shape == (4,) and small.mean.shape == ()
    assert float(large.mean) < float(small.mean)  # the floor shrinks with the sample size
    # A wrong sampler (the prior's components with uniform weights) sits far above it.
    wrong = bfd.GaussianMixture(torch.full((3,), 1 / 3, dtype=DT), gmm.means, gmm.covariances)
    dist = diag.sliced_wasserstein(
        wrong.sample(1600, gen(16)), gmm.sample(1600, gen(17)), 64, generator=gen(18)
    )
    assert float(dist) > float(large.mean) + 4 * float(large.std)
    fl = diag.exact_floor(gmm, 50, 60, metric="mmd", generator=gen(19), repeats=3)
    assert fl.values.shape == (3,)
    # A batched reference (B exact posteriors) gives a floor per problem.
    A = bfd.operators.Dense(torch.tensor([[1.0, 0.5]], dtype=DT))
    post = gmm.posterior(
        bfd.InverseProblem(A, torch.tensor([[0.0], [2.0]], dtype=DT), noise_std=0.5)
    )
    fl = diag.exact_floor(post, 200, metric="gaussian_w2", generator=gen(29), repeats=3)
    assert fl.mean.shape == (2,) and fl.values.shape == (3, 2) and (fl.values >= 0).all()


# ------------------------------------------------------------------------------ mixture
def test_mixture_weight_error_and_moments(calib):
    post, g = calib["post"], gen(20)
    B, N = 8, 4000
    post8 = bfd.GaussianMixture(post.weights[:B], post.means[:B], post.covariances)
    x = post8.sample(N, g)
    w_hat = diag.implied_component_weights(x, post8)
    # p(k | X) lies in [0, 1] with mean w_k, so its variance is at most w_k (1 - w_k).
    se = torch.sqrt(post8.weights * (1 - post8.weights) / N)
    assert ((w_hat - post8.weights).abs() < 4 * se + 1e-12).all()
    tv = diag.mixture_weight_error(x, post8)
    assert tv.shape == (B,) and (tv < 0.5 * (4 * se).sum(-1) + 1e-12).all()
    # Integer weights equal duplicated samples; a weighted Result carries its weights.
    k = torch.randint(1, 4, (50,), generator=g)
    xs = x[:, :50]
    a = diag.mixture_weight_error(xs, post8, weights=k.double())
    torch.testing.assert_close(a, diag.mixture_weight_error(xs.repeat_interleave(k, 1), post8))
    res = Result(
        samples=xs, log_weights=torch.log(k.double() / k.sum()).expand(B, 50), batched=True
    )
    torch.testing.assert_close(diag.mixture_weight_error(res, post8), a)
    # Wrong mode weights on well separated modes: TV = TV(true, wrong) up to overlap.
    far = bfd.GaussianMixture(
        torch.tensor([0.7, 0.2, 0.1], dtype=DT),
        10 * _gmm_2d().means,
        torch.full((3,), 0.5, dtype=DT),
    )
    wrong = bfd.GaussianMixture(torch.full((3,), 1 / 3, dtype=DT), far.means, far.covariances)
    tv = diag.mixture_weight_error(wrong.sample(N, g), far)
    assert abs(float(tv) - (0.7 - 1 / 3)) < 4 * math.sqrt(2 / 9 / N) * 2
    # Moments: exact draws are within MC error; a whitened point set is exact.
    err = diag.moment_errors(x, post8)
    assert (err["mean_std"] < 4 / math.sqrt(N)).all() and (err["cov"] < 0.1).all()
    z = torch.randn(B, 50, 2, generator=g, dtype=DT)
    z = z - z.mean(1, keepdim=True)
    L = torch.linalg.cholesky(z.transpose(1, 2) @ z / 49)
    z = torch.linalg.solve_triangular(L, z.transpose(1, 2), upper=False).transpose(1, 2)
    Lp = torch.linalg.cholesky(post8.covariance())
    pts = post8.mean()[:, None, :] + z @ Lp.transpose(1, 2)
    err = diag.moment_errors(pts, post8)
    assert all((v < 1e-10).all() for v in err.values())


def test_marginal_mixture_matches_gaussian_marginals():
    g = gen(21)
    d, K = 4, 3
    G = torch.randn(K, d, d, generator=g, dtype=DT)
    cov = G @ G.transpose(1, 2) + 0.5 * torch.eye(d, dtype=DT)
    mix = bfd.GaussianMixture(
        torch.tensor([0.2, 0.5, 0.3], dtype=DT), torch.randn(K, d, generator=g, dtype=DT), cov
    )
    marg = diag.marginal_mixture(mix, (2, 0))
    pts = torch.randn(5, 2, generator=g, dtype=DT)
    ref = np.log(
        sum(
            float(mix.weights[k])
            * scipy.stats.multivariate_normal(
                mix.means[k, [2, 0]].numpy(), cov[k][[2, 0]][:, [2, 0]].numpy()
            ).pdf(pts.numpy())
            for k in range(K)
        )
    )
    np.testing.assert_allclose(marg.log_prob(pts).numpy(), ref, rtol=1e-10)
    diag_mix = bfd.GaussianMixture(
        mix.weights, mix.means, torch.rand(K, d, generator=g, dtype=DT) + 0.1
    )
    assert diag.marginal_mixture(diag_mix, (1, 3)).kind == "diag"
    with pytest.raises(ValueError, match="distinct"):
        diag.marginal_mixture(mix, (1, 1))


# ------------------------------------------------------------------------------ SMC
@dataclass(frozen=True)
class _TemperedIS(SMCSampler):
    """Test-only SMC: prior draws, likelihood tempered in num_steps equal steps, no moves."""

    def init(self, ctx, setup):
        mix = ctx.prior.mixture
        x = mix.sample(ctx.B * ctx.N, ctx.generator).reshape(ctx.shape)
        return {"x": x}, None

    def move(self, ctx, setup, state, k, t, t_next):
        return Move(state, ctx.problem.log_likelihood(state["x"]) / self.num_steps)

    def finalize(self, ctx, setup, state):
        return state["x"], None


def test_smc_traces_and_log_evidence_error():
    gmm = _gmm_2d()
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Dense(torch.tensor([[1.0, 0.5]], dtype=DT))
    y = torch.tensor([[0.5], [3.0], [-1.0]], dtype=DT)
    problem = bfd.InverseProblem(A, y, noise_std=0.3)
    N = 2000
    res = _TemperedIS(num_steps=4).sample(prior, problem, N, generator=gen(22))
    e = diag.ess_trace(res)
    assert e.shape == (5, 3) and ((e >= 1) & (e <= N)).all()
    torch.testing.assert_close(diag.ess_trace(res, relative=True), e / N)
    ev = diag.resampling_events(res)
    assert ev.shape == (5, 3) and ev.dtype == torch.bool and not ev[-1].any()
    assert ev.any()  # sigma_y = 0.3: the ESS drops below N/2 somewhere
    exact = gmm.log_evidence(problem)
    err = diag.log_evidence_error(res, exact)
    torch.testing.assert_close(err, res.log_evidence - exact)
    # Z_hat / Z has relative error ~ sqrt(N / ESS_final - 1) / sqrt(N) (importance sampling).
    assert (err.abs() < 4 * torch.sqrt(1 / e.min(0).values)).all(), err
    one = _TemperedIS(num_steps=2).sample(
        prior, bfd.InverseProblem(A, y[0], noise_std=0.3), 200, generator=gen(23)
    )
    assert diag.ess_trace(one).shape == (3,) and diag.log_evidence_error(one, 0.0).shape == ()
    with pytest.raises(ValueError, match="trace"):
        diag.ess_trace(Result(samples=torch.zeros(5, 2)))
    with pytest.raises(ValueError, match="log-evidence"):
        diag.log_evidence_error(Result(samples=torch.zeros(5, 2)), 0.0)


# ------------------------------------------------------------------------------ calibration
def test_sbc_exact_sampler_passes_and_overconfident_fails(calib):
    truth, post, N = calib["truth"], calib["post"], calib["N"]
    ranks = diag.sbc_ranks(truth, calib["draws"], projections=calib["dirs"], posterior=post)
    assert ranks.shape == (calib["B"], 5) and ranks.min() >= 0 and ranks.max() <= N
    ok = diag.rank_uniformity_test(ranks, N, generator=gen(24))
    bad_ranks = diag.sbc_ranks(truth, calib["shrunk"], projections=calib["dirs"], posterior=post)
    bad = diag.rank_uniformity_test(bad_ranks, N, generator=gen(24))
    assert ok.pvalue > 0.01, ok
    assert bad.pvalue < 0.01, bad
    assert (bad.chi2_pvalue < 0.01).all() and (bad.ks_pvalue < 0.01).all()
    # Random projections drawn with a generator equal the same directions given explicitly.
    r2 = diag.sbc_ranks(truth, calib["draws"], projections=2, generator=gen(1))
    assert torch.equal(r2, ranks[:, :4])
    pit = diag.pit_values(truth, calib["draws"], projections=calib["dirs"], posterior=post)
    torch.testing.assert_close(pit * N, ranks.double())  # continuous draws: no ties


def test_rank_uniformity_test_binning_and_errors():
    # Exactly uniform counts give chi2 = 0 even when the bins do not divide N + 1.
    N = 9
    ranks = torch.arange(N + 1).repeat(7)
    t = diag.rank_uniformity_test(ranks, N, bins=3)
    assert float(t.chi2[0]) == pytest.approx(0.0, abs=1e-12) and t.bins == 3
    with pytest.raises(ValueError, match="ranks must lie"):
        diag.rank_uniformity_test(torch.tensor([0, 11]), 10)
    with pytest.raises(ValueError, match="bins"):
        diag.rank_uniformity_test(ranks, N, bins=11)


def test_coverage_exact_is_nominal_overconfident_is_low(calib):
    levels = (0.5, 0.8, 0.9, 0.95)
    B, N = calib["B"], calib["N"]
    kw = dict(levels=levels, projections=calib["dirs"], posterior=calib["post"])
    cov = diag.coverage(calib["truth"], calib["draws"], **kw)
    bad = diag.coverage(calib["truth"], calib["shrunk"], **kw)
    assert cov.shape == (4, 5)
    lv = torch.tensor(levels, dtype=DT)[:, None]
    tol = 4 * torch.sqrt(lv * (1 - lv) / B) + 1 / N
    assert ((cov - lv).abs() < tol).all(), cov
    assert (bad[2] < 0.75).all(), bad  # nominal 0.9
    lo, hi = diag.binomial_interval(B, lv[:, 0], 0.99)
    assert ((lo <= lv[:, 0]) & (lv[:, 0] <= hi)).all()


# ------------------------------------------------------------------------------ ArviZ
@pytest.mark.slow
def test_to_arviz_chains_and_rhat():
    import arviz as az

    gmm = _gmm_2d()
    A = bfd.operators.Dense(torch.tensor([[1.0, 0.5]], dtype=DT))
    y = torch.tensor([[1.0]], dtype=DT).expand(4, 1).contiguous()  # 4 runs, one observation
    post = gmm.posterior(bfd.InverseProblem(A, y, noise_std=0.7))
    x = post.sample(500, gen(25))
    idata = diag.to_arviz(Result(samples=x, batched=True))
    assert idata.posterior["x"].shape == (4, 500, 2)
    summary = az.summary(idata)
    assert len(summary) == 2
    rhat = az.rhat(idata)["x"].values
    assert np.all(np.abs(rhat - 1) < 0.02), rhat
    # Weighted particles: resampled to equal weights, or kept with their log-weights.
    lw = torch.log_softmax(torch.randn(4, 500, generator=gen(26), dtype=DT), -1)
    res = Result(samples=x, log_weights=lw, batched=True)
    kept = diag.to_arviz(res, resample=False)
    lwa = kept.sample_stats["log_weight"].values
    assert lwa.shape == (4, 500)
    np.testing.assert_allclose(scipy.special.logsumexp(lwa, axis=1), 0, atol=1e-12)
    drawn = diag.to_arviz(res, generator=gen(27)).posterior["x"].values
    assert drawn.shape == (4, 500, 2)
    assert np.isin(drawn[0, :, 0], x[0, :, 0].numpy()).all()
    # A list of unbatched Results: one chain each.
    runs = [Result(samples=x[i]) for i in range(3)]
    assert diag.to_arviz(runs, var_name="theta").posterior["theta"].shape == (3, 500, 2)
    with pytest.raises(ValueError, match="batched"):
        diag.to_arviz([Result(samples=x, batched=True)])


def test_to_arviz_uses_the_arviz_1_calling_convention(monkeypatch):
    # arviz 1.x: from_dict({"posterior": {...}, "sample_stats": {...}}) returns a DataTree.
    import arviz as az

    seen = {}

    class _Node:
        def __init__(self):
            self.attrs = {}

    def fake_from_dict(data, **kwargs):
        seen["data"], seen["kwargs"] = data, kwargs
        return {"posterior": _Node()}

    monkeypatch.setattr(az, "__version__", "1.2.0")
    monkeypatch.setattr(az, "from_dict", fake_from_dict)
    lw = torch.log_softmax(torch.randn(2, 10, generator=gen(32), dtype=DT), -1)
    out = diag.to_arviz(
        Result(samples=torch.zeros(2, 10, 3), log_weights=lw, batched=True), resample=False
    )
    assert set(seen["data"]) == {"posterior", "sample_stats"} and not seen["kwargs"]
    assert seen["data"]["posterior"]["x"].shape == (2, 10, 3)
    assert out["posterior"].attrs["inference_library"] == "bayesfilter_diff"


# ------------------------------------------------------------------------------ plots
def _render(fig) -> None:
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    assert buf.tell() > 0


def test_plots_return_figures(calib):
    post, draws, N = calib["post"], calib["draws"], calib["N"]
    _render(diag.plot_samples_vs_posterior(draws, post, dims=(0, 1), index=3))
    _render(diag.plot_samples_vs_posterior(draws[0], _gmm_2d(), dims=(1, 0)))
    ranks = diag.sbc_ranks(calib["truth"], draws, projections=calib["dirs"])
    _render(diag.plot_rank_histogram(ranks, N))
    _render(diag.plot_rank_histogram(ranks[:, 0], N))
    levels = [0.5, 0.8, 0.9, 0.95]
    cov = diag.coverage(calib["truth"], draws, levels=levels)
    _render(diag.plot_coverage(levels, cov, n=calib["B"]))
    _render(
        diag.plot_distance_vs_particles(
            [100, 400, 1600], {"a": [0.3, 0.15, 0.08], "b": np.ones((3, 2))}, floor=0.05
        )
    )
    gmm = _gmm_2d()
    A = bfd.operators.Dense(torch.tensor([[1.0, 0.5]], dtype=DT))
    problem = bfd.InverseProblem(A, torch.tensor([[0.5], [2.0]], dtype=DT), noise_std=0.3)
    res = _TemperedIS(num_steps=3).sample(
        gmm.diffusion(bfd.VPSchedule.linear()), problem, 300, generator=gen(28)
    )
    _render(diag.plot_ess(res))
    fig = Figure()
    ax = fig.add_subplot()
    assert diag.plot_samples_vs_posterior(res, gmm.posterior(problem), ax=ax, index=1) is fig
    assert ax.get_legend() is not None
    # a grid shows its legend once: legend=False for the other panels
    ax2 = Figure().add_subplot()
    diag.plot_samples_vs_posterior(res, gmm.posterior(problem), ax=ax2, legend=False)
    assert ax2.get_legend() is None


def test_log_axis_error_bars_stay_on_the_axis():
    """A 95% interval whose lower end is at or below 0 is clipped above 0 (a log axis
    cannot draw it); the others are kept as given."""
    err = diag.log_axis_errors([1.0, 0.2, 0.5], [0.3, 0.5, 0.5])
    assert err.shape == (2, 3)
    np.testing.assert_allclose(err[1], [0.3, 0.5, 0.5])
    np.testing.assert_allclose(err[0], [0.3, 0.198, 0.495])
    assert ((np.array([1.0, 0.2, 0.5]) - err[0]) > 0).all()


# ------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = gen(30)
    x = torch.randn(2, 300, 3, generator=g, dtype=DT)
    y = torch.randn(2, 200, 3, generator=g, dtype=DT) + 0.5
    w = torch.rand(2, 300, generator=g, dtype=DT)
    theta = diag.random_directions(64, 3, gen(31))
    dev = torch.device("cuda")
    for kw in ({}, {"weights_x": w}):
        cpu = diag.sliced_wasserstein(x, y, directions=theta, **kw)
        gpu = diag.sliced_wasserstein(
            x.to(dev), y.to(dev), directions=theta.to(dev), **{k: v.to(dev) for k, v in kw.items()}
        )
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diag.mmd(x.to(dev), y.to(dev)).cpu(), diag.mmd(x, y))
    truth = torch.randn(2, 3, generator=g, dtype=DT)
    cov = diag.coverage(truth.to(dev), x.to(dev), projections=theta[:2].to(dev))
    torch.testing.assert_close(cov.cpu(), diag.coverage(truth, x, projections=theta[:2]))
    assert diag.wasserstein2_exact(x[:, :50].to(dev), y[:, :50].to(dev)).device.type == "cuda"


@pytest.mark.slow
def test_monte_carlo_errors_from_runs_and_from_the_genealogy():
    """128 independent copies of a Gaussian problem in one batch (TDS, many surviving
    lineages): the genealogy variance of one run, averaged over the copies, matches the
    copies' spread of the posterior-mean estimates within 4.5 standard errors of the
    comparison; runs_mcse pools the copies and covers the chain's exact posterior mean."""
    from test_tds import chain_prior, gaussian_setup

    sched = bfd.VPSchedule.linear()
    R = 128
    gmm, mu, S, problem, g = gaussian_setup(0.5, sched, P=1, R=R, seed=1)
    res = bfd.samplers.TDS(num_steps=20).sample(gmm.diffusion(sched), problem, 300, g)
    est = bfd.diagnostics.genealogy_mcse(res)
    assert est.std_error.shape == (R, 3) and bool((est.lineages > 100).all())
    W = res.weights().double()
    means = (W[..., None] * res.samples).sum(1)  # (R, 3)
    emp = means.var(0)
    gen_v = est.std_error.double() ** 2
    ratio = gen_v.mean(0) / emp
    # relative s.e. of a sample variance of R values, and of the mean of the R estimates
    se = torch.sqrt(2 / (R - 1) + gen_v.var(0) / (R * gen_v.mean(0) ** 2))
    assert ((ratio - 1).abs() <= 4.5 * se).all(), (ratio, se)

    pooled = bfd.diagnostics.runs_mcse(res)
    assert pooled.runs == R and pooled.value.shape == (3,)
    torch.testing.assert_close(pooled.std_error, means.std(0) / math.sqrt(R))
    sub = bfd.InverseProblem(problem.operator, problem.y[0], noise_std=0.5)
    exact = chain_prior(mu, S, sched, res.info.times).posterior(sub).mean()
    assert ((pooled.value - exact).abs() <= 4.5 * pooled.std_error).all()
    # few lineages: the estimate says it cannot be trusted
    with pytest.warns(bfd.PosteriorQualityWarning, match="use independent runs"):
        bfd.diagnostics.genealogy_mcse(res, min_lineages=10_000)
    with pytest.raises(ValueError, match="independent"):
        bfd.diagnostics.runs_mcse([res])


def test_sliced_wasserstein_equals_pots_with_the_same_directions():
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    y = 1.5 * torch.randn(200, 5, generator=g, dtype=torch.float64) + 0.3
    wx = torch.rand(300, generator=g, dtype=torch.float64)
    wy = torch.rand(200, generator=g, dtype=torch.float64)
    theta = bfd.diagnostics.random_directions(64, 5, g, x.device, x.dtype)
    for p in (1, 2):
        ours = bfd.diagnostics.sliced_wasserstein(
            x, y, p=p, weights_x=wx, weights_y=wy, directions=theta
        )
        theirs = ot.sliced_wasserstein_distance(
            x, y, a=wx / wx.sum(), b=wy / wy.sum(), p=p, projections=theta.T
        )
        torch.testing.assert_close(ours, torch.as_tensor(theirs, dtype=torch.float64))


def test_exact_w2_with_pot_matches_scipy_and_scales_past_the_lp(monkeypatch):
    pytest.importorskip("ot")
    from bayesfilter_diff.diagnostics import distances

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 60, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 50, 3, generator=g, dtype=torch.float64) + 0.5
    wx = torch.rand(2, 60, generator=g, dtype=torch.float64)
    with_pot = bfd.diagnostics.wasserstein2_exact(x, y, weights_x=wx)
    same = bfd.diagnostics.wasserstein2_exact(x[:, :50], y)
    monkeypatch.setattr(distances, "_pot", lambda: None)  # the scipy fallback
    torch.testing.assert_close(with_pot, bfd.diagnostics.wasserstein2_exact(x, y, weights_x=wx))
    torch.testing.assert_close(same, bfd.diagnostics.wasserstein2_exact(x[:, :50], y))
    big_x = torch.randn(1500, 2, generator=g, dtype=torch.float64)
    big_y = torch.randn(1200, 2, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="install POT"):
        bfd.diagnostics.wasserstein2_exact(big_x, big_y)
    monkeypatch.undo()
    assert float(bfd.diagnostics.wasserstein2_exact(big_x, big_y)) > 0  # 1.8e6 variables


@pytest.mark.slow
def test_step_check_sees_the_ddim_kernels_evidence_error_and_not_the_analytic_ones():
    # README mixture, 2 x 8 operator, sigma_y = 0.1: TDS's DDIM kernel misses the exact
    # log-evidence by +0.245 at 20 steps and +0.149 at 40; the check sees the shift (4.6 of
    # its Monte Carlo sd at N = 8192) and warns. The analytic reverse variance misses by
    # -0.017 / -0.012 at 50 / 100 steps: no shift beyond the noise, no warning.
    from _readme import readme_problem

    gmm, prior, problem = readme_problem(8, 0.1, torch.Generator().manual_seed(0))
    exact = float(gmm.log_evidence(problem))
    with pytest.warns(bfd.PosteriorQualityWarning, match="from 20 to 40 steps"):
        c = bfd.diagnostics.step_check(
            bfd.samplers.TDS(num_steps=20), prior, problem, 8192, torch.Generator().manual_seed(1)
        )
    assert c.steps == (20, 40) and bool(c.moved)
    errs = [float(r.log_evidence) - exact for r in c.results]
    assert errs[0] > errs[1] > 0.1  # the coarse run's error the larger
    assert float(c.log_evidence_shift) < -4 * float(c.log_evidence_se)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ok = bfd.diagnostics.step_check(
            bfd.samplers.TDS(num_steps=50, reverse_variance="analytic"),
            prior,
            problem,
            8192,
            torch.Generator().manual_seed(1),
        )
    assert not [w for w in rec if "steps" in str(w.message)]
    assert not bool(ok.moved) and abs(float(ok.log_evidence_shift)) < 3 * float(ok.log_evidence_se)


def test_step_check_shapes_and_errors():
    d = 3
    gmm = bfd.GaussianMixture(torch.ones(1), torch.zeros(1, d), torch.ones(1))
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Dense(torch.eye(2, d))
    batched = bfd.InverseProblem(A, torch.zeros(3, 2), 0.5)
    g = torch.Generator().manual_seed(0)
    c = bfd.diagnostics.step_check(bfd.samplers.TDS(num_steps=4), prior, batched, 16, g, warn=False)
    assert c.steps == (4, 8) and c.results[1].info.num_steps >= 8
    assert c.log_evidence_shift.shape == c.log_evidence_se.shape == c.moved.shape == (3,)
    assert c.mean_shift.shape == c.mean_z.shape == (3,)
    one = bfd.InverseProblem(A, torch.zeros(2), 0.5)
    c1 = bfd.diagnostics.step_check(bfd.samplers.DPS(num_steps=4), prior, one, 16, g, factor=3)
    assert c1.steps == (4, 12) and c1.log_evidence_shift is None and c1.moved.dim() == 0
    with pytest.raises(ValueError, match="factor"):
        bfd.diagnostics.step_check(bfd.samplers.TDS(num_steps=5), prior, one, 8, factor=1)

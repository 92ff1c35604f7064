"""FPS and FPS-SMC (Dou & Song, ICLR 2024) against exact linear-Gaussian references.

FPS-SMC is not exact for ``p(x0 | y)``; it is a particle filter for FPS's *filtering model*
(the y-sequence treated as conditionally independent observations). With a Gaussian prior
and the exact (affine) denoiser that model is linear-Gaussian, so its posterior for a given
y-sequence is the Kalman filter's answer, which the particles must match within Monte
Carlo error. FPS (unweighted) with its own y-sequence per sample is an affine-Gaussian chain
in ``(x_t, y_t)``; its output distribution is computed exactly by moment propagation.

``python tests/test_fps.py`` prints the bias table of ``docs/methods/fps.md`` (FPS-SMC limit
versus the true posterior, 1-D Gaussian).
"""

import math

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.fps import FPS, FPSSMC, fps_grid, fps_y_sequence
from bayesfilter_diff.samplers.spectral import condition

D64 = torch.float64


# ------------------------------------------------------------------ exact references (float64)
def _kernel(sched, times, k, c_rate, eta):
    """``(a_t, s_t, a_s, c_eps, v)`` of FPS's kernel for step ``k``, derived independently."""
    t, s = times[k], times[k + 1]
    a_t, s_t, a_s, s_s = (
        float(f(u))
        for f, u in ((sched.alpha, t), (sched.sigma, t), (sched.alpha, s), (sched.sigma, s))
    )
    if eta is None:
        v = c_rate * s_s**2
    else:  # DDIM(eta): std^2 = eta^2 (s_t^2 - (a_t/a_s)^2 s_s^2) s_s^2 / s_t^2
        v = eta**2 * max(s_t**2 - (a_t / a_s) ** 2 * s_s**2, 0.0) * s_s**2 / s_t**2
    return a_t, s_t, a_s, math.sqrt(max(s_s**2 - v, 0.0)), v


def _kernel_affine(m0, S0, a_t, s_t, a_s, c_eps):
    """``mu(x_t) = F x_t + b`` for the exact denoiser of the prior ``N(m0, S0)``."""
    d = m0.numel()
    eye = torch.eye(d, dtype=D64)
    H = a_t * S0 @ torch.linalg.inv(a_t**2 * S0 + s_t**2 * eye)  # x0_hat = H x_t + h
    h = m0 - a_t * H @ m0
    g = a_s - c_eps * a_t / s_t  # mu = g x0_hat + (c_eps / s_t) x_t
    return g * H + (c_eps / s_t) * eye, g * h


def kalman_filtering_model(sched, times, m0, S0, A, sigma_y, ys, c_rate=0.95, eta=None):
    """Exact posterior of FPS's filtering model for y-sequences ``ys`` ``(n + 1, B, m)``.

    Returns the mean ``(B, d)``, covariance ``(d, d)`` and log-likelihood
    ``log p_F(y_{t_0:t_n})`` ``(B,)`` (the quantity FPS-SMC's evidence estimates).
    """
    d, m = A.shape[1], A.shape[0]
    eye_m = torch.eye(m, dtype=D64)

    def update(mean, C, y, r2):
        S = A @ C @ A.T + r2 * eye_m
        L = torch.linalg.cholesky(S)
        res = y - mean @ A.T
        sol = torch.cholesky_solve(res.unsqueeze(-1), L).squeeze(-1)
        ll = -0.5 * (
            (res * sol).sum(-1) + 2 * torch.log(L.diagonal()).sum() + m * math.log(2 * math.pi)
        )
        K = C @ A.T @ torch.cholesky_inverse(L)
        return mean + res @ K.T, C - K @ A @ C, ll

    s0 = float(sched.sigma(times[0]))
    a0 = float(sched.alpha(times[0]))
    mean, C, ll = update(
        torch.zeros(ys.shape[1], d, dtype=D64),
        s0**2 * torch.eye(d, dtype=D64),
        ys[0],
        (a0 * sigma_y) ** 2,
    )
    for k in range(times.numel() - 1):
        a_t, s_t, a_s, c_eps, v = _kernel(sched, times, k, c_rate, eta)
        F, b = _kernel_affine(m0, S0, a_t, s_t, a_s, c_eps)
        mean, C = mean @ F.T + b, F @ C @ F.T + v * torch.eye(d, dtype=D64)
        mean, C, l_k = update(mean, C, ys[k + 1], (a_s * sigma_y) ** 2)
        ll = ll + l_k
    return mean, 0.5 * (C + C.T), ll


def fps_chain_moments(sched, times, m0, S0, A, sigma_y, y, c_rate=0.95, eta=None):
    """Exact mean ``(d,)`` and covariance of unweighted FPS's output (y-sequence integrated).

    ``(x_t, y_t)`` is jointly Gaussian along the chain: ``y_s`` is an affine bridge step
    with noise ``std A z`` and ``x_s = (I - K A) mu(x_t) + K y_s + e``.
    """
    d, m = A.shape[1], A.shape[0]
    eye_d, eye_m = torch.eye(d, dtype=D64), torch.eye(m, dtype=D64)
    AAt = A @ A.T

    def gain(v, r2):  # proposal N(mu, v) x N(y; A x, r2): x = (I - K A) mu + K y + e
        K = v * A.T @ torch.linalg.inv(v * AAt + r2 * eye_m)
        return K, v * eye_d - K @ A * v

    a0, s0 = float(sched.alpha(times[0])), float(sched.sigma(times[0]))
    # y_{t_0} = a0 y + s0 A z ; x_{t_0} = K y_{t_0} + e   (prior N(0, s0^2 I))
    K, Se = gain(s0**2, (a0 * sigma_y) ** 2)
    mu = torch.cat([K @ (a0 * y), a0 * y])
    Syy = s0**2 * AAt
    cov = torch.cat([torch.cat([K @ Syy @ K.T + Se, K @ Syy], 1), torch.cat([Syy @ K.T, Syy], 1)])
    for k in range(times.numel() - 1):
        a_t, s_t, a_s, c_eps, v = _kernel(sched, times, k, c_rate, eta)
        F, b = _kernel_affine(m0, S0, a_t, s_t, a_s, c_eps)
        cy = c_eps / s_t  # y_s = cy y_t + (a_s - cy a_t) y + std A z,  std^2 = v
        K, Se = gain(v, (a_s * sigma_y) ** 2)
        P = eye_d - K @ A
        M = torch.cat(
            [
                torch.cat([P @ F, cy * K], 1),
                torch.cat([torch.zeros(m, d, dtype=D64), cy * eye_m], 1),
            ]
        )
        const_y = (a_s - cy * a_t) * y
        const = torch.cat([P @ b + K @ const_y, const_y])
        Nz = v * AAt  # covariance of std A z
        Q = torch.cat([torch.cat([K @ Nz @ K.T + Se, K @ Nz], 1), torch.cat([Nz @ K.T, Nz], 1)])
        mu, cov = M @ mu + const, M @ cov @ M.T + Q
    return mu[:d], cov[:d, :d]


# ------------------------------------------------------------------ problems
def _gaussian_problem(B, sigma_y, seed=0, d=3, m=2, mask=False):
    g = torch.Generator().manual_seed(seed)
    m0 = torch.tensor([0.5, -0.3, 0.2], dtype=D64)[:d]
    L0 = 0.4 * torch.randn(d, d, generator=g, dtype=D64)
    S0 = L0 @ L0.T + 0.5 * torch.eye(d, dtype=D64)
    gmm = bfd.GaussianMixture(torch.ones(1, dtype=D64), m0[None], S0[None])
    Am = torch.randn(m, d, generator=g, dtype=D64)
    A = bfd.operators.Dense(Am)
    if mask:  # observe entries 0 and 2 (the elementwise pixel path)
        A = bfd.operators.Mask(torch.tensor([True, False, True]), dtype=D64)
        Am = A.matrix()
    x = gmm.sample(B, g)
    y = A(x) + sigma_y * torch.randn(B, m, generator=g, dtype=D64)
    return gmm, m0, S0, Am, bfd.InverseProblem(A, y, noise_std=sigma_y)


def _unique_ess(x, W):
    """ESS of the weights summed over identical particles (resampling makes duplicates)."""
    out = []
    for b in range(x.shape[0]):
        _, inv = torch.unique(x[b], dim=0, return_inverse=True)
        Wu = torch.zeros(int(inv.max()) + 1, dtype=D64).index_add_(0, inv, W[b])
        out.append(1.0 / (Wu**2).sum())
    return torch.stack(out)


def _weighted_moments(x, W):
    mean = (W[..., None] * x).sum(1)
    dx = x - mean[:, None]
    return mean, torch.einsum("bn,bni,bnj->bij", W, dx, dx)


def _assert_moments(mean, cov, ref_mean, ref_cov, ess, k=5.0):
    """``|error| < k`` standard errors of a mean / covariance from ``ess`` draws."""
    vd = ref_cov.diagonal(dim1=-2, dim2=-1)
    se_m = torch.sqrt(vd / ess[:, None])
    z_m = (mean - ref_mean) / se_m
    se_c = torch.sqrt((vd[..., :, None] * vd[..., None, :] + ref_cov**2) / ess[:, None, None])
    z_c = (cov - ref_cov) / se_c
    assert z_m.abs().max() < k, f"mean off by {z_m.abs().max():.2f} standard errors"
    assert z_c.abs().max() < k, f"covariance off by {z_c.abs().max():.2f} standard errors"
    return float(z_m.abs().max()), float(z_c.abs().max())


# ------------------------------------------------------------------ exact for the filtering model
# Monte Carlo error of FPS-SMC's output. Its particles are resampled at every step, so the
# final cloud holds duplicates (the last move, to t = 0, is deterministic) and relatives; we
# count duplicates once (`_unique_ess`) and scale by an inflation factor measured with 30
# independent runs on one fixed y-sequence (N = 2000, 4 problems, 20 steps): the empirical sd
# of the weighted mean was 1.0-1.4x (VP, c = 0.95) and 2.1-3.4x (flow, DDPM kernel) the
# unique-ESS standard error, that of the log-evidence 1.1-1.8x and 1.8-3.0x the heuristic
# sqrt(sum_k (1/ESS_k - 1/N)); no bias was detectable (|mean error| < 2 sd / sqrt(30)).
@pytest.mark.parametrize(
    "schedule, c_rate, eta, inflation, mask",
    [
        (bfd.VPSchedule.linear(), 0.95, None, 2.0, False),
        (bfd.FlowSchedule(), 0.95, 1.0, 3.5, False),
        (bfd.VPSchedule.linear(), 0.95, None, 2.0, True),
    ],
    ids=["vp-c0.95", "flow-ddpm", "vp-mask-pixels"],
)
def test_fps_smc_matches_kalman_of_filtering_model(schedule, c_rate, eta, inflation, mask):
    B, N, sigma_y = 4, 8000, 0.3
    gmm, m0, S0, Am, problem = _gaussian_problem(B, sigma_y, mask=mask)
    prior = gmm.diffusion(schedule)
    sampler = FPSSMC(num_steps=20, c_rate=c_rate, eta=eta)
    seed = 5
    ys = sampler.y_sequence(prior, problem, torch.Generator().manual_seed(seed))
    res = sampler.sample(prior, problem, N, torch.Generator().manual_seed(seed))
    assert res.samples.shape == (B, N, 3) and res.info["nfe"] == 20
    assert res.info["resampled"][:-1].all() and not res.info["resampled"][-1].any()
    torch.testing.assert_close(ys[-1], problem.y)  # the last level is y itself
    times = sampler.time_grid(prior, problem)
    ref_mean, ref_cov, ref_ll = kalman_filtering_model(
        schedule, times, m0, S0, Am, sigma_y, ys, c_rate, eta
    )
    W = res.weights()
    ess = _unique_ess(res.samples, W)
    assert (ess > 1000).all()
    mean, cov = _weighted_moments(res.samples, W)
    # 5 (inflated) standard errors. At N = 8000 the errors measured 2.4 / 3.4 SE (VP / flow;
    # 2.3 / 4.7 with the random stream of the earlier move -> weight -> resample loop, whose
    # particles were 13.5 / 18.4 SE from the Kalman answer with the y-sequence shifted by one
    # level, 29 / 51 SE from that of another y-sequence and 10 / 22 SE (means) and 26 / 25 SE
    # (covariances) from the true posterior p(x0 | y)).
    _assert_moments(mean, cov, ref_mean, ref_cov.expand(B, 3, 3), ess, k=5.0 * inflation)
    # The evidence estimates the filtering model's log p_F(y_{t_0:t_n}) (12-46 nats below
    # log p(y) here), not log p(y).
    sd = torch.sqrt((1.0 / res.info["ess"] - 1.0 / N).sum(0))
    assert res.log_evidence is None  # not an estimate of log p(y): kept in the trace only
    err = (res.info["log_evidence"][-1] - ref_ll).abs()
    assert (err < 5.0 * inflation * sd).all(), (err, sd)
    assert ((ref_ll - gmm.log_evidence(problem)).abs() > 5).all()


def test_fps_matches_exact_chain_distribution():
    B, N, sigma_y = 2, 4000, 0.3
    gmm, m0, S0, Am, problem = _gaussian_problem(B, sigma_y, seed=1)
    schedule = bfd.VPSchedule.linear()
    prior = gmm.diffusion(schedule)
    sampler = FPS(num_steps=20)
    res = sampler.sample(prior, problem, N, torch.Generator().manual_seed(3))
    assert res.log_weights is None and res.samples.shape == (B, N, 3)
    times = sampler.time_grid(prior, problem)
    refs = [fps_chain_moments(schedule, times, m0, S0, Am, sigma_y, problem.y[b]) for b in range(B)]
    ref_mean = torch.stack([r[0] for r in refs])
    ref_cov = torch.stack([r[1] for r in refs])
    mean, cov = _weighted_moments(res.samples, res.weights())
    _assert_moments(mean, cov, ref_mean, ref_cov, torch.full((B,), float(N), dtype=D64))


def test_predictive_weight_equals_three_term_ratio():
    """log N(y; A x', r2) + log N(x'; mu, v) - log q(x' | mu, y) = log N(y; A mu, r2 + v A A^T)."""
    g = torch.Generator().manual_seed(0)
    d, m, v, r2 = 4, 3, 0.7, 0.2
    Am = torch.randn(m, d, generator=g, dtype=D64)
    op = bfd.operators.Dense(Am)
    lam = op.singular_values()
    mu = torch.randn(2, 5, d, generator=g, dtype=D64)
    y = torch.randn(2, 1, m, generator=g, dtype=D64)
    z = torch.randn(2, 5, d, generator=g, dtype=D64)
    x, log_pred = condition(op, lam, op.Vt(mu), v, r2, op.Ut(y), z)
    mvn = torch.distributions.MultivariateNormal
    prec = torch.eye(d, dtype=D64) / v + Am.T @ Am / r2
    Sq = torch.linalg.inv(prec)
    mq = (mu / v + (y @ Am / r2)) @ Sq
    lq = mvn(mq, covariance_matrix=Sq).log_prob(x)
    ly = mvn(x @ Am.T, covariance_matrix=r2 * torch.eye(m, dtype=D64)).log_prob(y)
    lx = mvn(mu, covariance_matrix=v * torch.eye(d, dtype=D64)).log_prob(x)
    pred = mvn(mu @ Am.T, covariance_matrix=r2 * torch.eye(m, dtype=D64) + v * Am @ Am.T).log_prob(
        y
    )
    torch.testing.assert_close(log_pred, pred)
    torch.testing.assert_close(ly + lx - lq, pred)


def _operators_for(kind, g):
    shape = (2, 3, 4)
    if kind == "pixels":  # a mask and the identity
        return shape, [
            bfd.operators.Mask.random(shape, 0.5, g, dtype=D64),
            bfd.operators.Identity(shape, dtype=D64),
        ]
    # wide Dense matrices (a thin range), one rank-deficient (rank 2 of 3 rows)
    low = torch.randn(2, 2, generator=g, dtype=D64) @ torch.randn(2, 24, generator=g, dtype=D64)
    return shape, [
        bfd.operators.Dense(torch.randn(3, 24, generator=g, dtype=D64), in_shape=shape),
        bfd.operators.Dense(torch.cat([low, low[:1]]), in_shape=shape),
    ]


@pytest.mark.parametrize("kind", ["pixels", "range"])
@pytest.mark.parametrize("per_particle_y", [False, True])
@pytest.mark.parametrize("r2", [0.2, 0.0])
def test_signal_grid_conditioning_equals_the_spectral_one(kind, per_particle_y, r2):
    """condition_pixels (masks, the identity: elementwise, no V / V^T) and condition_range
    (wide Dense matrices: only the range's coordinates transformed) with noise z = V z' are
    condition with spectral noise z': the same draws and predictive likelihoods."""
    from bayesfilter_diff.samplers.spectral import condition_pixels, condition_range, pixel_classes

    g = torch.Generator().manual_seed(1 if kind == "pixels" else 2)
    shape, ops = _operators_for(kind, g)
    for op in ops:
        assert op.pixel_svd if kind == "pixels" else op.thin_range
        d, P = op.in_dim, 5 if per_particle_y else 1
        mu = torch.randn((2, 5) + shape, generator=g, dtype=D64)
        yt = op.Ut(torch.randn((2, P) + tuple(op.out_shape), generator=g, dtype=D64))
        z = torch.randn(2, 5, d, generator=g, dtype=D64)
        s = op.singular_values()
        v = torch.tensor(0.7, dtype=D64)
        x, lp = condition(op, s, op.Vt(mu), v, r2, yt, z)
        zs = op.flat_in(op.V(z))  # the same noise on the signal grid
        if kind == "pixels":
            cl = pixel_classes(op, D64, mu.device)
            xs, lps = condition_pixels(op, mu, v, r2, op.pixel_observation(yt), zs, cl)
        else:
            xs, lps = condition_range(op, s, mu, v, r2, yt, zs)
        torch.testing.assert_close(xs, x, rtol=0, atol=1e-12)
        torch.testing.assert_close(lps, lp, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_fps_smc_is_biased_for_the_true_posterior():
    """The documented limitation: pooled over y-sequences, FPS-SMC is over-concentrated."""
    B, N, sigma_y, y0 = 64, 500, 0.5, 1.3
    gmm = bfd.GaussianMixture(
        torch.ones(1, dtype=D64), torch.zeros(1, 1, dtype=D64), torch.ones(1, dtype=D64)
    )
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    op = bfd.operators.Identity((1,), dtype=D64)
    problem = bfd.InverseProblem(op, torch.full((B, 1), y0, dtype=D64), noise_std=sigma_y)
    res = FPSSMC(num_steps=100).sample(prior, problem, N, torch.Generator().manual_seed(0))
    W = res.weights()
    mean_b = (W * res.samples[..., 0]).sum(1)
    var = ((W * (res.samples[..., 0] - mean_b[:, None]) ** 2).sum(1)).mean() + mean_b.var()
    true_mean, true_var = y0 / (1 + sigma_y**2), sigma_y**2 / (1 + sigma_y**2)
    # Exact limit (bias table): mean 1.234, var 0.0383 vs the truth 1.040, 0.200; the
    # pooled mean's standard error over 64 y-sequences is ~0.02.
    assert var < 0.4 * true_var
    assert mean_b.mean() - true_mean > 0.1


# ------------------------------------------------------------------ shapes, errors, determinism
def _std_normal_prior(event_shape, schedule=None):
    schedule = schedule or bfd.VPSchedule.linear()

    def denoiser(x, t):  # exact E[x0 | x_t] for x0 ~ N(0, I)
        a = schedule.alpha(t).reshape((-1,) + (1,) * (x.dim() - 1))
        s = schedule.sigma(t).reshape(a.shape)
        return a * x / (a**2 + s**2)

    return bfd.DiffusionModel(denoiser, schedule, event_shape)


@pytest.mark.parametrize("sampler_cls", [FPSSMC, FPS])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("kind", ["mask-vector", "mask-image", "downsample-image"])
def test_shapes(sampler_cls, batched, kind):
    g = torch.Generator().manual_seed(0)
    if kind == "mask-vector":
        shape = (6,)
        op = bfd.operators.Mask.random(shape, 0.5, generator=g)
    elif kind == "mask-image":
        shape = (3, 8, 8)
        op = bfd.operators.Mask.random(shape, 0.3, generator=g)
    else:
        shape = (3, 8, 8)
        op = bfd.operators.Downsample(shape, 2)
    prior = _std_normal_prior(shape)
    x = torch.randn((2,) + shape, generator=g)
    y = op(x) + 0.1 * torch.randn((2,) + op.out_shape, generator=g)
    problem = bfd.InverseProblem(op, y if batched else y[0], noise_std=0.1)
    res = sampler_cls(num_steps=5).sample(prior, problem, 7, g)
    lead = (2, 7) if batched else (7,)
    assert res.samples.shape == lead + shape
    assert torch.isfinite(res.samples).all()
    if sampler_cls is FPSSMC:
        assert res.log_weights.shape == lead and res.log_evidence is None
        assert res.info["log_evidence"].shape[1:] == (2 if batched else 1,)
        ys = FPSSMC(num_steps=5).y_sequence(prior, problem, torch.Generator().manual_seed(0))
        assert ys.shape == (6, problem.batch_size) + op.out_shape
    else:
        assert res.log_weights is None


def test_clear_errors():
    g = torch.Generator().manual_seed(0)
    prior = _std_normal_prior((1, 4, 4))
    pr = bfd.operators.PhaseRetrieval((1, 4, 4))
    y = pr(torch.randn(1, 4, 4, generator=g))
    for cls in (FPSSMC, FPS):
        with pytest.raises(ValueError, match="linear operator with an SVD"):
            cls(num_steps=3).sample(prior, bfd.InverseProblem(pr, y, noise_std=0.1), 4, g)
    mask = bfd.operators.Mask.random((1, 4, 4), 0.5, generator=g)
    yp = torch.poisson(torch.full(mask.out_shape, 3.0), generator=g)
    with pytest.raises(ValueError, match="poisson"):
        FPSSMC(num_steps=3).sample(prior, bfd.InverseProblem(mask, yp, noise="poisson"), 4, g)
    with pytest.raises(ValueError, match="noise_std > 0"):
        FPS(num_steps=3).sample(prior, bfd.InverseProblem(mask, yp, noise_std=0.0), 4, g)
    for bad in (dict(c_rate=1.5), dict(c_rate=-0.1), dict(eta=2.0), dict(c_rate=True)):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            FPSSMC(**bad)
        with pytest.raises(ValueError, match=name):
            FPS(**bad)
    with pytest.raises(ValueError, match="resampling"):
        FPSSMC(resampling="nope")


@pytest.mark.parametrize("sampler", [FPSSMC(num_steps=6), FPS(num_steps=6, eta=1.0)])
def test_determinism(sampler):
    op = bfd.operators.Downsample((2, 4, 4), 2)
    prior = _std_normal_prior((2, 4, 4))
    y = torch.randn((3,) + op.out_shape, generator=torch.Generator().manual_seed(1))
    problem = bfd.InverseProblem(op, y, noise_std=0.2)
    r1 = sampler.sample(prior, problem, 16, torch.Generator().manual_seed(7))
    r2 = sampler.sample(prior, problem, 16, torch.Generator().manual_seed(7))
    r3 = sampler.sample(prior, problem, 16, torch.Generator().manual_seed(8))
    assert torch.equal(r1.samples, r2.samples)
    assert not torch.equal(r1.samples, r3.samples)
    if sampler.weighted:
        assert torch.equal(r1.log_weights, r2.log_weights)
        assert torch.equal(r1.info["log_evidence"], r2.info["log_evidence"])


# ------------------------------------------------------------------ the bias table
def bias_table(sigmas=(0.05, 0.5), steps=(20, 100), y0=1.3, num_paths=20000, runs=200, N=1000):
    """FPS-SMC's limit and FPS's output vs the true posterior, 1-D ``N(0, 1)``, ``A = 1``.

    ``limit``: the exact ``N -> inf`` FPS-SMC answer (Kalman on the filtering model),
    averaged over ``num_paths`` y-sequences; ``runs``: actual FPS-SMC runs (``N`` particles,
    ``runs`` y-sequences), pooled; ``FPS``: the exact output law of unweighted FPS.
    """
    sched = bfd.VPSchedule.linear()
    gmm = bfd.GaussianMixture(
        torch.ones(1, dtype=D64), torch.zeros(1, 1, dtype=D64), torch.ones(1, dtype=D64)
    )
    prior = gmm.diffusion(sched)
    op = bfd.operators.Identity((1,), dtype=D64)
    one, A = torch.ones(1, dtype=D64), torch.ones(1, 1, dtype=D64)
    rows = []
    for sig in sigmas:
        problem = bfd.InverseProblem(op, torch.full((1,), y0, dtype=D64), noise_std=sig)
        true = (y0 / (1 + sig**2), sig**2 / (1 + sig**2))
        for n in steps:
            row = {"sigma_y": sig, "steps": n, "true": true}
            for name, kw in (("c=0.95", dict(c_rate=0.95)), ("eta=1", dict(eta=1.0))):
                smp = FPSSMC(num_steps=n, **kw)
                times = smp.time_grid(prior, problem)
                grid = fps_grid(sched, times, smp.c_rate, smp.eta)
                ys = fps_y_sequence(problem, grid, num_paths, torch.Generator().manual_seed(0))[
                    :, 0
                ]
                m, C, _ = kalman_filtering_model(
                    sched, times, 0 * one, A, A, sig, ys, smp.c_rate, smp.eta
                )
                row[name + " limit"] = (float(m.mean()), float(C[0, 0] + m.var()))
                rep = bfd.InverseProblem(op, torch.full((runs, 1), y0, dtype=D64), noise_std=sig)
                res = smp.sample(prior, rep, N, torch.Generator().manual_seed(1))
                W, xs = res.weights(), res.samples[..., 0]
                mb = (W * xs).sum(1)
                vb = (W * (xs - mb[:, None]) ** 2).sum(1)
                row[name + " runs"] = (float(mb.mean()), float(vb.mean() + mb.var()))
                fm, fc = fps_chain_moments(
                    sched, times, 0 * one, A, A, sig, y0 * one, smp.c_rate, smp.eta
                )
                row[name + " FPS"] = (float(fm[0]), float(fc[0, 0]))
            rows.append(row)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    for row in bias_table():
        cells = [
            f"{k} {v[0]:.4f}/{v[1]:.5f}" if isinstance(v, tuple) else f"{k}={v}"
            for k, v in row.items()
        ]
        print(" | ".join(cells))

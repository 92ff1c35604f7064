"""PiGDM: exactness for a standard normal prior, guidance algebra, shapes, errors."""

from __future__ import annotations

import math

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.base import Context
from bayesfilter_diff.samplers.pigdm import PiGDM, PiGDMState, pigdm_vector

ops = bfd.operators
DT = torch.float64

from _helpers import CASES, _ops, std_normal, std_normal_prior  # noqa: E402


def kalman_x0(x_t, a, s, A, y, sy):
    """Exact E[x0 | x_t, y] for x0 ~ N(0, I), x_t = a x0 + s eps, y = A x0 + sy n (dense)."""
    d = A.shape[1]
    P = torch.linalg.inv((a**2 / s**2 + 0.0) * torch.eye(d, dtype=DT) + torch.eye(d, dtype=DT))
    m = (a / s**2) * x_t @ P.T  # E[x0 | x_t]
    G = A @ P @ A.T + sy**2 * torch.eye(A.shape[0], dtype=DT)
    K = P @ A.T @ torch.linalg.inv(G)
    return m + (y[:, None, :] - m @ A.T) @ K.T


def whitened_z(samples, post):
    """Largest |z| of the whitened sample mean and covariance against the exact posterior.

    In the posterior's eigenbasis, ``w = L^-1/2 Q^T (x - m)`` should be N(0, I): each mean
    has standard error ``1/sqrt(N)``, each covariance entry ``sqrt((1 + delta_ij) / N)``.
    Directions of zero posterior variance (noiseless y) must be exact.
    """
    N = samples.shape[1]
    mu = post.means[:, 0]
    lam, Q = torch.linalg.eigh(post.covariance_matrices()[0])
    keep = lam > 1e-10
    u = (samples - mu[:, None]) @ Q  # (B, N, d)
    if (~keep).any():
        assert u[..., ~keep].abs().max() < 1e-8
    w = u[..., keep] / lam[keep].sqrt()
    em = w.mean(1)
    wc = w - em[:, None]
    ec = torch.einsum("bni,bnj->bij", wc, wc) / (N - 1)
    k = int(keep.sum())
    eye = torch.eye(k, dtype=DT)
    z_mean = (em.abs() * math.sqrt(N)).max().item()
    z_cov = ((ec - eye).abs() / ((1 + eye) / N).sqrt()).max().item()
    return z_mean, z_cov


def pigdm_chain_moments(sampler, sch, times, A, y, sy):
    """Exact mean and variance of the spectral coordinates ``V^T x`` of PiGDM's output for a
    standard normal prior (each coordinate is an independent linear-Gaussian chain), and the
    exact posterior's, written from the update rule independently of the sampler's code."""
    r = A.singular_values().numel()
    s = A.pad_in(A.singular_values())
    obs = s > 0
    one = torch.ones_like(s)
    ss = torch.where(obs, s, one)
    yh = A.pad_in(A.Ut(y)[..., :r])  # (B, d): U^T y on the observed coordinates
    a, sg = sch.alpha(times[0]), sch.sigma(times[0])
    # x_T = alpha_T A^T (A A^T + sigma_y^2)^-1 y + sigma_T z (A^+ y for sigma_y = 0)
    M = torch.where(obs, a * s * yh / (ss**2 + sy**2), 0 * yh)
    V = sg**2 * torch.ones_like(M)
    eta = sampler.eta
    for t, tn in zip(times[:-1], times[1:]):
        at, st = sch.alpha(t), sch.sigma(t)
        k = at / (at**2 + st**2)  # x0_hat = k x_t, J = k I
        r2 = st**2 / (at**2 + st**2)
        an, sn = sch.alpha(tn), sch.sigma(tn)
        std = eta * ((st**2 - (at / an) ** 2 * sn**2).clamp_min(0) * sn**2 / st**2).sqrt()
        ce = (sn**2 - std**2).clamp_min(0).sqrt()
        den = torch.where(obs, r2 * s**2 + sy**2, one)
        g1 = torch.where(obs, -k * k * s * s / den, 0 * s)  # g = g1 x_t + g0 U^T y
        g0 = torch.where(obs, k * s / den, 0 * s)
        if sampler.weighting == "tweedie":
            c = an - ce * at / st
            p = c * (k + st**2 / at * g1) + ce / st
            q = c * st**2 / at * g0
        else:
            p = an * k + ce * (1 - at * k) / st + an * at * r2 * g1
            q = an * at * r2 * g0
        M = p * M + q * yh
        V = p**2 * V + std**2
    if sy > 0:
        pv = torch.where(obs, 1 / (1 + s**2 / sy**2), one)
        pm = torch.where(obs, s * yh / sy**2 * pv, 0 * yh)
    else:
        pv = torch.where(obs, 0 * s, one)
        pm = torch.where(obs, yh / ss, 0 * yh)
    return M, V, pm, pv


@pytest.fixture(scope="module")
def gauss_problem():
    g = torch.Generator().manual_seed(0)
    d, m = 4, 2
    gmm = std_normal(d)
    A = ops.Dense(torch.randn(m, d, generator=g, dtype=DT))
    x = gmm.sample(2, g)
    return g, gmm, A, x


@pytest.mark.parametrize("sy,eta", [(0.5, 1.0), (0.0, 0.0)])
@pytest.mark.slow
def test_exact_for_standard_normal_prior(sy, eta):
    """PiGDM (Tweedie weighting) samples the exact posterior of N(0, I) up to discretisation.

    Checked in the whitened posterior metric: 4 Monte Carlo standard errors (N = 4000) on
    every whitened mean and covariance entry. With 500 steps the DDIM discretisation bias
    (exact value from ``pigdm_chain_moments``: whitened variance 0.967 for eta = 1 here,
    0.993 for eta = 0 on the null space) is about 1.5 and 0.3 standard errors.
    """
    g = torch.Generator().manual_seed(1)
    gmm = std_normal(4)
    A = ops.Dense(0.5 * torch.randn(2, 4, generator=g, dtype=DT))
    y = A(gmm.sample(2, g)) + sy * torch.randn(2, 2, generator=g, dtype=DT)
    problem = bfd.InverseProblem(A, y, noise_std=sy)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    sampler = PiGDM(num_steps=500, eta=eta, weighting="tweedie")
    res = sampler.sample(prior, problem, num_samples=4000, generator=g)
    z_mean, z_cov = whitened_z(res.samples, gmm.posterior(problem))
    assert z_mean < 4.0, z_mean
    assert z_cov < 4.0, z_cov
    assert res.info["nfe"] == 500 and res.info["backprop"] is True
    if sy == 0:
        assert (A(res.samples) - y[:, None]).abs().max() < 1e-10


@pytest.mark.parametrize("weighting", ["tweedie", "official"])
@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_matches_exact_chain_moments(gauss_problem, weighting, eta):
    """The samples' spectral means and variances match the exact linear-Gaussian chain of the
    update rule (both weightings) within 4 Monte Carlo standard errors (N = 20000)."""
    g, gmm, A, x = gauss_problem
    sy = 0.3
    y = A(x) + sy * torch.randn(2, 2, generator=g, dtype=DT)
    problem = bfd.InverseProblem(A, y, noise_std=sy)
    sch = bfd.VPSchedule.linear()
    sampler = PiGDM(num_steps=30, eta=eta, weighting=weighting)
    res = sampler.sample(gmm.diffusion(sch), problem, 20000, generator=g)
    M, V, _, _ = pigdm_chain_moments(sampler, sch, res.info["times"], A, y, sy)
    xb = A.Vt(res.samples)
    N = xb.shape[1]
    z_mean = ((xb.mean(1) - M).abs() / (V / N).sqrt()).max().item()
    z_var = ((xb.var(1) - V).abs() / (V * math.sqrt(2 / N))).max().item()
    assert z_mean < 4.0 and z_var < 4.0, (z_mean, z_var)


@pytest.mark.slow
def test_exact_chain_converges_at_first_order(gauss_problem):
    """Tweedie weighting: the exact chain's mean is the posterior mean and the variance
    deficit (measured: 0.23 / 0.64 / 0.88 / 0.93 of the posterior variance in the best
    observed direction at 20 / 100 / 500 / 1000 ancestral steps) halves when the steps
    double. The official weighting does not converge: its observed-direction variance
    collapses (0.09 of the posterior's at 1000 ancestral steps, 0 for eta = 0)."""
    g, gmm, A, x = gauss_problem
    sy = 0.3
    y = A(x) + sy * torch.randn(2, 2, generator=g, dtype=DT)
    problem = bfd.InverseProblem(A, y, noise_std=sy)
    sch = bfd.VPSchedule.linear()
    prior = gmm.diffusion(sch)
    for eta in (1.0, 0.0):
        deficit = []
        for n in (500, 1000):
            sampler = PiGDM(num_steps=n, eta=eta)
            M, V, pm, pv = pigdm_chain_moments(
                sampler, sch, sampler.time_grid(prior, problem), A, y, sy
            )
            assert ((M - pm).abs() / pv.sqrt()).max() < 1e-3
            deficit.append((1 - V / pv).abs().max().item())
        assert 0.4 < deficit[1] / deficit[0] < 0.6, deficit
        off = PiGDM(num_steps=1000, eta=eta, weighting="official")
        _, V, _, pv = pigdm_chain_moments(off, sch, off.time_grid(prior, problem), A, y, sy)
        assert (V / pv)[:, :2].max() < 0.1


@pytest.mark.parametrize("schedule", [bfd.VPSchedule.linear(), bfd.VESchedule()])
@pytest.mark.parametrize("sy", [0.3, 0.0])
def test_tweedie_guidance_is_the_exact_conditional_denoiser(gauss_problem, schedule, sy):
    """One step t -> 0 with eta = 0 returns x0_y, which must equal E[x0 | x_t, y] exactly."""
    g, gmm, A, x = gauss_problem
    y = A(x) + sy * torch.randn(2, 2, generator=g, dtype=DT)
    problem = bfd.InverseProblem(A, y, noise_std=sy)
    prior = std_normal_prior(schedule, (4,))
    t = torch.tensor(0.3, dtype=DT)
    a, s = schedule.alpha(t), schedule.sigma(t)
    xt = a * gmm.sample(2 * 7, g).reshape(2, 7, 4) + s * torch.randn(2, 7, 4, generator=g, dtype=DT)
    ctx = Context(prior, problem, 7, g, torch.stack([t, torch.zeros((), dtype=DT)]))
    sampler = PiGDM(num_steps=1, eta=0.0)
    t_next = torch.zeros((), dtype=DT)
    out = sampler.move(ctx, sampler.setup(ctx), PiGDMState(xt), 0, t, t_next).state.x
    ref = kalman_x0(xt, a, s, A.M, y, sy)
    # eta = 0: x_next = x0_y + sigma(0) (x_t - alpha_t x0_y) / sigma_t; sigma(0) = 0 for VP,
    # sigma_min for VE (alpha = 1): solve for x0_y.
    c = schedule.sigma(t_next) / s
    out = (out - c * xt) / (1 - c * a)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8)


def test_official_weighting_is_abar_times_weaker(gauss_problem):
    """The official code shifts x0 by alpha_t^2 times the Tweedie shift (eps kept)."""
    g, gmm, A, x = gauss_problem
    sch = bfd.VPSchedule.linear()
    y = A(x)
    problem = bfd.InverseProblem(A, y, noise_std=0.0)
    prior = std_normal_prior(sch, (4,))
    t = torch.tensor(0.4, dtype=DT)
    a = sch.alpha(t)
    xt = torch.randn(2, 5, 4, generator=g, dtype=DT)
    ctx = Context(prior, problem, 5, g, torch.stack([t, torch.zeros((), dtype=DT)]))
    t0 = torch.zeros((), dtype=DT)

    def move(sampler):
        return sampler.move(ctx, sampler.setup(ctx), PiGDMState(xt), 0, t, t0).state.x

    out_t = move(PiGDM(num_steps=1, eta=0.0))
    out_o = move(PiGDM(num_steps=1, eta=0.0, weighting="official"))
    x0 = a * xt  # unguided denoiser of N(0, I) under VP
    torch.testing.assert_close(out_o - x0, a**2 * (out_t - x0), rtol=1e-10, atol=1e-12)


def test_cg_matches_svd():
    """Operators without an SVD use conjugate gradients; same vector as the SVD path."""

    class NoSVD(ops.Dense):
        has_svd = False

    g = torch.Generator().manual_seed(3)
    M = torch.randn(5, 8, generator=g, dtype=DT)
    y = torch.randn(2, 1, 5, generator=g, dtype=DT)
    x0 = torch.randn(2, 3, 8, generator=g, dtype=DT)
    for s2 in (0.09, 0.0):
        ref = pigdm_vector(ops.Dense(M), y, x0, 0.7, s2)
        out = pigdm_vector(NoSVD(M), y, x0, 0.7, s2, cg_iters=50)
        torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind,name", CASES)
@pytest.mark.parametrize("batched", [True, False])
def test_shapes_all_operators(kind, name, batched):
    g = torch.Generator().manual_seed(5)
    op = _ops(kind, g)[name]
    shape = op.in_shape
    x = torch.randn((2,) + shape, generator=g, dtype=DT)
    y = op(x) + 0.1 * torch.randn(op(x).shape, generator=g, dtype=DT)
    if not batched:
        y = y[0]
    problem = bfd.InverseProblem(op, y, noise_std=0.1)
    prior = std_normal_prior(bfd.VPSchedule.linear(), shape)
    for sampler in (PiGDM(num_steps=4), PiGDM(num_steps=4, weighting="official", eta=0.0)):
        res = sampler.sample(prior, problem, num_samples=3, generator=g)
        lead = (2, 3) if batched else (3,)
        assert res.samples.shape == lead + shape
        assert res.samples.dtype == DT and torch.isfinite(res.samples).all()
        assert res.log_weights is None
        assert res.info["nfe"] == 4 and res.info["backprop"] is True


def test_errors():
    g = torch.Generator().manual_seed(0)
    pr = ops.PhaseRetrieval((1, 4, 4))
    y = pr(torch.randn(1, 4, 4, generator=g, dtype=DT))
    prior = std_normal_prior(bfd.VPSchedule.linear(), (1, 4, 4))
    with pytest.raises(ValueError, match="linear operator"):
        PiGDM(num_steps=2).sample(prior, bfd.InverseProblem(pr, y, noise_std=0.1), 2)
    A = ops.Identity((4,), dtype=DT)
    y = torch.rand(4, generator=g, dtype=DT) + 1
    with pytest.raises(ValueError, match="gaussian observation model"):
        PiGDM(num_steps=2).sample(
            std_normal_prior(bfd.VPSchedule.linear(), (4,)),
            bfd.InverseProblem(A, y, noise="poisson"),
            2,
        )
    with pytest.raises(ValueError, match="PiGDMFlow"):
        PiGDM(num_steps=2, grid="uniform").sample(
            std_normal_prior(bfd.FlowSchedule(), (4,)), bfd.InverseProblem(A, y, noise_std=0.1), 2
        )
    for kw in (
        {"eta": 1.5},
        {"weighting": "dps"},
        {"scale": -1.0},
        {"x_init": "zeros"},
        {"cg_iters": 0},
        {"num_steps": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(kw))):
            PiGDM(**kw)


def test_tweedie_weighting_on_a_learned_network_fails_loudly_and_names_the_stable_one():
    # the conditional-Tweedie shift (sigma_t^2 / alpha_t) J^T v multiplies the network's
    # Jacobian error by ~ sigma_t^2 / alpha_t^2 at low SNR: on the shipped two-moons MLP the
    # draws run away to NaN from the first steps (shift ~600 against |x0| ~ 1 at t_max);
    # the official weighting multiplies g by alpha_s alpha_t r_t^2 instead and stays on it
    prior = bfd.priors.load_pretrained("moons_diffusion")
    g = torch.Generator().manual_seed(0)
    A = bfd.operators.Dense(torch.randn(1, 2, generator=g))
    x = torch.tensor([0.5, 0.25])  # on the upper moon
    problem = bfd.InverseProblem(A, A(x) + 0.05 * torch.randn(1, generator=g), noise_std=0.05)
    with pytest.raises(bfd.NonFiniteSamplesError, match="weighting='official'"):
        PiGDM(num_steps=20).sample(prior, problem, 128, generator=g)
    res = PiGDM(num_steps=20, weighting="official").sample(prior, problem, 128, generator=g)
    assert res.samples.norm(dim=-1).max() < 3  # the moons lie within norm 2

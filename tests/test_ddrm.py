"""DDRM: exact data consistency, exact moments of its chain for N(0, I), shapes, errors.

For a standard normal prior every spectral coordinate ``i`` of DDRM's chain evolves
independently and linearly, ``xbar_n = p x_t + q ybar + r z``, so the mean and variance
of ``V^T x`` after the last step follow from a scalar recursion (``ddrm_moments``), written
here from the paper's three cases independently of the sampler's code. The samples must
match it within Monte Carlo error; this checks every branch ("missing", "before",
"after"), the initialisation and the time convention.
"""

from __future__ import annotations

import math

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.ddrm import DDRM

ops = bfd.operators
DT = torch.float64

from _helpers import CASES, IMG, _ops, std_normal_prior  # noqa: E402


def ddrm_moments(sch, times, s, ybar, sy, eta, eta_b):
    """Mean and variance of ``V^T x`` after DDRM for x0 ~ N(0, I).

    ``s``: (d,) singular values padded with zeros; ``ybar``: (B, d) (zeros where s = 0).
    """
    obs = s > 0
    s_safe = torch.where(obs, s, torch.ones_like(s))
    a, sg = sch.alpha(times[0]), sch.sigma(times[0])
    start = obs & (s * sg > a * sy)
    M = torch.where(start, a * ybar, torch.zeros_like(ybar))
    V = torch.where(start, sg**2 - (a * sy / s_safe) ** 2, sg**2 * torch.ones_like(s))
    V = V.expand_as(M).clone()
    for t, tn in zip(times[:-1], times[1:]):
        a_t, s_t = sch.alpha(t), sch.sigma(t)
        kappa = a_t / (a_t**2 + s_t**2)  # x0_hat = kappa x_t
        e = (1 - a_t * kappa) / s_t  # eps_hat = e x_t
        a_n = sch.alpha(tn)
        S_n = sch.sigma(tn) / a_n
        c = math.sqrt(1 - eta**2)
        # missing
        p = (kappa + c * S_n * e) * torch.ones_like(s)
        q = torch.zeros_like(s)
        r = eta * S_n * torch.ones_like(s)
        # before: s S_n >= sy
        before = obs & (s * S_n >= sy)
        p = torch.where(before, (1 - eta_b) * kappa, p)
        q = torch.where(before, eta_b * torch.ones_like(s), q)
        r = torch.where(before, (S_n**2 - (eta_b * sy / s_safe) ** 2).clamp_min(0).sqrt(), r)
        # after: s S_n < sy
        after = obs & ~before
        rho = c * S_n * s / max(sy, 1e-300)
        p = torch.where(after, kappa * (1 - rho), p)
        q = torch.where(after, rho, q)
        r = torch.where(after, eta * S_n, r)
        M = a_n * (p * M + q * ybar)
        V = a_n**2 * (p**2 * V + r**2)
    return M, V


def spectral_z(samples, op, M, V):
    """Largest |z| of the per-coordinate sample mean and variance of V^T x."""
    xb = op.Vt(samples)  # (B, N, d)
    N = xb.shape[1]
    em, ev = xb.mean(1), xb.var(1)
    keep = (V > 1e-12).expand_as(em)  # zero-variance coordinates must be exact
    assert ((xb - M[:, None]).abs().amax(1)[~keep] < 1e-9).all()
    z_mean = ((em - M).abs() / (V / N).sqrt())[keep].max().item()
    z_var = ((ev - V).abs() / (V * math.sqrt(2.0 / N)))[keep].max().item()
    return z_mean, z_var


def _problem(op, sy, g, B=2):
    x = torch.randn((B,) + op.in_shape, generator=g, dtype=DT)
    y = op(x) + sy * torch.randn(op(x).shape, generator=g, dtype=DT)
    return bfd.InverseProblem(op, y, noise_std=sy)


@pytest.mark.parametrize("sy", [0.0, 0.2])
@pytest.mark.parametrize("eta,eta_b", [(0.85, 1.0), (0.5, 0.6)])
def test_moments_match_exact_recursion(sy, eta, eta_b):
    """DDRM's samples for N(0, I) and a rank-deficient dense operator (singular values
    spanning both "before" and "after" regimes) match the recursion within 4 standard errors."""
    g = torch.Generator().manual_seed(0)
    d = 6
    U, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=DT))
    Vm, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    sv = torch.tensor([8.0, 1.0, 0.05], dtype=DT)
    op = ops.Dense(U @ torch.diag(sv) @ Vm[:, :3].T)
    problem = _problem(op, sy, g)
    sch = bfd.VPSchedule.linear()
    sampler = DDRM(eta=eta, eta_b=eta_b)
    res = sampler.sample(std_normal_prior(sch, (d,)), problem, 20000, generator=g)
    s = op.pad_in(op.singular_values())
    ybar = op.pad_in(op.Ut(problem.y)[..., :3] / op.singular_values())
    M, V = ddrm_moments(sch, res.info["times"], s, ybar, sy, eta, eta_b)
    z_mean, z_var = spectral_z(res.samples, op, M, V)
    assert z_mean < 4.0 and z_var < 4.0, (z_mean, z_var)
    assert res.info["nfe"] == 20 and res.info["backprop"] is False


EXACT_CASES = {
    "dense-vector": lambda g: ops.Dense(torch.randn(3, 6, generator=g, dtype=DT)),
    "mask-vector": lambda g: ops.Mask(torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool), DT),
    "dense-image": lambda g: ops.Dense(
        torch.randn(7, math.prod(IMG), generator=g, dtype=DT), in_shape=IMG
    ),
    "mask-image": lambda g: ops.Mask.random(IMG, 0.5, g, dtype=DT),
    "downsample-image": lambda g: ops.Downsample(IMG, 2, dtype=DT),
    "blur-image": lambda g: ops.Blur(ops.gaussian_kernel(3, 1.0, dtype=DT), IMG),
    "colorize-image": lambda g: ops.Colorize(IMG, dtype=DT),
}


@pytest.mark.parametrize("name", list(EXACT_CASES))
def test_noiseless_reproduces_y(name):
    """With sigma_y = 0 the last step returns ybar on the observed coordinates: A x = y."""
    g = torch.Generator().manual_seed(1)
    op = EXACT_CASES[name](g)
    problem = _problem(op, 0.0, g)
    prior = std_normal_prior(bfd.VPSchedule.linear(), op.in_shape)
    res = DDRM().sample(prior, problem, 8, generator=g)
    y = problem.y
    err = (op(res.samples) - y[:, None]).abs().max() / y.abs().max()
    assert err < 1e-10, err


@pytest.mark.parametrize("schedule", [bfd.FlowSchedule(), bfd.VESchedule()])
def test_other_paths(schedule):
    """Times and noise levels come from the schedule: flow (alpha(1) = 0) and VE work."""
    g = torch.Generator().manual_seed(2)
    op = ops.Mask(torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool), DT)
    problem = _problem(op, 0.0, g)
    res = DDRM(grid="uniform").sample(std_normal_prior(schedule, (6,)), problem, 4000, g)
    assert torch.isfinite(res.samples).all()
    if schedule.kind == "flow":  # VE stops at sigma_min > 0, so no exact projection there
        assert (op(res.samples) - problem.y[:, None]).abs().max() < 1e-10
    s = op.pad_in(op.singular_values())
    ybar = op.pad_in(op.Ut(problem.y))
    M, V = ddrm_moments(schedule, res.info["times"], s, ybar, 0.0, 0.85, 1.0)
    z_mean, z_var = spectral_z(res.samples, op, M, V)
    assert z_mean < 4.0 and z_var < 4.0, (z_mean, z_var)


@pytest.mark.parametrize("kind,name", CASES)
@pytest.mark.parametrize("batched", [True, False])
def test_shapes_all_operators(kind, name, batched):
    g = torch.Generator().manual_seed(5)
    op = _ops(kind, g)[name]
    problem = _problem(op, 0.1, g)
    if not batched:
        problem = bfd.InverseProblem(op, problem.y[0], noise_std=0.1)
    prior = std_normal_prior(bfd.VPSchedule.linear(), op.in_shape)
    res = DDRM(num_steps=5).sample(prior, problem, num_samples=3, generator=g)
    assert res.samples.shape == ((2, 3) if batched else (3,)) + op.in_shape
    assert res.samples.dtype == DT and torch.isfinite(res.samples).all()
    assert res.log_weights is None
    assert res.info["nfe"] == 5 and res.info["backprop"] is False


def test_errors():
    g = torch.Generator().manual_seed(0)
    pr = ops.PhaseRetrieval((1, 4, 4))
    y = pr(torch.randn(1, 4, 4, generator=g, dtype=DT))
    prior = std_normal_prior(bfd.VPSchedule.linear(), (1, 4, 4))
    with pytest.raises(ValueError, match="SVD"):
        DDRM().sample(prior, bfd.InverseProblem(pr, y, noise_std=0.1), 2)
    A = ops.Identity((4,), dtype=DT)
    yp = torch.rand(4, generator=g, dtype=DT) + 1
    with pytest.raises(ValueError, match="needs a gaussian observation model.*poisson"):
        DDRM().sample(
            std_normal_prior(bfd.VPSchedule.linear(), (4,)),
            bfd.InverseProblem(A, yp, noise="poisson"),
            2,
        )
    for kw in ({"eta": -0.1}, {"eta": 1.1}, {"eta_b": 2.0}, {"num_steps": 0}, {"grid": "log"}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            DDRM(**kw)


def test_draws_that_follow_the_datas_noise_are_reported_as_overfit():
    # the 64-D masked mixture at sigma_y = 1e-2: DDRM's mean is right (0.03 posterior sd) but
    # its draws sit ~0.3 noise widths from y in the observed coordinates where the exact
    # posterior's spread there is ~1 (mean squared residual 0.1 of the noise's, against a
    # line of 0.2 at d_y = 32 that exact draws cross with chance <= 1e-6)
    from _masked import masked_mixture_problem

    from bayesfilter_diff.samplers.quality import residual_low_line, residual_ratio

    g = torch.Generator().manual_seed(0)
    mix, prior, problem = masked_mixture_problem(1e-2, g)
    line = residual_low_line(problem.operator.out_dim)
    assert 0.15 < line < 0.25
    with pytest.warns(bfd.PosteriorQualityWarning, match="more tightly than its noise"):
        res = DDRM(num_steps=50).sample(prior, problem, 500, torch.Generator().manual_seed(1))
    assert [q.kind for q in res.info.quality] == ["overfit"]
    assert float(res.info.residual_ratio) < 0.6 * line
    exact = mix.posterior(problem).sample(500, g)[None]
    assert float(residual_ratio(problem, exact, None)) > 0.5

"""DDNM / DDNM+: exact data consistency, exact moments of the chain for N(0, I), time
travel, shapes, errors.

For a standard normal prior each spectral coordinate of the DDNM(+) chain is linear,
``xbar_n = p x_t + q ybar + r z``, so the mean and variance of ``V^T x`` after the last step
follow from a scalar recursion (``ddnm_moments``), written here from the paper / code rules
independently of the sampler's implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.ddnm import DDNM, DDNMPlus

ops = bfd.operators
DT = torch.float64

from _helpers import CASES, IMG, _ops, std_normal_prior  # noqa: E402


def ddnm_moments(sch, times, s, ybar, sy, eta, plus):
    """Mean and variance of ``V^T x`` after DDNM (``plus=False``) or DDNM+ for N(0, I)."""
    obs = s > 0
    s_safe = torch.where(obs, s, torch.ones_like(s))
    M = torch.zeros_like(ybar)
    V = (sch.sigma(times[0]) ** 2 * torch.ones_like(ybar)).clone()
    ce = math.sqrt(1 - eta**2)
    for t, tn in zip(times[:-1], times[1:]):
        a_t, s_t = sch.alpha(t), sch.sigma(t)
        kappa = a_t / (a_t**2 + s_t**2)  # x0_hat = kappa x_t
        e = (1 - a_t * kappa) / s_t  # eps_hat = e x_t
        a, c = sch.alpha(tn), sch.sigma(tn)
        one = torch.ones_like(s)
        lam, d1, d2 = one, c * eta * one, c * ce * one
        if plus and sy > 0:
            thr = a * sy / s_safe
            noisy, clean = obs & (c < thr), obs & (c > thr)
            lam = torch.where(noisy, s * c * ce / (a * sy), lam)
            d2 = torch.where(noisy | clean, 0 * one, d2)
            d1 = torch.where(clean, (c**2 - thr**2).clamp_min(0).sqrt(), d1)
        lam = torch.where(obs, lam, 0 * one)  # no correction on the null space
        p = a * (1 - lam) * kappa + d2 * e
        q = a * lam
        M = p * M + q * ybar
        V = p**2 * V + d1**2
    return M, V


def spectral_z(samples, op, M, V):
    xb = op.Vt(samples)
    N = xb.shape[1]
    em, ev = xb.mean(1), xb.var(1)
    keep = (V > 1e-12).expand_as(em)
    assert ((xb - M[:, None]).abs().amax(1)[~keep] < 1e-9).all()
    z_mean = ((em - M).abs() / (V / N).sqrt())[keep].max().item()
    z_var = ((ev - V).abs() / (V * math.sqrt(2.0 / N)))[keep].max().item()
    return z_mean, z_var


def _problem(op, sy, g, B=2):
    x = torch.randn((B,) + op.in_shape, generator=g, dtype=DT)
    y = op(x) + sy * torch.randn(op(x).shape, generator=g, dtype=DT)
    return bfd.InverseProblem(op, y, noise_std=sy)


def _dense_rank3(g, d=6):
    U, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=DT))
    Vm, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    sv = torch.tensor([8.0, 1.0, 0.05], dtype=DT)
    return ops.Dense(U @ torch.diag(sv) @ Vm[:, :3].T)


@pytest.mark.parametrize("cls,sy", [(DDNM, 0.0), (DDNMPlus, 0.0), (DDNMPlus, 0.2), (DDNMPlus, 1.0)])
def test_moments_match_exact_recursion(cls, sy):
    """Per spectral coordinate, samples match the recursion within 4 standard errors
    (singular values 8, 1, 0.05 and a 3-d null space: every lambda / noise branch)."""
    g = torch.Generator().manual_seed(0)
    op = _dense_rank3(g)
    problem = _problem(op, sy, g)
    sch = bfd.VPSchedule.linear()
    sampler = cls(num_steps=25)
    res = sampler.sample(std_normal_prior(sch, (6,)), problem, 20000, generator=g)
    s = op.pad_in(op.singular_values())
    ybar = op.pad_in(op.Ut(problem.y)[..., :3] / op.singular_values())
    M, V = ddnm_moments(sch, res.info["times"], s, ybar, sy, 0.85, cls is DDNMPlus)
    z_mean, z_var = spectral_z(res.samples, op, M, V)
    assert z_mean < 4.0 and z_var < 4.0, (z_mean, z_var)
    assert res.info["nfe"] == 25 and res.info["backprop"] is False


def test_plus_equals_ddnm_when_noiseless():
    g = torch.Generator().manual_seed(1)
    op = _dense_rank3(g)
    problem = _problem(op, 0.0, g)
    prior = std_normal_prior(bfd.VPSchedule.linear(), (6,))
    a = DDNM(num_steps=10).sample(prior, problem, 50, torch.Generator().manual_seed(7)).samples
    b = DDNMPlus(num_steps=10).sample(prior, problem, 50, torch.Generator().manual_seed(7)).samples
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plus_noise_compensation():
    """Where y is noisier than x_next, the noise carried in through A^+ y
    (a lambda sigma_y / s) plus the fresh noise d1 add up to c^2; elsewhere lambda = 1 and
    (a sigma_y / s)^2 + d1^2 = c^2 (DDNM+'s design rule)."""
    s = torch.tensor([10.0, 1.0, 0.1], dtype=DT)
    a, c, sy = torch.tensor(0.8, dtype=DT), torch.tensor(0.6, dtype=DT), 0.5
    lam, d1, d2 = DDNMPlus()._coefficients(s, a, c, sy)
    carried = a * lam * sy / s
    noisy = c < a * sy / s
    assert noisy.tolist() == [False, False, True]
    torch.testing.assert_close(
        carried[noisy] ** 2 + d1[noisy] ** 2 + d2[noisy] ** 2, c**2 * torch.ones(1, dtype=DT)
    )
    torch.testing.assert_close(
        carried[~noisy] ** 2 + d1[~noisy] ** 2, c**2 * torch.ones(2, dtype=DT)
    )
    assert (lam[~noisy] == 1).all() and (d2 == 0).all()


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
@pytest.mark.parametrize(
    "sampler",
    [
        DDNM(num_steps=20),
        DDNMPlus(num_steps=20),
        DDNM(num_steps=20, travel_length=3, travel_repeat=2),
    ],
    ids=["ddnm", "ddnm+", "ddnm-travel"],
)
def test_noiseless_reproduces_y(name, sampler):
    """The last step returns the projected x0_hat': A x = y to float precision."""
    g = torch.Generator().manual_seed(1)
    op = EXACT_CASES[name](g)
    problem = _problem(op, 0.0, g)
    prior = std_normal_prior(bfd.VPSchedule.linear(), op.in_shape)
    res = sampler.sample(prior, problem, 8, generator=g)
    y = problem.y
    err = (op(res.samples) - y[:, None]).abs().max() / y.abs().max()
    assert err < 1e-10, err


def test_time_travel():
    """RePaint schedule: jumps at DDPM indices k = 0, L, 2L, ... < n - L, R - 1 times each,
    L extra NFEs per jump; L = R = 1 (the default) is the plain sampler bit for bit."""
    g = torch.Generator().manual_seed(3)
    op = ops.Mask(torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool), DT)
    problem = _problem(op, 0.0, g)
    prior = std_normal_prior(bfd.VPSchedule.linear(), (6,))
    n, L, R = 20, 3, 3
    jumps = len(range(0, n - L, L))
    res = DDNM(num_steps=n, travel_length=L, travel_repeat=R).sample(prior, problem, 4, g)
    assert res.info["nfe"] == n + jumps * (R - 1) * L
    a = DDNM(num_steps=n).sample(prior, problem, 4, torch.Generator().manual_seed(9)).samples
    b = (
        DDNM(num_steps=n, travel_length=5, travel_repeat=1)
        .sample(prior, problem, 4, torch.Generator().manual_seed(9))
        .samples
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind,name", CASES)
@pytest.mark.parametrize("batched", [True, False])
def test_shapes_all_operators(kind, name, batched):
    g = torch.Generator().manual_seed(5)
    op = _ops(kind, g)[name]
    problem = _problem(op, 0.1, g)
    if not batched:
        problem = bfd.InverseProblem(op, problem.y[0], noise_std=0.1)
    prior = std_normal_prior(bfd.VPSchedule.linear(), op.in_shape)
    for sampler in (DDNM(num_steps=5), DDNMPlus(num_steps=5)):
        res = sampler.sample(prior, problem, num_samples=3, generator=g)
        assert res.samples.shape == ((2, 3) if batched else (3,)) + op.in_shape
        assert res.samples.dtype == DT and torch.isfinite(res.samples).all()
        assert res.info["nfe"] == 5 and res.info["backprop"] is False


def test_flow_schedule():
    g = torch.Generator().manual_seed(6)
    op = ops.Mask(torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool), DT)
    problem = _problem(op, 0.0, g)
    sch = bfd.FlowSchedule()
    res = DDNM(num_steps=30, grid="uniform").sample(std_normal_prior(sch, (6,)), problem, 20000, g)
    s = op.pad_in(op.singular_values())
    M, V = ddnm_moments(sch, res.info["times"], s, op.pad_in(problem.y), 0.0, 0.85, False)
    z_mean, z_var = spectral_z(res.samples, op, M, V)
    assert z_mean < 4.0 and z_var < 4.0, (z_mean, z_var)


def test_errors():
    g = torch.Generator().manual_seed(0)
    pr = ops.PhaseRetrieval((1, 4, 4))
    y = pr(torch.randn(1, 4, 4, generator=g, dtype=DT))
    prior = std_normal_prior(bfd.VPSchedule.linear(), (1, 4, 4))
    for cls in (DDNM, DDNMPlus):
        with pytest.raises(ValueError, match="SVD"):
            cls().sample(prior, bfd.InverseProblem(pr, y, noise_std=0.1), 2)
    for kw in (
        {"eta": 1.5},
        {"travel_length": 0},
        {"travel_repeat": 0},
        {"travel_length": 100, "travel_repeat": 2},
        {"num_steps": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(kw))):
            DDNMPlus(**kw)

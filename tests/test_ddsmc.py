"""Tests of DDSMC against exact Gaussian posteriors of its own chain and of the prior.

DDSMC is asymptotically exact for the posterior of its *decoupled* chain
``p(x_T) prod p_eta(x_s | x_t) p(y | x_0)``. For a Gaussian prior the denoiser is affine,
and so is the probability-flow reconstruction (DDIM steps of an affine denoiser): the chain
is linear-Gaussian, and its law of ``x_0``, posterior and evidence are computed exactly
below (``decoupled_chain``). Monte Carlo standard errors come from independent copies of
each problem in the batch (``tests/test_tds.py``).
"""

from __future__ import annotations

import pytest
import torch
from test_tds import copy_stats, evidence_ratio_stats, gaussian_setup, weighted_moments

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.ddsmc import DDSMC, decoupled_coefficients

DT = torch.float64


def _denoiser(mu, S, schedule, t):
    """``x0_hat(x) = G x + c`` of the Gaussian prior ``N(mu, S)`` at time ``t``."""
    eye = torch.eye(mu.numel(), dtype=DT)
    a, sg = schedule.alpha(t), schedule.sigma(t)
    G = a * S @ torch.linalg.inv(a**2 * S + sg**2 * eye)
    return G, mu - a * G @ mu


def _reconstruction(sampler, mu, S, schedule, times, k):
    """The affine map ``(G, c)`` of :meth:`DDSMC._reconstruct` at ``times[k]``."""
    n = times.numel() - 1
    if sampler.reconstruction == "tweedie" or k >= n - 1:
        return _denoiser(mu, S, schedule, times[k])
    m = min(sampler.ode_steps, n - k)
    idx = torch.linspace(k, n, m + 1).round().long().tolist()
    d = mu.numel()
    M, c = torch.eye(d, dtype=DT), torch.zeros(d, dtype=DT)  # x_u = M x + c
    for j, (u, v) in enumerate(zip(idx[:-1], idx[1:])):
        G, g = _denoiser(mu, S, schedule, times[u])
        if j == m - 1:
            return G @ M, G @ c + g
        a_u, s_u = schedule.alpha(times[u]), schedule.sigma(times[u])
        a_v, s_v = schedule.alpha(times[v]), schedule.sigma(times[v])
        w0, wx = a_v - s_v * a_u / s_u, s_v / s_u
        M, c = (
            (w0 * G + wx * torch.eye(d, dtype=DT)) @ M,
            (w0 * G + wx * torch.eye(d, dtype=DT)) @ c + w0 * g,
        )
    raise AssertionError


def decoupled_chain(sampler, mu, S, schedule, times):
    """Exact law ``N(m, P)`` of ``x_0`` under DDSMC's chain for the prior ``N(mu, S)``."""
    d = mu.numel()
    eye = torch.eye(d, dtype=DT)
    m = torch.zeros(d, dtype=DT)
    P = schedule.sigma(times[0]) ** 2 * eye
    for k in range(times.numel() - 1):
        G, c = _reconstruction(sampler, mu, S, schedule, times, k)
        a, b, c2 = decoupled_coefficients(schedule, times[k], times[k + 1], sampler.eta)
        K = a * G + b * eye
        m = K @ m + a * c
        P = K @ P @ K.T + c2 * eye
    return bfd.GaussianMixture(torch.ones(1, dtype=DT), m[None], P[None])


def _check_chain(sampler, schedule, N, P=2, R=16, sigma_y=0.5, seed=1, z=4.5):
    gmm, mu, S, problem, g = gaussian_setup(sigma_y, schedule, P, R, seed=seed)
    res = sampler.sample(gmm.diffusion(schedule), problem, num_samples=N, generator=g)
    chain = decoupled_chain(sampler, mu, S, schedule, res.info.times)
    sub = bfd.InverseProblem(problem.operator, problem.y[::R], noise_std=sigma_y)
    exact = chain.posterior(sub)
    mean, cov = weighted_moments(res)
    m_hat, m_se = copy_stats(mean, P, R)
    c_hat, c_se = copy_stats(cov, P, R)
    r_hat, r_se = evidence_ratio_stats(res, chain.log_evidence(sub), P, R)
    assert ((m_hat - exact.mean()).abs() <= z * m_se).all()
    assert ((c_hat - exact.covariance()).abs() <= z * c_se + 1e-12).all()
    assert ((r_hat - 1).abs() <= z * r_se).all()
    return res, chain, gmm, sub, (m_hat, m_se)


@pytest.mark.parametrize(
    "schedule",
    [
        bfd.VPSchedule.linear(),
        pytest.param(bfd.FlowSchedule(), marks=pytest.mark.slow),
        pytest.param(bfd.VESchedule(), marks=pytest.mark.slow),
    ],
)
def test_ddpm_kernel_targets_its_chain_posterior_and_evidence(schedule):
    # eta = 1: the DDPM posterior kernel; a consistent chain, and nearly uniform weights
    res, *_ = _check_chain(DDSMC(num_steps=20, eta=1.0), schedule, N=300)
    assert res.info["nfe"] == res.info.times.numel() - 1
    assert float(res.info.min_ess.min()) > 0.25 * 300


@pytest.mark.parametrize(
    "reconstruction, eta",
    [("tweedie", 0.0), ("ode", 0.0), pytest.param("ode", 0.5, marks=pytest.mark.slow)],
)
def test_decoupled_kernels_target_their_chain(reconstruction, eta):
    # sigma_y = 3: weights stay healthy (the decoupled kernel's weights degenerate on
    # informative problems, docs/methods/ddsmc.md), so the copies' standard errors hold
    sampler = DDSMC(num_steps=12, eta=eta, reconstruction=reconstruction, ode_steps=4)
    res, *_ = _check_chain(sampler, bfd.VPSchedule.linear(), N=400, sigma_y=3.0)
    assert float(res.info.min_ess.min()) > 0.5 * 400
    # one call per reconstruction: at every time but the last; the ODE's at most 4 steps
    n = res.info.times.numel() - 1
    per = [1 if reconstruction == "tweedie" else min(4, n - k) for k in range(n)]
    assert res.info["nfe"] == sum(per)


def test_decoupled_chain_with_tweedie_is_underdispersed_at_any_step_count():
    # The eta = 0 kernel N(alpha_s x0_hat, sigma_s^2) forgets Var[x0 | x_t] at every step,
    # so its x_0 law stays too narrow however fine the grid; eta = 1 (DDPM) converges.
    sched = bfd.VPSchedule.linear()
    _, mu, S, _, _ = gaussian_setup(0.5, sched, 1, 1, seed=1)
    err = {}
    for eta in (0.0, 1.0):
        for n in (20, 1000):
            times = sched.time_grid(n, "uniform", dtype=DT)
            chain = decoupled_chain(DDSMC(num_steps=n, eta=eta), mu, S, sched, times)
            err[eta, n] = float((chain.covariance() - S).abs().max())
    assert err[1.0, 1000] < 0.02 and err[1.0, 1000] < err[1.0, 20] / 10
    assert err[0.0, 1000] > 0.8 and err[0.0, 1000] > 0.8 * err[0.0, 20]


def test_the_default_decoupled_chain_warns_of_its_bias_and_the_consistent_ones_do_not():
    import warnings

    gmm, _, _, problem, g = gaussian_setup(0.5, bfd.VPSchedule.linear(), 1, 1, seed=1)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    with pytest.warns(bfd.PosteriorQualityWarning, match="narrower than the model"):
        DDSMC(num_steps=4).sample(prior, problem, 8, generator=g)
    for sampler in (DDSMC(num_steps=4, eta=1.0), DDSMC(num_steps=4, reconstruction="ode")):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            sampler.sample(prior, problem, 8, generator=g)
        assert not [x for x in w if "narrower than the model" in str(x.message)]

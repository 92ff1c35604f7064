"""Tests of PnP-DM (split Gibbs with a diffusion prior) against the exact law of its chain.

For a Gaussian prior ``N(mu, S)`` every step of the sampler is linear-Gaussian: the
likelihood step is an exact Gaussian draw, and the prior step's ancestral steps apply the
affine denoiser. The law of ``x`` after ``K`` iterations is therefore Gaussian and computed
exactly below (``pnpdm_law``); the ``N`` samples are independent chains, so the standard
errors are those of independent draws.
"""

from __future__ import annotations

import math

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.kernels import ddim_coefficients
from bayesfilter_diff.samplers.pnpdm import PnPDM

DT = torch.float64


def _setup(sigma_y: float = 0.3):
    mu = torch.tensor([0.5, -1.0, 0.2], dtype=DT)
    S = torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.8]], dtype=DT)
    gmm = bfd.GaussianMixture(torch.ones(1, dtype=DT), mu[None], S[None])
    A = bfd.operators.Dense(torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]], dtype=DT))
    y = torch.tensor([[0.7, -0.4]], dtype=DT)
    return gmm, mu, S, bfd.InverseProblem(A, y, noise_std=sigma_y)


def pnpdm_law(sampler: PnPDM, mu, S, problem, schedule, times):
    """Exact ``N(m, P)`` of ``x`` after the sampler's ``K`` iterations from ``x = 0``."""
    d = mu.numel()
    eye = torch.eye(d, dtype=DT)
    M = problem.operator.M
    y = problem.y[0]
    s2 = problem.noise_std**2
    m, P = torch.zeros(d, dtype=DT), torch.zeros(d, d, dtype=DT)
    grid = torch.linspace(1.0, 0.0, sampler.prior_steps + 1, dtype=DT)  # fractions of t*
    for k in range(sampler.num_steps):
        rho2 = max(sampler.rho_0 * sampler.decay**k, sampler.rho_min) ** 2
        # likelihood step: z = C x / rho^2 + C A^T y / s2 + N(0, C), C = (A^T A / s2 + I / rho^2)^-1
        C = torch.linalg.inv(M.T @ M / s2 + eye / rho2)
        m = C @ m / rho2 + C @ M.T @ y / s2
        P = C @ P @ C.T / rho2**2 + C
        # prior step from t* at alpha z
        t = times[k]
        ts = t * grid
        a = schedule.alpha(t)
        m, P = a * m, a**2 * P
        for j in range(ts.numel() - 1):
            u, v = ts[j], ts[j + 1]
            au, su = schedule.alpha(u), schedule.sigma(u)
            G = au * S @ torch.linalg.inv(au**2 * S + su**2 * eye)  # x0_hat = G x + g
            g = mu - au * G @ mu
            if j == ts.numel() - 2:
                m, P = G @ m + g, G @ P @ G.T
                break
            coef = ddim_coefficients(schedule, u, v, 1.0)
            c_x = coef.c_eps / su
            c_0 = coef.alpha_s - c_x * coef.alpha_t
            K = c_x * eye + c_0 * G
            m, P = K @ m + c_0 * g, K @ P @ K.T + coef.std**2 * eye
    return m, P


@pytest.mark.parametrize(
    "sampler",
    [
        PnPDM(num_steps=8, rho_0=2.0, decay=0.7, rho_min=0.4, prior_steps=40),
        pytest.param(PnPDM(num_steps=30, prior_steps=100), marks=pytest.mark.slow),
    ],
)
def test_samples_follow_the_chains_exact_law(sampler):
    gmm, mu, S, problem = _setup()
    sched = bfd.VPSchedule.linear()
    N = 4000
    res = sampler.sample(
        gmm.diffusion(sched), problem, N, generator=torch.Generator().manual_seed(0)
    )
    m, P = pnpdm_law(sampler, mu, S, problem, sched, res.info.times)
    x = res.samples[0]  # (N, d): one problem
    se_m = torch.sqrt(torch.diagonal(P) / N)
    assert ((x.mean(0) - m).abs() <= 4.5 * se_m).all()
    # the sample covariance's standard error for Gaussian draws: sqrt((P_ii P_jj + P_ij^2) / N)
    se_c = torch.sqrt((torch.outer(torch.diagonal(P), torch.diagonal(P)) + P**2) / N)
    assert ((torch.cov(x.T) - P).abs() <= 4.5 * se_c).all()
    # network calls: one per ancestral step of every prior step
    assert res.info["nfe"] == sampler.num_steps * sampler.prior_steps


def test_small_coupling_approaches_the_posterior_large_coupling_does_not():
    # the fixed-rho stationary law is p(x) N(y; A x, s2 I + rho^2 A A^T): far from the
    # posterior at rho = 1; annealed to rho = 0.03 with fine prior steps it is close (the
    # remaining error is the prior step's discretisation: 0.064 / 0.021 / 0.0077 in the
    # covariance for 5 / 20 / 80 steps at rho_min = 0.1). Computed exactly (pnpdm_law).
    gmm, mu, S, problem = _setup()
    sched = bfd.VPSchedule.linear()
    post = gmm.posterior(problem)
    err = {}
    for name, sampler in (
        ("fixed 1", PnPDM(num_steps=60, rho_0=1.0, decay=1.0, rho_min=1.0)),
        ("annealed", PnPDM(num_steps=300, rho_min=0.03, prior_steps=80)),
    ):
        times = sampler.time_grid(gmm.diffusion(sched), problem)
        m, P = pnpdm_law(sampler, mu, S, problem, sched, times)
        err[name] = max(
            float((P - post.covariance()[0]).abs().max()), float((m - post.mean()[0]).abs().max())
        )
    assert err["annealed"] < 0.02 and err["fixed 1"] > 0.3


def test_errors():
    with pytest.raises(ValueError, match="rho_min"):
        PnPDM(rho_min=0.0)
    with pytest.raises(ValueError, match="decay"):
        PnPDM(decay=1.5)
    with pytest.raises(ValueError, match="prior_steps"):
        PnPDM(prior_steps=0)
    gmm, _, _, _ = _setup()
    noiseless = bfd.InverseProblem(
        bfd.operators.Dense(torch.eye(3, dtype=DT)), torch.zeros(3, dtype=DT), noise_std=0.0
    )
    with pytest.raises(ValueError, match="PnPDM needs"):
        PnPDM(num_steps=2).sample(gmm.diffusion(bfd.VPSchedule.linear()), noiseless, 4)


def test_math_is_finite_on_flow_and_ve_paths():
    gmm, _, _, problem = _setup()
    for sched in (bfd.FlowSchedule(), bfd.VESchedule()):
        res = PnPDM(num_steps=5, prior_steps=20).sample(gmm.diffusion(sched), problem, 16)
        assert torch.isfinite(res.samples).all() and math.isfinite(float(res.samples.sum()))

"""Tests of classifier and classifier-free guidance against exact Gaussian-mixture answers.

With a mixture prior ``sum_k w_k N(mu_k, S_k)``, the exact noisy classifier is the
component responsibility ``p_t(c = k | x_t)``, and guidance with scale 1 must reproduce the
exact diffusion of component ``k`` alone: ``E[x0 | x_t, c = k]``.
"""

from __future__ import annotations

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.priors.guidance import ClassifierFreeGuidance, ClassifierGuidance
from bayesfilter_diff.samplers.base import ddim_coefficients
from bayesfilter_diff.samplers.dps import DPS
from bayesfilter_diff.samplers.tds import TDS

DT = torch.float64
SCHEDULES = [bfd.VPSchedule.linear(), bfd.VPSchedule.cosine(), bfd.VESchedule(), bfd.FlowSchedule()]


def mixture(seed=0, K=3, d=2):
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=DT)[:K]
    mu = 3 * torch.randn(K, d, generator=g, dtype=DT)
    L = torch.randn(K, d, d, generator=g, dtype=DT)
    C = L @ L.transpose(-1, -2) + 0.3 * torch.eye(d, dtype=DT)
    return bfd.GaussianMixture(w / w.sum(), mu, C), mu, C


def exact_classifier(gmm, schedule, k):
    """``log p_t(c = k | x_t)`` per row from the mixture's joint log-densities."""

    def log_prob(x, t):
        lj, _, _ = gmm._noisy(x, schedule.alpha(t), schedule.sigma(t))
        return torch.log_softmax(lj, dim=-1)[..., k]

    return log_prob


def component(mu, C, k, schedule):
    return bfd.GaussianMixture(torch.ones(1, dtype=DT), mu[k : k + 1], C[k : k + 1]).diffusion(
        schedule
    )


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{s.kind}-{getattr(s, 'name', '')}")
def test_classifier_guidance_is_the_exact_component(schedule):
    gmm, mu, C = mixture()
    prior = gmm.diffusion(schedule)
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(4, 5, 2, generator=g, dtype=DT)
    times = [0.999, 0.9, 0.5, 0.1, 0.01, 0.0]  # t = 1 is excluded for flows (see below)
    for k in range(3):
        guided = ClassifierGuidance(prior, exact_classifier(gmm, schedule, k), scale=1.0)
        assert isinstance(guided, bfd.DiffusionModel) and guided.schedule == schedule
        ref = component(mu, C, k, schedule)
        for t in times:
            torch.testing.assert_close(guided.denoise(x, t), ref.denoise(x, t), rtol=0, atol=1e-10)
        # Per-particle times broadcast as for any DiffusionModel.
        tt = torch.linspace(0.05, 0.95, 5, dtype=DT).expand(4, 5)
        torch.testing.assert_close(guided.denoise(x, tt), ref.denoise(x, tt), rtol=0, atol=1e-10)
        # eps and score follow from the denoiser.
        torch.testing.assert_close(guided.eps(x, 0.3), ref.eps(x, 0.3), rtol=0, atol=1e-10)


def test_guidance_scale_is_linear_and_flow_endpoint_is_finite():
    gmm, _, _ = mixture()
    sched = bfd.FlowSchedule()
    prior = gmm.diffusion(sched)
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    lp = exact_classifier(gmm, sched, 1)
    base = prior.denoise(x, 0.4)
    one = ClassifierGuidance(prior, lp, 1.0).denoise(x, 0.4)
    three = ClassifierGuidance(prior, lp, 3.0).denoise(x, 0.4)
    torch.testing.assert_close(three - base, 3 * (one - base), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ClassifierGuidance(prior, lp, 0.0).denoise(x, 0.4), base)
    # alpha(1) = 0: the shift is 0/0 and taken as 0 (finite, the unguided denoiser).
    end = ClassifierGuidance(prior, lp, 1.0).denoise(x, 1.0)
    torch.testing.assert_close(end, prior.denoise(x, 1.0))


def test_classifier_free_guidance():
    gmm, mu, C = mixture()
    sched = bfd.VPSchedule.linear()
    uncond, cond = gmm.diffusion(sched), component(mu, C, 2, sched)
    x = 2 * torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    for t in (0.9, 0.3, 0.02):
        torch.testing.assert_close(
            ClassifierFreeGuidance(cond, uncond, 1.0).denoise(x, t), cond.denoise(x, t)
        )
        torch.testing.assert_close(
            ClassifierFreeGuidance(cond, uncond, 0.0).denoise(x, t), uncond.denoise(x, t)
        )
        # Ho & Salimans' rule in eps form, here with w = 2.5 (their w' = 1.5).
        cfg = ClassifierFreeGuidance(cond, uncond, 2.5)
        e_u, e_c = uncond.eps(x, t), cond.eps(x, t)
        torch.testing.assert_close(cfg.eps(x, t), e_u + 2.5 * (e_c - e_u), rtol=1e-10, atol=1e-10)


def test_cfg_on_images():
    sched = bfd.VPSchedule.cosine()
    shape = (2, 3, 3)

    def model(mean):
        def den(x, t):
            tt = t.reshape(t.shape + (1,) * (x.dim() - 1))
            a, s = sched.alpha(tt), sched.sigma(tt)
            return mean + a * (x - a * mean) / (a**2 + s**2)

        return bfd.DiffusionModel(den, sched, shape)

    cfg = ClassifierFreeGuidance(model(1.0), model(0.0), 3.0)
    x = torch.randn((4, 5) + shape, generator=torch.Generator().manual_seed(4))
    out = cfg.denoise(x, 0.5)
    assert out.shape == x.shape
    s = sched.sigma(torch.tensor(0.5))
    # x0_w = x0_u + 3 (x0_c - x0_u) with x0_c - x0_u = 1 - a^2 / (a^2 + s^2) = s^2.
    torch.testing.assert_close(out - model(0.0).denoise(x, 0.5), 3 * (s**2).expand_as(out))


def chain_moments(mu, S, schedule, times):
    """Exact mean and covariance of the ancestral chain's output for a Gaussian prior."""
    d = mu.numel()
    eye = torch.eye(d, dtype=DT)
    m, P = torch.zeros(d, dtype=DT), schedule.sigma(times[0]) ** 2 * eye
    for i in range(times.numel() - 1):
        t, s = times[i], times[i + 1]
        a, sg = schedule.alpha(t), schedule.sigma(t)
        G = a * S @ torch.linalg.inv(a**2 * S + sg**2 * eye)
        a_s, c_eps, std, a_t = ddim_coefficients(schedule, t, s, 1.0)
        c1, c2 = a_s - c_eps * a_t / sg, c_eps / sg
        K = c1 * G + c2 * eye
        m, P = K @ m + c1 * (mu - a * G @ mu), K @ P @ K.T + std**2 * eye
    return m, P


def test_guided_prior_with_samplers():
    gmm, mu, C = mixture()
    sched = bfd.VPSchedule.linear()
    k = 0
    guided = ClassifierGuidance(gmm.diffusion(sched), exact_classifier(gmm, sched, k), 1.0)
    ref = component(mu, C, k, sched)
    g = torch.Generator().manual_seed(5)
    # Unconditional draws (DDIM ancestral) from the guided model: the law of the chain of
    # component k, computed exactly; the mean within 4 standard errors.
    N, n = 4000, 50
    A0 = bfd.operators.Dense(torch.zeros(1, 2, dtype=DT))
    dummy = bfd.InverseProblem(A0, torch.zeros(1, dtype=DT), noise_std=1.0)
    x = bfd.samplers.DDIM(num_steps=n).sample(guided, dummy, N, generator=g).samples
    m, P = chain_moments(mu[k], C[k], sched, sched.time_grid(n, dtype=DT))
    se = (torch.diagonal(P) / N).sqrt()
    assert ((x.mean(0) - m).abs() <= 4 * se).all()
    cov_se = (torch.diagonal(P)[:, None] * torch.diagonal(P)[None, :] * 2 / N).sqrt()
    assert ((torch.cov(x.T) - P).abs() <= 4 * cov_se).all()
    # Samplers that differentiate through the denoiser (second order through the
    # classifier's gradient): same results as with component k's exact model.
    A = bfd.operators.Dense(torch.tensor([[1.0, 0.5]], dtype=DT))
    problem = bfd.InverseProblem(A, torch.tensor([[0.3], [-1.0]], dtype=DT), noise_std=0.5)
    for sampler in (TDS(num_steps=20, twist_variance="inflated"), DPS(num_steps=20, scale=0.3)):
        a = sampler.sample(guided, problem, 16, torch.Generator().manual_seed(6))
        b = sampler.sample(ref, problem, 16, torch.Generator().manual_seed(6))
        torch.testing.assert_close(a.samples, b.samples, rtol=1e-7, atol=1e-9)
        if a.log_evidence is not None:
            torch.testing.assert_close(a.log_evidence, b.log_evidence, rtol=1e-7, atol=1e-9)


def test_errors():
    gmm, _, _ = mixture()
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    with pytest.raises(TypeError, match="prior"):
        ClassifierGuidance(gmm, lambda x, t: x.sum(-1))
    with pytest.raises(TypeError, match="log_prob_fn"):
        ClassifierGuidance(prior, 3.0)
    with pytest.raises(ValueError, match="scale"):
        ClassifierGuidance(prior, lambda x, t: x.sum(-1), float("nan"))
    bad = ClassifierGuidance(prior, lambda x, t: x, 1.0)  # one value per entry, not per row
    with pytest.raises(ValueError, match="one log-probability per row"):
        bad.denoise(torch.zeros(3, 2, dtype=DT), 0.5)
    other = gmm.diffusion(bfd.VPSchedule.cosine())
    with pytest.raises(ValueError, match="schedule"):
        ClassifierFreeGuidance(prior, other, 2.0)
    with pytest.raises(TypeError, match="uncond"):
        ClassifierFreeGuidance(prior, gmm, 2.0)
    with pytest.raises(TypeError, match="weight"):
        ClassifierFreeGuidance(prior, prior, "2")

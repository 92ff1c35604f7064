"""DAPS: annealing grid, Langevin stationary spread, data fit as sigma_y -> 0, shapes, errors.

The measured posterior-mean error is in docs/methods/daps.md.
"""

import math

import pytest
import torch
from _helpers import DT, _gmm, _image_prior

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.daps import DAPS, poly_sigmas, time_of_ve_sigma


@pytest.mark.parametrize(
    "sched", [bfd.VPSchedule.linear(), bfd.FlowSchedule(), bfd.VPSchedule.cosine()]
)
def test_annealing_grid_is_the_codes_poly7_grid(sched):
    prior = _gmm(2).diffusion(sched)
    problem = bfd.InverseProblem(
        bfd.operators.Identity(2, dtype=DT), torch.zeros(2, dtype=DT), noise_std=0.1
    )
    t = DAPS().time_grid(prior, problem)
    assert t.shape == (201,) and float(t[-1]) == 0.0 and torch.all(t[1:] < t[:-1])
    s = sched.sigma(t[:-1]) / sched.alpha(t[:-1])
    want = poly_sigmas(100.0, 0.1, 200)[:-1]
    torch.testing.assert_close(s, want, rtol=1e-9, atol=0)
    # The official EDMScheduler values: 100, 97.8, ..., 0.112, 0.106.
    assert abs(float(s[1]) - 97.825) < 1e-3 and abs(float(s[-1]) - 0.10604) < 1e-5
    # bisection inverse
    tt = time_of_ve_sigma(sched, torch.tensor([0.5, 3.0], dtype=DT))
    torch.testing.assert_close(
        sched.sigma(tt) / sched.alpha(tt), torch.tensor([0.5, 3.0], dtype=DT)
    )


def test_small_noise_fits_the_data_with_the_langevin_spread():
    # Mask (A A^T = I), tau = sigma_y = 1e-3, constant step h = 0.5 tau^2. On the observed
    # entries the Langevin target is Gaussian with precision P = 1/tau^2 + 1/r^2, whose ULA
    # chain is stationary with variance 2 / (P (2 - h P)); from x0_hat it contracts by
    # (1 - h P)^30 ~ 1e-9, and the pull of x0_hat shifts the mean by ~ tau^2 / r^2 relative.
    g = torch.Generator().manual_seed(0)
    d = 6
    gmm = _gmm(d)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Mask(torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.bool), dtype=DT)
    sy = 1e-3
    y = A(gmm.sample(2, g)) + sy * torch.randn(2, 3, generator=g, dtype=DT)
    h = 0.5 * sy**2
    s = DAPS(num_steps=10, ode_steps=2, langevin_steps=30, lr=h, lr_min_ratio=1.0)
    res = s.sample(prior, bfd.InverseProblem(A, y, noise_std=sy), 400, generator=g)
    r = A(res.samples) - y[:, None]
    r_last = float(s.time_grid(prior, bfd.InverseProblem(A, y, noise_std=sy))[-2])
    r2 = (
        float(
            prior.schedule.sigma(torch.tensor(r_last, dtype=DT))
            / prior.schedule.alpha(torch.tensor(r_last, dtype=DT))
        )
        ** 2
    )
    P = 1 / sy**2 + 1 / r2
    var_theory = 2 / (P * (2 - h * P))
    ratio = float(r.pow(2).mean()) / var_theory
    n = r.numel()
    print(
        f"DAPS sigma_y=1e-3: rms |A x - y| = {float(r.pow(2).mean().sqrt()):.3e}, "
        f"var / ULA theory = {ratio:.3f}"
    )
    assert float(r.pow(2).mean().sqrt()) < 2 * sy
    assert abs(ratio - 1) < 4 * math.sqrt(2 / n)
    assert res.info["nfe"] == 10 * 2


def test_code_convention_is_paper_convention_with_tau_over_sqrt2():
    g = torch.Generator().manual_seed(1)
    d = 4
    prior = _gmm(d).diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Dense(torch.randn(2, d, generator=g, dtype=DT))
    problem = bfd.InverseProblem(A, torch.randn(2, generator=g, dtype=DT), noise_std=0.3)
    kw = dict(num_steps=5, ode_steps=2, langevin_steps=5, lr=1e-3)
    a = DAPS(**kw).sample(prior, problem, 10, generator=torch.Generator().manual_seed(3))
    b = DAPS(tau=0.3 * math.sqrt(2), tau_convention="code", **kw).sample(
        prior, problem, 10, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batched", [False, True])
def test_shapes_images_and_vectors(batched):
    g = torch.Generator().manual_seed(3)
    shape = (2, 3, 3)
    gmm = _gmm(18)
    sched = bfd.VPSchedule.linear()
    prior = _image_prior(gmm, sched, shape)
    A = bfd.operators.Downsample(shape, 3, dtype=DT)
    x = gmm.sample(2, g).reshape((2,) + shape)
    y = A(x) if batched else A(x[0])
    s = DAPS(num_steps=4, ode_steps=2, langevin_steps=3, lr=1e-3)
    res = s.sample(prior, bfd.InverseProblem(A, y, noise_std=0.1), 5, generator=g)
    assert res.samples.shape == ((2, 5) if batched else (5,)) + shape
    assert torch.isfinite(res.samples).all()
    # vectors, flow schedule
    vprior = _gmm(5).diffusion(bfd.FlowSchedule())
    Av = bfd.operators.Dense(torch.randn(2, 5, generator=g, dtype=DT))
    yv = torch.zeros((3, 2) if batched else (2,), dtype=DT)
    res = s.sample(vprior, bfd.InverseProblem(Av, yv, noise_std=0.1), 4, generator=g)
    assert res.samples.shape == ((3, 4, 5) if batched else (4, 5))
    assert torch.isfinite(res.samples).all()


def test_nonlinear_operator_and_explicit_tau():
    g = torch.Generator().manual_seed(4)
    shape = (1, 3, 3)
    prior = _image_prior(_gmm(9), bfd.VPSchedule.linear(), shape)
    A = bfd.operators.PhaseRetrieval(shape)
    y = A(torch.randn(shape, generator=g, dtype=DT))
    s = DAPS(num_steps=4, ode_steps=2, langevin_steps=3, lr=1e-4, tau=0.05)
    res = s.sample(prior, bfd.InverseProblem(A, y, noise_std=0.0), 3, generator=g)
    assert res.samples.shape == (3,) + shape
    assert torch.isfinite(res.samples).all()


def test_errors():
    prior = _gmm(4).diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Identity(4, dtype=DT)
    pois = bfd.InverseProblem(A, torch.ones(4, dtype=DT), noise="poisson")
    with pytest.raises(ValueError, match="DAPS needs a gaussian observation model"):
        DAPS(num_steps=2).sample(prior, pois, 2)
    clean = bfd.InverseProblem(A, torch.ones(4, dtype=DT), noise_std=0.0)
    with pytest.raises(ValueError, match="tau"):
        DAPS(num_steps=2).sample(prior, clean, 2)
    ve = _gmm(4).diffusion(bfd.VESchedule(sigma_min=0.05))
    with pytest.raises(ValueError, match="ode_sigma_min"):
        DAPS(num_steps=2).sample(
            ve, bfd.InverseProblem(A, torch.ones(4, dtype=DT), noise_std=0.1), 2
        )
    with pytest.raises(ValueError, match="sigma_min"):
        DAPS(sigma_min=200.0)
    with pytest.raises(ValueError, match="tau_convention"):
        DAPS(tau_convention="half")
    with pytest.raises(ValueError, match="ode_steps"):
        DAPS(ode_steps=0)


def test_a_diverged_run_names_the_langevin_stability_bound():
    # README's mixture at sigma_y = 1e-3: lr = 1e-4 is ~500x the bound 2 / (||A||^2 / tau^2
    # + 1 / sigma_min^2) ~ 2e-7 and every draw is NaN; the error says so, and a step below
    # the bound runs
    d = 8
    g = torch.Generator().manual_seed(0)
    mix = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7]),
        torch.stack([-2 * torch.ones(d), 2 * torch.ones(d)]),
        torch.ones(2),
    )
    prior = mix.diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Dense(torch.randn(2, d, generator=g))
    problem = bfd.InverseProblem(A, A(mix.sample(1, g)[0]), noise_std=1e-3)
    small = dict(num_steps=5, ode_steps=2, langevin_steps=20)
    with pytest.raises(bfd.NonFiniteSamplesError, match=r"stability bound .* = 2\.\d+e-07"):
        DAPS(**small).sample(prior, problem, 16, generator=g)
    res = DAPS(lr=1e-7, **small).sample(prior, problem, 16, generator=g)
    assert torch.isfinite(res.samples).all()

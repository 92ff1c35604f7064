"""SMCDiff: replacement particle filter for masks.

SMCDiff is not exact on a finite grid (see ``docs/methods/smcdiff.md``): on a Gaussian
prior the tests *report* its error against the exact posterior (run with ``-s`` to see it)
and check only what the method guarantees: the observed entries are kept, the output is
finite and shaped right, and the error is of the size the discretisation explains.
"""

import math

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.smcdiff import SMCDiff

D64 = torch.float64


def _gaussian_mask_setup(sy, R):
    g = torch.Generator().manual_seed(0)
    d = 4
    Lm = torch.randn(d, d, generator=g, dtype=D64) * 0.7
    C = Lm @ Lm.T + 0.3 * torch.eye(d, dtype=D64)
    mu = torch.randn(d, generator=g, dtype=D64)
    gmm = bfd.GaussianMixture(torch.ones(1, dtype=D64), mu[None], C[None])
    op = bfd.operators.Mask(torch.tensor([True, False, True, False]), dtype=D64)
    y = op(gmm.sample(1, g))[0] + sy * torch.randn(2, generator=g, dtype=D64)
    problem = bfd.InverseProblem(op, y.expand(R, 2).clone(), noise_std=sy)  # R replicates
    return gmm, gmm.diffusion(bfd.VPSchedule.linear()), op, y, problem


def _report(res, exact, label):
    """Pooled mean (and its SE), within-run and pooled variances vs the exact posterior."""
    W, xs = res.weights(), res.samples
    R = xs.shape[0]
    m = (W[..., None] * xs).sum(1)
    dx = xs - m[:, None]
    within = torch.einsum("bn,bni,bnj->bij", W, dx, dx).mean(0).diagonal()
    pooled = within + m.var(0)
    em, ev = exact.mean()[0], exact.covariance()[0].diagonal()
    se = m.std(0) / math.sqrt(R)
    free = ev > 1e-12
    print(
        f"\n[{label}] tau={float(res.info['tau']):.3f} final ESS {res.ess().mean():.0f}\n"
        f"  mean err {(m.mean(0) - em).numpy().round(3)} (+- {se.numpy().round(3)}), "
        f"err / posterior sd {((m.mean(0) - em)[free] / ev[free].sqrt()).numpy().round(3)}\n"
        f"  var ratio within-run {(within[free] / ev[free]).numpy().round(3)}, "
        f"pooled over runs {(pooled[free] / ev[free]).numpy().round(3)}"
    )
    return m.mean(0) - em, within / ev.clamp_min(1e-12), free, ev


@pytest.mark.parametrize("steps", [50, 200])
def test_gaussian_prior_noiseless_keeps_observations_and_reports_error(steps):
    R, N = 16, 250
    gmm, prior, op, y, problem = _gaussian_mask_setup(0.0, R)
    exact = gmm.posterior(problem)
    res = SMCDiff(num_steps=steps).sample(prior, problem, N, torch.Generator().manual_seed(1))
    assert res.samples.shape == (R, N, 4)
    assert torch.equal(op(res.samples), y.expand(R, N, 2))  # observed entries replaced by y
    path = res.info["observation_path"]
    assert path.shape == (steps + 1, R, 2) and torch.equal(path[-1], y.expand(R, 2))
    assert not torch.equal(path[0, 0], path[0, 1])  # independent paths per problem
    err, ratio, free, ev = _report(res, exact, f"noiseless, {steps} steps")
    # error of the size explained by the discretisation (the prior DDPM chain alone loses
    # ~14% of the variance at 50 steps, ~4% at 200 on this grid)
    assert (err[free].abs() < 0.25 * ev[free].sqrt()).all()
    assert ((ratio[free] > 0.6) & (ratio[free] < 1.05)).all()


def test_gaussian_prior_noisy_mask_runs_and_reports_error():
    R, N = 16, 250
    gmm, prior, op, y, problem = _gaussian_mask_setup(0.5, R)
    exact = gmm.posterior(problem)
    res = SMCDiff(num_steps=50).sample(prior, problem, N, torch.Generator().manual_seed(2))
    assert 0 < float(res.info["tau"]) < 1
    assert torch.isfinite(res.samples).all()
    assert not torch.equal(op(res.samples), y.expand(R, N, 2))  # free below tau
    err, ratio, free, ev = _report(res, exact, "noisy (sigma_y = 0.5), 50 steps")
    assert (err.abs() < 0.5 * ev.sqrt()).all()


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("shape", [(6,), (2, 4, 4)])
@pytest.mark.parametrize("noise_std", [0.0, 0.1])
def test_shapes(shape, batched, noise_std):
    g = torch.Generator().manual_seed(0)
    op = bfd.operators.Mask.random(shape, 0.4, generator=g)
    sched = bfd.VPSchedule.linear()

    def denoiser(x, t):  # exact E[x0 | x_t] for x0 ~ N(0, I)
        a = sched.alpha(t).reshape((-1,) + (1,) * (x.dim() - 1))
        s = sched.sigma(t).reshape(a.shape)
        return a * x / (a**2 + s**2)

    prior = bfd.DiffusionModel(denoiser, sched, shape)
    y = op(torch.randn((3,) + shape, generator=g))
    problem = bfd.InverseProblem(op, y if batched else y[0], noise_std=noise_std)
    res = SMCDiff(num_steps=6).sample(prior, problem, 7, g)
    lead = (3, 7) if batched else (7,)
    assert res.samples.shape == lead + shape and res.log_weights.shape == lead
    assert torch.isfinite(res.samples).all()
    if noise_std == 0:
        yy = (y if batched else y[0]).unsqueeze(-2)
        assert torch.equal(op(res.samples), yy.expand(op(res.samples).shape))
    r2 = SMCDiff(num_steps=6).sample(prior, problem, 7, torch.Generator().manual_seed(0))
    r3 = SMCDiff(num_steps=6).sample(prior, problem, 7, torch.Generator().manual_seed(0))
    assert torch.equal(r2.samples, r3.samples)


def test_clear_errors():
    g = torch.Generator().manual_seed(0)
    gmm, prior, op, y, _ = _gaussian_mask_setup(0.0, 1)
    dense = bfd.operators.Dense(torch.randn(2, 4, generator=g, dtype=D64))
    with pytest.raises(ValueError, match="Mask"):
        SMCDiff(num_steps=3).sample(prior, bfd.InverseProblem(dense, y, noise_std=0.1), 4, g)
    for other in (bfd.operators.Downsample((1, 4, 4), 2), bfd.operators.PhaseRetrieval((1, 4, 4))):
        x = torch.randn(1, 4, 4, generator=g)
        p = bfd.InverseProblem(other, other(x), noise_std=0.1)
        pr = bfd.DiffusionModel(lambda x, t: x, bfd.VPSchedule.linear(), (1, 4, 4))
        with pytest.raises(ValueError, match="Mask"):
            SMCDiff(num_steps=3).sample(pr, p, 4, g)
    yp = torch.poisson(torch.full((2,), 3.0, dtype=D64), generator=g)
    with pytest.raises(ValueError, match="poisson"):
        SMCDiff(num_steps=3).sample(prior, bfd.InverseProblem(op, yp, noise="poisson"), 4, g)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="eta"):
            SMCDiff(eta=bad)
    assert SMCDiff().resampling == "residual"


def test_every_run_warns_that_its_error_omits_the_shared_observation_path():
    # each run follows one noised observation path: runs differ by more than their own
    # genealogy shows (docs/methods/smcdiff.md), so every run of N >= 10 says so
    _, prior, _, _, problem = _gaussian_mask_setup(0.1, 2)
    with pytest.warns(bfd.PosteriorQualityWarning, match="one random noised path"):
        res = SMCDiff(num_steps=20).sample(prior, problem, 64, torch.Generator().manual_seed(0))
    assert "shared_draw" in [q.kind for q in res.info.quality]
    assert SMCDiff.shared_draw and bfd.samplers.FPSSMC.shared_draw  # FPS-SMC: its y-sequence
    assert not bfd.samplers.TDS.shared_draw and not bfd.samplers.MCGdiff.shared_draw

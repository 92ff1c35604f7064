"""D-Flow: data fit at lambda = 0, regulariser sign, per-sample independence, NFEs, shapes.

The measured posterior-mean error is in docs/methods/dflow.md.
"""

import math

import pytest
import torch
from _helpers import DT, _gmm, _image_prior

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.dflow import DFlow


def _problem(d=6, m=3, B=2, sy=0.0, seed=0, sched=None):
    g = torch.Generator().manual_seed(seed)
    gmm = _gmm(d)
    prior = gmm.diffusion(sched or bfd.FlowSchedule())
    A = bfd.operators.Dense(torch.randn(m, d, generator=g, dtype=DT))
    y = A(gmm.sample(B, g)) + sy * torch.randn(B, m, generator=g, dtype=DT)
    return gmm, prior, A, y


@pytest.mark.parametrize("sched", [bfd.FlowSchedule(), bfd.VPSchedule.linear()])
def test_lambda_zero_fits_the_data(sched):
    # lambda = 0: L(z) = ||A Phi(z) - y||^2 with m < d has (many) zeros; L-BFGS finds one.
    _, prior, A, y = _problem(sched=sched)
    s = DFlow(max_iters=2, lbfgs_iters=15, lam=0.0, history_size=10)
    res = s.sample(prior, bfd.InverseProblem(A, y), 8, generator=torch.Generator().manual_seed(1))
    f0, f1 = res.info["loss_start"][0], res.info["loss"][-1]
    resid = (A(res.samples) - y[:, None]).pow(2).sum(-1)
    torch.testing.assert_close(resid, f1)  # the returned sample is Phi at the final z
    print(
        f"D-Flow lambda=0 ({sched.kind}): median loss {float(f0.median()):.3g} -> "
        f"{float(f1.median()):.3g}, max {float(f1.max()):.3g}"
    )
    assert float(f1.max()) < 1e-6 * float(f0.min())


def test_regulariser_sign_keeps_z_on_the_typical_sphere():
    # R(z) = ||z||^2/2 - (d-1) log ||z|| is minimised at ||z|| = sqrt(d-1); with a dominant
    # lambda the optimum is there (the flipped sign would send ||z|| to 0 or infinity).
    d = 6
    _, prior, A, y = _problem(d=d)
    s = DFlow(max_iters=1, lbfgs_iters=25, lam=1e6, history_size=10, init_blend=0.0)
    res = s.sample(prior, bfd.InverseProblem(A, y), 8, generator=torch.Generator().manual_seed(2))
    zn = res.info["z_norm"][-1]
    print(
        f"D-Flow lambda=1e6: ||z|| in [{float(zn.min()):.5f}, {float(zn.max()):.5f}], "
        f"sqrt(d-1) = {math.sqrt(d - 1):.5f}"
    )
    torch.testing.assert_close(zn, torch.full_like(zn, math.sqrt(d - 1)), rtol=5e-3, atol=0)


def test_samples_are_independent_optimisations():
    # init_blend = 1 makes the run deterministic given y: problem 0 must give the same
    # result alone as next to another problem (no coupling through the line search).
    _, prior, A, y = _problem(B=2)
    s = DFlow(max_iters=1, lbfgs_iters=8, lam=1e-3, history_size=5, init_blend=1.0)
    both = s.sample(prior, bfd.InverseProblem(A, y), 2, generator=torch.Generator().manual_seed(3))
    alone = s.sample(
        prior, bfd.InverseProblem(A, y[:1]), 2, generator=torch.Generator().manual_seed(4)
    )
    torch.testing.assert_close(both.samples[:1], alone.samples, rtol=1e-9, atol=1e-9)


def test_nfe_and_backprop_reported():
    _, prior, A, y = _problem()
    for solver, per in (("midpoint", 2), ("euler", 1)):
        s = DFlow(max_iters=2, lbfgs_iters=3, ode_steps=4, solver=solver, history_size=5)
        res = s.sample(
            prior,
            bfd.InverseProblem(A, y, noise_std=0.1),
            4,
            generator=torch.Generator().manual_seed(5),
        )
        assert res.info["backprop"] is True
        # inversion (ode_steps Euler NFEs) + every objective evaluation (ode_steps * per):
        # one at the start, then those of each move
        evaluations = 1 + int(res.info["evaluations"].sum())
        assert res.info["nfe"] == 4 + evaluations * 4 * per
        assert res.info["evaluations"].shape == (2,) and res.info["loss"].shape == (2, 2, 4)
        assert res.info["num_steps"] == 2


@pytest.mark.parametrize("batched", [False, True])
def test_shapes_images_and_vectors(batched):
    g = torch.Generator().manual_seed(7)
    shape = (2, 3, 3)
    gmm = _gmm(18)
    prior = _image_prior(gmm, bfd.FlowSchedule(), shape)
    A = bfd.operators.Downsample(shape, 3, dtype=DT)
    x = gmm.sample(2, g).reshape((2,) + shape)
    y = A(x) if batched else A(x[0])
    s = DFlow(max_iters=1, lbfgs_iters=2, ode_steps=2, history_size=3)
    res = s.sample(prior, bfd.InverseProblem(A, y, noise_std=0.1), 3, generator=g)
    assert res.samples.shape == ((2, 3) if batched else (3,)) + shape
    assert torch.isfinite(res.samples).all()
    # vectors, VP schedule, Euler
    vprior = _gmm(5).diffusion(bfd.VPSchedule.linear())
    Av = bfd.operators.Dense(torch.randn(2, 5, generator=g, dtype=DT))
    yv = torch.zeros((3, 2) if batched else (2,), dtype=DT)
    s = DFlow(max_iters=1, lbfgs_iters=2, ode_steps=2, solver="euler", history_size=3)
    res = s.sample(vprior, bfd.InverseProblem(Av, yv, noise_std=0.1), 4, generator=g)
    assert res.samples.shape == ((3, 4, 5) if batched else (4, 5))
    assert torch.isfinite(res.samples).all()


def test_nonlinear_operator_starts_from_noise():
    g = torch.Generator().manual_seed(8)
    shape = (1, 3, 3)
    prior = _image_prior(_gmm(9), bfd.FlowSchedule(), shape)
    A = bfd.operators.PhaseRetrieval(shape)
    y = A(torch.randn(shape, generator=g, dtype=DT))
    s = DFlow(max_iters=1, lbfgs_iters=3, ode_steps=2, history_size=3)
    res = s.sample(prior, bfd.InverseProblem(A, y, noise_std=0.05), 3, generator=g)
    assert res.samples.shape == (3,) + shape
    assert torch.isfinite(res.samples).all()
    assert float(res.info["loss"][-1].max()) <= float(res.info["loss_start"][0].max())


def test_errors():
    prior = _gmm(4).diffusion(bfd.FlowSchedule())
    A = bfd.operators.Identity(4, dtype=DT)
    pois = bfd.InverseProblem(A, torch.ones(4, dtype=DT), noise="poisson")
    with pytest.raises(ValueError, match="DFlow needs a gaussian observation model"):
        DFlow(max_iters=1).sample(prior, pois, 2)
    with pytest.raises(ValueError, match="solver"):
        DFlow(solver="rk4")
    with pytest.raises(ValueError, match="max_iters"):
        DFlow(max_iters=0)
    with pytest.raises(ValueError, match="init_blend"):
        DFlow(init_blend=2.0)
    with pytest.raises(ValueError, match="lam"):
        DFlow(lam=-1.0)

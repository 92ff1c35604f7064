"""RED-diff: least squares at lambda = 0, initialisation, Adam algebra, shapes, errors.

The measured posterior-mean error is in docs/methods/reddiff.md.
"""

import pytest
import torch
from _helpers import DT, DenseNoSVD, _gmm, _image_prior

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.base import Context
from bayesfilter_diff.samplers.reddiff import REDDiff


def test_lambda_zero_converges_to_a_least_squares_solution():
    # With lambda = 0 the loss is ||y - A mu||^2 / (2m): Adam's fixed points solve the
    # normal equations A^T (A mu - y) = 0.
    g = torch.Generator().manual_seed(0)
    d = 6
    prior = _gmm(d).diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Dense(torch.randn(3, d, generator=g, dtype=DT))
    y = torch.randn(2, 3, generator=g, dtype=DT)
    s = REDDiff(lam=0.0, mu_init="zeros", lr=0.01, num_steps=500, grid="uniform")
    res = s.sample(prior, bfd.InverseProblem(A, y, noise_std=0.1), 4, generator=g)
    normal = A.adjoint(A(res.samples) - y[:, None]).norm(dim=-1)
    print(f"RED-diff lambda=0: max |A^T(A mu - y)| = {float(normal.max()):.2e}")
    assert float(normal.max()) < 1e-3 * float(A.adjoint(y).norm(dim=-1).min())
    assert res.info["nfe"] == 500


@pytest.mark.parametrize("which", ["pinv", "adjoint", "zeros", "nosvd"])
def test_initialisation(which):
    g = torch.Generator().manual_seed(1)
    d = 5
    prior = _gmm(d).diffusion(bfd.VPSchedule.linear())
    M = torch.randn(2, d, generator=g, dtype=DT)
    A = DenseNoSVD(M) if which == "nosvd" else bfd.operators.Dense(M)
    y = torch.randn(3, 2, generator=g, dtype=DT)
    problem = bfd.InverseProblem(A, y, noise_std=0.1)
    s = REDDiff(mu_init="pinv" if which == "nosvd" else which)
    ctx = Context(prior, problem, 4, g, s.time_grid(prior, problem))
    state, lw = s.init(ctx, s.setup(ctx))
    want = {
        # damped pseudo-inverse A^T (A A^T + sigma_y^2 I)^-1 y (sigma_y = 0.1), dense check
        "pinv": y @ torch.linalg.solve(M @ M.T + 0.01 * torch.eye(2, dtype=DT), M),
        "adjoint": A.adjoint(y),
        "zeros": torch.zeros(3, d, dtype=DT),
        "nosvd": A.adjoint(y),  # documented fallback: no SVD -> adjoint
    }[which]
    assert lw is None
    torch.testing.assert_close(state.x, want[:, None].expand(3, 4, d))


def test_first_step_is_adam_on_the_closed_form_gradient():
    # One Adam step from mu0 moves every entry by -lr * sign(g) (bias-corrected first step).
    d = 4
    prior = _gmm(d).diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Mask(torch.tensor([True, False, True, True]), dtype=DT)
    y = torch.tensor([1.0, -1.0, 0.5], dtype=DT)
    problem = bfd.InverseProblem(A, y, noise_std=0.1)
    s = REDDiff(num_steps=50, lam=0.25)
    times = s.time_grid(prior, problem)
    ctx = Context(prior, problem, 3, torch.Generator().manual_seed(5), times)
    setup = s.setup(ctx)
    state, _ = s.init(ctx, setup)
    new = s.move(ctx, setup, state, 0, times[0], times[1]).state
    # Replay the noise: x_t = alpha mu + sigma eps with the same generator.
    gen = torch.Generator().manual_seed(5)
    eps = torch.randn(ctx.shape, generator=gen, dtype=DT)
    sch = prior.schedule
    a, sg = sch.alpha(times[0]), sch.sigma(times[0])
    mu = state.x
    xt = a * mu + sg * eps
    eps_hat = (xt - a * prior.denoise(xt, times[0])) / sg
    grad = 0.25 * (sg / a) * (eps_hat - eps) / d + A.adjoint(A(mu) - y) / A.out_dim
    step = 0.1 * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(new.x, mu - step)
    assert ctx.nfe == 1


@pytest.mark.parametrize("batched", [False, True])
def test_shapes_images_and_vectors(batched):
    g = torch.Generator().manual_seed(4)
    shape = (2, 3, 3)
    gmm = _gmm(18)
    sched = bfd.VPSchedule.linear()
    prior = _image_prior(gmm, sched, shape)
    A = bfd.operators.Downsample(shape, 3, dtype=DT)
    x = gmm.sample(2, g).reshape((2,) + shape)
    y = A(x) if batched else A(x[0])
    res = REDDiff(num_steps=10).sample(
        prior, bfd.InverseProblem(A, y, noise_std=0.1), 5, generator=g
    )
    assert res.samples.shape == ((2, 5) if batched else (5,)) + shape
    assert torch.isfinite(res.samples).all()
    # vectors, flow schedule, uniform grid (alpha = 0 at t = 1 must not give NaN)
    vprior = _gmm(5).diffusion(bfd.FlowSchedule())
    Av = bfd.operators.Dense(torch.randn(2, 5, generator=g, dtype=DT))
    yv = torch.zeros((3, 2) if batched else (2,), dtype=DT)
    res = REDDiff(num_steps=10, grid="uniform").sample(
        vprior, bfd.InverseProblem(Av, yv, noise_std=0.1), 4, generator=g
    )
    assert res.samples.shape == ((3, 4, 5) if batched else (4, 5))
    assert torch.isfinite(res.samples).all()


def test_nonlinear_operator_uses_autograd():
    g = torch.Generator().manual_seed(5)
    shape = (1, 3, 3)
    prior = _image_prior(_gmm(9), bfd.VPSchedule.linear(), shape)
    A = bfd.operators.PhaseRetrieval(shape)
    y = A(torch.randn(shape, generator=g, dtype=DT))
    res = REDDiff(num_steps=10).sample(
        prior, bfd.InverseProblem(A, y, noise_std=0.1), 3, generator=g
    )
    assert res.samples.shape == (3,) + shape
    assert torch.isfinite(res.samples).all()


def test_errors():
    prior = _gmm(4).diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Identity(4, dtype=DT)
    pois = bfd.InverseProblem(A, torch.ones(4, dtype=DT), noise="poisson")
    with pytest.raises(ValueError, match="REDDiff needs a gaussian observation model"):
        REDDiff(num_steps=2).sample(prior, pois, 2)
    clean = bfd.InverseProblem(A, torch.ones(4, dtype=DT), noise_std=0.0)
    with pytest.raises(ValueError, match="noise_std > 0"):
        REDDiff(num_steps=2, loss_scaling="paper").sample(prior, clean, 2)
    with pytest.raises(ValueError, match="weighting"):
        REDDiff(weighting="cubic")
    with pytest.raises(ValueError, match="betas"):
        REDDiff(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        REDDiff(lr=0.0)
    with pytest.raises(ValueError, match="mu_init"):
        REDDiff(mu_init="random")


def test_noiseless_initialisation_is_the_pseudo_inverse():
    g = torch.Generator().manual_seed(2)
    prior = _gmm(5).diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Dense(torch.randn(2, 5, generator=g, dtype=DT))
    y = torch.randn(3, 2, generator=g, dtype=DT)
    problem = bfd.InverseProblem(A, y, noise_std=0.0)
    s = REDDiff()
    ctx = Context(prior, problem, 4, g, s.time_grid(prior, problem))
    state, _ = s.init(ctx, s.setup(ctx))
    want = y @ torch.linalg.pinv(A.matrix()).T
    torch.testing.assert_close(state.x, want[:, None].expand(3, 4, 5))

"""DiffPIR: exact data fit at sigma_y = 0, proximal map, CG = SVD, grid, shapes, errors."""

import pytest
import torch
from _helpers import DT, DenseNoSVD, _gmm, _image_prior

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.base import Context
from bayesfilter_diff.samplers.diffpir import DiffPIR, quad_time_grid


def test_quad_grid():
    t = quad_time_grid(100, dtype=DT)
    assert t.shape == (101,) and float(t[0]) == 1.0 and float(t[-1]) == 0.0
    assert torch.all(t[1:] < t[:-1])
    torch.testing.assert_close(t[1], torch.tensor(0.9, dtype=DT))  # 1 - sqrt(1/100)
    prior = _gmm(3).diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Identity(3, dtype=DT)
    problem = bfd.InverseProblem(A, torch.zeros(3, dtype=DT), noise_std=0.1)
    torch.testing.assert_close(DiffPIR(num_steps=100).time_grid(prior, problem), t)
    grid = DiffPIR(num_steps=10, spacing="grid").time_grid(prior, problem)
    torch.testing.assert_close(grid, torch.linspace(1, 0, 11, dtype=DT))


@pytest.mark.parametrize("op", ["dense", "mask", "nosvd"])
def test_noiseless_fits_the_data_exactly(op):
    # sigma_y = 0: rho_t = 0, the proximal step is the projection onto {A x = y} and the
    # last step (to t = 0) returns it.
    g = torch.Generator().manual_seed(0)
    d = 6
    gmm = _gmm(d)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    M = torch.randn(3, d, generator=g, dtype=DT)
    A = {
        "dense": bfd.operators.Dense(M),
        "mask": bfd.operators.Mask(torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.bool), dtype=DT),
        "nosvd": DenseNoSVD(M),
    }[op]
    y = A(gmm.sample(2, g))
    res = DiffPIR(num_steps=20).sample(prior, bfd.InverseProblem(A, y), 50, generator=g)
    resid = (A(res.samples) - y[:, None]).abs().max()
    assert float(resid) < (1e-6 if op == "nosvd" else 1e-10)


def test_small_noise_approaches_the_data():
    g = torch.Generator().manual_seed(1)
    d = 6
    gmm = _gmm(d)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Dense(torch.randn(3, d, generator=g, dtype=DT))
    x = gmm.sample(2, g)
    out = []
    for sy in (1e-1, 1e-2, 1e-3):
        y = A(x) + sy * torch.randn(2, 3, generator=g, dtype=DT)
        res = DiffPIR(num_steps=30).sample(
            prior, bfd.InverseProblem(A, y, noise_std=sy), 50, generator=g
        )
        out.append(float((A(res.samples) - y[:, None]).pow(2).mean().sqrt()))
    print(f"DiffPIR rms residual |A x - y| for sigma_y = 0.1, 0.01, 0.001: {out}")
    assert out[2] < out[0] and out[2] < 1e-2


def test_proximal_step_cg_equals_svd_closed_form():
    g = torch.Generator().manual_seed(2)
    d = 5
    prior = _gmm(d).diffusion(bfd.VPSchedule.linear())
    M = torch.randn(3, d, generator=g, dtype=DT)
    y = torch.randn(2, 3, generator=g, dtype=DT)
    x0 = torch.randn(2, 4, d, generator=g, dtype=DT)
    rho = torch.tensor(0.37, dtype=DT)
    # Closed form (A^T A + rho I)^-1 (A^T y + rho x0)
    want = torch.linalg.solve(
        M.T @ M + rho * torch.eye(d, dtype=DT), (y @ M)[:, None, :, None] + rho * x0[..., None]
    )[..., 0]
    s = DiffPIR()
    for A in (bfd.operators.Dense(M), DenseNoSVD(M)):
        problem = bfd.InverseProblem(A, y, noise_std=0.1)
        ctx = Context(prior, problem, 4, g, s.time_grid(prior, problem))
        got = s.prox(ctx, s.setup(ctx), x0, rho)  # SVD closed form, or CG from x0
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def test_cg_path_matches_svd_path():
    g = torch.Generator().manual_seed(3)
    d = 6
    gmm = _gmm(d)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    M = torch.randn(3, d, generator=g, dtype=DT)
    y = bfd.operators.Dense(M)(gmm.sample(2, g))
    out = []
    for A in (bfd.operators.Dense(M), DenseNoSVD(M)):
        res = DiffPIR(num_steps=15).sample(
            prior,
            bfd.InverseProblem(A, y, noise_std=0.2),
            20,
            generator=torch.Generator().manual_seed(7),
        )
        out.append(res.samples)
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batched", [False, True])
def test_shapes_images_and_vectors(batched):
    g = torch.Generator().manual_seed(5)
    shape = (2, 3, 3)
    gmm = _gmm(18)
    sched = bfd.VPSchedule.cosine()
    prior = _image_prior(gmm, sched, shape)
    A = bfd.operators.Blur(bfd.operators.gaussian_kernel(3, 1.0).to(DT), shape)
    x = gmm.sample(2, g).reshape((2,) + shape)
    y = A(x) if batched else A(x[0])
    res = DiffPIR(num_steps=8).sample(
        prior, bfd.InverseProblem(A, y, noise_std=0.05), 5, generator=g
    )
    assert res.samples.shape == ((2, 5) if batched else (5,)) + shape
    assert torch.isfinite(res.samples).all()
    assert res.info["nfe"] == 8
    # vectors, flow schedule (alpha = 0 at t = 1: rho = 0 there, no NaN)
    vprior = _gmm(5).diffusion(bfd.FlowSchedule())
    Av = bfd.operators.Dense(torch.randn(2, 5, generator=g, dtype=DT))
    yv = torch.zeros((3, 2) if batched else (2,), dtype=DT)
    res = DiffPIR(num_steps=8).sample(
        vprior, bfd.InverseProblem(Av, yv, noise_std=0.1), 4, generator=g
    )
    assert res.samples.shape == ((3, 4, 5) if batched else (4, 5))
    assert torch.isfinite(res.samples).all()


def test_errors():
    shape = (1, 3, 3)
    prior = _image_prior(_gmm(9), bfd.VPSchedule.linear(), shape)
    A = bfd.operators.PhaseRetrieval(shape)
    problem = bfd.InverseProblem(A, torch.ones(A.out_shape, dtype=DT), noise_std=0.1)
    with pytest.raises(ValueError, match="linear operator"):
        DiffPIR(num_steps=2).sample(prior, problem, 2)
    vprior = _gmm(4).diffusion(bfd.VPSchedule.linear())
    pois = bfd.InverseProblem(
        bfd.operators.Identity(4, dtype=DT), torch.ones(4, dtype=DT), noise="poisson"
    )
    with pytest.raises(ValueError, match="gaussian observation model"):
        DiffPIR(num_steps=2).sample(vprior, pois, 2)
    with pytest.raises(ValueError, match="zeta"):
        DiffPIR(zeta=1.5)
    with pytest.raises(ValueError, match="lam"):
        DiffPIR(lam=-1.0)
    with pytest.raises(ValueError, match="spacing"):
        DiffPIR(spacing="cubic")

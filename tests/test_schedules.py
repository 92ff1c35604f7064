import math

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff import schedules as S

SCHEDULES = [bfd.VPSchedule.linear(), bfd.VPSchedule.cosine(), bfd.VESchedule(), bfd.FlowSchedule()]


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: type(s).__name__ + getattr(s, "name", ""))
def test_derivatives_match_finite_differences(sch):
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    for f, df in ((sch.alpha, sch.dalpha), (sch.sigma, sch.dsigma)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        assert torch.allclose(df(t), fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: type(s).__name__ + getattr(s, "name", ""))
def test_log_snr_and_ends(sch):
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    lam = sch.log_snr(t)
    assert torch.allclose(lam, 2 * torch.log(sch.alpha(t) / sch.sigma(t)), atol=1e-10)
    assert (lam[1:] < lam[:-1]).all()  # SNR decreases with t
    if sch.kind == "vp":
        assert torch.allclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones_like(t))
        assert float(sch.sigma(torch.tensor(0.0))) == 0.0


def test_vp_linear_matches_discrete_ddpm():
    # continuous limit of betas linspace(1e-4, 0.02, 1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    sch = bfd.VPSchedule.linear()
    t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    assert torch.allclose(sch.alpha(t) ** 2, abar, rtol=2e-2, atol=1e-4)


def test_time_grids():
    sch = bfd.VPSchedule.linear()
    g = sch.time_grid(20)
    assert g.shape == (21,) and g[0] == 1 and g[-1] == 0 and (g[1:] < g[:-1]).all()
    d = sch.time_grid(20, "ddpm", dtype=torch.float64)
    assert d.shape == (21,) and math.isclose(float(d[0]), 951 / 1000) and d[-1] == 0
    assert torch.allclose(d[-2], torch.tensor(1 / 1000, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_steps"):
        sch.time_grid(0)
    with pytest.raises(ValueError, match="kind"):
        sch.time_grid(5, "nope")


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: type(s).__name__ + getattr(s, "name", ""))
def test_parameterisation_round_trips(sch, gen):
    x0 = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    t = torch.rand(7, 1, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    a, s, da, ds = sch.alpha(t), sch.sigma(t), sch.dalpha(t), sch.dsigma(t)
    xt = a * x0 + s * eps
    assert torch.allclose(S.eps_to_x0(xt, eps, a, s), x0)
    assert torch.allclose(S.x0_to_eps(xt, x0, a, s), eps)
    assert torch.allclose(S.score_to_x0(xt, S.x0_to_score(xt, x0, a, s), a, s), x0)
    v = a * eps - s * x0
    assert torch.allclose(S.v_to_x0(xt, v, a, s), x0)
    u = S.x0_to_velocity(xt, x0, a, s, da, ds)
    assert torch.allclose(u, da * x0 + ds * eps)
    assert torch.allclose(S.velocity_to_x0(xt, u, a, s, da, ds), x0)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="beta_min"):
        bfd.VPSchedule.linear(beta_min=5, beta_max=1)
    with pytest.raises(ValueError, match="sigma_min"):
        bfd.VESchedule(sigma_min=2.0, sigma_max=1.0)


@pytest.mark.parametrize("kind", ["eps", "v", "score", "velocity", "x0"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_denoise_affine_equals_the_combination_of_x0(kind, chunk_size, gen):
    """c_x x + c_x0 E[x0 | x] from the network's own output (no x0 formed for eps / v /
    score networks) equals the same combination of denoise(x): the DDIM means of the
    samplers that use it are those of the x0 form."""
    sch = bfd.FlowSchedule() if kind == "velocity" else bfd.VPSchedule.linear()
    lin = torch.nn.Linear(4, 4).double()

    def net(x, t):
        return lin(x) * (1 + t[:, None])

    shape = (4,)
    if kind == "x0":
        prior = bfd.DiffusionModel(net, sch, shape, chunk_size=chunk_size)
    else:
        wrap = {"eps": "from_eps", "v": "from_v", "score": "from_score"}.get(kind, "from_velocity")
        prior = getattr(bfd.DiffusionModel, wrap)(net, sch, shape, chunk_size=chunk_size)
    x = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    c_x, c_x0 = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-1.7, dtype=torch.float64)
    want = c_x * x + c_x0 * prior.denoise(x, t)
    torch.testing.assert_close(prior.denoise_affine(x, t, c_x, c_x0), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["eps", "v", "score", "velocity", "x0"])
def test_denoise_vjp_equals_autograd_through_denoise(kind, gen):
    """J^T u by autograd through the network only (the affine map's part added in
    closed form) equals autograd through ``denoise``, and the value of ``fn`` at x0_hat."""
    sch = bfd.FlowSchedule() if kind == "velocity" else bfd.VPSchedule.linear()
    lin = torch.nn.Linear(4, 4).double()

    def net(x, t):
        return torch.tanh(lin(x)) * (1 + t[:, None])

    shape = (4,)
    if kind == "x0":
        prior = bfd.DiffusionModel(net, sch, shape)
    else:
        wrap = {"eps": "from_eps", "v": "from_v", "score": "from_score"}.get(kind, "from_velocity")
        prior = getattr(bfd.DiffusionModel, wrap)(net, sch, shape)
    x = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    w = torch.randn(4, generator=gen, dtype=torch.float64)

    def fn(x0):
        return (x0 * w).sum(-1) ** 2, 2 * (x0 * w).sum(-1, keepdim=True) * w

    x0, v, g = prior.denoise_vjp(x, t, fn)
    xr = x.clone().requires_grad_(True)
    ref_x0 = prior.denoise(xr, t)
    ref_v = ((ref_x0 * w).sum(-1) ** 2).sum()
    (ref_g,) = torch.autograd.grad(ref_v, xr)
    torch.testing.assert_close(x0, ref_x0.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v.sum(), ref_v.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, ref_g, rtol=1e-10, atol=1e-12)
    assert not x0.requires_grad and not g.requires_grad

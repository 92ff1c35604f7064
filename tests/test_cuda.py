"""The SMC samplers on a GPU, against the exact posterior (skipped without CUDA)."""

import copy

import pytest
import torch

import bayesfilter_diff as bfd

pytestmark = pytest.mark.cuda


def _problem(device):
    g = torch.Generator().manual_seed(0)
    d = 3
    gmm = bfd.GaussianMixture(
        torch.ones(1, dtype=torch.float64),
        torch.zeros(1, d, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
    )
    A = bfd.operators.Dense(torch.randn(2, d, generator=g, dtype=torch.float64))
    x = gmm.sample(4, g)
    y = A(x) + 0.5 * torch.randn(4, 2, generator=g, dtype=torch.float64)
    problem = bfd.InverseProblem(A, y, 0.5)
    # GaussianMixture is an nn.Module: .to moves it in place, so the device copy is a copy
    return gmm, copy.deepcopy(gmm).to(device), problem.to(device)


@pytest.mark.parametrize("name", ["TDS", "MCGdiff", "FPSSMC"])
def test_smc_samplers_on_cuda(name):
    dev = torch.device("cuda")
    gmm_cpu, gmm, problem = _problem(dev)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    sampler = getattr(bfd.samplers, name)(num_steps=100)
    g = torch.Generator(device=dev).manual_seed(0)
    res = sampler.sample(prior, problem, 20000, generator=g)
    assert res.samples.device.type == "cuda" and res.log_weights.device.type == "cuda"
    again = sampler.sample(
        prior, problem, 20000, generator=torch.Generator(device=dev).manual_seed(0)
    )
    assert torch.equal(res.samples, again.samples)  # deterministic on the device
    if name == "FPSSMC":
        return  # targets its filtering model, not p(x | y): see tests/test_fps.py
    post = gmm_cpu.posterior(problem.to("cpu"))
    # the time discretisation at 100 steps shifts the target by up to ~0.07 (tests/test_tds.py,
    # tests/test_mcgdiff.py); Monte Carlo error with 20000 particles is far below that
    err = (res.mean().cpu() - post.mean()).abs().max()
    assert err < 0.1, err
    if res.log_evidence is not None:
        assert (res.log_evidence.cpu() - gmm_cpu.log_evidence(problem.to("cpu"))).abs().max() < 0.4


def test_mixture_x0_variance_on_cuda():
    """The default kernel's ``x0_variance`` of a mixture on the device: the CPU values up to
    the tables' Monte Carlo error (each from 8192 draws of 3 coordinates on its own device's
    generator: relative sd 0.9%, of the difference 1.3%), on the device, the table copied
    there once (not at every step)."""
    dev = torch.device("cuda")
    gmm_cpu, gmm, _ = _problem(dev)
    t = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    v = prior.x0_variance(t.to(dev))
    assert v is not None and v.device.type == "cuda"
    ref = gmm_cpu.diffusion(bfd.VPSchedule.linear()).x0_variance(t)
    torch.testing.assert_close(v.cpu(), ref, rtol=0.06, atol=0.0)
    first = prior.__dict__["_x0_variance_device"][1][0]
    prior.x0_variance(t.to(dev))
    assert prior.__dict__["_x0_variance_device"][1][0] is first


# ------------------------------------------------------------------ CPU / GPU agreement
def _same_stream_runs(monkeypatch, devices, names):
    """Run each sampler on each device with identical random numbers: every draw of the
    package (``torch.randn`` / ``torch.rand`` with a generator) is taken from a CPU generator
    seeded like the caller's and moved to the device, so the runs differ only in where the
    arithmetic happens."""
    orig = {"randn": torch.randn, "rand": torch.rand}

    def routed(fn):
        pairs = []  # (caller's generator, its CPU twin); references kept, so no id reuse

        def draw(*size, generator=None, dtype=None, device=None, **kw):
            if generator is None:
                return fn(*size, dtype=dtype, device=device, **kw)
            cpu = next((c for g, c in pairs if g is generator), None)
            if cpu is None:
                cpu = torch.Generator().manual_seed(generator.initial_seed())
                pairs.append((generator, cpu))
            return fn(*size, generator=cpu, dtype=dtype, **kw).to(device or "cpu")

        return draw

    out = {}
    for dev in devices:
        monkeypatch.setattr(torch, "randn", routed(orig["randn"]))
        monkeypatch.setattr(torch, "rand", routed(orig["rand"]))
        gmm_cpu, gmm, problem = _problem(torch.device(dev))
        prior = gmm.diffusion(bfd.VPSchedule.linear())
        for name in names:
            g = torch.Generator(device=dev).manual_seed(7)
            out[dev, name] = getattr(bfd.samplers, name)(num_steps=30).sample(
                prior, problem, 500, generator=g
            )
    monkeypatch.setattr(torch, "randn", orig["randn"])
    monkeypatch.setattr(torch, "rand", orig["rand"])
    return out


NAMES = ["MCGdiff", "TDS", "FPSSMC", "DDRM", "DPS"]


def _assert_agree(out, a, b):
    for name in NAMES:
        ra, rb = out[a, name], out[b, name]
        torch.testing.assert_close(ra.samples.cpu(), rb.samples.cpu(), rtol=1e-9, atol=1e-9)
        if ra.log_weights is not None:
            torch.testing.assert_close(
                ra.weights().cpu(), rb.weights().cpu(), rtol=1e-8, atol=1e-12
            )
        if ra.log_evidence is not None:
            torch.testing.assert_close(
                ra.log_evidence.cpu(), rb.log_evidence.cpu(), rtol=1e-9, atol=1e-9
            )


@pytest.mark.parametrize("dummy", [0])
def test_gpu_and_cpu_paths_agree_on_the_same_random_numbers(monkeypatch, dummy):
    out = _same_stream_runs(monkeypatch, ["cpu", "cuda"], NAMES)
    assert out["cuda", "MCGdiff"].samples.device.type == "cuda"
    _assert_agree(out, "cpu", "cuda")


# ------------------------------------------------------------------ SMC^2 on the device
def test_smc2_on_cuda_against_quadrature():
    """bfd.infer with a global noise scale, the model's tensors and the generator on the
    device: the theta draws and the evidence against the chain's exact answers (the CPU test
    of tests/test_hierarchical.py, on the device), then particle-marginal moves."""
    import pyro
    import pyro.distributions as dist
    from test_hierarchical import (
        STEPS,
        _check_sigma_and_evidence,
        _gaussian_prior,
        _sigma_quadrature,
    )

    from bayesfilter_diff.samplers.tds import TDS

    dev = torch.device("cuda")
    dt = torch.float64
    prior, chain = _gaussian_prior()
    prior = prior.to(dev)
    M = torch.tensor([[1.0, 0.3], [-0.4, 1.0]], dtype=dt)
    y = torch.tensor([0.9, -1.2], dtype=dt)
    mean, sd, log_z = _sigma_quadrature(chain, M, torch.ones(2, dtype=dt), y)
    M, y, one = M.to(dev), y.to(dev), torch.tensor(1.0, dtype=dt, device=dev)

    def model(y=None):
        sigma = pyro.sample("sigma", dist.HalfNormal(one))
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", dist.Normal(x @ M.T, sigma).to_event(1), obs=y)

    K, N = 256, 128
    kw = {"y": y, "num_samples": N, "num_theta": K}
    post = bfd.infer(
        model, TDS(num_steps=STEPS), moves=0, generator=torch.Generator(dev).manual_seed(0), **kw
    )
    assert post.theta["sigma"].device.type == "cuda"
    _check_sigma_and_evidence(post, mean, sd, log_z, K)
    moved = bfd.infer(
        model, TDS(num_steps=STEPS), moves=2, generator=torch.Generator(dev).manual_seed(1), **kw
    )
    assert len(moved.acceptance) == 2 and bool(torch.isfinite(moved.log_evidence))
    with pytest.raises(ValueError, match="generator"):
        bfd.infer(model, TDS(num_steps=STEPS), generator=torch.Generator().manual_seed(0), **kw)


def test_infer_on_cuda_gives_the_samplers_draws():
    """bfd.infer on a Pyro model whose tensors are on the device: the linear-Gaussian site
    gives the sampler's own draws bit for bit there, and a nonlinear Gaussian site runs with
    finite draws on the device."""
    import pyro
    import pyro.distributions as dist

    from bayesfilter_diff.distributions import DiffusionPrior, LinearGaussian
    from bayesfilter_diff.samplers.tds import TDS

    dev, dt = torch.device("cuda"), torch.float64
    gmm = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=dt),
        torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=dt),
        torch.tensor([0.5, 0.3], dtype=dt),
    ).to(dev)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Dense(torch.tensor([[1.5, -0.3], [0.2, 1.0]], dtype=dt)).to(dev)
    y = torch.tensor([0.7, -0.2], dtype=dt, device=dev)

    def model(y=None):
        x = pyro.sample("x", DiffusionPrior(prior))
        pyro.sample("y", LinearGaussian(A, x, noise_std=0.3), obs=y)

    sampler = TDS(num_steps=20)
    post = bfd.infer(
        model, sampler, y=y, num_samples=256, generator=torch.Generator(dev).manual_seed(1)
    )
    ref = sampler.sample(
        prior, bfd.InverseProblem(A, y, 0.3), 256, torch.Generator(dev).manual_seed(1)
    )
    assert post.samples.device.type == "cuda" and torch.equal(post.samples, ref.samples)

    def nonlinear(y=None):
        x = pyro.sample("x", DiffusionPrior(prior))
        f = torch.stack([torch.sin(x[..., 0]) + x[..., 1] ** 2 / 4, x[..., 0] * x[..., 1] / 3], -1)
        pyro.sample("y", dist.Normal(f, 0.3).to_event(1), obs=y)

    res = bfd.infer(
        nonlinear,
        TDS(num_steps=20),
        y=y,
        num_samples=256,
        generator=torch.Generator(dev).manual_seed(2),
    )
    assert res.samples.device.type == "cuda" and bool(torch.isfinite(res.samples).all())

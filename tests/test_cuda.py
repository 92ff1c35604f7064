"""The SMC samplers on a GPU, against the exact posterior (skipped without CUDA)."""

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
    return gmm, gmm.to(device), problem.to(device)


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

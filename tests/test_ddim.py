import math

import pytest
import torch

import bayesfilter_diff as bfd


@pytest.mark.slow
def test_prior_sampling_recovers_mixture():
    g = torch.Generator().manual_seed(0)
    d64 = torch.float64
    gmm = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=d64),
        torch.tensor([[-4.0, 0], [4, 1]], dtype=d64),
        torch.tensor([1.0, 0.5], dtype=d64),
    )
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    problem = bfd.InverseProblem(
        bfd.operators.Identity((2,), dtype=d64), torch.zeros(2, dtype=d64), 1.0
    )
    n = 20000
    res = bfd.samplers.DDIM(num_steps=200, eta=0.0).sample(prior, problem, n, g)
    x = res.samples
    assert x.shape == (n, 2) and res.log_weights is None and res.info["nfe"] == 200
    resp = gmm.component_log_responsibilities(x).exp().mean(0)
    se = torch.sqrt(gmm.weights * (1 - gmm.weights) / n)
    assert ((resp - gmm.weights).abs() < 5 * se).all()
    se_m = torch.sqrt(gmm.covariance().diagonal() / n)
    assert ((x.mean(0) - gmm.mean()).abs() < 5 * se_m).all()
    assert math.isfinite(res.info["wall_time"])

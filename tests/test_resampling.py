import math

import pytest
import torch

from bayesfilter_diff import smc

SCHEMES = ["multinomial", "stratified", "systematic", "residual"]
W = torch.tensor([0.05, 0.3, 0.0, 0.15, 0.37, 0.13], dtype=torch.float64)


def _counts(name, reps=20000, N=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lw = torch.log(W).expand(reps, -1)  # reps independent problems in one batch
    idx = smc.get_resampler(name)(lw, N, g)
    assert idx.shape == (reps, N) and idx.min() >= 0 and idx.max() < W.numel()
    return torch.nn.functional.one_hot(idx, W.numel()).sum(1).double()  # (reps, n)


@pytest.mark.parametrize("name", SCHEMES)
def test_offspring_counts_are_unbiased(name):
    N, reps = 6, 20000
    c = _counts(name, reps, N)
    mean, se = c.mean(0), c.std(0) / math.sqrt(reps)
    assert ((mean - N * W).abs() <= 5 * se + 1e-12).all(), (mean, N * W)
    assert (c[:, 2] == 0).all()  # zero weight, no offspring
    assert (c.sum(1) == N).all()


def test_variance_ordering():
    N = 6
    var = {name: _counts(name, 40000, N, seed=1).var(0) for name in SCHEMES}
    exact_multi = N * W * (1 - W)
    # multinomial matches its closed form within the sampling error of a variance (~2.5%)
    assert torch.allclose(var["multinomial"], exact_multi, rtol=0.1, atol=1e-3)
    # residual and stratified never exceed multinomial (Douc & Cappe 2005); systematic
    # offspring counts take only floor/ceil(N w_i), the minimal variance per particle
    for name in ("residual", "stratified", "systematic"):
        assert (var[name] <= exact_multi * 1.05 + 1e-3).all(), name
    frac = N * W - torch.floor(N * W)
    assert torch.allclose(var["systematic"], frac * (1 - frac), atol=0.02)


def test_inverse_cdf_on_fixed_uniforms():
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    u = torch.tensor([[0.0, 0.0999, 0.1, 0.29, 0.31, 0.61, 0.999999]], dtype=torch.float64)
    assert smc.inverse_cdf(u, w).tolist() == [[0, 0, 1, 1, 2, 3, 3]]


def test_float32_cumsum_below_one_stays_in_range():
    lw = torch.full((1, 1000), -math.log(1000), dtype=torch.float32)
    w = torch.softmax(lw, -1)
    u = torch.tensor([[1 - 1e-9]], dtype=torch.float64)
    w32 = w * 0.999  # a cumulative sum that ends clearly under one
    assert int(smc.inverse_cdf(u, w32)) == 999
    for name in SCHEMES:
        idx = smc.get_resampler(name)(lw, 1000, torch.Generator().manual_seed(0))
        assert idx.max() < 1000


def test_bad_arguments():
    with pytest.raises(ValueError, match="resampling must be one of"):
        smc.get_resampler("nope")
    with pytest.raises(ValueError, match="num_samples"):
        smc.systematic(torch.zeros(1, 3), 0)


def test_weights_helpers():
    lw = torch.log(torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64)) + 3.0
    assert torch.allclose(smc.ess(lw), torch.tensor([1 / (0.0625 * 2 + 0.25)], dtype=torch.float64))
    assert torch.allclose(smc.normalize(lw).exp().sum(-1), torch.ones(1, dtype=torch.float64))
    assert torch.allclose(smc.log_mean_exp(torch.zeros(1, 5)), torch.zeros(1))

"""RePaint: jump schedule, transition counts, known entries kept exactly, shapes, errors.

The measured posterior-mean error is in docs/methods/repaint.md.
"""

import math

import pytest
import torch
from _helpers import DT, _gmm, _image_prior

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.repaint import RePaint, repaint_jump_schedule


def test_schedule_matches_official_counts():
    ts = repaint_jump_schedule(250, 10, 10)
    diffs = [b - a for a, b in zip(ts[:-1], ts[1:])]
    assert ts[0] == 249 and ts[-1] == -1
    assert all(abs(s) == 1 for s in diffs)
    # The official schedule: 2410 reverse and 2160 forward transitions; first jump at 230.
    assert sum(s < 0 for s in diffs) == 2410
    assert sum(s > 0 for s in diffs) == 2160
    assert ts[19:22] == [230, 231, 232]
    # jump_n_sample = 1: plain descent.
    assert repaint_jump_schedule(20, 10, 1) == list(range(19, -2, -1))


def test_time_grid_is_the_nonmonotone_sequence_and_loop_follows_it():
    gmm = _gmm(4)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Mask(torch.tensor([True, False, True, False]), dtype=DT)
    y = torch.tensor([0.3, -0.2], dtype=DT)
    s = RePaint(num_steps=20, jump_length=5, jump_n_sample=3)
    res = s.sample(prior, bfd.InverseProblem(A, y), 8, generator=torch.Generator().manual_seed(0))
    times = res.info["times"]
    base = prior.schedule.time_grid(20, dtype=DT)
    ks = repaint_jump_schedule(20, 5, 3)
    assert torch.equal(times, base[[20 - 1 - k for k in ks]])
    assert float(times[0]) == 1.0 and float(times[-1]) == 0.0
    d = times[1:] - times[:-1]
    n_rev, n_fwd = int((d < 0).sum()), int((d > 0).sum())
    assert n_fwd > 0
    assert res.info["nfe"] == n_rev == res.info["reverse_steps"]
    assert res.info["forward_steps"] == n_fwd
    assert res.info["num_steps"] == n_rev + n_fwd


@pytest.mark.parametrize("noise_std", [0.0, 0.2])
def test_known_entries_equal_y_exactly(noise_std):
    g = torch.Generator().manual_seed(1)
    gmm = _gmm(6)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Mask(torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool), dtype=DT)
    x = gmm.sample(2, g)
    y = A(x) + noise_std * torch.randn(2, A.out_dim, generator=g, dtype=DT)
    res = RePaint(num_steps=30, jump_length=5, jump_n_sample=2).sample(
        prior, bfd.InverseProblem(A, y, noise_std=noise_std), 50, generator=g
    )
    # alpha(0) = 1 and sigma(0) = 0 for VP: the last merge pastes y itself (noisy or not).
    assert torch.equal(A(res.samples), y[:, None].expand(2, 50, A.out_dim))


def test_unknown_entries_of_an_independent_prior_have_mean_zero():
    # N(0, I) prior: the denoiser acts coordinatewise and linearly, so the unknown entries
    # follow a zero-mean linear Gaussian chain whatever y is: E[x_unknown] = 0 exactly.
    g = torch.Generator().manual_seed(2)
    d = 4
    gmm = bfd.GaussianMixture(
        torch.ones(1, dtype=DT), torch.zeros(1, d, dtype=DT), torch.ones(1, dtype=DT)
    )
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    mask = torch.tensor([True, True, False, False])
    A = bfd.operators.Mask(mask, dtype=DT)
    y = torch.tensor([2.0, -3.0], dtype=DT)
    N = 2000
    res = RePaint(num_steps=25, jump_length=5, jump_n_sample=2).sample(
        prior, bfd.InverseProblem(A, y), N, generator=g
    )
    unk = res.samples[:, ~mask]
    sd = unk.std(0)
    assert torch.all(unk.mean(0).abs() < 4 * sd / math.sqrt(N))


@pytest.mark.parametrize("batched", [False, True])
def test_shapes_images_and_vectors(batched):
    g = torch.Generator().manual_seed(4)
    shape = (2, 3, 3)
    gmm = _gmm(18)
    sched = bfd.VPSchedule.cosine()
    prior = _image_prior(gmm, sched, shape)
    A = bfd.operators.Mask.random(shape, 0.5, generator=g)
    A = bfd.operators.Mask(A.mask, dtype=DT)
    x = gmm.sample(2, g).reshape((2,) + shape)
    y = A(x) if batched else A(x[0])
    res = RePaint(num_steps=12, jump_length=3, jump_n_sample=2).sample(
        prior, bfd.InverseProblem(A, y), 5, generator=g
    )
    lead = (2, 5) if batched else (5,)
    assert res.samples.shape == lead + shape
    assert torch.isfinite(res.samples).all()
    assert torch.equal(
        A(res.samples), (y.unsqueeze(-2) if batched else y).expand(lead + (A.out_dim,))
    )
    # vectors, flow schedule
    vprior = _gmm(5).diffusion(bfd.FlowSchedule())
    Av = bfd.operators.Mask(torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool), dtype=DT)
    yv = torch.zeros((3, 3) if batched else (3,), dtype=DT)
    res = RePaint(num_steps=10, jump_length=3, jump_n_sample=2).sample(
        vprior, bfd.InverseProblem(Av, yv), 4, generator=g
    )
    assert res.samples.shape == ((3, 4, 5) if batched else (4, 5))
    assert torch.isfinite(res.samples).all()


def test_errors():
    prior = _gmm(4).diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Dense(torch.randn(2, 4, dtype=DT))
    problem = bfd.InverseProblem(A, torch.zeros(2, dtype=DT), noise_std=0.1)
    with pytest.raises(ValueError, match="masking operator"):
        RePaint(num_steps=5).sample(prior, problem, 2)
    with pytest.raises(ValueError, match="jump_length"):
        RePaint(jump_length=0)
    with pytest.raises(ValueError, match="jump_n_sample"):
        RePaint(jump_n_sample=1.5)

"""``diagnostics.prior_predictive_check``: is the observation one the prior produces?

Under a typical observation (a prior predictive draw) the check's p-value is uniform on the
grid ``1 / (1 + M) .. 1`` and it flags with probability ``1 / (1 + M)``; every generator
is fixed, so each test is deterministic.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import bayesfilter_diff as bfd


def _rare():
    """A mode of prior weight 1e-6 that the observation favours (validation/runs_check.py)."""
    d = 8
    m2 = torch.full((d,), 5.0)
    m2[0] = 8.0
    gmm = bfd.GaussianMixture(
        torch.tensor([1 - 1e-6, 1e-6]), torch.stack([torch.zeros(d), m2]), torch.ones(2)
    )
    A = bfd.operators.Dense(torch.eye(d)[:1].clone())
    return gmm, bfd.InverseProblem(A, torch.tensor([5.46]), noise_std=0.1)


def test_an_observation_in_the_prior_s_far_tail_is_flagged():
    gmm, problem = _rare()
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    g = torch.Generator().manual_seed(0)
    with pytest.warns(bfd.PosteriorQualityWarning, match="farther from the prior predictive"):
        c = bfd.diagnostics.prior_predictive_check(prior, problem, 1024, g)
    assert bool(c.conflict) and c.reference_draws == 512 and c.metric == "mahalanobis"
    assert float(c.p_value) == pytest.approx(1 / 513)
    # y is 5.4 sd out: a squared distance near 29, far beyond the largest of 512 draws
    assert float(c.distance) > 2 * float(c.farthest)


def test_typical_observations_give_uniform_p_values_and_no_alarm():
    """40 observations drawn from the prior predictive (README mixture, 2 observations):
    p-values uniform (their mean within 4 of its standard errors of 1/2), no conflict
    (each a 1-in-1025 event)."""
    d = 8
    gmm = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7]),
        torch.stack([-2 * torch.ones(d), 2 * torch.ones(d)]),
        torch.ones(2),
    )
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    g = torch.Generator().manual_seed(5)
    A = bfd.operators.Dense(torch.randn(2, d, generator=g))
    x = gmm.sample(40, g)
    Y = A(x) + 0.1 * torch.randn(40, 2, generator=g)
    problem = bfd.InverseProblem(A, Y, noise_std=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bfd.PosteriorQualityWarning)
        c = bfd.diagnostics.prior_predictive_check(prior, problem, 2048, g)
    assert c.p_value.shape == (40,) and not bool(c.conflict.any())
    assert abs(float(c.p_value.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / 40)


def test_poisson_counts_and_many_observations():
    """Poisson noise draws its own observations; with more observations than a tenth of the
    draws the distance is the sum of standardised entries."""
    d = 64
    gmm = bfd.GaussianMixture(torch.ones(1), torch.full((1, d), 3.0), torch.tensor([0.3]))
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    g = torch.Generator().manual_seed(1)
    A = bfd.operators.Identity((d,))
    x = gmm.sample(1, g)[0]
    y = torch.poisson(2.0 * x.clamp_min(0.1), generator=g)
    problem = bfd.InverseProblem(A, y, noise="poisson", poisson_rate=2.0)
    c = bfd.diagnostics.prior_predictive_check(prior, problem, 1024, g, warn=False)
    assert c.metric == "diagonal" and not bool(c.conflict)
    far = bfd.InverseProblem(A, y + 40.0, noise="poisson", poisson_rate=2.0)
    c = bfd.diagnostics.prior_predictive_check(prior, far, 1024, g, warn=False)
    assert bool(c.conflict)


def test_bad_arguments_are_refused_by_name():
    gmm, problem = _rare()
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    custom = bfd.InverseProblem(
        problem.operator, problem.y, log_likelihood_fn=lambda x, y: x.sum((-1,)) * 0
    )
    with pytest.raises(ValueError, match="log_likelihood_fn"):
        bfd.diagnostics.prior_predictive_check(prior, custom)
    with pytest.raises(ValueError, match="num_draws"):
        bfd.diagnostics.prior_predictive_check(prior, problem, num_draws=10)
    with pytest.raises(TypeError, match="InverseProblem"):
        bfd.diagnostics.prior_predictive_check(prior, problem.y)

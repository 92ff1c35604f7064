"""``diagnostics.reference_check``: a run against a reference run of the same problem.

The exact posterior of a Gaussian-mixture prior under a linear-Gaussian likelihood gives
both an exact reference (its draws) and clouds of known error (the same draws shifted or
narrowed); every generator is fixed, so each test is deterministic.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.result import Result

DT = torch.float64


def _problem():
    g = torch.Generator().manual_seed(3)
    d = 4
    one = torch.ones(d, dtype=DT)
    gmm = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=DT),
        torch.stack([-2 * one, 2 * one]),
        torch.ones(2, dtype=DT),
    )
    A = bfd.operators.Dense(torch.randn(2, d, generator=g, dtype=DT))
    y = A(gmm.sample(1, g)[0]) + 0.3 * torch.randn(2, generator=g, dtype=DT)
    return gmm, bfd.InverseProblem(A, y, noise_std=0.3)


def test_an_exact_run_agrees_and_biased_clouds_do_not():
    gmm, problem = _problem()
    g = torch.Generator().manual_seed(0)
    post = gmm.posterior(problem)
    exact = Result(samples=post.sample(4096, g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bfd.PosteriorQualityWarning)
        # the analytic kernel: DDIM's 50-step chain is measurably narrow here (sd 0.91)
        tds = bfd.samplers.TDS(num_steps=50, reverse_variance="analytic").sample(
            gmm.diffusion(bfd.VPSchedule.linear()), problem, 4096, g
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", bfd.PosteriorQualityWarning)  # quiet when they agree
        ok = bfd.diagnostics.reference_check(tds, exact)
        ok2 = bfd.diagnostics.reference_check(Result(samples=post.sample(4096, g)), exact)
    for c in (ok, ok2):
        assert not bool(c.differs)
        assert float(c.mean_z) < c.line and float(c.sd_z) < c.line and float(c.ks) < c.ks_line
    # the same exact draws narrowed to 0.85 of their spread about the mean: a too-narrow
    # posterior in every direction (sd error 0.15 against a Monte Carlo error of ~0.015)
    x = post.sample(4096, g)
    m = x.mean(0)
    narrow = Result(samples=m + 0.85 * (x - m))
    with pytest.warns(bfd.PosteriorQualityWarning, match="differs from the reference"):
        c = bfd.diagnostics.reference_check(narrow, exact)
    assert bool(c.differs) and 0.8 < float(c.sd_ratio) < 0.9
    # shifted by 0.2 posterior sd in one coordinate (Monte Carlo error ~0.02 sd per run)
    x = post.sample(4096, g)
    shifted = x.clone()
    shifted[:, 3] += 0.2 * x[:, 3].std()
    c = bfd.diagnostics.reference_check(Result(samples=shifted), exact, warn=False)
    # (in a random direction of smaller posterior sd the same shift counts for more)
    assert bool(c.differs) and float(c.mean_shift) > 0.15 and float(c.mean_z) > c.line
    # a few exploded draws: the variance and its error blow up together, the KS test sees it
    x = post.sample(4096, g)
    x[:400] *= 1e6  # 10%: a KS distance of ~0.1 against a line of ~0.055
    c = bfd.diagnostics.reference_check(Result(samples=x), exact, warn=False)
    assert bool(c.differs) and float(c.ks) > c.ks_line


def test_the_evidences_are_compared_and_batches_per_problem():
    gmm, problem = _problem()
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    y2 = torch.stack([problem.y, problem.y + 0.5])
    batched = bfd.InverseProblem(problem.operator, y2, noise_std=0.3)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bfd.PosteriorQualityWarning)
        a = bfd.samplers.TDS(num_steps=30).sample(prior, batched, 1024, g)
        b = bfd.samplers.TDS(num_steps=30).sample(prior, batched, 1024, g)
    c = bfd.diagnostics.reference_check(a, b, warn=False)
    assert c.mean_z.shape == (2,) and c.log_evidence_shift is not None
    assert c.log_evidence_se is not None and bool((c.log_evidence_se > 0).all())
    # a batched cloud whose second problem is shifted: only that problem differs
    x = b.samples.clone()
    x[1] += 3.0
    c = bfd.diagnostics.reference_check(Result(x, b.log_weights, None, b.info, True), b, warn=False)
    assert c.differs.tolist() == [False, True]


def test_bad_arguments_are_refused_by_name():
    gmm, problem = _problem()
    g = torch.Generator().manual_seed(2)
    post = gmm.posterior(problem)
    r = Result(samples=post.sample(64, g))
    with pytest.raises(TypeError, match="reference must be a Result"):
        bfd.diagnostics.reference_check(r, post.sample(64, g))
    with pytest.raises(ValueError, match="same problem"):
        bfd.diagnostics.reference_check(r, Result(samples=torch.zeros(64, 3, dtype=DT)))
    with pytest.raises(ValueError, match="both be batched"):
        bfd.diagnostics.reference_check(r, Result(samples=r.samples[None], batched=True))
    with pytest.raises(ValueError, match="directions"):
        bfd.diagnostics.reference_check(r, r, directions=-1)
    bad = r.samples.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        bfd.diagnostics.reference_check(Result(samples=bad), r)


def test_a_weighted_result_without_a_genealogy_counts_its_effective_size():
    # importance-weighted prior draws (no roots): the errors must use 1 / sum W^2, not N
    gmm, problem = _problem()
    g = torch.Generator().manual_seed(5)
    post = gmm.posterior(problem)
    exact = Result(samples=post.sample(4000, g))
    x = gmm.sample(4000, g)
    logw = problem.log_likelihood(x[None])[0]
    res = Result(samples=x, log_weights=logw)
    ess = float(1 / (res.weights() ** 2).sum())
    assert ess < 1000  # far fewer than N = 4000
    c = bfd.diagnostics.reference_check(res, exact, warn=False)
    assert not bool(c.differs)

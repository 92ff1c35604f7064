"""Determinism of every sampler on CPU (small settings, float64 Gaussian-mixture problems).

- the same generator seed gives bit-identical samples, log-weights and log-evidence, the
  generator ends in the same state, and the global RNG is never touched;
- the prior's ``chunk_size`` (None vs 3) changes results only by float rounding
  (measured: at most 6e-14 in the samples, DFlow; 1.4e-14 in the log-weights, TDS);
- a problem's results do not depend on the batch it shares: exactly (bit for bit) when
  the other problems' observations change with the same seed, or when an unbatched ``y``
  becomes a batch of one; in distribution when problem 0 runs alone vs in a batch of 3
  (the RNG streams then differ: independent replicate runs, Welch t on their means).
"""

import math
import sys
from pathlib import Path

import pytest
import torch

import bayesfilter_diff as bfd

sys.path.insert(0, str(Path(__file__).parent))
import _reliability_cases as rc  # noqa: E402

SAMPLERS = rc.small_samplers()
NAMES = list(SAMPLERS)
MASK = torch.tensor([True, False, True])


def _setup(name: str, chunk_size=None):
    """Prior (flow for PiGDMFlow, VP otherwise), a Mask operator (fits every sampler), y."""
    gmm = rc.mixture()
    sched = bfd.FlowSchedule() if name == "PiGDMFlow" else bfd.VPSchedule.linear()
    prior, _ = rc.counting_prior(gmm, sched, chunk_size=chunk_size)
    A = bfd.operators.Mask(MASK, dtype=rc.D)
    y = rc.observe(A, 3, 0.3, gmm=gmm)
    return gmm, prior, A, y


def _parts(res):
    return [p for p in (res.samples, res.log_weights, res.log_evidence) if p is not None]


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_is_bit_identical_and_global_rng_untouched(name):
    _, prior, A, y = _setup(name)
    problem = bfd.InverseProblem(A, y, 0.3)
    sampler = SAMPLERS[name]
    state = torch.random.get_rng_state()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = sampler.sample(prior, problem, 16, g1)
    b = sampler.sample(prior, problem, 16, g2)
    assert all(torch.equal(u, v) for u, v in zip(_parts(a), _parts(b)))
    assert torch.equal(g1.get_state(), g2.get_state())
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG was used"
    c = sampler.sample(prior, problem, 16, torch.Generator().manual_seed(8))
    assert not torch.equal(a.samples, c.samples), "the generator does not drive the sampler"


@pytest.mark.parametrize("name", NAMES)
def test_chunk_size_changes_results_only_by_rounding(name):
    _, whole, A, y = _setup(name)
    _, chunked, _, _ = _setup(name, chunk_size=3)
    problem = bfd.InverseProblem(A, y, 0.3)
    a = SAMPLERS[name].sample(whole, problem, 16, torch.Generator().manual_seed(0))
    b = SAMPLERS[name].sample(chunked, problem, 16, torch.Generator().manual_seed(0))
    for u, v in zip(_parts(a), _parts(b)):
        assert float((u - v).abs().max()) <= 1e-10


@pytest.mark.parametrize("name", NAMES)
def test_problem_does_not_depend_on_the_other_problems_of_its_batch(name):
    _, prior, A, y = _setup(name)
    y_other = y.clone()
    y_other[1:] = 30 * y_other[1:] + 7  # very different neighbours, same shapes
    sampler = SAMPLERS[name]
    a = sampler.sample(prior, bfd.InverseProblem(A, y, 0.3), 16, torch.Generator().manual_seed(0))
    b = sampler.sample(
        prior, bfd.InverseProblem(A, y_other, 0.3), 16, torch.Generator().manual_seed(0)
    )
    # the noise drawn depends only on shapes, so problem 0 must be unchanged bit for bit
    for u, v in zip(_parts(a), _parts(b)):
        assert torch.equal(u[0], v[0])
    # and an unbatched y is exactly a batch of one
    c = sampler.sample(
        prior, bfd.InverseProblem(A, y[0], 0.3), 16, torch.Generator().manual_seed(0)
    )
    d = sampler.sample(
        prior, bfd.InverseProblem(A, y[:1], 0.3), 16, torch.Generator().manual_seed(0)
    )
    for u, v in zip(_parts(c), _parts(d)):
        assert torch.equal(u, v[0])


def _replicate_means(sampler, prior, problem, index, seeds, n):
    out = []
    for s in seeds:
        res = sampler.sample(prior, problem, n, torch.Generator().manual_seed(s))
        m = res.mean()
        out.append(m[index] if problem.batched else m)
    return torch.stack(out)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.slow
def test_problem_alone_and_in_a_batch_have_the_same_distribution(name):
    _, prior, A, y = _setup(name)
    sampler = SAMPLERS[name]
    if sampler.weighted:  # enough steps for the weights to matter
        sampler = type(sampler)(**{**rc.SMALL[name], "num_steps": 10})
    R, n = 8, 64
    alone = _replicate_means(sampler, prior, bfd.InverseProblem(A, y[0], 0.3), 0, range(R), n)
    batch = _replicate_means(
        sampler, prior, bfd.InverseProblem(A, y, 0.3), 0, range(100, 100 + R), n
    )
    # Welch t per coordinate on independent replicate means; coordinates the sampler
    # pins (observed entries of a mask) have zero variance and must agree exactly
    va, vb = alone.var(0), batch.var(0)
    diff = (alone.mean(0) - batch.mean(0)).abs()
    se = ((va + vb) / R).sqrt()
    pinned = se < 1e-12
    assert bool((diff[pinned] < 1e-10).all())
    t = diff[~pinned] / se[~pinned]
    # |t| > 6 has probability < 1e-4 per coordinate under the null (t with >= 7 df: 3e-4)
    assert bool((t < 6).all()), f"{name}: t = {t.tolist()}"
    assert not math.isnan(float(diff.sum()))

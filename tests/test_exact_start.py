"""The chain's start: the reference N(0, sigma_T^2 I) against a mixture's exact p_T.

A 1-D mixture with its modes at +-300 (unit variances, weights 0.3 / 0.7): at the end of the
VP path ``alpha_T m = +-1.97``, so the reference start, which ignores ``alpha_T x0``, gives
the modes the wrong weights (about 0.63 for the heavy one, a logistic average over the
start), which the chain keeps to t = 0; started from the exact noisy marginal it keeps 0.7.
Tolerances: 4 standard errors of the mode weight (binomial; for a weighted sampler, over its
genealogy ESS).
"""

import math

import pytest
import torch
from _helpers import SMALL_BENCHMARK

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.registry import build

DT = torch.float64


def _mixture() -> bfd.GaussianMixture:
    return bfd.GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=DT),
        torch.tensor([[-300.0], [300.0]], dtype=DT),
        torch.ones(2, dtype=DT),
    )


def _heavy_weight(x: torch.Tensor, W: torch.Tensor | None = None) -> float:
    pos = (x.reshape(-1) > 0).to(DT)
    return float(pos.mean() if W is None else (W.reshape(-1).to(DT) * pos).sum())


def _dummy() -> bfd.InverseProblem:
    return bfd.InverseProblem(
        bfd.operators.Dense(torch.zeros(1, 1, dtype=DT)), torch.zeros(1, dtype=DT), 1.0
    )


def test_sample_noisy_is_the_exact_marginal():
    gmm = _mixture()
    sch = bfd.VPSchedule.linear()
    prior = gmm.diffusion(sch, exact_start=True)
    t = torch.tensor(1.0, dtype=DT)
    x = prior.sample_noisy(t, (4, 5000), torch.Generator().manual_seed(0))
    assert x.shape == (4, 5000, 1)
    a, s = float(sch.alpha(t)), float(sch.sigma(t))
    # mean 0.4 * 300 alpha; variance 1 - alpha^2 + alpha^2 (1 + Var of the means)
    mean = a * 300 * (0.7 - 0.3)
    var = s**2 + a**2 * (1 + 300**2 * (1 - 0.4**2))
    n = x.numel()
    assert abs(float(x.mean()) - mean) < 4 * math.sqrt(var / n)
    assert abs(float(x.var()) / var - 1) < 4 * math.sqrt(2 / n)


def test_the_reference_start_misweights_far_modes_and_the_exact_start_does_not():
    gmm = _mixture()
    N = 4000
    se = math.sqrt(0.7 * 0.3 / N)
    got = {}
    for exact in (False, True):
        prior = gmm.diffusion(bfd.VPSchedule.linear(), exact_start=exact)
        res = build("DDIM", 20).sample(
            prior, _dummy(), N, generator=torch.Generator().manual_seed(1)
        )
        got[exact] = _heavy_weight(res.samples)
    assert abs(got[True] - 0.7) < 4 * se, got
    assert got[False] < 0.7 - 6 * se, got  # the chain's own prior is off


def test_tds_from_the_exact_start_weights_the_posterior_modes_right():
    gmm = _mixture()
    # a broad observation of x: both modes keep posterior mass
    problem = bfd.InverseProblem(
        bfd.operators.Dense(torch.ones(1, 1, dtype=DT)), torch.tensor([100.0], dtype=DT), 300.0
    )
    w_exact = float(gmm.posterior(problem).weights[1])
    prior = gmm.diffusion(bfd.VPSchedule.linear(), exact_start=True)
    res = build("TDS", 20).sample(prior, problem, 4000, generator=torch.Generator().manual_seed(2))
    w = _heavy_weight(res.samples, res.weights())
    ess = float(res.info.genealogy_ess)
    assert abs(w - w_exact) < 4 * math.sqrt(w_exact * (1 - w_exact) / ess), (w, w_exact, ess)
    lz = float(gmm.log_evidence(problem))
    assert abs(float(res.log_evidence) - lz) < 0.1


def test_samplers_with_a_closed_form_reference_start_refuse_an_exact_start():
    gmm = _mixture()
    prior = gmm.diffusion(bfd.VPSchedule.linear(), exact_start=True)
    problem = bfd.InverseProblem(
        bfd.operators.Dense(torch.ones(1, 1, dtype=DT)), torch.tensor([100.0], dtype=DT), 300.0
    )
    with pytest.raises(ValueError, match="exact_start=False"):
        build("MCGdiff", 5).sample(prior, problem, 8)
    with pytest.raises(TypeError, match="exact_start"):
        gmm.diffusion(bfd.VPSchedule.linear(), exact_start=1)  # type: ignore[arg-type]
    net = bfd.DiffusionModel(lambda x, t: x, bfd.VPSchedule.linear(), (1,))
    assert net.exact_start is False
    with pytest.raises(NotImplementedError, match="noisy marginals"):
        net.sample_noisy(1.0, (2,))


def test_the_benchmark_study_runs_from_the_exact_start(tmp_path):
    from bayesfilter_diff.studies.store import ResultStore
    from bayesfilter_diff.studies.validate import validate

    small = {**SMALL_BENCHMARK, "exact_start": True}
    with pytest.raises(ValueError, match="MCGdiff"):
        validate(tmp_path / "a", config=small, methods=["MCGdiff"], progress=False)
    res = validate(tmp_path / "b", config=small, methods=["TDS"], progress=False)
    assert "**Exact start**" in res["text"] and len(res["chain"]) == 1
    store = ResultStore(tmp_path / "b")
    cells = [store.load(k)["cell"] for k in store.keys()]
    assert len(cells) == 2 and all(c["exact_start"] is True for c in cells)


def test_a_far_reference_start_warns_and_the_exact_start_does_not():
    gmm = _mixture()
    prob = bfd.InverseProblem(
        bfd.operators.Dense(torch.ones(1, 1, dtype=DT)), torch.tensor([100.0], dtype=DT), 300.0
    )
    with pytest.warns(bfd.PosteriorQualityWarning, match="exact_start=True"):
        res = build("TDS", 5).sample(gmm.diffusion(bfd.VPSchedule.linear()), prob, 64)
    assert res.info.start_kl is not None and res.info.start_kl > 0.5  # ~0.97 nats here
    assert [q.kind for q in res.info.quality].count("start") == 1
    exact = gmm.diffusion(bfd.VPSchedule.linear(), exact_start=True)
    res = build("TDS", 5).sample(exact, prob, 64)
    assert res.info.start_kl is None and "start" not in [q.kind for q in res.info.quality]
    # a prior whose mass sits near the origin on the scale 1 / alpha_T: no finding
    near = bfd.GaussianMixture(
        torch.tensor([0.5, 0.5], dtype=DT),
        torch.tensor([[-2.0], [2.0]], dtype=DT),
        torch.ones(2, dtype=DT),
    )
    res = build("TDS", 5).sample(near.diffusion(bfd.VPSchedule.linear()), prob, 64)
    assert res.info.start_kl is not None and res.info.start_kl < 1e-3
    assert "start" not in [q.kind for q in res.info.quality]

"""Numerical edges: extreme noise levels, observations far in a mixture's tail, degenerate
weights, and 16-bit networks with 32-bit bookkeeping.

The SMC samplers (MCGdiff, TDS when importable, FPS-SMC; SMCDiff where a mask fits) must
give finite samples (and, for MCGdiff / TDS, a finite log-evidence estimate) in float32;
the exact posterior must stay finite where naive float32 weights underflow; a problem
whose weights all vanish must raise :class:`DegenerateWeightsError` naming the step and
the problem; every sampler must run with a bfloat16 / float16 network.
"""

import copy
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.studies.noise_levels import noise_problem

sys.path.insert(0, str(Path(__file__).parent))
import _reliability_cases as rc  # noqa: E402

F32 = torch.float32
CLASSES = rc.sampler_classes()
SMC = [n for n in ("MCGdiff", "TDS", "FPSSMC") if n in CLASSES]
EVIDENCE = [n for n in ("MCGdiff", "TDS") if n in CLASSES]


def _mixture(dtype=F32) -> bfd.GaussianMixture:
    """Three components in R^4 (isotropic), well separated."""
    means = torch.tensor([[3.0, 0, 0, 0], [-3, 1, 0, 0], [0, -3, 1, 0]], dtype=dtype)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=dtype)
    return bfd.GaussianMixture(w, means, torch.tensor([0.3, 0.5, 0.4], dtype=dtype))


def _operator(dtype=F32) -> bfd.operators.Dense:
    g = torch.Generator().manual_seed(0)
    return bfd.operators.Dense(torch.randn(2, 4, generator=g, dtype=dtype))


def _finite_result(res, name: str) -> None:
    assert bool(torch.isfinite(res.samples).all()), f"{name}: non-finite samples"
    if res.log_weights is not None:
        lw = res.log_weights
        assert not bool(torch.isnan(lw).any()), f"{name}: NaN log-weights"
        assert bool(torch.isfinite(lw).any(-1).all()), f"{name}: all weights of a problem zero"
    if name in EVIDENCE:
        assert res.log_evidence is not None and bool(torch.isfinite(res.log_evidence).all())


# --------------------------------------------------------------------------------------
# 1. sigma_y from 1e-6 to 1e3 (float32)


@pytest.mark.parametrize("name", SMC)
@pytest.mark.parametrize("sigma_y", [1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e3])
def test_noise_level_extremes_give_finite_results(name, sigma_y):
    g = torch.Generator().manual_seed(0)
    gmm = _mixture()
    A = _operator()
    y = A(gmm.sample(2, g)) + sigma_y * torch.randn(2, 2, generator=g, dtype=F32)
    problem = bfd.InverseProblem(A, y, sigma_y)
    exact = gmm.log_evidence(problem)
    assert bool(torch.isfinite(exact).all())
    res = CLASSES[name](num_steps=20).sample(
        gmm.diffusion(bfd.VPSchedule.linear()), problem, 256, torch.Generator().manual_seed(1)
    )
    assert res.samples.dtype == F32
    _finite_result(res, name)
    if name in EVIDENCE and sigma_y >= 1.0:
        # where the likelihood is not sharp the estimate is also close to the truth (measured
        # errors at N = 256, 20 steps: <= 0.84 nats, MCGdiff at sigma_y = 1); for
        # sigma_y <= 1e-2 it is finite but far off (-1e9 at 1e-6: MCGdiff's final swap of
        # its kappa2 = 1e-4 potential for sigma_y^2, TDS's sharp twist) -- a limitation of
        # the estimators at N = 256, not of the arithmetic
        assert torch.allclose(res.log_evidence, exact, atol=1.0), (res.log_evidence, exact)


# --------------------------------------------------------------------------------------
# 2. an observation far in the tail (float32)


@pytest.mark.parametrize("kind", ["iso", "full"])
def test_far_tail_observation_exact_posterior_and_smc_stay_finite(kind):
    means = torch.tensor([[3.0, 0], [-3, 1], [0, -3]], dtype=F32)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=F32)
    if kind == "iso":
        cov = torch.tensor([0.3, 0.5, 0.4], dtype=F32)
    else:
        cov = torch.tensor(
            [[[0.3, 0.1], [0.1, 0.2]], [[0.5, 0.0], [0.0, 0.5]], [[0.4, -0.1], [-0.1, 0.3]]],
            dtype=F32,
        )
    gmm = bfd.GaussianMixture(w, means, cov)
    A = bfd.operators.Identity(2, dtype=F32)
    y = torch.tensor([[60.0, -45.0], [1.0, 0.5]], dtype=F32)  # problem 0: ~ 20 sd away
    problem = bfd.InverseProblem(A, y, 0.5)
    # naive float32 weights w_k N(y; A mu_k, G_k) underflow to 0 for problem 0 (0/0 = NaN)
    *_, loglik = gmm._observation_terms(problem)
    naive = gmm.weights * torch.exp(loglik.to(F32))
    assert bool((naive[0] == 0).all())
    # the log-space path: finite posterior weights summing to one, finite evidence
    post = gmm.posterior(problem)
    assert bool(torch.isfinite(post.weights).all()) and bool(torch.isfinite(post.means).all())
    assert torch.allclose(post.weights.sum(-1), torch.ones(2), atol=1e-6)
    le = gmm.log_evidence(problem)
    assert bool(torch.isfinite(le).all()) and float(le[0]) < -1000
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    for name in SMC:
        res = CLASSES[name](num_steps=50).sample(
            prior, problem, 256, torch.Generator().manual_seed(1)
        )
        _finite_result(res, name)


# --------------------------------------------------------------------------------------
# 3. all weights of one problem degenerate


def _step_and_problems(message: str) -> tuple[int, list[int]]:
    m = re.search(r"problem\(s\) \[([\d, ]+)\] became zero or NaN at step (\d+)", message)
    assert m, message
    return int(m.group(2)), [int(v) for v in m.group(1).split(",")]


@pytest.mark.skipif("TDS" not in CLASSES, reason="TDS not importable")
def test_custom_likelihood_minus_inf_for_one_problem_raises_naming_it():
    gmm = rc.mixture(dtype=F32)
    A = rc.dense(dtype=F32)
    y = rc.observe(A, 3, 0.1, gmm=gmm)

    def ll(x, yy):
        out = -0.5 * ((yy - A(x)) ** 2).sum(-1) / 0.01
        return torch.where(torch.arange(3)[:, None] == 1, -math.inf, out)

    problem = bfd.InverseProblem(A, y, log_likelihood_fn=ll)
    with pytest.raises(bfd.DegenerateWeightsError) as err:
        CLASSES["TDS"](num_steps=10).sample(
            gmm.diffusion(bfd.VPSchedule.linear()), problem, 16, torch.Generator().manual_seed(0)
        )
    step, probs = _step_and_problems(str(err.value))
    assert probs == [1] and step == 0 and "TDS" in str(err.value)


class _NaNForProblem1(torch.nn.Module):
    """The exact denoiser, NaN for the particles of problem 1 once t < 0.5."""

    def __init__(self, gmm, schedule, num_samples: int):
        super().__init__()
        self.inner = gmm.diffusion(schedule).net
        self.n = num_samples

    def forward(self, x, t):
        out = self.inner(x, t)
        rows = torch.arange(x.shape[0])
        bad = (rows >= self.n) & (rows < 2 * self.n) & (t < 0.5)
        return torch.where(bad[:, None], torch.full_like(out, math.nan), out)


# first reweighting (the loop's step k: weights of the particles at times[k]) that uses the
# network at t < 0.5: MCGdiff / TDS evaluate it at the end of the move that lands on the
# first grid time below 0.5, on the particles there (their look-ahead / twist); FPS-SMC and
# SMCDiff at the start of the next move, whose weight lands one step later
_LAG = {"MCGdiff": 0, "TDS": 0, "FPSSMC": 1, "SMCDiff": 1}


@pytest.mark.parametrize("name", [n for n in _LAG if n in CLASSES])
def test_network_nan_for_one_problem_raises_naming_step_and_problem(name):
    N = 16
    gmm = rc.mixture(dtype=F32)
    sched = bfd.VPSchedule.linear()
    prior = bfd.DiffusionModel(_NaNForProblem1(gmm, sched, N), sched, (rc.DIM,))
    A = bfd.operators.Mask(torch.tensor([True, False, True]), dtype=F32)
    problem = bfd.InverseProblem(A, rc.observe(A, 3, 0.1, gmm=gmm), 0.1)
    sampler = CLASSES[name](num_steps=10)
    times = sampler.time_grid(prior, problem)  # MCGdiff's grid has its tau_i inserted
    first = int(torch.nonzero(times < 0.5)[0]) + _LAG[name]
    with pytest.raises(bfd.DegenerateWeightsError) as err:
        sampler.sample(prior, problem, N, torch.Generator().manual_seed(0))
    step, probs = _step_and_problems(str(err.value))
    assert probs == [1] and step == first, str(err.value)


@pytest.mark.parametrize("name", [n for n in ("MCGdiff", "FPSSMC", "TDS") if n in CLASSES])
def test_float32_overflowing_observation_raises_naming_the_problem(name):
    gmm = rc.mixture(dtype=F32)
    A = rc.dense(dtype=F32)
    y = rc.observe(A, 3, 0.1, gmm=gmm)
    y[1] = 1e30  # finite, but its squared residual overflows float32
    problem = bfd.InverseProblem(A, y, 0.1)
    with pytest.raises(bfd.DegenerateWeightsError) as err:
        CLASSES[name](num_steps=10).sample(
            gmm.diffusion(bfd.VPSchedule.linear()), problem, 16, torch.Generator().manual_seed(0)
        )
    step, probs = _step_and_problems(str(err.value))
    assert probs == [1] and step == 0


# --------------------------------------------------------------------------------------
# 4. 16-bit networks, 32-bit bookkeeping


class LowPrecisionNet(torch.nn.Module):
    """The exact mixture denoiser evaluated in ``dtype``: casts x, t in and the output back."""

    def __init__(self, gmm, schedule, dtype):
        super().__init__()
        self.inner = copy.deepcopy(gmm).to(dtype).diffusion(schedule).net
        self.dtype = dtype

    def forward(self, x, t):
        return self.inner(x.to(self.dtype), t.to(self.dtype)).to(x.dtype)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_sixteen_bit_network_runs_every_sampler_with_finite_weights(half):
    gmm = rc.mixture(dtype=F32)
    A = bfd.operators.Mask(torch.tensor([True, False, True]), dtype=F32)
    problem = bfd.InverseProblem(A, rc.observe(A, 2, 0.1, gmm=gmm), 0.1)
    for name, cls in CLASSES.items():
        sched = bfd.FlowSchedule() if name == "PiGDMFlow" else bfd.VPSchedule.linear()
        prior = bfd.DiffusionModel(LowPrecisionNet(gmm, sched, half), sched, (rc.DIM,))
        kw = dict(rc.SMALL.get(name, {}))
        if "num_steps" in kw and cls.weighted:
            kw["num_steps"] = 20
        res = cls(**kw).sample(prior, problem, 64, torch.Generator().manual_seed(0))
        assert res.samples.dtype == F32, name
        _finite_result(res, name)
        if cls.weighted:
            assert bool(torch.isfinite(res.info["log_evidence"]).all()), name
            assert bool((res.ess() >= 1).all()), name


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_sixteen_bit_problem_runs_in_float32_and_matches_the_exact_evidence(half):
    # A 16-bit y, operator and prior: the run is float32 inside (only the network call stays
    # 16-bit), so the evidence and the draws match a float32 run within Monte Carlo error.
    R, N = 8, 500
    gmm, one = noise_problem(8, 0.1, seed=0)
    A = one.operator
    y = one.y.expand(R, 2)
    exact = float(gmm.log_evidence(one))
    sampler = bfd.samplers.MCGdiff(num_steps=50)
    runs = {}
    for dt in (F32, half):
        A_dt = copy.deepcopy(A).to(dt)
        prior = copy.deepcopy(gmm).to(dt).diffusion(bfd.VPSchedule.linear())
        problem = bfd.InverseProblem(A_dt, y.to(dt).contiguous(), noise_std=0.1)
        res = sampler.sample(prior, problem, N, torch.Generator().manual_seed(1))
        assert res.samples.dtype == dt and A_dt.M.dtype == dt  # the caller's operator untouched
        runs[dt] = res.log_evidence
    # the R replicate estimates: 16-bit and float32 agree with each other and the exact value
    se = torch.sqrt((runs[F32].var() + runs[half].var()) / R)
    assert abs(float(runs[half].mean() - runs[F32].mean())) < 4 * float(se)
    assert abs(float(runs[half].mean()) - exact) < 4 * float(runs[half].std() / R**0.5)


@pytest.mark.parametrize("shape", [(4, 8, 196_608), (8, 196_608), (16, 512, 800), (64, 4099)])
def test_float32_row_dots_of_the_log_weights_keep_float32_accuracy(shape):
    """The samplers' weighted sums of squares (``kernels.rowdot``) in float32 stay within a
    few float32 roundings of the float64 sum at image size, for batched problems too.
    ``torch.einsum("...d,...d->...")`` took a batched matrix-product path there whose
    error reached ~1e-5 of the sum (two nats of a log-weight ~2e5 in magnitude, at every
    step): the bound here, 1e-6, is ~16 float32 epsilons (a cascade sum's ``log2 d``)."""
    from bayesfilter_diff.samplers.kernels import rowdot, rowsq

    g = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=g) + 0.3
    b = torch.randn(shape, generator=g) + 0.3
    for x, y in ((a, a), (a, b)):
        want = (x.double() * y.double()).sum(-1)
        err = (rowdot(x, y).double() - want).abs() / (x.double() * y.double()).abs().sum(-1)
        assert float(err.max()) < 1e-6
    # the sums of squares as squared norms (kernels.rowsq): the same bound
    want = (a.double() ** 2).sum(-1)
    assert float(((rowsq(a).double() - want).abs() / want).max()) < 1e-6

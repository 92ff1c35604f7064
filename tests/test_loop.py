"""The shared particle loop on toy samplers with known answers."""

import math
from dataclasses import dataclass

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.base import SMCSampler


@dataclass(frozen=True)
class _ToyIS(SMCSampler):
    """Particles from N(0, 1) per coordinate; weights p(y|x) split evenly over the steps.

    The evidence estimate is then an importance-sampling estimate of p(y) under a N(0, I)
    prior, and the weighted particles target the exact posterior.
    """

    bad_problem: int = -1

    def init(self, ctx):
        return {"x": ctx.randn()}, None

    def step(self, ctx, state, i, t, t_next):
        ll = ctx.problem.log_likelihood(state["x"]) / self.num_steps
        if self.bad_problem >= 0 and i == 2:
            ll = ll.clone()
            ll[self.bad_problem] = float("-inf")
        return state, ll


def _problem(B=4, sigma=1.0):
    g = torch.Generator().manual_seed(0)
    A = bfd.operators.Identity((2,), dtype=torch.float64)
    y = torch.randn(B, 2, generator=g, dtype=torch.float64)
    return bfd.InverseProblem(A, y, sigma)


def _prior():
    gmm = bfd.GaussianMixture(
        torch.ones(1, dtype=torch.float64),
        torch.zeros(1, 2, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
    )
    return gmm, gmm.diffusion(bfd.VPSchedule.linear())


@pytest.mark.parametrize("thr", [0.0, 0.5, 1.0])
def test_evidence_and_posterior_mean(thr):
    gmm, prior = _prior()
    problem = _problem()
    res = _ToyIS(num_steps=5, ess_threshold=thr).sample(
        prior, problem, 20000, torch.Generator().manual_seed(1)
    )
    exact = gmm.log_evidence(problem)
    # resampling between reweightings keeps the estimator unbiased for Z; tolerance from a
    # crude bound: relative sd of the weights ~ sqrt(e^{chi2}) / sqrt(N)
    assert torch.allclose(res.log_evidence, exact, atol=0.05)
    post = gmm.posterior(problem)
    se = torch.sqrt(post.covariance().diagonal(dim1=-2, dim2=-1) / res.ess()[:, None])
    assert ((res.mean() - post.mean()).abs() < 5 * se).all()
    assert res.info["ess"].shape == (5, 4) and res.info["resampled"].shape == (5, 4)
    if thr == 1.0:
        assert res.info["resampled"][:-1].all() and not res.info["resampled"][-1].any()
    if thr == 0.0:
        assert not res.info["resampled"].any()


def test_degenerate_weights_raise_naming_step_and_problem():
    _, prior = _prior()
    with pytest.raises(bfd.DegenerateWeightsError, match=r"problem\(s\) \[2\].*step 2"):
        _ToyIS(num_steps=5, bad_problem=2).sample(
            prior, _problem(), 100, torch.Generator().manual_seed(0)
        )


def test_unbatched_result_shapes_and_draws():
    _, prior = _prior()
    A = bfd.operators.Identity((2,), dtype=torch.float64)
    problem = bfd.InverseProblem(A, torch.zeros(2, dtype=torch.float64), 1.0)
    res = _ToyIS(num_steps=3).sample(prior, problem, 50, torch.Generator().manual_seed(0))
    assert res.samples.shape == (50, 2) and res.log_weights.shape == (50,)
    assert res.log_evidence.shape == ()
    assert res.draws(70, torch.Generator().manual_seed(0)).shape == (70, 2)
    assert math.isclose(float(res.weights().sum()), 1.0)


def test_determinism():
    _, prior = _prior()
    a = _ToyIS(num_steps=4).sample(prior, _problem(), 64, torch.Generator().manual_seed(3))
    b = _ToyIS(num_steps=4).sample(prior, _problem(), 64, torch.Generator().manual_seed(3))
    assert torch.equal(a.samples, b.samples) and torch.equal(a.log_weights, b.log_weights)


def test_input_errors():
    gmm, prior = _prior()
    problem = _problem()
    s = _ToyIS(num_steps=2)
    with pytest.raises(ValueError, match="num_samples"):
        s.sample(prior, problem, 0)
    with pytest.raises(TypeError, match="prior"):
        s.sample(gmm, problem, 10)
    A3 = bfd.operators.Identity((3,), dtype=torch.float64)
    with pytest.raises(ValueError, match="event shape"):
        s.sample(prior, bfd.InverseProblem(A3, torch.zeros(3, dtype=torch.float64), 0.1), 10)
    with pytest.raises(ValueError, match="resampling"):
        _ToyIS(resampling="bogus")
    with pytest.raises(ValueError, match="ess_threshold"):
        _ToyIS(ess_threshold=2.0)
    with pytest.raises(ValueError, match="num_steps"):
        _ToyIS(num_steps=0)


class _RecordingEps(torch.nn.Module):
    """An eps-network with trainable parameters that records whether autograd was on."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(d, d, dtype=torch.float64)
        self.grad_modes: list[bool] = []

    def forward(self, x, t):
        self.grad_modes.append(torch.is_grad_enabled())
        return 0.1 * self.lin(x)


@pytest.mark.parametrize(
    "name,needs_grad", [("MCGdiff", False), ("DDRM", False), ("FPSSMC", False), ("DPS", True)]
)
def test_network_runs_without_autograd_unless_the_sampler_differentiates_it(name, needs_grad):
    # A network whose parameters require gradients (any nn.Module by default) must not build
    # graphs in samplers that never differentiate it: the activations would stay alive.
    net = _RecordingEps(4)
    prior = bfd.DiffusionModel.from_eps(net, bfd.VPSchedule.linear(), (4,))
    op = bfd.operators.Mask(torch.tensor([True, False, True, False]), dtype=torch.float64)
    problem = bfd.InverseProblem(op, torch.zeros(2, dtype=torch.float64), noise_std=0.1)
    res = getattr(bfd.samplers, name)(num_steps=4).sample(
        prior, problem, 3, torch.Generator().manual_seed(0)
    )
    assert not res.samples.requires_grad
    assert net.grad_modes and all(m == needs_grad for m in net.grad_modes), net.grad_modes

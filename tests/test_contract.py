"""One contract over every sampler of the registry (Pyro's one-test-over-all-distributions).

For each entry, with its small settings, on the toy problems its declared requirements
admit: the Result's shapes, weights and trace; determinism; that a batched problem gives
each problem what it gets alone in distribution is in ``test_determinism.py``. On the problems
its requirements exclude: a ValueError naming the sampler before any network call.
"""

import math

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.registry import REGISTRY

DT = torch.float64
D = 4
ENTRIES = list(REGISTRY.values())


def _gmm() -> bfd.GaussianMixture:
    g = torch.Generator().manual_seed(0)
    return bfd.GaussianMixture(
        torch.tensor([0.4, 0.6], dtype=DT),
        2.0 + 0.5 * torch.randn(2, D, generator=g, dtype=DT),  # A x > 0: Poisson rates
        torch.tensor([0.5, 0.8], dtype=DT),
    )


class _Quadratic(bfd.operators.Operator):
    """A nonlinear forward model ``y = (W x)^2`` (phase-retrieval-like, on vectors)."""

    def __init__(self, W):
        super().__init__((W.shape[1],), (W.shape[0],))
        self.register_buffer("W", W)

    def forward(self, x):
        return (x @ self.W.T) ** 2


class _DenseNoSVD(bfd.operators.Dense):
    has_svd = False


def _problems() -> dict[str, bfd.InverseProblem]:
    g = torch.Generator().manual_seed(1)
    dense = bfd.operators.Dense(torch.randn(2, D, generator=g, dtype=DT))
    mask = bfd.operators.Mask(torch.tensor([True, False, True, False]), dtype=DT)
    y2 = torch.randn(3, 2, generator=g, dtype=DT)
    rate = bfd.operators.Dense(torch.rand(2, D, generator=g, dtype=DT) + 0.5)

    def student_t(x, y):  # a custom (Pyro-style) likelihood: Student-t(3) observations of x
        r = (y - x) / 0.3
        return (-2.0 * torch.log1p(r**2 / 3)).sum(-1)

    return {
        "dense-gaussian": bfd.InverseProblem(dense, y2, noise_std=0.3),
        "dense-noiseless": bfd.InverseProblem(dense, y2, noise_std=0.0),
        "mask-gaussian": bfd.InverseProblem(mask, y2, noise_std=0.3),
        "poisson": bfd.InverseProblem(
            rate, torch.tensor([[3.0, 5.0], [1.0, 0.0], [2.0, 2.0]], dtype=DT), noise="poisson"
        ),
        "custom": bfd.InverseProblem(
            bfd.operators.Identity((D,), dtype=DT),
            torch.full((3, D), 2.0, dtype=DT),
            log_likelihood_fn=student_t,
        ),
        "dense-no-svd": bfd.InverseProblem(_DenseNoSVD(dense.M.clone()), y2, noise_std=0.3),
        "nonlinear": bfd.InverseProblem(
            _Quadratic(torch.randn(3, D, generator=g, dtype=DT)),
            torch.rand(3, 3, generator=g, dtype=DT) + 0.5,
            noise_std=0.3,
        ),
    }


PROBLEMS = _problems()


class _Counting(torch.nn.Module):
    """The mixture's exact denoiser, counting calls."""

    def __init__(self, prior):
        super().__init__()
        self.prior = prior
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.prior.denoise(x, t)


def _prior(entry, counting=False):
    sched = bfd.FlowSchedule() if entry.path == "flow" else bfd.VPSchedule.linear()
    exact = _gmm().diffusion(sched)
    if not counting:
        return exact, None
    net = _Counting(exact)
    return bfd.DiffusionModel(net, sched, (D,)), net


def _cases():
    for e in ENTRIES:
        for pname, problem in PROBLEMS.items():
            yield pytest.param(e, pname, e.accepts(problem), id=f"{e.name}-{pname}")


@pytest.mark.parametrize("entry,pname,accepted", list(_cases()))
def test_contract(entry, pname, accepted):
    problem = PROBLEMS[pname]
    sampler = entry.build()
    prior, net = _prior(entry, counting=not accepted)
    g = torch.Generator().manual_seed(0)
    if not accepted:
        with pytest.raises(ValueError, match=type(sampler).__name__):
            sampler.sample(prior, problem, 5, generator=g)
        assert net.calls == 0, "refused only after network calls"
        return
    N, B = 5, problem.batch_size
    res = sampler.sample(prior, problem, N, generator=g)
    assert res.samples.shape == (B, N, D) and res.batched
    assert bool(torch.isfinite(res.samples).all())
    info = res.info
    assert isinstance(info, bfd.result.RunInfo) and info.nfe >= 1
    assert info.times is not None and info.num_steps == info.times.numel() - 1
    assert info.distinct.shape == (B,) and bool((info.distinct >= 1).all())
    if entry.weighted:
        assert res.log_weights.shape == (B, N) and res.log_weights.dtype == torch.float64
        torch.testing.assert_close(res.weights().sum(-1), torch.ones(B, dtype=DT))
        assert info.ess.shape == (info.num_steps + 1, B)
        assert info.resampled.shape == info.ess.shape and info.resampled.dtype == torch.bool
        assert bool(((info.min_ess >= 1 - 1e-9) & (info.min_ess <= N + 1e-9)).all())
        assert bool(((info.ancestors >= 1) & (info.ancestors <= N)).all())
        if getattr(entry.cls, "estimates_evidence", True):
            assert res.log_evidence.shape == (B,)
    else:
        assert res.log_weights is None and res.log_evidence is None and info.ess is None
        assert "ess" not in info and info.get("ess") is None
    # same generator state, same inputs: the same result, bit for bit
    again = sampler.sample(prior, problem, N, generator=torch.Generator().manual_seed(0))
    assert torch.equal(res.samples, again.samples)
    # an unbatched observation drops the batch axis everywhere
    one = bfd.InverseProblem(
        problem.operator,
        problem.y[0],
        noise_std=problem.noise_std,
        noise=problem.noise,
        log_likelihood_fn=problem.log_likelihood_fn,
    )
    r1 = sampler.sample(prior, one, N, generator=torch.Generator().manual_seed(0))
    assert r1.samples.shape == (N, D) and not r1.batched
    if entry.weighted:
        assert r1.log_weights.shape == (N,) and math.isclose(float(r1.weights().sum()), 1.0)


def test_every_problem_kind_is_accepted_by_some_posterior_sampler():
    for pname, problem in PROBLEMS.items():
        assert any(e.accepts(problem) for e in ENTRIES if e.posterior), pname


def test_readme_method_table_states_the_declared_requirements():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and "`" in line]
    for e in ENTRIES:
        row = [r for r in rows if f"`{e.cls.__name__}`" in r.split("|")[2]]
        assert len(row) == 1, e.name
        cells = [c.strip() for c in row[0].strip("|").split("|")]
        req = e.cls.requires
        assert cells[3] == req.operator_text(), (e.name, cells[3])
        assert cells[4] == req.likelihood_text(), (e.name, cells[4])


def test_method_labels_name_a_sampler_and_its_overrides():
    from bayesfilter_diff.samplers.registry import build, parse_label

    assert parse_label("TDS") == ("TDS", {})
    name, ov = parse_label("TDS[proposal=gradient, ess_threshold=0.3]")
    assert (name, ov) == ("TDS", {"proposal": "gradient", "ess_threshold": 0.3})
    s = build(name, 20, **ov)
    assert s.proposal == "gradient" and s.ess_threshold == 0.3 and s.num_steps == 20
    for bad in ("TDS[proposal=gradient", "TDS[gradient]"):
        with pytest.raises(ValueError, match="method label"):
            parse_label(bad)

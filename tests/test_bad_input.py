"""Property-based bad-input tests over the public API (hypothesis).

Every category of ``tests/_reliability_cases.py`` (the generators that
``validation/reliability_table.py`` also runs): each case must be refused with a
``ValueError`` / ``TypeError`` naming the argument before the prior's network runs on the
particles, or -- where the input is valid for a sampler -- give finite numbers. Every
sampler class is run on every case whose inputs can be built.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import bayesfilter_diff as bfd
from bayesfilter_diff import NonFiniteSamplesError

sys.path.insert(0, str(Path(__file__).parent))
import _reliability_cases as rc  # noqa: E402

SAMPLERS = rc.small_samplers()

PROPERTY = settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _assert_good(case: rc.Case) -> None:
    outcomes = rc.evaluate(case, SAMPLERS)
    bad = [o for o in outcomes if not o.ok]
    assert not bad, "\n".join(map(str, bad))


def test_every_exported_sampler_is_registered_and_exercised():
    exported = {
        n
        for n in bfd.samplers.__all__
        if isinstance(getattr(bfd.samplers, n), type)
        and issubclass(getattr(bfd.samplers, n), bfd.samplers.Sampler)
        and getattr(bfd.samplers, n) not in (bfd.samplers.Sampler, bfd.samplers.SMCSampler)
        and n != "OTODE"  # an alias of PiGDMFlow
    }
    assert exported == set(SAMPLERS)


@pytest.mark.parametrize("category", [c for c in rc.CATEGORIES if c != "capability"])
def test_bad_input_is_refused_clearly_and_early(category):
    strategy, _ = rc.CATEGORIES[category]

    @PROPERTY
    @given(strategy)
    def prop(case):
        _assert_good(case)

    prop()


@PROPERTY
@given(rc.capability_strategy())
def test_every_sampler_runs_or_says_what_it_needs(case):
    _assert_good(case)


# ----------------------------------------------------------------------------------------
# Targeted regressions for the fixes (each also covered by the properties above)


def test_messages_name_the_argument_and_expectation():
    A = rc.dense()
    y = torch.zeros(rc.OBS, dtype=rc.D)
    with pytest.raises(ValueError, match=r"noise_std must be a finite number >= 0, got True"):
        bfd.InverseProblem(A, y, True)
    with pytest.raises(ValueError, match=r"noise_std=1e-200 is too small .*use noise_std=0"):
        bfd.InverseProblem(A, y, 1e-200)
    with pytest.raises(ValueError, match=r"noise_std=1e\+200 is too large"):
        bfd.InverseProblem(A, y, 1e200)
    with pytest.raises(ValueError, match=r"noise_std=1e-30 is too small for torch.float32"):
        bfd.InverseProblem(rc.dense(dtype=torch.float32), y.float(), 1e-30)
    w, means, cov = rc._gmm_args()
    with pytest.raises(ValueError, match="share one dtype"):
        bfd.GaussianMixture(w.float(), means, cov)
    with pytest.raises(ValueError, match=r"means must have shape .* d >= 1"):
        bfd.GaussianMixture(w, means[:, :0], torch.ones(2, dtype=rc.D))
    with pytest.raises(ValueError, match="DDIM: eta must be float, got True"):
        bfd.samplers.DDIM(eta=True)
    with pytest.raises(ValueError, match="MCGdiff: kappa2 must not be NaN"):
        bfd.samplers.MCGdiff(kappa2=math.nan)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        bfd.samplers.REDDiff(lr=math.inf)


def test_corrupted_inputs_are_caught_before_the_network_runs():
    prior, net = rc.counting_prior()
    problem = rc._problem(batch=2)
    problem.y[1, 0] = math.nan  # after validation
    with pytest.raises(ValueError, match="y must be finite"):
        bfd.samplers.DDIM(num_steps=3).sample(prior, problem, 4)
    gmm = rc.mixture()
    prior, net = rc.counting_prior(gmm)
    gmm.means[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"prior has NaN .*means"):
        bfd.samplers.MCGdiff(num_steps=3).sample(prior, rc._problem(), 4)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        bfd.samplers.MCGdiff(num_steps=3).sample(rc.counting_prior()[0], rc._problem(), 4, 7)
    assert net.calls == 0


def test_custom_likelihood_of_the_wrong_shape_is_refused_before_the_run():
    def ll(x, y):  # (N,) instead of (B, N)
        return -((x - 1) ** 2).sum(-1)[0]

    A = rc.dense()
    problem = bfd.InverseProblem(A, rc.observe(A, 2, 0.1), log_likelihood_fn=ll)
    prior, net = rc.counting_prior()
    for sampler in SAMPLERS.values():
        with pytest.raises(ValueError, match="log_likelihood_fn"):
            sampler.sample(prior, problem, 4)
    assert net.calls == 0


def test_diverging_run_raises_instead_of_returning_nan():
    class Diverging(torch.nn.Module):
        """The exact denoiser, but NaN below t = 0.5 (a broken network)."""

        def __init__(self):
            super().__init__()
            self.inner = rc.mixture().diffusion(bfd.VPSchedule.linear()).net

        def forward(self, x, t):
            out = self.inner(x, t)
            return torch.where((t < 0.5)[:, None], torch.full_like(out, math.nan), out)

    prior = bfd.DiffusionModel(Diverging(), bfd.VPSchedule.linear(), (rc.DIM,))
    problem = rc._problem(batch=2)
    for name in ("DDIM", "REDDiff", "DiffPIR", "DDRM", "PiGDM"):
        if name not in SAMPLERS:
            continue
        with pytest.raises(NonFiniteSamplesError, match=rf"{name} returned NaN or inf samples"):
            SAMPLERS[name].sample(prior, problem, 4, torch.Generator().manual_seed(0))


def test_sixteen_bit_prior_that_does_not_cast_is_refused_after_one_row():
    prior, net = rc.counting_prior()
    prior = prior.to(torch.bfloat16)
    A = rc.dense(dtype=torch.float32)
    problem = bfd.InverseProblem(A, rc.observe(A, 2, 0.1), 0.1)
    with pytest.raises(ValueError, match="mixed-precision network must cast"):
        bfd.samplers.FPSSMC(num_steps=3).sample(prior, problem, 4)
    assert net.rows == 1


@pytest.mark.cuda
def test_device_mismatches_are_refused():
    dev = torch.device("cuda")
    A = rc.dense()
    y = rc.observe(A, 2, 0.1)
    with pytest.raises(ValueError, match="device|cuda"):
        bfd.InverseProblem(A, y.to(dev), 0.1)  # operator on the CPU
    problem = bfd.InverseProblem(A.to(dev), y.to(dev), 0.1)
    prior, net = rc.counting_prior()  # on the CPU
    for sampler in SAMPLERS.values():
        with pytest.raises(ValueError, match="cuda|cpu"):
            sampler.sample(prior, problem, 4, torch.Generator(device=dev).manual_seed(0))
    prior = prior.to(dev)
    for sampler in SAMPLERS.values():
        with pytest.raises(ValueError, match="generator"):
            sampler.sample(prior, problem, 4, torch.Generator().manual_seed(0))  # CPU generator
    assert net.calls == 0
    res = SAMPLERS["MCGdiff"].sample(prior, problem, 4, torch.Generator(device=dev).manual_seed(0))
    assert res.samples.device.type == "cuda" and bool(torch.isfinite(res.samples).all())


@pytest.mark.slow
def test_the_full_corpus_of_at_least_1000_cases_has_no_failure():
    """The corpus of validation/reliability_table.py (60 derandomised examples per category,
    two categories enumerated): over 1000 distinct cases across the API, bfd.infer and the
    command line, every outcome good (a clear error naming the argument before the network
    runs, or a finite result where the input is valid)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "validation" / "reliability_table.py"
    spec = importlib.util.spec_from_file_location("reliability_table", path)
    assert spec is not None and spec.loader is not None
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    total, bad = 0, []
    for cat, (strategy, _) in rc.CATEGORIES.items():
        cases = table.EXHAUSTIVE[cat]() if cat in table.EXHAUSTIVE else table.collect(strategy, 60)
        total += len(cases)
        for case in cases:
            bad += [o for o in rc.evaluate(case, SAMPLERS) if not o.ok]
    assert total >= 1000, total
    assert not bad, "\n".join(map(str, bad[:20]))

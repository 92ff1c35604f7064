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


def _readme(d: int):
    """The README's mixture in ``d`` dimensions and its exact diffusion prior."""
    gmm = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7]),
        torch.stack([-2 * torch.ones(d), 2 * torch.ones(d)]),
        torch.ones(2),
    )
    return gmm, gmm.diffusion(bfd.VPSchedule.linear())


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
    gmm, prior = _readme(d)
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


# ------------------------------------------------------------- Pyro models' own sites


def _pyro_prior():
    gmm, prior = _readme(2)
    return gmm, prior, torch.tensor([[1.0, 0.5], [0.2, -1.0], [0.3, 0.3]])


def test_a_model_s_sites_are_drawn_in_the_order_of_y():
    """Two sites of other shapes in a plate of three problems, and an unbatched plate of
    coordinates computed from the event: at the true signals, with noise 1e-6, the draws
    are ``y`` entry by entry (so they line up with the problem's ``y``); a generator makes
    them reproducible and leaves torch's global generator alone."""
    import pyro
    import pyro.distributions as dist

    from bayesfilter_diff.inference import model_to_problem

    gmm, prior, W = _pyro_prior()

    def batched(y1=None, y2=None):
        with pyro.plate("data", 3):
            x = pyro.sample("x", bfd.DiffusionPrior(prior))
            pyro.sample("a", dist.StudentT(4.0, x @ W.T, 1e-6).to_event(1), obs=y1)
            pyro.sample("b", dist.Laplace(x.sum(-1), 1e-6), obs=y2)

    xs = gmm.sample(3, torch.Generator().manual_seed(0))
    _, problem, st = model_to_problem(batched, xs @ W.T, xs.sum(-1))
    assert st.kind == "custom" and problem.y.shape == (3, 4)
    xb = xs[:, None].expand(3, 5, 2)
    state = torch.random.get_rng_state()
    d1 = st.observed_draws(xb, torch.Generator().manual_seed(1))
    assert d1.shape == (3, 5, 4)
    torch.testing.assert_close(d1, problem.y[:, None].expand(3, 5, 4), atol=1e-4, rtol=0)
    assert torch.equal(d1, st.observed_draws(xb, torch.Generator().manual_seed(1)))
    assert torch.equal(state, torch.random.get_rng_state())

    def coords(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        with pyro.plate("coords", 3):
            pyro.sample("y", dist.StudentT(3.0, x @ W.T, 1e-6), obs=y)

    _, problem, st = model_to_problem(coords, xs[0] @ W.T)
    got = st.observed_draws(xs[0].expand(1, 6, 2))
    torch.testing.assert_close(got, problem.y.expand(1, 6, 3), atol=1e-4, rtol=0)


def test_a_student_t_model_s_sites_draw_their_law_and_typical_data_pass():
    """A Student-t site (a law the problem's noise models cannot draw): at a fixed signal
    the draws' standardised residuals follow t(2.5) (Kolmogorov-Smirnov at level 1e-3;
    a Normal of the same variance is rejected); 40 observations from the prior predictive,
    as a plate of problems, give uniform p-values and no alarm."""
    import pyro
    import pyro.distributions as dist
    from scipy import stats

    from bayesfilter_diff.inference import model_to_problem

    gmm, prior, W = _pyro_prior()
    g = torch.Generator().manual_seed(3)

    def model(y=None):
        with pyro.plate("data", 40):
            x = pyro.sample("x", bfd.DiffusionPrior(prior))
            pyro.sample("y", dist.StudentT(2.5, x @ W.T, 0.3).to_event(1), obs=y)

    x = gmm.sample(40, g)
    t = torch.distributions.StudentT(2.5).sample((40, 3))
    _, problem, st = model_to_problem(model, x @ W.T + 0.3 * t)
    xb = x[:, None].expand(40, 100, 2)
    r = ((st.observed_draws(xb, g) - (xb @ W.T)) / 0.3).flatten().numpy()
    assert stats.kstest(r, stats.t(2.5).cdf).pvalue > 1e-3
    assert stats.kstest(r, stats.norm(scale=math.sqrt(5)).cdf).pvalue < 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error", bfd.PosteriorQualityWarning)
        c = bfd.diagnostics.prior_predictive_check(
            prior, problem, 2048, g, observe=st.observed_draws
        )
    assert c.p_value.shape == (40,) and not bool(c.conflict.any())
    assert abs(float(c.p_value.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / 40)


def test_posterior_prior_predictive_check_draws_the_model_s_sites():
    """``Posterior.prior_predictive_check`` on a Pyro model with a Student-t site: a typical
    observation passes, one shifted by 40 noise scales is flagged, and the warning names the
    caller's line; a masked site is refused by name."""
    import pyro
    import pyro.distributions as dist

    gmm, prior, W = _pyro_prior()
    g = torch.Generator().manual_seed(4)

    def model(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", dist.StudentT(3.0, x @ W.T, 0.3).to_event(1), obs=y)

    y = gmm.sample(1, g)[0] @ W.T + 0.3 * torch.randn(3, generator=g)
    ddim = bfd.samplers.DDIM(num_steps=10)  # the check does not read the posterior's draws
    warnings.simplefilter("ignore", bfd.PosteriorQualityWarning)  # (DDIM ignores y)
    post = bfd.infer(model, ddim, y=y, num_samples=16, generator=g)
    assert post.kind == "custom"
    c = post.prior_predictive_check(1024, g, warn=False)
    assert not bool(c.conflict) and float(c.p_value) > 0.01
    far = bfd.infer(model, ddim, y=y + 12.0, num_samples=16, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = far.prior_predictive_check(1024, g)
    hits = [w for w in caught if "farther from the prior predictive" in str(w.message)]
    assert bool(c.conflict) and len(hits) == 1 and hits[0].filename == __file__

    def masked(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        m = torch.tensor([True, False, True])
        pyro.sample("y", dist.StudentT(3.0, x @ W.T, 0.3).mask(m).to_event(1), obs=y)

    post = bfd.infer(masked, ddim, y=y, num_samples=16, generator=g)
    with pytest.raises(ValueError, match="'y' is masked"):
        post.prior_predictive_check(256, g)


def test_a_site_that_reads_another_observed_site_sees_its_draw():
    """``y2 ~ N(y1, 0.1)`` after ``y1 ~ N(x, 0.1)``: at x = 0 the draws of ``(y1, y2)`` are
    ``p(y | x)``'s (``y2``'s sd 0.141, correlation 0.707), not ``y2`` given the observed
    ``y1 = 5`` (mean 5, correlation 0). Standard errors at 20 000 draws: 0.001 for the
    sd, 0.004 for the correlation."""
    import pyro
    import pyro.distributions as dist

    from bayesfilter_diff.inference import model_to_problem

    _, prior, _ = _pyro_prior()

    def chain(y1=None, y2=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        y1 = pyro.sample("y1", dist.Normal(x[..., 0], 0.1), obs=y1)
        pyro.sample("y2", dist.Normal(y1, 0.1), obs=y2)

    _, _, st = model_to_problem(chain, torch.tensor(5.0), torch.tensor(5.0))
    d = st.observed_draws(torch.zeros(1, 20000, 2), torch.Generator().manual_seed(0))[0]
    assert abs(float(d[:, 1].mean())) < 4 * 0.141 / math.sqrt(20000)
    assert abs(float(d[:, 1].std()) - 0.1 * math.sqrt(2)) < 4 * 0.001
    assert abs(float(torch.corrcoef(d.T)[0, 1]) - math.sqrt(0.5)) < 4 * 0.004


def test_sites_that_cannot_be_drawn_are_refused_by_name():
    """A pyro.factor, a law without sample(), parameters outside their domain at prior
    signals (a Poisson rate x + 1 < 0, a Geometric probability above 1 that draws NaN), and
    an ``observe`` that returns the wrong shape: each a ValueError saying why."""
    import pyro
    import pyro.distributions as dist

    from bayesfilter_diff.inference import model_to_problem

    gmm, prior, W = _pyro_prior()
    g = torch.Generator().manual_seed(0)
    x = gmm.sample(64, g)[None]

    def factor(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.factor("soft", -(x**2).sum(-1))
        pyro.sample("y", dist.Normal(x, 0.3).to_event(1), obs=y)

    def improper(y=None, c=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", dist.Normal(x, 0.3).to_event(1), obs=y)
        pyro.sample("c", dist.ImproperUniform(dist.constraints.real, (), ()), obs=c)

    def poisson(y=None, z=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", dist.Poisson(x[..., 0] + 1.0), obs=y)
        pyro.sample("z", dist.Laplace(x[..., 1], 0.3), obs=z)

    def geometric(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", dist.Geometric(probs=torch.sigmoid(x) * 1.5).to_event(1), obs=y)

    cases = [
        (factor, (torch.zeros(2),), "is a pyro.factor"),
        (improper, (torch.zeros(2), torch.tensor(0.0)), "'c' \\(ImproperUniform\\) could not be"),
        (poisson, (torch.tensor(2.0), torch.tensor(0.0)), "'y' \\(Poisson\\) could not be"),
    ]
    for model, data, match in cases:
        _, _, st = model_to_problem(model, *data)
        with pytest.raises(ValueError, match=match):
            st.observed_draws(x, g)
    _, problem, st = model_to_problem(geometric, torch.ones(2))
    with pytest.raises(ValueError, match="not finite: the noise model's parameters"):
        bfd.diagnostics.prior_predictive_check(prior, problem, 256, g, observe=st.observed_draws)
    for bad in (lambda x, g: torch.zeros(1, 256, 3), lambda x, g: torch.zeros(256, 1, 2)):
        with pytest.raises(ValueError, match="observe must return one observation per signal"):
            bfd.diagnostics.prior_predictive_check(prior, problem, 256, g, observe=bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_prior_s_model_is_checked_in_float32(dtype):
    """As in the samplers, a 16-bit prior's model runs in float32 for the check (a
    Student-t site's sampler has no 16-bit kernel on the CPU)."""
    import pyro
    import pyro.distributions as dist

    gmm = _readme(2)[0].to(dtype)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    W = torch.tensor([[1.0, 0.5], [0.2, -1.0], [0.3, 0.3]])
    seen = set()

    def model(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        seen.add(x.dtype)
        pyro.sample("y", dist.StudentT(3.0, x @ W.to(x.dtype).T, 0.3).to_event(1), obs=y)

    g = torch.Generator().manual_seed(0)
    warnings.simplefilter("ignore", bfd.PosteriorQualityWarning)
    post = bfd.infer(
        model,
        bfd.samplers.DDIM(num_steps=5),
        y=torch.tensor([1.0, 0.0, 2.0]),
        num_samples=16,
        generator=g,
    )
    seen.clear()
    c = post.prior_predictive_check(256, g, num_steps=20, warn=False)
    assert seen == {torch.float32} and not bool(c.conflict)


def _noisy_model():
    """The README mixture, 4 observations, an unknown noise ``sigma ~ HalfNormal(0.2)``."""
    import pyro
    import pyro.distributions as dist

    d = 8
    gmm, prior = _readme(d)
    g = torch.Generator().manual_seed(0)
    A = bfd.operators.Dense(torch.randn(4, d, generator=g))

    def noisy(y=None):
        sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(0.2)))
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", dist.Normal(A(x), sigma).to_event(1), obs=y)

    return gmm, prior, A, noisy, g


def test_a_model_with_globals_gives_uniform_p_values_on_typical_data():
    """30 data sets drawn from the joint prior predictive of an unknown-noise model (sigma
    from its prior, then the signal, then the data) give p-values of mean within 4
    standard errors of 1/2."""
    from bayesfilter_diff.diagnostics.predictive import _model_with_globals_check

    gmm, _, A, noisy, g = _noisy_model()
    torch.manual_seed(0)
    sig = torch.distributions.HalfNormal(0.2).sample((30,))
    Y = A(gmm.sample(30, g)) + sig[:, None] * torch.randn(30, 4, generator=g)
    p = [
        float(_model_with_globals_check(noisy, (), {"y": y}, 512, g, 20, False, 2).p_value)
        for y in Y
    ]
    assert abs(sum(p) / 30 - 0.5) < 4 * math.sqrt(1 / 12 / 30)


def test_a_model_with_an_unknown_noise_scale_is_checked_with_its_globals():
    """SMC^2's models (``bfd.infer`` with a global latent site): data whose noise is 25
    times sigma's prior scale are flagged by ``HierarchicalPosterior.prior_predictive_check``
    at the caller's line, typical data are not; a plate of observations sharing sigma is
    checked as one observation of all the plate's data."""
    import pyro
    import pyro.distributions as dist

    gmm, prior, A, noisy, g = _noisy_model()
    warnings.simplefilter("ignore", bfd.PosteriorQualityWarning)  # (SMC^2's own findings)
    x = gmm.sample(1, g)[0]
    for scale, flagged in ((0.15, False), (5.0, True)):
        y = A(x) + scale * torch.randn(4, generator=g)
        post = bfd.infer(noisy, y=y, num_samples=32, num_theta=16, moves=0, generator=g)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c = post.prior_predictive_check(1024, g, num_steps=50)
        hits = [w for w in caught if "farther from the prior predictive" in str(w.message)]
        assert bool(c.conflict) == flagged and len(hits) == int(flagged)
        assert all(w.filename == __file__ for w in hits)

    def plate(y=None):
        sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(0.2)))
        with pyro.plate("obs", 3):
            x = pyro.sample("x", bfd.DiffusionPrior(prior))
            pyro.sample("y", dist.StudentT(4.0, A(x), sigma).to_event(1), obs=y)

    from bayesfilter_diff.diagnostics.predictive import _model_with_globals_check

    Y = A(gmm.sample(3, g)) + 0.15 * torch.randn(3, 4, generator=g)
    far = Y + 5.0 * torch.randn(3, 4, generator=g)  # noise 25 times sigma's prior scale
    for y, flagged in ((Y, False), (far, True)):
        c = _model_with_globals_check(plate, (), {"y": y}, 1024, g, 50, False, 2)
        assert c.metric == "mahalanobis" and bool(c.conflict) == flagged


def test_a_labelled_prior_given_a_drawn_label_draws_each_signal_from_its_member():
    """``DiffusionPrior(LabelledPriors([...]).given(c))`` with ``c ~ Categorical(0.25,
    0.75)`` (the README's conditional prior): each reference observation's signal comes
    from the member of its own drawn label (the check raised the prior's "needs x_t with
    the problems' axis first" before; a review's probe, session 36): the share of draws near
    the second member's mean is within 4 standard errors of 0.75."""
    import pyro
    import pyro.distributions as dist

    import bayesfilter_diff.diagnostics.predictive as pp

    sched = bfd.VPSchedule.linear()
    mus = [torch.tensor([5.0, 5.0]), torch.tensor([-5.0, -5.0])]
    members = [
        bfd.GaussianMixture(torch.ones(1), m[None], torch.tensor([0.01])).diffusion(sched)
        for m in mus
    ]
    family = bfd.priors.LabelledPriors(members)

    def model(y=None):
        c = pyro.sample("c", dist.Categorical(torch.tensor([0.25, 0.75])))
        x = pyro.sample("x", bfd.DiffusionPrior(family.given(c)))
        pyro.sample("y", dist.Normal(x, 0.1).to_event(1), obs=y)

    g = torch.Generator().manual_seed(0)
    seen = {}
    rank = pp._rank

    def spy(y, yp, *a):
        seen["yp"] = yp
        return rank(y, yp, *a)

    pp._rank = spy
    try:
        c = pp._model_with_globals_check(
            model, (), {"y": torch.tensor([-5.0, -5.0])}, 512, g, 20, False, 2
        )
    finally:
        pp._rank = rank
    share = float((seen["yp"][0, :, 0] < 0).double().mean())
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 512)
    assert not bool(c.conflict)

"""infer on Pyro models: same draws as the sampler, IS references, error messages."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import bayesfilter_diff as bfd
from bayesfilter_diff.distributions import DiffusionPrior, LinearGaussian
from bayesfilter_diff.inference import Posterior, infer, model_to_problem

tds = pytest.importorskip("bayesfilter_diff.samplers.tds", reason="TDS not written yet")
TDS = tds.TDS

D64 = torch.float64


def _gmm() -> bfd.GaussianMixture:
    return bfd.GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=D64),
        torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=D64),
        torch.tensor([0.5, 0.3], dtype=D64),
    )


GMM = _gmm()
PRIOR = GMM.diffusion(bfd.VPSchedule.linear())
A = bfd.operators.Dense(torch.tensor([[1.5, -0.3], [0.2, 1.0]], dtype=D64))
W = torch.tensor([0.4, -0.3], dtype=D64)
C = torch.tensor([1.0, 2.0], dtype=D64)


def f_nl(x):
    """A nonlinear forward model R^2 -> R^2, written to broadcast over leading dims."""
    return torch.stack([torch.sin(x[..., 0]) + x[..., 1] ** 2 / 4, x[..., 0] * x[..., 1] / 3], -1)


def poisson_rate(x):
    return torch.exp(x @ W).unsqueeze(-1) * C


# ------------------------------------------------------------------ linear-Gaussian models


def test_linear_gaussian_model_gives_the_samplers_draws_bit_for_bit():
    y = torch.tensor([0.7, -0.2], dtype=D64)

    def model(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", LinearGaussian(A, x, noise_std=0.3), obs=y)

    sampler = TDS(num_steps=20, twist_variance="inflated")
    post = infer(model, sampler, y=y, num_samples=256, generator=torch.Generator().manual_seed(1))
    ref = sampler.sample(
        PRIOR, bfd.InverseProblem(A, y, 0.3), 256, torch.Generator().manual_seed(1)
    )
    assert isinstance(post, Posterior) and post.kind == "linear_gaussian" and post.site == "x"
    assert post.samples.shape == (256, 2)
    assert torch.equal(post.samples, ref.samples)
    assert torch.equal(post.log_weights, ref.log_weights)
    assert torch.equal(post.log_evidence, ref.log_evidence)
    assert post.info["nfe"] == ref.info["nfe"] and post.result.log_weights is post.log_weights
    assert post.draws(100, generator=torch.Generator().manual_seed(0)).shape == (100, 2)
    assert post.mean().shape == (2,)
    # the particles are weighted: weights() averages them as mean() does
    assert torch.equal(post.weights(), ref.weights())
    torch.testing.assert_close((post.weights()[:, None] * post.samples).sum(0), post.mean())
    # Pyro's get_samples: equally weighted draws, as many as the run's N by default, the
    # same as draws() on the same generator
    got = post.get_samples(generator=torch.Generator().manual_seed(3))
    assert list(got) == ["x"] and got["x"].shape == (256, 2)
    assert torch.equal(got["x"], post.draws(256, torch.Generator().manual_seed(3)))
    assert post.get_samples(7)["x"].shape == (7, 2)

    # Data passed with poutine.condition instead of obs=: the same problem and draws.
    cond = poutine.condition(model, data={"y": y})
    post2 = infer(cond, sampler, num_samples=256, generator=torch.Generator().manual_seed(1))
    assert torch.equal(post2.samples, ref.samples)


def test_plate_of_independent_observations_maps_to_batched_problem():
    B = 3
    Y = torch.tensor([[0.7, -0.2], [-2.0, 0.1], [1.0, 1.0]], dtype=D64)

    def model(y):
        with pyro.plate("data", B):
            x = pyro.sample("x", DiffusionPrior(PRIOR))
            pyro.sample("y", LinearGaussian(A, x, noise_std=0.3), obs=y)

    _, problem, st = model_to_problem(model, Y)
    assert problem.batched and problem.batch_size == B and st.kind == "linear_gaussian"
    sampler = TDS(num_steps=10)
    post = infer(model, sampler, Y, num_samples=64, generator=torch.Generator().manual_seed(2))
    ref = sampler.sample(PRIOR, bfd.InverseProblem(A, Y, 0.3), 64, torch.Generator().manual_seed(2))
    assert post.samples.shape == (B, 64, 2) and post.log_evidence.shape == (B,)
    assert torch.equal(post.samples, ref.samples)


# ------------------------------------------------------------------ non-Gaussian likelihoods


def _chain_is_reference(loglik, y, num_steps, n=50_000):
    """Importance sampling with prior draws of the same discretised chain as the sampler.

    TDS is consistent for the posterior of the discrete chain p_theta(x0) p(y | x0) (its
    docstring); a 50-step DDPM chain moves the prior mean by ~0.03, more than the Monte
    Carlo error below, so the reference uses that chain's draws (DiffusionPrior.sample).
    Returns the posterior mean, its standard error and the log-evidence.
    """
    xs = DiffusionPrior(PRIOR, num_steps=num_steps).sample(
        (n,), generator=torch.Generator().manual_seed(11)
    )
    lw = loglik(xs, y)
    Wn = torch.softmax(lw, 0)
    mean = (Wn[:, None] * xs).sum(0)
    var = (Wn[:, None] * (xs - mean) ** 2).sum(0)
    ess = 1 / (Wn**2).sum()
    return mean, (var / ess).sqrt(), torch.logsumexp(lw, 0) - math.log(n)


@pytest.mark.parametrize("likelihood", ["poisson", "nonlinear"])
@pytest.mark.slow
def test_tds_on_pyro_likelihood_matches_importance_sampling(likelihood):
    # R replicate problems (a plate over copies of y) give R independent TDS runs in one
    # vectorised call; the spread of their means is the Monte Carlo error.
    R, N, steps = 8, 1000, 50
    if likelihood == "poisson":
        y = torch.tensor([1.0, 1.0], dtype=D64)

        def obs(x):
            return dist.Poisson(poisson_rate(x)).to_event(1)

        sampler = TDS(num_steps=steps)  # the twist is the likelihood at x0_hat
    else:
        y = torch.tensor([0.8, 0.5], dtype=D64)

        def obs(x):
            return dist.Normal(f_nl(x), 0.7).to_event(1)

        sampler = TDS(num_steps=steps, twist_variance="inflated")

    def model(y):
        with pyro.plate("replicates", y.shape[0]):
            x = pyro.sample("x", DiffusionPrior(PRIOR))
            pyro.sample("y", obs(x), obs=y)

    post = infer(
        model, sampler, y.expand(R, 2), num_samples=N, generator=torch.Generator().manual_seed(0)
    )
    assert post.kind == ("poisson" if likelihood == "poisson" else "gaussian")
    assert post.samples.shape == (R, N, 2)
    means = post.mean()  # (R, 2)
    se_tds = means.std(0) / math.sqrt(R)
    ref, se_is, log_z = _chain_is_reference(lambda x, y: obs(x).log_prob(y), y, steps)
    tol = 4 * torch.sqrt(se_tds**2 + se_is**2)
    assert ((means.mean(0) - ref).abs() < tol).all(), (means.mean(0), ref, tol)
    le = post.log_evidence
    assert (le.mean() - log_z).abs() < 4 * le.std() / math.sqrt(R) + 0.02, (le, log_z)


def test_custom_likelihood_sums_observed_sites_per_particle():
    # Laplace site + a scaled second site, unbatched and in a plate: log_likelihood_fn must
    # equal the hand-written sum of log-densities for every particle.
    y1 = torch.tensor([0.8, 0.5], dtype=D64)
    y2 = torch.tensor(0.3, dtype=D64)

    def model(y1, y2):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("a", dist.Laplace(f_nl(x), 0.5).to_event(1), obs=y1)
        with poutine.scale(scale=0.5):
            pyro.sample("b", dist.StudentT(3.0, x[..., 0], 1.0), obs=y2)

    _, problem, st = model_to_problem(model, y1, y2)
    assert st.kind == "custom" and problem.y.shape == (3,) and problem.log_likelihood_fn
    x = GMM.sample(5, torch.Generator().manual_seed(0))[None]
    ref = dist.Laplace(f_nl(x), 0.5).log_prob(y1).sum(-1) + 0.5 * dist.StudentT(
        3.0, x[..., 0], 1.0
    ).log_prob(y2)
    assert torch.allclose(problem.log_likelihood(x), ref)
    with pytest.raises(ValueError, match="no forward operator"):
        problem.operator(x)

    Y = torch.tensor([[0.8, 0.5], [0.0, 1.0], [-1.0, 0.2]], dtype=D64)

    def bmodel(y):
        with pyro.plate("data", 3):
            x = pyro.sample("x", DiffusionPrior(PRIOR))
            pyro.sample("a", dist.Laplace(f_nl(x), 0.5).to_event(1), obs=y)

    _, problem, st = model_to_problem(bmodel, Y)
    assert st.kind == "custom" and problem.batch_size == 3
    xb = GMM.sample(12, torch.Generator().manual_seed(1)).reshape(3, 4, 2)
    ref = dist.Laplace(f_nl(xb), 0.5).log_prob(Y[:, None]).sum(-1)
    assert torch.allclose(problem.log_likelihood(xb), ref)
    # the residual check's scores, reduced per problem like the log-likelihood: Laplace
    # scores sign(t) Phi^-1(1 - exp(-|t|) / 2) of t = (y - f(x)) / 0.5, summed squared
    t = (Y[:, None] - f_nl(xb)) / 0.5
    z = -torch.sign(t) * torch.special.ndtri(0.5 * torch.exp(-t.abs()))
    torch.testing.assert_close(problem.squared_scores_fn(xb), (z * z).sum(-1))
    # a scaled site is not a probability model of y: no scores, no check

    def scaled(y):
        with pyro.plate("data", 3), pyro.poutine.scale(scale=0.5):
            x = pyro.sample("x", DiffusionPrior(PRIOR))
            pyro.sample("a", dist.Laplace(f_nl(x), 0.5).to_event(1), obs=y)

    assert model_to_problem(scaled, Y)[1].squared_scores_fn(xb) is None


def test_structured_forward_operator_reads_the_model():
    Y = torch.tensor([[3.0, 5.0], [0.0, 1.0], [2.0, 2.0]], dtype=D64)

    def model(y):
        with pyro.plate("data", 3):
            x = pyro.sample("x", DiffusionPrior(PRIOR))
            pyro.sample("y", dist.Poisson(poisson_rate(x)).to_event(1), obs=y)

    _, problem, st = model_to_problem(model, Y)
    assert st.kind == "poisson" and problem.noise == "poisson" and not problem.operator.is_linear
    xb = GMM.sample(12, torch.Generator().manual_seed(1)).reshape(3, 4, 2)
    assert torch.allclose(problem.operator(xb), poisson_rate(xb))
    ref = dist.Poisson(poisson_rate(xb)).log_prob(Y[:, None]).sum(-1)
    assert torch.allclose(problem.log_likelihood(xb), ref)

    # A Normal whose scale depends on x is not a Gaussian noise model: custom likelihood.
    def hetero(y):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.Normal(f_nl(x), 0.1 + x.abs()).to_event(1), obs=y)

    assert model_to_problem(hetero, Y[0])[2].kind == "custom"

    # M iid observations of one signal (a plate over the data, not over problems).
    def iid(y):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        with pyro.plate("obs", y.shape[0]):
            pyro.sample("y", dist.Normal(f_nl(x), 0.5).to_event(1), obs=y)

    _, problem, st = model_to_problem(iid, Y)
    assert st.kind == "gaussian" and not problem.batched and problem.y.shape == (3, 2)
    assert problem.noise_std == 0.5
    x = GMM.sample(4, torch.Generator().manual_seed(2))[None]  # (1, 4, 2)
    assert torch.allclose(problem.operator(x), f_nl(x)[:, :, None].expand(1, 4, 3, 2))
    ref = dist.Normal(f_nl(x)[..., None, :], 0.5).log_prob(Y).sum((-2, -1))
    assert torch.allclose(problem.log_likelihood(x), ref)


def test_dps_runs_on_pyro_likelihoods():
    dps = pytest.importorskip("bayesfilter_diff.samplers.dps", reason="DPS not written yet")

    def pmodel(y):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.Poisson(poisson_rate(x)).to_event(1), obs=y)

    def nmodel(y):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.Normal(f_nl(x), 0.5).to_event(1), obs=y)

    for model, y in (
        (pmodel, torch.tensor([1.0, 2.0], dtype=D64)),
        (nmodel, torch.tensor([0.8, 0.5], dtype=D64)),
    ):
        post = infer(
            model,
            dps.DPS(num_steps=20),
            y,
            num_samples=32,
            generator=torch.Generator().manual_seed(0),
        )
        assert post.samples.shape == (32, 2) and torch.isfinite(post.samples).all()
        assert post.log_weights is None


# ------------------------------------------------------------------ errors


def _lg_model(y):
    x = pyro.sample("x", DiffusionPrior(PRIOR))
    pyro.sample("y", LinearGaussian(A, x, 0.3), obs=y)


def test_errors():
    y = torch.tensor([0.7, -0.2], dtype=D64)

    def two_priors(y):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        z = pyro.sample("z", DiffusionPrior(PRIOR))
        pyro.sample("y", LinearGaussian(A, x + z, 0.3), obs=y)

    with pytest.raises(ValueError, match="2 DiffusionPrior sites"):
        infer(two_priors, TDS(num_steps=5), y)

    def no_prior(y):
        x = pyro.sample("x", dist.Normal(torch.zeros(2, dtype=D64), 1.0).to_event(1))
        pyro.sample("y", LinearGaussian(A, x, 0.3), obs=y)

    with pytest.raises(ValueError, match="no DiffusionPrior site"):
        infer(no_prior, TDS(num_steps=5), y)

    def no_obs():
        pyro.sample("x", DiffusionPrior(PRIOR))

    with pytest.raises(ValueError, match="no observed site"):
        infer(no_obs, TDS(num_steps=5))

    def extra_latent(y):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        s = pyro.sample("s", dist.LogNormal(torch.tensor(0.0, dtype=D64), 1.0))
        pyro.sample("y", dist.Normal(x, s).to_event(1), obs=y)

    # model_to_problem reads one latent site; infer samples a global one by SMC^2
    with pytest.raises(ValueError, match=r"latent sites \['s'\]"):
        model_to_problem(extra_latent, y)
    post = infer(extra_latent, TDS(num_steps=3), y, num_samples=4, num_theta=4, moves=1)
    assert isinstance(post, bfd.inference.HierarchicalPosterior)
    assert set(post.get_samples()) == {"s", "x"}

    with pytest.raises(TypeError, match="sampler"):
        infer(_lg_model, object(), y)

    def not_broadcasting(y):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.Normal(torch.stack([x[0], x[1]]), 0.3).to_event(1), obs=y)

    with pytest.raises(ValueError, match="must broadcast over the leading dimensions"):
        infer(not_broadcasting, TDS(num_steps=5), y)


def test_linear_only_sampler_on_poisson_likelihood_is_refused():
    candidates = []
    for mod, name in (("fps", "FPSSMC"), ("mcgdiff", "MCGdiff"), ("pigdm", "PiGDM")):
        try:
            m = __import__(f"bayesfilter_diff.samplers.{mod}", fromlist=[name])
            candidates.append(getattr(m, name))
        except (ImportError, AttributeError):
            pass
    if not candidates:
        pytest.skip("no linear-Gaussian-only sampler written yet")

    def model(y):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.Poisson(poisson_rate(x)).to_event(1), obs=y)

    y = torch.tensor([1.0, 2.0], dtype=D64)
    for cls in candidates:
        with pytest.raises(ValueError, match=rf"{cls.__name__} cannot sample this model.*Poisson"):
            infer(model, cls(num_steps=5), y, num_samples=4)
    dps = pytest.importorskip("bayesfilter_diff.samplers.dps")

    def laplace(y):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.Laplace(f_nl(x), 0.5).to_event(1), obs=y)

    with pytest.raises(ValueError, match="DPS cannot sample this model.*Laplace"):
        infer(laplace, dps.DPS(num_steps=5), y, num_samples=4)


def test_to_arviz():
    pytest.importorskip("arviz")
    diag = pytest.importorskip("bayesfilter_diff.diagnostics")
    if not hasattr(diag, "to_arviz"):
        pytest.skip("bayesfilter_diff.diagnostics.to_arviz not written yet")
    post = infer(
        _lg_model,
        TDS(num_steps=5),
        torch.tensor([0.7, -0.2], dtype=D64),
        num_samples=16,
        generator=torch.Generator().manual_seed(0),
    )
    data = post.to_arviz(generator=torch.Generator().manual_seed(0))
    assert "x" in data.posterior
    assert tuple(data.posterior["x"].shape) == (1, 16, 2)


def test_no_sampler_named_picks_an_exact_default():
    # A LinearGaussian site with an SVD: TDS with its conditioned proposal (its weighted
    # mean within 4 s.e. of the exact posterior's); a Student-t site (a custom
    # likelihood): TDS with the analytic reverse variance.
    y = torch.tensor([0.7, -0.2], dtype=D64)
    post = infer(_lg_model, y=y, num_samples=2000, generator=torch.Generator().manual_seed(0))
    assert isinstance(post.sampler, bfd.samplers.TDS) and post.sampler.adaptive_ess == 0.1
    assert post.result.info.extra.proposal == "conditioned"
    exact = GMM.posterior(bfd.InverseProblem(A, y, 0.3))
    se = (exact.covariance().diagonal() / float(post.result.ess())).sqrt()
    assert ((post.mean() - exact.mean()).abs() < 4 * se).all()

    def student(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.StudentT(3.0, x, 0.3).to_event(1), obs=y)

    post = infer(student, y=y, num_samples=64, generator=torch.Generator().manual_seed(0))
    assert isinstance(post.sampler, bfd.samplers.TDS) and post.kind != "linear_gaussian"
    assert post.sampler.reverse_variance == "analytic"
    with pytest.raises(TypeError, match="keyword"):
        infer(_lg_model, y)


# ------------------------------------------------------------------ Pyro conventions


@pytest.mark.parametrize("site", ["normal", "student_t"])
def test_observation_plate_equals_to_event(site):
    """A per-coordinate pyro.plate around the observation (not around the prior site) is
    the same likelihood as .to_event(1): the same problem, the same draws."""
    y = torch.tensor([0.7, -0.2], dtype=D64)

    def obs(x):
        return dist.Normal(f_nl(x), 0.7) if site == "normal" else dist.StudentT(4.0, f_nl(x), 0.7)

    def plated(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        with pyro.plate("coords", 2):
            pyro.sample("y", obs(x), obs=y)

    def evented(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", obs(x).to_event(1), obs=y)

    sampler = TDS(num_steps=10)
    a = infer(plated, sampler, y=y, num_samples=64, generator=torch.Generator().manual_seed(3))
    b = infer(evented, sampler, y=y, num_samples=64, generator=torch.Generator().manual_seed(3))
    assert a.kind == b.kind == ("gaussian" if site == "normal" else "custom")
    assert torch.equal(a.samples, b.samples) and torch.equal(a.log_evidence, b.log_evidence)


def test_observation_plate_left_of_the_prior_plates_is_refused():
    Y = torch.zeros(2, 3, dtype=D64)

    def model(y):
        with pyro.plate("coords", 2, dim=-2):
            with pyro.plate("problems", 3, dim=-1):
                x = pyro.sample("x", DiffusionPrior(PRIOR))  # noqa: F841
        with pyro.plate("coords2", 2, dim=-2):
            pyro.sample("y", dist.Normal(torch.zeros(2, 3, dtype=D64), 1.0), obs=y)

    with pytest.raises(ValueError, match="coords2"):
        infer(model, TDS(num_steps=3), Y, num_samples=4)


def test_subsampling_is_refused_with_the_plate_named():
    y = torch.tensor([0.7, -0.2, 0.3], dtype=D64)

    def model(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        with pyro.plate("data", 3, subsample_size=2) as idx:
            pyro.sample("y", dist.Normal(x[..., :1].expand(x.shape[:-1] + (2,)), 1.0), obs=y[idx])

    with pytest.raises(ValueError, match=r"pyro.plate\('data', 3, subsample_size=2\)"):
        infer(model, TDS(num_steps=3), y=y, num_samples=4)


def test_to_arviz_accepts_posteriors():
    y = torch.tensor([0.7, -0.2], dtype=D64)

    def model(y=None):
        theta = pyro.sample("theta", DiffusionPrior(PRIOR))
        pyro.sample("y", LinearGaussian(A, theta, noise_std=0.3), obs=y)

    posts = [
        infer(
            model, TDS(num_steps=5), y=y, num_samples=16, generator=torch.Generator().manual_seed(s)
        )
        for s in range(2)
    ]
    one = bfd.diagnostics.to_arviz(posts[0])
    two = bfd.diagnostics.to_arviz(posts)
    for data, chains in ((one, 1), (two, 2)):
        post = data["posterior"]
        assert "theta" in post and tuple(post["theta"].shape) == (chains, 16, 2)


def test_reprs_are_short_summaries():
    """Printing a Result, its RunInfo or a Posterior shows shapes and key numbers, not
    every tensor (34 KB for B = 3, N = 500 before)."""
    gmm = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7]),
        torch.stack([-2 * torch.ones(4), 2 * torch.ones(4)]),
        torch.ones(2),
    )
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Dense(torch.eye(2, 4))
    Y = torch.zeros(3, 2)

    def model(y=None):
        with pyro.plate("problems", 3):
            x = pyro.sample("x", bfd.DiffusionPrior(prior))
            pyro.sample("y", bfd.LinearGaussian(A, x, noise_std=0.5), obs=y)

    post = bfd.infer(model, bfd.samplers.TDS(num_steps=4), y=Y, num_samples=500)
    for obj in (post, post.result, post.result.info):
        text = repr(obj)
        assert len(text) < 600, text
    assert "samples=<(3, 500, 4) float32>" in repr(post.result)
    assert "log_evidence=[" in repr(post.result) and "kind='linear_gaussian'" in repr(post)


@pytest.mark.parametrize(
    "case, err, match",
    [
        ("wrong_shape", ValueError, "must end with the event shape"),
        ("list", TypeError, "pass a torch.Tensor"),
        ("meta", ValueError, "meta device"),
        ("no_broadcast", ValueError, "must compute with x by broadcasting"),
        # a 16-bit matrix against the float32 particles (a 16-bit prior runs in float32)
        ("half_matrix", ValueError, "mixes dtypes.*W.to\\(x.dtype\\)"),
    ],
)
def test_bad_models_and_data_get_the_librarys_errors(case, err, match):
    gmm = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7]),
        torch.stack([-2 * torch.ones(4), 2 * torch.ones(4)]),
        torch.ones(2),
    )
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Dense(torch.randn(2, 4, generator=torch.Generator().manual_seed(0)))

    def model(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", bfd.LinearGaussian(A, x, 0.1), obs=y)

    def no_broadcast(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", dist.Normal(A.matrix() @ x, 0.1).to_event(1), obs=y)

    def half_matrix(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        W = A.matrix().to(torch.float16)
        pyro.sample("y", dist.Normal(x @ W.T, 0.1).to_event(1), obs=y)

    m, y = {
        "half_matrix": (half_matrix, torch.zeros(2)),
        "wrong_shape": (model, torch.zeros(3)),
        "list": (model, [0.0, 1.0]),
        "meta": (model, torch.zeros(2, device="meta")),
        "no_broadcast": (no_broadcast, torch.zeros(2)),
    }[case]
    with pytest.raises(err, match=match):
        bfd.infer(m, bfd.samplers.TDS(num_steps=3), y=y, num_samples=4)


def test_an_operator_cast_after_the_problem_is_named():
    gmm = bfd.GaussianMixture(torch.tensor([1.0]), torch.zeros(1, 2), torch.ones(1))
    A = bfd.operators.Dense(torch.eye(2))
    problem = bfd.InverseProblem(A, torch.zeros(2), 0.1)
    A.to(torch.float64)
    with pytest.raises(ValueError, match="cast or moved after the InverseProblem was built"):
        bfd.samplers.TDS(num_steps=3).sample(gmm.diffusion(bfd.VPSchedule.linear()), problem, 4)


def test_site_parameters_and_supports_are_checked_before_the_run():
    # replays run without Pyro's validation: a negative / zero / NaN scale on a plain Normal
    # site, or non-integer Poisson counts, ran (and degenerated, or ran silently) before
    y = torch.tensor([0.5, -0.3], dtype=torch.float64)
    for sd in (-0.1, 0.0, float("nan")):

        def model(y=None, sd=sd):
            x = pyro.sample("x", DiffusionPrior(PRIOR))
            pyro.sample("y", dist.Normal(x, sd).to_event(1), obs=y)

        with pytest.raises(ValueError, match="site 'y'.*scale"):
            model_to_problem(model, y)

    def counts(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.Poisson(x.exp()).to_event(1), obs=y)

    with pytest.raises(ValueError, match="outside the support.*Poisson"):
        model_to_problem(counts, torch.tensor([2.5, 1.0], dtype=torch.float64))
    model_to_problem(counts, torch.tensor([2.0, 1.0], dtype=torch.float64))

    # a scale computed from the prior value is not judged at the placeholder (|x| is 0 there)
    def from_x(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.Normal(x, x.abs() + 0.0).to_event(1), obs=y)

    model_to_problem(from_x, y)


def test_the_precision_check_sees_data_upcast_by_infer():
    # bfloat16 data read by infer are upcast to the prior's float64, but keep their rounding
    # (1.3 -> 1.296875: 3 posterior sd at noise 1e-3), which the precision check must see
    def model(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.Normal(x, 1e-2).to_event(1), obs=y)

    y = torch.tensor([1.3, -0.4], dtype=torch.bfloat16)
    _, problem, _ = model_to_problem(model, y)
    assert problem.y.dtype == torch.float64 and problem.data_dtype == torch.bfloat16
    assert problem.to(torch.float64).data_dtype == torch.bfloat16
    with pytest.warns(bfd.PosteriorQualityWarning, match="bfloat16 cannot resolve"):
        post = infer(model, y=y, num_samples=32, generator=torch.Generator().manual_seed(0))
    assert "precision" in [q.kind for q in post.result.info.quality]


@pytest.mark.parametrize("site", ["laplace", "student_t"])
def test_the_precision_check_covers_sites_with_a_constant_scale(site):
    # bfloat16 data at a Laplace / Student-t site of scale 1e-3: rounded by ~2 scales
    # (0.8123 -> 0.8125), which put the mean 0.4 posterior sd off unwarned before
    def law(x, scale):
        loc = x[..., :1].expand(*x.shape[:-1], 2)
        if site == "laplace":
            return dist.Laplace(loc, scale).to_event(1)
        return dist.StudentT(3.0, loc, scale).to_event(1)

    def model(y=None, scale=1e-3):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", law(x, scale), obs=y)

    def from_x(y=None):  # a scale that depends on the signal has no ratio
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", law(x, x[..., :1].abs().expand(*x.shape[:-1], 2) + 1e-3), obs=y)

    y16 = torch.tensor([0.8123, 0.8131], dtype=torch.bfloat16)
    _, problem, _ = model_to_problem(model, y16)
    assert problem.data_scale_ratio == pytest.approx(0.8125 / 1e-3, rel=1e-3)
    assert problem.to(D64).data_scale_ratio == problem.data_scale_ratio
    assert model_to_problem(from_x, y16)[1].data_scale_ratio is None

    def masked(y=None):  # masked entries may hold anything
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        loc = x[..., :1].expand(*x.shape[:-1], 2)
        m = torch.tensor([True, False])
        pyro.sample("y", dist.Laplace(loc, 1e-3).mask(m).to_event(1), obs=y)

    def scaled(y=None):  # poutine.scale: the site's noise is not its scale parameter
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        with poutine.scale(scale=100.0):
            pyro.sample("y", law(x, 1e-3), obs=y)

    for other in (masked, scaled):
        assert model_to_problem(other, y16)[1].data_scale_ratio is None
    with pytest.warns(bfd.PosteriorQualityWarning, match="bfloat16 cannot resolve"):
        post = infer(model, y=y16, num_samples=32, generator=torch.Generator().manual_seed(0))
    assert "precision" in [q.kind for q in post.result.info.quality]
    # the same data in float64, or bfloat16 data at a scale it resolves: no finding
    for y, scale in ((y16.double(), 1e-3), (y16, 1.0)):
        post = infer(
            model, y=y, scale=scale, num_samples=32, generator=torch.Generator().manual_seed(0)
        )
        assert "precision" not in [q.kind for q in post.result.info.quality]


def test_complex_or_bool_observations_are_clear_errors():
    def model(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.Normal(f_nl(x), 0.1).to_event(1), obs=y)

    def bern(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.Bernoulli(logits=x).to_event(1), obs=y)

    with pytest.raises(ValueError, match="site 'y' is complex"):
        model_to_problem(model, torch.tensor([0.1 + 1j, 0.2], dtype=torch.complex128))
    with pytest.raises(ValueError, match="site 'y' is a bool tensor"):
        model_to_problem(bern, torch.tensor([True, False]))
    model_to_problem(bern, torch.tensor([1.0, 0.0], dtype=D64))

    def onehot(y=None):  # a law that evaluates bool data keeps them
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        logits = torch.stack([x[..., 0], x[..., 1], -x[..., 0]], -1)
        pyro.sample("y", dist.OneHotCategorical(logits=logits), obs=y)

    model_to_problem(onehot, torch.tensor([True, False, False]))


def test_observation_plates_and_repeated_data_are_not_taken_for_crossed_particles():
    # the layout check refuses a batch dim that is neither the layout's, the observed
    # value's nor a plate's; observation plates (masked too) and repeated observations pass
    Y3 = torch.tensor([[0.8, 0.5], [0.0, 1.0], [-1.0, 0.2]], dtype=D64)
    mask = torch.tensor([True, False, True])

    def plated(y=None, masked=False):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        with pyro.plate("obs", 3), poutine.mask(mask=mask if masked else True):
            pyro.sample("y", dist.StudentT(3.0, f_nl(x), 0.5).to_event(1), obs=y)

    def repeated(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.StudentT(3.0, f_nl(x), 0.5).to_event(1), obs=y)

    x = GMM.sample(4, torch.Generator().manual_seed(0))[None]
    per = dist.StudentT(3.0, f_nl(x)[..., None, :], 0.5).log_prob(Y3).sum(-1)  # (1, 4, 3)
    for model, kw, want in (
        (plated, {}, per.sum(-1)),
        (plated, {"masked": True}, (per * mask).sum(-1)),
        (repeated, {}, per.sum(-1)),
    ):
        _, problem, st = model_to_problem(model, Y3, **kw)
        assert st.kind == "custom"
        torch.testing.assert_close(problem.log_likelihood(x), want)


def test_constant_site_parameters_are_judged_elementwise_and_at_a_generic_value():
    y = torch.tensor([0.5, -0.3], dtype=D64)

    def partly_nan(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        scale = torch.tensor([float("nan"), 1.0], dtype=D64)
        pyro.sample("y", dist.Normal(x, scale).to_event(1), obs=y)

    with pytest.raises(ValueError, match="scale"):
        model_to_problem(partly_nan, y)

    # a scale that vanishes at 0 and 1 (the ends of an image's range) but not in between
    def bernoulli_like(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.Normal(x, (x * (1 - x)).abs().sqrt() / 4).to_event(1), obs=y)

    model_to_problem(bernoulli_like, y)


def test_repeated_observations_of_an_affine_site_read_as_one_linear_problem():
    # y of shape (5, 1) for a site with event (1,): five observations of the same mean;
    # read as a 5-row linear-Gaussian problem (it was refused: "y must have the
    # operator's output shape (5,)")
    y = torch.tensor([[1.0], [0.8], [1.3], [0.6], [1.1]], dtype=D64)

    def model(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.Normal(2.0 * x[..., :1] + 0.5, 0.3).to_event(1), obs=y)

    _, problem, st = model_to_problem(model, y)
    assert st.kind == "affine_gaussian" and problem.y.shape == (5,)
    x = GMM.sample(6, torch.Generator().manual_seed(0))[None]
    want = dist.Normal(2.0 * x[..., :1] + 0.5, 0.3).log_prob(y[:, 0][:, None, None]).sum(0)
    torch.testing.assert_close(problem.log_likelihood(x), want[None, :, 0])


def test_a_site_whose_support_moves_with_x_gives_zero_likelihood_outside_it():
    """``Uniform(x - 1, x + 1)``: particles whose support misses ``y`` get log-likelihood
    -inf (weight 0), as the vectorisation contract says, not torch's support error (the
    sites' log_prob ran with Pyro's validation on, outside the replay)."""

    def model(y=None):
        x = pyro.sample("x", DiffusionPrior(PRIOR))
        pyro.sample("y", dist.Uniform(x - 1, x + 1).to_event(1), obs=y)

    y = torch.tensor([0.3, -1.2], dtype=D64)
    _, problem, st = model_to_problem(model, y)
    assert st.kind == "custom"
    x = torch.tensor([[[0.0, -1.0], [0.3, 2.0]]], dtype=D64)
    ll = problem.log_likelihood(x)
    assert ll[0, 0] == pytest.approx(2 * math.log(0.5)) and ll[0, 1] == -math.inf


def test_posterior_step_check_finds_a_discretisation_bias():
    """Three narrow modes, data between them (session 36's probe): the evidence of the
    default until session 37 (the Jacobian twist with the reference kernel) is +0.12 off at
    100 steps (23 of its sd, no warning); ``post.step_check(4096)`` moves by about -0.06 to
    200 steps against a sd of about 0.007 and warns at the caller's line (at N = 1024, sd
    0.014, the shift is 3.5-5.3 sd: a check's power grows with N), and its Richardson
    extrapolation is within 4 sd of the exact evidence. The default since (the kernel's
    covariance in the observed directions, +0.014 there) is within 4 of its own sd. On a
    Gaussian prior the default's kernel is exact at any steps: nothing moves."""
    import warnings

    from bayesfilter_diff.samplers import TDS

    def three(weights, means, sds):
        w = torch.tensor(weights, dtype=D64)
        return bfd.GaussianMixture(
            w, torch.tensor(means, dtype=D64), torch.tensor(sds, dtype=D64) ** 2
        )

    A = torch.tensor([[1.0, 0.5], [-0.3, 1.0]], dtype=D64)
    y = torch.tensor([0.8, 0.4], dtype=D64)
    cases = {
        "modes": three([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], [0.8, 0.6, 0.7]),
        "gaussian": three([1.0], [[0.5, -0.5]], [1.0]),
    }
    for name, gmm in cases.items():
        prior = gmm.diffusion(bfd.VPSchedule.linear())

        def model(y=None, prior=prior):
            x = pyro.sample("x", DiffusionPrior(prior))
            pyro.sample("y", dist.Normal(x @ A.T, 0.3).to_event(1), obs=y)

        g = torch.Generator().manual_seed(0)
        exact = float(gmm.log_evidence(bfd.InverseProblem(bfd.operators.Dense(A), y, 0.3)))
        post = infer(model, y=y, num_samples=1024, generator=g)
        se = post.result.info.log_evidence_se
        assert se is not None and abs(float(post.log_evidence) - exact) < 4 * float(se)
        if name == "modes":  # the default until session 37
            reference = TDS(
                adaptive_ess=0.1, twist_variance="jacobian", reverse_variance="reference"
            )
            post = infer(model, reference, y=y, num_samples=1024, generator=g)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c = post.step_check(4096, generator=g)
        hits = [w for w in caught if "from 100 to 200 steps" in str(w.message)]
        assert c.steps == (100, 200) and c.results[0].num_samples == 4096
        assert c.log_evidence_shift is not None and c.log_evidence_se is not None
        if name == "modes":
            assert bool(c.moved) and len(hits) == 1 and hits[0].filename == __file__
            assert float(c.log_evidence_shift) < -4 * float(c.log_evidence_se)
            # the first-order error extrapolated away: within 4 of its sd of the exact
            assert c.log_evidence_extrapolated is not None
            assert c.log_evidence_extrapolated_se is not None
            err = float(c.log_evidence_extrapolated) - exact
            assert abs(err) < 4 * float(c.log_evidence_extrapolated_se)
            assert float(post.log_evidence) - exact > 8 * float(c.log_evidence_extrapolated_se)
        else:
            assert not bool(c.moved) and not hits

"""Batches of problems that differ in their noise scale or forward model (the theta-particles
of SMC^2), and Pyro Gaussian sites with an affine mean read as linear operators."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from test_tds import DT, chain_prior

import bayesfilter_diff as bfd
from bayesfilter_diff.inference import model_to_problem
from bayesfilter_diff.inference.linearize import check_linearization
from bayesfilter_diff.operators import Dense, PerProblemDense, spectral_norm
from bayesfilter_diff.samplers import TDS, MCGdiff


def _matrices(B=3, m=2, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, m, d, generator=g, dtype=DT)


# ---------------------------------------------------------------- per-problem noise
def test_per_problem_noise_likelihood_equals_separate_problems():
    g = torch.Generator().manual_seed(1)
    A = Dense(torch.randn(2, 3, generator=g, dtype=DT))
    y = torch.randn(3, 2, generator=g, dtype=DT)
    sig = torch.tensor([0.1, 0.5, 2.0], dtype=DT)
    p = bfd.InverseProblem(A, y, sig)
    assert p.per_problem_noise and p.min_noise_std == pytest.approx(0.1)
    assert torch.equal(p.noise_stds, sig)
    x = torch.randn(3, 4, 3, generator=g, dtype=DT)
    ll, grad = p.grad_log_likelihood(x)
    for b in range(3):
        q = bfd.InverseProblem(A, y[b], float(sig[b]))
        llb, gb = q.grad_log_likelihood(x[b : b + 1])
        torch.testing.assert_close(ll[b], llb[0])
        torch.testing.assert_close(grad[b], gb[0])
        torch.testing.assert_close(p.log_likelihood(x)[b], q.log_likelihood(x[b : b + 1])[0])
    with pytest.raises(ValueError, match="one noise_std per problem"):
        _ = p.noise_std
    # equal scales collapse to a shared one
    assert not bfd.InverseProblem(A, y, torch.full((3,), 0.3, dtype=DT)).per_problem_noise


@pytest.mark.parametrize(
    "noise, match",
    [
        (torch.tensor([0.1, 0.2]), "one value per problem"),
        (torch.tensor([0.1, -0.2, 0.3]), "finite numbers >= 0"),
        (torch.tensor([0.1, 0.0, 0.3]), "must be > 0 for every problem"),
        (torch.tensor([0.1, float("nan"), 0.3]), "finite"),
    ],
)
def test_per_problem_noise_refused_with_its_name(noise, match):
    A = Dense(torch.eye(2, dtype=DT))
    with pytest.raises(ValueError, match=match):
        bfd.InverseProblem(A, torch.zeros(3, 2, dtype=DT), noise.to(DT))


def test_samplers_without_per_problem_support_refuse_before_running():
    gmm = bfd.GaussianMixture(
        torch.ones(1, dtype=DT), torch.zeros(1, 2, dtype=DT), torch.ones(1, dtype=DT)
    )
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    A = Dense(torch.eye(2, dtype=DT))
    y = torch.zeros(3, 2, dtype=DT)
    noisy = bfd.InverseProblem(A, y, torch.tensor([0.1, 0.2, 0.3], dtype=DT))
    with pytest.raises(ValueError, match="one noise_std shared by all problems"):
        MCGdiff(num_steps=5).sample(prior, noisy, 4)
    per_op = bfd.InverseProblem(PerProblemDense(_matrices(3, 2, 2)), y, 0.1)
    with pytest.raises(ValueError, match="one operator shared by all problems"):
        bfd.samplers.DPS(num_steps=5).sample(prior, per_op, 4)
    assert TDS.requires.per_problem
    assert bfd.samplers.registry.default_sampler(noisy).__class__ is TDS


# ---------------------------------------------------------------- PerProblemDense
@pytest.mark.parametrize("m", [3, 12])
def test_per_problem_gram_solve_with_more_rows_than_columns_in_float32(m):
    """``(r2 M M^T + s2 I)^-1 y`` for ``M`` ``(B, m, 8)``: with ``m > d`` its ``m - d``
    eigenvalues ``s2`` sank under float32's rounding of ``r2 M M^T`` at TDS's early twist
    variance (``r2 = 2.3e4``), and the Cholesky solve raised torch's ``LinAlgError`` (SMC^2
    with an unknown gain and 12 observations of 8 coordinates, every seed). Through the
    SVD: the float64 solve's values, to float32's rounding; per-particle coefficients too;
    a zero ``s2`` with ``m > d`` is refused by name."""
    g = torch.Generator().manual_seed(4)
    B, d = 3, 8
    Ms = torch.randn(B, m, d, generator=g, dtype=DT)
    y = torch.randn(B, 5, m, generator=g, dtype=DT)
    r2 = torch.tensor([2.3e4, 1.0, 1e-3], dtype=DT)[:, None]
    s2 = torch.tensor([1e-4, 0.01, 1.0], dtype=DT)[:, None]
    eye = torch.eye(m, dtype=DT)
    MMt = (Ms @ Ms.transpose(-1, -2)).unsqueeze(1)  # (B, 1, m, m)
    G = r2[..., None, None] * MMt + s2[..., None, None] * eye
    want = torch.linalg.solve(G, y.unsqueeze(-1)).squeeze(-1)
    got = PerProblemDense(Ms.float()).gram_solve(y.float(), r2.float(), s2.float())
    assert got.dtype == torch.float32
    # the systems' condition numbers reach r2 |M|^2 / s2 ~ 1e10, so float64 solves by
    # different routes agree to ~1e10 eps ~ 2e-6 of the solution's size (measured: 2.7e-7);
    # the float32 operator's (its matrices, data and coefficients rounded) to 2.3e-7
    scale = want.abs().amax(-1, keepdim=True)
    exact = PerProblemDense(Ms).gram_solve(y, r2, s2)
    for sol in (got.double(), exact):
        rel = (sol - want).abs() / scale
        assert float(rel.max()) < 1e-5, float(rel.max())
    if m > d:
        with pytest.raises(ValueError, match="s2 must be > 0"):
            PerProblemDense(Ms).gram_solve(y, r2, torch.zeros_like(s2))


def test_per_problem_dense_matches_dense_per_problem():
    Ms = _matrices(3, 2, 4)
    op = PerProblemDense(Ms)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 4, generator=g, dtype=DT)
    r = torch.randn(3, 5, 2, generator=g, dtype=DT)
    s2 = torch.tensor([0.1, 0.2, 0.3], dtype=DT)[:, None]
    sol = op.gram_solve(r, 0.7, s2)
    for b in range(3):
        D = Dense(Ms[b])
        torch.testing.assert_close(op(x)[b], D(x[b]))
        torch.testing.assert_close(op.adjoint(r)[b], D.adjoint(r[b]))
        torch.testing.assert_close(sol[b], D.gram_solve(r[b], 0.7, float(s2[b])))
    assert spectral_norm(op) == pytest.approx(
        max(float(torch.linalg.matrix_norm(M, ord=2)) for M in Ms)
    )
    with pytest.raises(ValueError, match="problems' axis first"):
        op(torch.zeros(2, 5, 4, dtype=DT))
    with pytest.raises(ValueError, match="one forward model per problem"):
        bfd.InverseProblem(op, torch.zeros(2, 2, dtype=DT), 0.1)


def test_gmm_log_evidence_per_problem_noise_and_operator():
    g = torch.Generator().manual_seed(3)
    gmm = bfd.GaussianMixture(
        torch.tensor([0.4, 0.6], dtype=DT),
        torch.randn(2, 3, generator=g, dtype=DT),
        torch.tensor([0.5, 1.2], dtype=DT),
    )
    Ms = _matrices(3, 2, 3, seed=4)
    y = torch.randn(3, 2, generator=g, dtype=DT)
    sig = torch.tensor([0.1, 0.5, 2.0], dtype=DT)
    both = gmm.log_evidence(bfd.InverseProblem(PerProblemDense(Ms), y, sig))
    noise = gmm.log_evidence(bfd.InverseProblem(Dense(Ms[0]), y, sig))
    for b in range(3):
        one = gmm.log_evidence(bfd.InverseProblem(Dense(Ms[b]), y[b], float(sig[b])))
        torch.testing.assert_close(both[b], one)
        torch.testing.assert_close(
            noise[b], gmm.log_evidence(bfd.InverseProblem(Dense(Ms[0]), y[b], float(sig[b])))
        )
    with pytest.raises(ValueError, match="log_evidence accepts per-problem"):
        gmm.posterior(bfd.InverseProblem(Dense(Ms[0]), y, sig))


@pytest.mark.slow
def test_tds_per_problem_noise_and_operator_against_the_chain():
    """TDS on P problems with their own noise scale and matrix (R copies each): the chain's
    exact evidence and posterior mean of each problem within 4.5 standard errors."""
    P, R, N, n = 3, 12, 300, 40
    sched = bfd.VPSchedule.linear()
    mu = torch.tensor([1.0, -0.5, 0.3], dtype=DT)
    S = torch.diag(torch.tensor([1.0, 0.6, 0.8], dtype=DT))
    gmm = bfd.GaussianMixture(torch.ones(1, dtype=DT), mu[None], S[None])
    Ms = _matrices(P, 2, 3, seed=5)
    sig = torch.tensor([0.1, 0.4, 1.0], dtype=DT)
    g = torch.Generator().manual_seed(6)
    y = torch.randn(P, 2, generator=g, dtype=DT)
    problem = bfd.InverseProblem(
        PerProblemDense(Ms.repeat_interleave(R, 0)),
        y.repeat_interleave(R, 0),
        sig.repeat_interleave(R, 0),
    )
    res = TDS(num_steps=n).sample(gmm.diffusion(sched), problem, N, g)
    chain = chain_prior(mu, S, sched, res.info.times)
    sub = bfd.InverseProblem(PerProblemDense(Ms), y, sig)
    log_z = chain.log_evidence(sub)
    ratio = torch.exp(res.log_evidence - log_z.repeat_interleave(R)).reshape(P, R)
    r_hat, r_se = ratio.mean(1), ratio.std(1) / math.sqrt(R)
    assert ((r_hat - 1).abs() <= 4.5 * r_se).all(), (r_hat, r_se)
    mean = (res.weights().to(DT)[..., None] * res.samples).sum(1).reshape(P, R, 3)
    m_hat, m_se = mean.mean(1), mean.std(1) / math.sqrt(R)
    for b in range(P):
        exact = chain.posterior(bfd.InverseProblem(Dense(Ms[b]), y[b], float(sig[b]))).mean()
        assert ((m_hat[b] - exact).abs() <= 4.5 * m_se[b] + 1e-9).all(), (b, m_hat[b], exact)


# ---------------------------------------------------------------- LinearGaussian with tensor noise
def test_linear_gaussian_per_batch_noise():
    A = Dense(_matrices(1, 2, 3)[0])
    x = torch.randn(4, 3, dtype=DT)
    sig = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DT)[:, None]
    lg = bfd.LinearGaussian(A, x, sig)
    v = torch.randn(4, 2, dtype=DT)
    ref = dist.Normal(A(x), sig).to_event(1).log_prob(v)
    torch.testing.assert_close(lg.log_prob(v), ref)
    with pytest.raises(ValueError, match="one scale per batch element"):
        bfd.LinearGaussian(A, x, torch.full((4, 2), 0.1, dtype=DT))
    with pytest.raises(ValueError, match="finite numbers > 0"):
        bfd.LinearGaussian(A, x, -sig)


# ---------------------------------------------------------------- affine Pyro sites
def _gmm_prior():
    gmm = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=DT),
        torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=DT),
        torch.tensor([0.5, 0.3], dtype=DT),
    )
    return gmm, gmm.diffusion(bfd.VPSchedule.linear())


M2 = torch.tensor([[1.0, 0.3], [-0.4, 1.0], [0.2, 0.5]], dtype=DT)


def test_affine_site_is_read_as_a_dense_operator():
    gmm, prior = _gmm_prior()
    y = torch.tensor([1.5, -0.5, 0.2], dtype=DT)

    def model(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", dist.Normal(2.0 * (x @ M2.T) + 0.5, 0.1).to_event(1), obs=y)

    _, problem, st = model_to_problem(model, y=y)
    assert st.kind == "affine_gaussian" and isinstance(problem.operator, Dense)
    torch.testing.assert_close(problem.operator.matrix(), 2.0 * M2)
    torch.testing.assert_close(problem.y, y - 0.5)
    assert problem.noise_std == 0.1
    # the same likelihood as the model's own
    x = torch.randn(1, 7, 2, dtype=DT)
    torch.testing.assert_close(problem.log_likelihood(x), st.observed_log_prob(x))
    picked = bfd.samplers.registry.default_sampler(problem)
    assert picked.__class__ is TDS and picked.conditions(problem)
    _, kept, st2 = model_to_problem(model, y=y, linearize=False)
    assert st2.kind == "gaussian" and not kept.operator.is_linear


@pytest.mark.parametrize(
    "f",
    [
        lambda x: torch.relu(x @ M2.T),
        lambda x: (x @ M2.T) + 1e-3 * (x @ M2.T) ** 2,
        lambda x: torch.clamp(x @ M2.T, -50.0, 50.0),
        lambda x: (x @ M2.T).abs(),
    ],
    ids=["relu", "quadratic", "clamp", "abs"],
)
def test_nonaffine_sites_stay_black_boxes(f):
    _, prior = _gmm_prior()

    def model(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", dist.Normal(f(x), 0.1).to_event(1), obs=y)

    assert model_to_problem(model, y=torch.zeros(3, dtype=DT))[2].kind == "gaussian"


def test_per_problem_gains_give_a_per_problem_operator():
    _, prior = _gmm_prior()
    gains = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=DT)
    Y = torch.randn(4, 3, dtype=DT)

    def model(y=None):
        with pyro.plate("problems", 4):
            x = pyro.sample("x", bfd.DiffusionPrior(prior))
            pyro.sample("y", dist.Normal(gains[:, None] * (x @ M2.T), 0.2).to_event(1), obs=y)

    _, problem, st = model_to_problem(model, y=Y)
    assert st.kind == "affine_gaussian" and isinstance(problem.operator, PerProblemDense)
    torch.testing.assert_close(problem.operator.matrix(), gains[:, None, None] * M2)
    x = torch.randn(4, 5, 2, dtype=DT)
    torch.testing.assert_close(problem.log_likelihood(x), st.observed_log_prob(x))


def test_a_map_that_fools_the_probes_is_caught_at_the_draws():
    _, prior = _gmm_prior()

    def model(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        lin = x @ M2.T
        # affine within |x| < 1e4 (every probe), not beyond
        mean = torch.where(x.abs().amax(-1, keepdim=True) > 1e4, lin**2, lin)
        pyro.sample("y", dist.Normal(mean, 0.1).to_event(1), obs=y)

    _, problem, st = model_to_problem(model, y=torch.zeros(3, dtype=DT))
    assert st.kind == "affine_gaussian"
    check_linearization(st, problem, torch.randn(1, 4, 2, dtype=DT))  # agrees here
    with pytest.raises(ValueError, match="not affine"):
        check_linearization(st, problem, 2e4 * torch.ones(1, 4, 2, dtype=DT))


def test_the_draws_check_tolerates_float32_rounding_at_a_tiny_noise_scale():
    """An affine site in float32 whose noise scale (one per problem, as SMC^2's theta-
    particles) reaches 1e-7 with draws that fit y to that scale: the linear and the model's
    log-likelihoods differ by rounding of the residual over sigma^2 (about 100 nats here),
    which is no sign of a non-affine map; the check reads the mean, and still catches a map
    that is not affine at the same draws."""
    g = torch.Generator().manual_seed(3)
    d, m, N = 80, 40, 64
    sig = torch.tensor([1e-7, 1e-3, 1.0], dtype=DT)
    A = torch.randn(m, d, generator=g, dtype=DT) / math.sqrt(d)
    x0 = torch.randn(3, d, generator=g, dtype=DT)
    Y = x0 @ A.T + sig[:, None] * torch.randn(3, m, generator=g, dtype=DT)
    # draws that fit y as well as x0 does: x0 plus null-space directions of A
    null = torch.linalg.svd(A).Vh[m:]  # (d - m, d)
    x = x0[:, None] + torch.randn(3, N, d - m, generator=g, dtype=DT) @ null
    gmm = bfd.GaussianMixture(
        torch.tensor([0.5, 0.5]), torch.stack([-torch.ones(d), torch.ones(d)]), torch.ones(2)
    )
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    A32, sig32 = A.float(), sig.float()

    def model(y=None, bent=False):
        with pyro.plate("problems", 3):
            xs = pyro.sample("x", bfd.DiffusionPrior(prior))
            mean = xs @ A32.T
            if bent:  # affine within |x| < 1e4 (every probe), not beyond
                mean = torch.where(xs.abs().amax(-1, keepdim=True) > 1e4, mean**2, mean)
            pyro.sample("y", dist.Normal(mean, sig32[:, None]).to_event(1), obs=y)

    _, problem, st = model_to_problem(model, y=Y.float())
    assert st.kind == "affine_gaussian"
    x32 = x.float()
    gap = (problem.log_likelihood(x32) - st.observed_log_prob(x32)).double().abs()
    assert float(gap[0].max()) > 10  # the log-likelihoods' rounding gap at sigma = 1e-7
    check_linearization(st, problem, x32)  # an affine map: no false alarm
    _, problem, st = model_to_problem(lambda y=None: model(y, bent=True), y=Y.float())
    assert st.kind == "affine_gaussian"
    check_linearization(st, problem, x32)
    with pytest.raises(ValueError, match="not affine"):
        check_linearization(st, problem, x32 + 2e4)


def test_infer_on_an_affine_site_matches_the_hand_built_problem():
    """The same run as the sampler on InverseProblem(Dense(M), y - c): draws equal to
    rounding of the materialised matrix."""
    _, prior = _gmm_prior()
    y = torch.tensor([1.5, -0.5, 0.2], dtype=DT)

    def model(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", dist.Normal(x @ M2.T, 0.2).to_event(1), obs=y)

    post = bfd.infer(
        model,
        MCGdiff(num_steps=20),
        y=y,
        num_samples=64,
        generator=torch.Generator().manual_seed(0),
    )
    ref = MCGdiff(num_steps=20).sample(
        prior, bfd.InverseProblem(Dense(M2), y, 0.2), 64, torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(post.result.samples, ref.samples)
    torch.testing.assert_close(post.result.log_evidence, ref.log_evidence)

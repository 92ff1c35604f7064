import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

import bayesfilter_diff as bfd

D64 = torch.float64


def _mixture(kind, g, K=3, d=4):
    w = torch.tensor([0.2, 0.5, 0.3], dtype=D64)[:K]
    w = w / w.sum()
    mu = 3 * torch.randn(K, d, generator=g, dtype=D64)
    if kind == "full":
        A = torch.randn(K, d, d, generator=g, dtype=D64)
        cov = A @ A.transpose(-1, -2) / d + 0.1 * torch.eye(d, dtype=D64)
    elif kind == "diag":
        cov = torch.rand(K, d, generator=g, dtype=D64) + 0.2
    else:
        cov = torch.rand(K, generator=g, dtype=D64) + 0.2
    return bfd.GaussianMixture(w, mu, cov)


def _scipy_logpdf(gmm, x, alpha=1.0, sigma=0.0):
    C = gmm.covariance_matrices().expand(gmm.num_components, gmm.dim, gmm.dim).numpy()
    mu = gmm.means.numpy()
    w = gmm.weights.numpy()
    d = gmm.dim
    comps = [
        np.log(w[k])
        + multivariate_normal(alpha * mu[k], alpha**2 * C[k] + sigma**2 * np.eye(d)).logpdf(
            x.numpy()
        )
        for k in range(len(w))
    ]
    return torch.as_tensor(np.logaddexp.reduce(np.stack(comps), axis=0))


KINDS = ["full", "diag", "iso"]


@pytest.mark.parametrize("kind", KINDS)
def test_log_prob_matches_scipy(kind, gen):
    gmm = _mixture(kind, gen)
    x = gmm.sample(50, gen)
    assert x.shape == (50, 4)
    assert torch.allclose(gmm.log_prob(x), _scipy_logpdf(gmm, x), atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "sched",
    [bfd.VPSchedule.linear(), bfd.VESchedule(), bfd.FlowSchedule()],
    ids=["vp", "ve", "flow"],
)
def test_noisy_marginal_closed_form(kind, sched, gen):
    gmm = _mixture(kind, gen)
    prior = gmm.diffusion(sched)
    x = 2 * torch.randn(20, 4, generator=gen, dtype=D64)
    for t in (0.1, 0.5, 0.9):
        tt = torch.tensor(t, dtype=D64)
        ref = _scipy_logpdf(gmm, x, float(sched.alpha(tt)), float(sched.sigma(tt)))
        assert torch.allclose(prior.noisy_log_prob(x, t), ref, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_score_is_gradient_of_noisy_log_density(kind, gen):
    gmm = _mixture(kind, gen)
    prior = gmm.diffusion(bfd.VPSchedule.cosine())
    x = torch.randn(6, 4, generator=gen, dtype=D64).requires_grad_(True)
    t = torch.full((6,), 0.4, dtype=D64)
    (grad,) = torch.autograd.grad(prior.noisy_log_prob(x, t).sum(), x)
    assert torch.allclose(prior.score(x.detach(), t), grad, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_denoiser_matches_self_normalised_importance_sampling(kind, gen):
    gmm = _mixture(kind, gen)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    t = torch.tensor(0.3, dtype=D64)
    a, s = prior.schedule.alpha(t), prior.schedule.sigma(t)
    x_t = a * gmm.sample(1, gen) + s * torch.randn(1, 4, generator=gen, dtype=D64)
    x0 = gmm.sample(200_000, gen)
    lw = -0.5 * ((x_t - a * x0) ** 2).sum(-1) / s**2
    W = torch.softmax(lw, 0)
    est = (W[:, None] * x0).sum(0)
    se = torch.sqrt((W[:, None] ** 2 * (x0 - est) ** 2).sum(0))  # SNIS standard error
    exact = prior.denoise(x_t, t)[0]
    assert ((exact - est).abs() < 5 * se + 1e-9).all(), (exact, est, se)


def test_denoise_batch_shapes_and_time_per_row(gen):
    gmm = _mixture("diag", gen)
    prior = gmm.diffusion(bfd.VPSchedule.linear(), chunk_size=7)
    x = torch.randn(3, 5, 4, generator=gen, dtype=D64)
    t = torch.rand(3, 5, generator=gen, dtype=D64)
    out = prior.denoise(x, t)
    assert out.shape == x.shape
    row = prior.denoise(x[1, 2], t[1, 2])
    assert torch.allclose(out[1, 2], row)
    with pytest.raises(ValueError, match="event shape"):
        prior.denoise(torch.zeros(3, 5), 0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_and_evidence_vs_brute_force(kind, gen):
    gmm = _mixture(kind, gen)
    A = bfd.operators.Dense(torch.randn(2, 4, generator=gen, dtype=D64))
    xs = gmm.sample(3, gen)
    problem = bfd.InverseProblem(A, A(xs) + 0.5 * torch.randn(3, 2, generator=gen, dtype=D64), 0.5)
    post = gmm.posterior(problem)
    assert post.batch_shape == (3,) and post.means.shape == (3, 3, 4)
    n = 400_000
    x0 = gmm.sample(n, gen)
    ll = problem.log_likelihood(x0.expand(3, n, 4))  # (3, n)
    # evidence: log mean exp, with delta-method standard error
    w = torch.exp(ll - ll.max(-1, keepdim=True).values)
    le_mc = torch.log(w.mean(-1)) + ll.max(-1).values
    se = w.std(-1) / (math.sqrt(n) * w.mean(-1))
    le = gmm.log_evidence(problem)
    assert ((le - le_mc).abs() < 5 * se).all(), (le, le_mc, se)
    # posterior mean and component weights by self-normalised importance sampling
    W = torch.softmax(ll, -1)
    est = W @ x0
    se_m = torch.sqrt(torch.einsum("bn,bnd->bd", W**2, (x0 - est[:, None]) ** 2))
    assert ((post.mean() - est).abs() < 5 * se_m).all()
    resp = gmm.component_log_responsibilities(x0).exp()  # p(k | x), and p(k | y) = E[p(k | x) | y]
    wk = W @ resp
    se_k = torch.sqrt(torch.einsum("bn,bnk->bk", W**2, (resp[None] - wk[:, None]) ** 2))
    assert ((post.weights - wk).abs() < 5 * se_k + 1e-12).all()
    # exact posterior density vs Bayes' rule on a few points
    x = xs[:, None, :] + 0.1
    lhs = post.log_prob(x)[:, 0]
    rhs = gmm.log_prob(x[:, 0]) + problem.log_likelihood(x).squeeze(1) - le
    assert torch.allclose(lhs, rhs, atol=1e-8)


def test_unbatched_posterior_and_noiseless(gen):
    gmm = _mixture("iso", gen)
    A = bfd.operators.Mask(torch.tensor([True, False, True, False]), dtype=D64)
    x = gmm.sample(1, gen)[0]
    post = gmm.posterior(bfd.InverseProblem(A, A(x), 0.0))
    assert post.batch_shape == () and post.means.shape == (3, 4)
    draws = post.sample(100, gen)
    assert torch.allclose(A(draws), A(x).expand(100, 2), atol=1e-6)


def test_float32_stability_d800():
    g = torch.Generator().manual_seed(0)
    d = 800
    grid = torch.tensor([-16.0, -8.0, 0.0, 8.0, 16.0])
    ij = torch.cartesian_prod(grid, grid)  # (25, 2)
    means = ij.repeat(1, d // 2)
    w = torch.randn(25, generator=g) ** 2
    w = w / w.sum()
    gmm32 = bfd.GaussianMixture(w, means, torch.ones(25))
    gmm64 = bfd.GaussianMixture(w.double(), means.double(), torch.ones(25, dtype=D64))
    sch = bfd.VPSchedule.linear()
    x0 = gmm64.sample(64, g)
    for t in (0.01, 0.3, 0.7, 1.0):
        tt = torch.tensor(t, dtype=D64)
        xt = sch.alpha(tt) * x0 + sch.sigma(tt) * torch.randn(64, d, generator=g, dtype=D64)
        out32 = gmm32.diffusion(sch).denoise(xt.float(), t)
        out64 = gmm64.diffusion(sch).denoise(xt, t)
        assert torch.isfinite(out32).all()
        assert (out32.double() - out64).abs().max() < 1e-3 * (1 + out64.abs().max())


def test_mixture_moments(gen):
    gmm = _mixture("full", gen)
    x = gmm.sample(200_000, gen)
    assert torch.allclose(
        x.mean(0), gmm.mean(), atol=5 * float(x.std(0).max()) / math.sqrt(200_000)
    )
    assert torch.allclose(torch.cov(x.T), gmm.covariance(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "weights, means, cov, match",
    [
        ([0.5, 0.6], [[0.0], [1.0]], [1.0, 1.0], "sum to one"),
        ([-0.5, 1.5], [[0.0], [1.0]], [1.0, 1.0], "non-negative"),
        ([0.5, 0.5], [[0.0], [1.0]], [1.0, -1.0], "positive definite"),
        ([0.5, 0.5], [[0.0], [float("nan")]], [1.0, 1.0], "finite"),
        ([0.5, 0.5, 0.0], [[0.0], [1.0]], [1.0, 1.0], "shape"),
        ([0.5, 0.5], [[0.0], [1.0]], [[[1.0]], [[1.0]], [[1.0]]], "covariances must have shape"),
    ],
)
def test_bad_mixture_arguments(weights, means, cov, match):
    with pytest.raises(ValueError, match=match):
        bfd.GaussianMixture(torch.tensor(weights), torch.tensor(means), torch.tensor(cov))


def test_not_positive_definite_full():
    cov = torch.tensor([[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="positive definite"):
        bfd.GaussianMixture(torch.ones(1), torch.zeros(1, 2), cov)


def test_posterior_shape_mismatch(gen):
    gmm = _mixture("iso", gen)
    A = bfd.operators.Dense(torch.randn(2, 5, generator=gen, dtype=D64))
    with pytest.raises(ValueError, match="dimension"):
        gmm.posterior(bfd.InverseProblem(A, torch.zeros(2, dtype=D64), 0.1))


def test_shared_covariance_path_equals_the_per_component_path():
    """A covariance shared by all components is factored once (the posterior of an isotropic
    mixture); densities, denoiser and moments equal the per-component computation."""
    g = torch.Generator().manual_seed(0)
    K, d = 5, 6
    D = torch.float64
    M = torch.randn(d, d, generator=g, dtype=D)
    S = M @ M.T + torch.eye(d, dtype=D)
    w = torch.softmax(torch.randn(K, generator=g, dtype=D), 0)
    mu = torch.randn(K, d, generator=g, dtype=D)
    shared = bfd.GaussianMixture(w, mu, S.expand(K, d, d).clone())
    assert shared._cov_shared and shared.eigvecs.shape == (1, d, d)
    ref = bfd.GaussianMixture(w, mu, S.expand(K, d, d).clone())
    ref._cov_shared = False  # force the general path with K factorisations
    lam, Q = torch.linalg.eigh(S.expand(K, d, d))
    ref.eigvals, ref.eigvecs = lam, Q
    x = torch.randn(7, 3, d, generator=g, dtype=D)
    a = torch.full((7, 3), 0.7, dtype=D)
    s = torch.full((7, 3), 0.5, dtype=D)
    torch.testing.assert_close(shared.log_prob(x), ref.log_prob(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        shared.noisy_denoise(x, a, s), ref.noisy_denoise(x, a, s), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(shared.covariance(), ref.covariance(), rtol=0, atol=1e-12)
    # sampling: moments within Monte Carlo error (4 s.e. per entry of the mean)
    X = shared.sample(100_000, torch.Generator().manual_seed(1))
    se = shared.covariance().diagonal().sqrt() / 100_000**0.5
    assert ((X.mean(0) - shared.mean()).abs() < 4 * se).all()


def test_isotropic_gemm_path_is_exact_in_float32_far_from_the_origin():
    """||x||^2 - 2a x.mu + a^2 ||mu||^2 is evaluated in float64: no cancellation for means
    at +-16 in d = 800 with float32 inputs (compared with the float64 direct residual)."""
    g = torch.Generator().manual_seed(2)
    K, d = 25, 800
    mu = 16 * torch.sign(torch.randn(K, d, generator=g, dtype=torch.float64))
    var = torch.full((K,), 1e-3, dtype=torch.float64)
    w = torch.full((K,), 1 / K, dtype=torch.float64)
    x = mu[:4] + 0.03 * torch.randn(4, d, generator=g, dtype=torch.float64)
    g32 = bfd.GaussianMixture(w.float(), mu.float(), var.float())
    got = g32.log_prob(x.float()).double()
    # compare with the exact value for the float32-rounded x
    exact32 = torch.logsumexp(
        torch.log(w)
        - 0.5
        * (
            ((x.float().double()[:, None] - mu) ** 2).sum(-1) / var
            + d * torch.log(2 * math.pi * var)
        ),
        -1,
    )
    # the result is a float32 number of magnitude ~1.7e3 (resolution 1.2e-4); a float32
    # expansion of the square would be off by ~20 here (its maha error is ~38)
    assert (got - exact32).abs().max() < 2e-3


def test_diagonal_and_identity_full_covariances_take_the_compact_path():
    """(K, d, d) matrices with zero off-diagonal entries are stored as (K, d) variances and
    scaled identities as (K,) ones: the same densities, denoiser, evidence and posterior as the dense
    eigendecomposition path (float64, to rounding)."""
    g = torch.Generator().manual_seed(3)
    K, d = 3, 5
    D = torch.float64
    w = torch.softmax(torch.randn(K, generator=g, dtype=D), 0)
    mu = torch.randn(K, d, generator=g, dtype=D)
    iso = torch.tensor([0.5, 1.0, 2.0], dtype=D)
    diag = 0.5 + torch.rand(K, d, generator=g, dtype=D)
    x = torch.randn(6, d, generator=g, dtype=D)
    a, s = torch.full((6,), 0.8, dtype=D), torch.full((6,), 0.6, dtype=D)
    for full, kind in (
        (iso[:, None, None] * torch.eye(d, dtype=D), "iso"),
        (torch.diag_embed(diag), "diag"),
        (torch.diag_embed(iso[:, None].expand(K, d)).clone(), "iso"),
    ):
        fast = bfd.GaussianMixture(w, mu, full.clone())
        assert fast.kind == kind
        ref = bfd.GaussianMixture(w, mu, full.clone())
        # the dense path: a rotation that is the identity, set by hand
        lam = torch.diagonal(full, dim1=-2, dim2=-1)
        ref.kind, ref._cov_shared = "full", False
        ref.eigvals, ref.eigvecs = lam, torch.eye(d, dtype=D).expand(K, d, d).clone()
        torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(
            fast.noisy_denoise(x, a, s), ref.noisy_denoise(x, a, s), rtol=0, atol=1e-12
        )
        torch.testing.assert_close(fast.covariance_matrices(), full)
        A = torch.randn(2, d, generator=g, dtype=D)
        prob = bfd.InverseProblem(bfd.operators.Dense(A), y=x[:2, :2], noise_std=0.3)
        torch.testing.assert_close(
            fast.log_evidence(prob), ref.log_evidence(prob), rtol=0, atol=1e-12
        )
        torch.testing.assert_close(
            fast.posterior(prob).means, ref.posterior(prob).means, rtol=0, atol=1e-12
        )
    # a non-diagonal entry keeps the full path
    full = torch.eye(d, dtype=D).expand(K, d, d).clone()
    full[:, 0, 1] = full[:, 1, 0] = 0.1
    assert bfd.GaussianMixture(w, mu, full).kind == "full"


def test_x0_variance_of_a_mixture_and_none_for_a_network():
    """``x0_variance(t)``: a Gaussian mixture's own (tabulated from 8192 of its draws of 4
    coordinates: relative sd about 0.8%), the prior's variance per coordinate at ``alpha =
    0``, 0 at ``sigma = 0`` and rising with the noise; the same table for a flow path at the
    same log-SNR (it depends on nothing else); a network does not know it."""
    D = torch.float64
    gmm = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=D),
        torch.tensor([[-1.0, 0.5, 0.0, 2.0], [1.0, 0.0, -0.5, 0.0]], dtype=D),
        torch.tensor([0.2, 0.05], dtype=D),
    )
    vp = bfd.VPSchedule.linear()
    exact = gmm.diffusion(vp)
    t = torch.tensor([0.0, 0.02, 0.2, 0.5, 1.0], dtype=D)
    own = exact.x0_variance(t)
    assert own is not None and own[0] == 0
    torch.testing.assert_close(own[-1], gmm.average_variance(), rtol=0.04, atol=0.0)
    assert (own[1:].diff() > 0).all()  # more noise, more posterior variance
    # a flow path's time with the same alpha / sigma: the same value
    flow = bfd.FlowSchedule()
    ratio = vp.alpha(t[1:4]) / vp.sigma(t[1:4])  # alpha / sigma = (1 - u) / u on the flow
    u = 1 / (1 + ratio)
    torch.testing.assert_close(gmm.diffusion(flow).x0_variance(u), own[1:4], rtol=1e-9, atol=0)
    # a float16 mixture's table is made in float64 (its own arithmetic cannot resolve the
    # small noise levels): the float64 mixture's, up to its parameters' rounding
    half = bfd.GaussianMixture(gmm.weights.half(), gmm.means.half(), gmm.eigvals[:, 0].half())
    torch.testing.assert_close(half.diffusion(vp).x0_variance(t), own, rtol=0.01, atol=0.0)
    net = bfd.DiffusionModel(lambda x, tt: exact.denoise(x, tt), vp, (4,))
    assert net.x0_variance(t) is None
    # parameters changed in place after the model was made: the table follows them
    before = exact.x0_variance(t)
    gmm.eigvals.mul_(40.0)
    after = exact.x0_variance(t)
    assert before is not None and after is not None and (after[2:] > 3 * before[2:]).all()
    fresh = bfd.GaussianMixture(gmm.weights, gmm.means, gmm.eigvals[:, 0].clone())
    torch.testing.assert_close(after, fresh.diffusion(vp).x0_variance(t), rtol=1e-12, atol=0)


def test_x0_variance_tables_of_different_mixtures_do_not_collide():
    """Two mixtures whose parameters have the same bytes in other shapes (isotropic at d = 3,
    diagonal at d = 2) keep their own tables; a prior of per-coordinate variance 1e-8 is
    tabulated up to the log-SNR where its ratio to the unit Gaussian's reaches 1."""
    D = torch.float64
    t = torch.tensor([0.1, 0.5], dtype=D)
    vp = bfd.VPSchedule.linear()
    a = bfd.GaussianMixture(
        torch.tensor([0.5, 0.5], dtype=D),
        torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 2.0]], dtype=D),
        torch.tensor([1.0, 1.0], dtype=D),
    )
    b = bfd.GaussianMixture(
        torch.tensor([0.5, 0.5], dtype=D),
        torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=D),
        torch.tensor([[1.0, 2.0], [1.0, 1.0]], dtype=D),
    )
    vb = b.diffusion(vp).x0_variance(t)
    va = a.diffusion(vp).x0_variance(t)
    assert va is not None and vb is not None and not torch.allclose(va, vb, rtol=0.05)
    tiny = bfd.GaussianMixture(
        torch.ones(1, dtype=D), torch.zeros(1, 2, dtype=D), torch.tensor([1e-8], dtype=D)
    )
    # log-SNR 25.3 / 23.0 / 20.0 on this path, past the old table's end at 16, where the
    # ratio to the unit Gaussian's was still 0.08 (12x off); from 8192 draws of 2
    # coordinates the sample variance's relative sd is 1.1%
    ts = torch.tensor([1e-10, 1e-9, 2e-8], dtype=D)
    from bayesfilter_diff.samplers.tds import _gaussian_x0_variance

    own = tiny.diffusion(vp).x0_variance(ts)
    torch.testing.assert_close(own, _gaussian_x0_variance(vp, ts, 1e-8), rtol=0.04, atol=0)


def test_float32_weights_cast_to_float64_are_accepted_and_renormalised():
    # torch.tensor([0.4, 0.6]).double() sums to 1 + 3e-8: float32's rounding, not an error
    w = torch.tensor([0.4, 0.6]).double()
    assert abs(float(w.sum()) - 1) > 1e-8
    gmm = bfd.GaussianMixture(w, torch.tensor([[-1.0], [1.0]], dtype=D64), torch.ones(2, dtype=D64))
    assert abs(float(gmm.weights.sum()) - 1) < 1e-15
    assert torch.allclose(gmm.weights, w, atol=1e-7)
    with pytest.raises(ValueError, match="sum to one"):  # a real error still is one
        bfd.GaussianMixture(
            torch.tensor([0.4, 0.6 + 1e-5], dtype=D64),
            torch.tensor([[-1.0], [1.0]], dtype=D64),
            torch.ones(2, dtype=D64),
        )


def test_singular_predictive_covariance_is_a_clear_error():
    # d_y = 32 rows of rank 2 at noise 1e-8: A S A^T + sigma^2 I is singular to float64
    # precision; the exact formulas say so instead of a raw LinAlgError
    g = torch.Generator().manual_seed(123)
    gmm = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=D64),
        torch.stack([-2 * torch.ones(2, dtype=D64), 2 * torch.ones(2, dtype=D64)]),
        torch.ones(2, dtype=D64),
    )
    M = torch.randn(32, 2, generator=g, dtype=D64)
    y = M @ gmm.sample(1, g)[0]
    p = bfd.InverseProblem(bfd.operators.Dense(M), y, 1e-8)
    for fn in (gmm.log_evidence, gmm.posterior):
        with pytest.raises(ValueError, match="singular to float64 precision"):
            fn(p)
    assert torch.isfinite(gmm.log_evidence(bfd.InverseProblem(bfd.operators.Dense(M), y, 1e-6)))

"""Tests of Diffusion Posterior Sampling (per-particle step sizes, operators, noise models)."""

from __future__ import annotations

import math

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.base import Context
from bayesfilter_diff.samplers.dps import DPS, DPSState
from bayesfilter_diff.samplers.kernels import ddim_coefficients

DT = torch.float64


def gaussian_prior(d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([1.0, -0.5, 0.3], dtype=DT)[:d]
    L = torch.randn(d, d, generator=g, dtype=DT)
    S = L @ L.T / d + 0.5 * torch.eye(d, dtype=DT)
    return bfd.GaussianMixture(torch.ones(1, dtype=DT), mu[None], S[None]), mu, S


def gaussian_image_prior(shape, schedule, tau2=1.0):
    """The exact diffusion of N(0, tau2 I) on images of shape ``shape`` (float32)."""

    def denoise(x, t):
        tt = t.reshape(t.shape + (1,) * (x.dim() - 1))
        a, s = schedule.alpha(tt), schedule.sigma(tt)
        return a * tau2 * x / (a**2 * tau2 + s**2)

    return bfd.DiffusionModel(denoise, schedule, shape)


def make_problem(kind, g):
    sched = bfd.VPSchedule.linear()
    if kind == "dense":
        gmm, _, _ = gaussian_prior()
        A = bfd.operators.Dense(torch.randn(2, 3, generator=g, dtype=DT))
        y = A(gmm.sample(2, g)) + 0.1 * torch.randn(2, 2, generator=g, dtype=DT)
        return gmm.diffusion(sched), bfd.InverseProblem(A, y, noise_std=0.1), (3,)
    shape = (1, 4, 4)
    prior = gaussian_image_prior(shape, sched)
    x = torch.randn(shape, generator=g)
    if kind == "mask":
        A = bfd.operators.Mask.random(shape, 0.5, generator=g)
        y = A(x) + 0.05 * torch.randn(A.out_shape, generator=g)
        return prior, bfd.InverseProblem(A, y, noise_std=0.05), shape
    A = bfd.operators.PhaseRetrieval(shape)
    if kind == "phase":
        y = A(x) + 0.05 * torch.randn(A.out_shape, generator=g)
        return prior, bfd.InverseProblem(A, y, noise_std=0.05), shape
    y = torch.poisson(4.0 * A(torch.stack([x, -x])), generator=g)  # batched, B = 2
    return prior, bfd.InverseProblem(A, y, noise="poisson", poisson_rate=4.0), shape


@pytest.mark.parametrize(
    "kind, poisson, rule",
    [
        ("dense", "weighted", "paper"),
        ("mask", "weighted", "code"),
        ("phase", "weighted", "paper"),
        ("poisson", "weighted", "paper"),
        ("poisson", "nll", "code"),
    ],
)
def test_runs_and_shapes(kind, poisson, rule):
    g = torch.Generator().manual_seed(1)
    prior, problem, shape = make_problem(kind, g)
    res = DPS(num_steps=20, scale=0.3, step_rule=rule, poisson=poisson).sample(
        prior, problem, num_samples=5, generator=g
    )
    lead = (problem.batch_size, 5) if problem.batched else (5,)
    assert res.samples.shape == lead + shape and res.samples.dtype == problem.y.dtype
    assert torch.isfinite(res.samples).all()
    assert res.log_weights is None and res.log_evidence is None
    assert res.info["nfe"] == 20 and res.info["backprop"]
    # per step and problem: particles that skipped a non-finite gradient step
    skipped = res.info["dps_nonfinite"]
    assert skipped.shape == (20, problem.batch_size) and (skipped == 0).all()


def make_ctx(prior, problem, N, seed, sampler):
    times = sampler.time_grid(prior, problem)
    ctx = Context(prior, problem, N, torch.Generator().manual_seed(seed), times)
    return ctx, sampler.setup(ctx)


def move(sampler, ctx, setup, x, k, t, t_next):
    return sampler.move(ctx, setup, DPSState(x), k, t, t_next).state.x


@pytest.mark.parametrize("rule", ["paper", "code"])
def test_step_size_is_per_particle(rule):
    # One particle's update must not depend on the other particles or problems (the
    # official code's whole-batch norm would couple them).
    gmm, _, _ = gaussian_prior()
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    g = torch.Generator().manual_seed(2)
    A = bfd.operators.Dense(torch.randn(2, 3, generator=g, dtype=DT))
    y = torch.randn(2, 2, generator=g, dtype=DT)
    x = torch.randn(2, 4, 3, generator=g, dtype=DT)
    sampler = DPS(num_steps=10, scale=0.7, step_rule=rule)
    t, t_next = torch.tensor(0.5, dtype=DT), torch.tensor(0.4, dtype=DT)

    def step(x, y, seed=0):
        ctx, setup = make_ctx(prior, bfd.InverseProblem(A, y, 0.1), x.shape[1], seed, sampler)
        ctx.generator.manual_seed(seed)  # the same noise for every call
        return move(sampler, ctx, setup, x, 3, t, t_next)

    ref = step(x, y)
    x2, y2 = x.clone(), y.clone()
    x2[0, 1:] = 10 * torch.randn(3, 3, generator=g, dtype=DT)  # other particles
    x2[1] = -x2[1]  # the other problem's particles
    y2[1] = 50.0  # the other problem's observation
    out = step(x2, y2)
    torch.testing.assert_close(out[0, 0], ref[0, 0], rtol=0, atol=1e-14)
    assert not torch.allclose(out[0, 1], ref[0, 1]) and not torch.allclose(out[1], ref[1])
    # Deterministic kernel (eta = 0): the batched update equals the one-particle update.
    det = DPS(num_steps=10, scale=0.7, step_rule=rule, eta=0.0)
    ctx, setup = make_ctx(prior, bfd.InverseProblem(A, y, 0.1), 4, 0, det)
    full = move(det, ctx, setup, x, 3, t, t_next)
    ctx1, setup1 = make_ctx(prior, bfd.InverseProblem(A, y[1:], 0.1), 1, 0, det)
    one = move(det, ctx1, setup1, x[1:, 2:3], 3, t, t_next)
    torch.testing.assert_close(full[1, 2], one[0, 0], rtol=0, atol=1e-14)


def test_step_matches_closed_form():
    # Gaussian prior: x0_hat = G x_t + b is affine, so grad ||y - A x0_hat||^2 =
    # -2 G^T A^T r; one deterministic (eta = 0) step is checked against the formula.
    gmm, mu, S = gaussian_prior()
    sched = bfd.VPSchedule.linear()
    prior = gmm.diffusion(sched)
    g = torch.Generator().manual_seed(3)
    M = torch.randn(2, 3, generator=g, dtype=DT)
    A = bfd.operators.Dense(M)
    y = torch.randn(1, 2, generator=g, dtype=DT)
    x = torch.randn(1, 6, 3, generator=g, dtype=DT)
    t, s = torch.tensor(0.3, dtype=DT), torch.tensor(0.25, dtype=DT)
    a, sg = sched.alpha(t), sched.sigma(t)
    G = a * S @ torch.linalg.inv(a**2 * S + sg**2 * torch.eye(3, dtype=DT))
    x0 = x @ G.T + (mu - a * G @ mu)
    r = y[:, None] - x0 @ M.T
    grad = -2 * (r @ M) @ G  # (G^T M^T r)^T per particle
    a_s, c_eps, _, a_t = ddim_coefficients(sched, t, s, 0.0)
    base = a_s * x0 + c_eps * (x - a_t * x0) / sg
    norm = r.norm(dim=-1, keepdim=True)
    for rule, expected in (("paper", base - 0.4 * grad / norm), ("code", base - 0.2 * grad / norm)):
        sampler = DPS(num_steps=10, scale=0.4, step_rule=rule, eta=0.0)
        ctx, setup = make_ctx(prior, bfd.InverseProblem(A, y, 0.1), 6, 0, sampler)
        out = move(sampler, ctx, setup, x, 0, t, s)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_paper_rule_is_twice_the_code_rule():
    g = torch.Generator().manual_seed(4)
    prior, problem, _ = make_problem("dense", g)
    a = DPS(num_steps=15, scale=0.25).sample(prior, problem, 6, torch.Generator().manual_seed(5))
    b = DPS(num_steps=15, scale=0.5, step_rule="code").sample(
        prior, problem, 6, torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-10, atol=1e-12)


def test_moves_toward_the_posterior():
    # DPS is approximate; with a small step it should land near the exact posterior mean
    # (a sanity check of the sign and size of the guidance, not an exactness test).
    gmm, mu, _ = gaussian_prior()
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    g = torch.Generator().manual_seed(6)
    A = bfd.operators.Dense(torch.randn(2, 3, generator=g, dtype=DT))
    y = A(gmm.sample(3, g)) + 0.1 * torch.randn(3, 2, generator=g, dtype=DT)
    problem = bfd.InverseProblem(A, y, noise_std=0.1)
    exact = gmm.posterior(problem)
    res = DPS(num_steps=100, scale=0.1).sample(prior, problem, num_samples=1000, generator=g)
    err = (res.mean() - exact.mean()).norm(dim=-1)
    dist = (mu - exact.mean()).norm(dim=-1)
    assert (err < 0.2 * dist).all()
    resid = (A(res.samples) - y[:, None]).norm(dim=-1).mean(1)
    prior_resid = (A(gmm.sample(1000, g)) - y[:, None]).norm(dim=-1).mean(1)
    assert (resid < 0.5 * prior_resid).all()


def test_poisson_data_fits():
    g = torch.Generator().manual_seed(7)
    prior, problem, shape = make_problem("poisson", g)
    y, rate, op = problem.y[:, None], problem.poisson_rate, problem.operator
    x1 = torch.randn((2, 3) + shape, generator=g)
    x2 = torch.randn((2, 3) + shape, generator=g)
    nll_dps = DPS(num_steps=5, poisson="nll")
    ctx, setup = make_ctx(prior, problem, 3, 0, nll_dps)

    def nll(x):
        return nll_dps.distance(ctx, setup, x)

    # "nll": D = -log p(y | x) + const, so D + log p(y | x) does not depend on x.
    c1 = nll(x1) + problem.log_likelihood(x1)
    c2 = nll(x2) + problem.log_likelihood(x2)
    torch.testing.assert_close(c1, c2, rtol=1e-5, atol=1e-3)
    assert (nll(x1) >= 0).all()
    # "weighted": sum (y - rate A x)^2 / (2 max(y, 1)).
    weighted = DPS(num_steps=5)
    ctx, setup = make_ctx(prior, problem, 3, 0, weighted)
    expected = ((y - rate * op(x1)) ** 2 / (2 * y.clamp_min(1))).flatten(2).sum(-1)
    torch.testing.assert_close(weighted.distance(ctx, setup, x1), expected)


def test_nonfinite_guidance_is_skipped():
    # Poisson "nll" with a rate A x0_hat that can be negative: those particles skip the
    # gradient step instead of turning into NaN.
    gmm, _, _ = gaussian_prior()
    g = torch.Generator().manual_seed(8)
    A = bfd.operators.Dense(torch.tensor([[-1.0, 1.0, 0.0]], dtype=DT))  # A mu = -1.5
    problem = bfd.InverseProblem(A, torch.tensor([1.0], dtype=DT), noise="poisson")
    res = DPS(num_steps=20, poisson="nll").sample(
        gmm.diffusion(bfd.VPSchedule.linear()), problem, 50, g
    )
    skipped = res.info["dps_nonfinite"]  # (num_steps, B): per step and problem
    assert torch.isfinite(res.samples).all() and skipped.shape == (20, 1)
    assert skipped.sum() > 0 and (skipped <= 50).all()


def test_clamp():
    g = torch.Generator().manual_seed(9)
    prior, problem, shape = make_problem("mask", g)
    a = DPS(num_steps=10).sample(prior, problem, 4, torch.Generator().manual_seed(1))
    b = DPS(num_steps=10, clamp_x0=(-1e6, 1e6)).sample(
        prior, problem, 4, torch.Generator().manual_seed(1)
    )
    # a non-binding clamp changes nothing but the arithmetic: the unclamped run takes the
    # pixel grid's closed-form data fit (squared norms by kernels.rowsq), the clamped one
    # autograd through the generic one, so they agree to float32 rounding (3e-7 measured)
    assert torch.allclose(a.samples, b.samples, rtol=0, atol=1e-5)
    # Without guidance the last step returns the clamped x0_hat.
    c = DPS(num_steps=10, scale=0.0, clamp_x0=(-0.5, 0.5)).sample(prior, problem, 4, g)
    assert c.samples.abs().max() <= 0.5


def test_errors():
    with pytest.raises(ValueError, match="step_rule"):
        DPS(step_rule="batch")
    with pytest.raises(ValueError, match="poisson"):
        DPS(poisson="anscombe")
    with pytest.raises(ValueError, match="scale"):
        DPS(scale=-1.0)
    with pytest.raises(ValueError, match="scale"):
        DPS(scale=math.inf)
    with pytest.raises(ValueError, match="eta"):
        DPS(eta=2.0)
    with pytest.raises(ValueError, match="clamp_x0"):
        DPS(clamp_x0=(1.0,))
    assert DPS().num_steps == 1000 and DPS().scale == 1.0
    gmm, _, _ = gaussian_prior()
    A = bfd.operators.Dense(torch.ones(1, 3, dtype=DT))
    custom = bfd.InverseProblem(
        A, torch.zeros(1, dtype=DT), log_likelihood_fn=lambda x, y: -(x**2).sum(-1)
    )
    with pytest.raises(ValueError, match="log_likelihood_fn"):
        DPS(num_steps=5).sample(gmm.diffusion(bfd.VPSchedule.linear()), custom, 4)


def test_pixel_distance_equals_the_operator_form():
    """For a mask under Gaussian noise the data fit runs on the pixel grid (no gather of the
    observed entries): the same ||y - A x0||^2 and gradient as the operator form."""
    g = torch.Generator().manual_seed(4)
    shape = (2, 3, 3)
    op = bfd.operators.Mask.random(shape, 0.5, g, dtype=torch.float64)
    gmm = bfd.GaussianMixture(
        torch.ones(1, dtype=torch.float64),
        torch.zeros(1, 18, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
    )
    y = torch.randn(2, op.out_dim, generator=g, dtype=torch.float64)
    problem = bfd.InverseProblem(op, y, noise_std=0.1)
    prior = bfd.DiffusionModel(
        lambda x, t: gmm.noisy_denoise(
            x.reshape(x.shape[0], -1), torch.ones_like(t), torch.zeros_like(t)
        ).reshape(x.shape),
        bfd.VPSchedule.linear(),
        shape,
    )
    sampler = DPS(num_steps=5)
    ctx, setup = make_ctx(prior, problem, 4, 0, sampler)
    assert setup.pixel is not None
    x0 = torch.randn((2, 4) + shape, generator=g, dtype=torch.float64, requires_grad=True)
    got = sampler.distance(ctx, setup, x0)
    want = ((y[:, None] - op(x0)) ** 2).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (gg,) = torch.autograd.grad(got.sum(), x0)
    (gw,) = torch.autograd.grad(want.sum(), x0)
    torch.testing.assert_close(gg, gw, rtol=1e-12, atol=1e-12)
    # the closed form the move uses: the value and gradient of -D / 2
    half, gc = setup.pixel.value_and_grad(x0.detach())
    torch.testing.assert_close(-2.0 * half, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(-2.0 * gc, gw, rtol=1e-12, atol=1e-12)


def _readme_mixture(d=8):
    mix = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7]),
        torch.stack([-2 * torch.ones(d), 2 * torch.ones(d)]),
        torch.ones(2),
    )
    return mix, mix.diffusion(bfd.VPSchedule.linear())


@pytest.mark.parametrize(
    "gain,kinds",
    [(10.0, ["off_support", "misfit"]), (30.0, ["off_support", "misfit", "exploded"])],
)
def test_overshooting_steps_warn_before_their_draws_explode(gain, kinds):
    # DPS's step moves ~ 2 scale ||A|| whatever the residual: with 10 A and 30 A its draws
    # sit 50-160 times the starting noise's norm away (sliced W 170-430 times the exact
    # floor), below the ``exploded`` line at 10 A (100 since 2026-12-04, 1e3 before, when
    # both were silent); the prior's denoiser moves them 21-128 times the bound on its own
    # draws' move; nor do the draws fit y (residuals 10^3-10^7 times the noise's, ``misfit``)
    mix, prior = _readme_mixture()
    g = torch.Generator().manual_seed(0)
    M, x = torch.randn(2, 8, generator=g), mix.sample(1, g)[0]
    noise = 0.1 * torch.randn(2, generator=g)
    A = bfd.operators.Dense(gain * M)
    problem = bfd.InverseProblem(A, A(x) + noise, noise_std=0.1)
    with pytest.warns(bfd.PosteriorQualityWarning, match="little mass") as rec:
        res = DPS(num_steps=20).sample(prior, problem, 256, generator=g)
    assert [q.kind for q in res.info.quality] == kinds and len(rec) == len(kinds)
    assert float(res.info.support_ratio) > 10
    # the same problem at the operator's own scale: its draws are where the prior is (the
    # support test is quiet), but they do not fit y: A x spreads with sd ~9 and ~4 around y
    # where the exact posterior's spreads with sd 0.1 (noise_std), mean squared residuals
    # thousands of times the noise's, which only the residual check (``misfit``) reports
    A1 = bfd.operators.Dense(M)
    ok = DPS(num_steps=20).sample(prior, bfd.InverseProblem(A1, A1(x) + noise, 0.1), 256, g)
    assert [q.kind for q in ok.info.quality] == ["misfit"]
    assert float(ok.info.support_ratio) < 1.5 and float(ok.info.residual_ratio) > 1e3


def test_a_draw_thrown_off_the_learned_priors_support_is_reported_as_escaped():
    # the shipped two-moons MLP (data within norm 2, starting noise 1.41), DPS at scale 0.1,
    # 20 steps: with this generator one draw of 256 ends at norm 52.7 (the mean moves by
    # ~0.2). A step threw it off at the start of the run and the network, which extrapolates
    # off its data, never pulled it back: below the ``exploded`` line (100 x 1.41), and the
    # renoised support test sees nothing (the network does not pull it back there either);
    # its path ratio (25.5) is over the chi^2 line (16) and it is 45 median distances from
    # the cloud's median. The 15 other generators of 0..15 leave no such draw and are quiet.
    prior = bfd.priors.load_pretrained("moons_diffusion")
    g = torch.Generator().manual_seed(0)
    A = bfd.operators.Dense(torch.tensor([[1.0, 0.5]]))
    y = A(torch.tensor([0.5, -0.2])) + 0.05 * torch.randn(1, generator=g)
    problem = bfd.InverseProblem(A, y, 0.05)
    with pytest.warns(bfd.PosteriorQualityWarning, match="escaped") as rec:
        res = DPS(num_steps=20, scale=0.1).sample(
            prior, problem, 256, torch.Generator().manual_seed(1)
        )
    # at scale 0.1 DPS barely conditions on y: its draws' mean squared residuals are 40-80
    # times the noise's on every generator (TDS 1.14, MCGdiff 1.04 on this problem), which
    # the residual check reports (``misfit``); the escaped draw lies along A's null space
    # and barely changes them
    assert [q.kind for q in res.info.quality] == ["escaped", "misfit"] and len(rec) == 2
    assert int(res.info.escaped) == 1 and float(res.samples.norm(dim=-1).max()) > 20
    assert float(res.info.path_ratio) > 16
    for seed in (0, 2):
        ok = DPS(num_steps=20, scale=0.1).sample(
            prior, problem, 256, torch.Generator().manual_seed(seed)
        )
        assert [q.kind for q in ok.info.quality] == ["misfit"] and int(ok.info.escaped) == 0
        assert float(ok.samples.norm(dim=-1).max()) < 3


def test_draws_that_miss_the_data_by_far_more_than_its_noise_are_reported_as_misfit():
    # a 64-D two-mode mixture, half of the coordinates observed at sigma_y = 1e-3: DPS's
    # posterior mean is ~13 posterior standard deviations off in the observed coordinates
    # (0.08 in the others), inside the prior's support and on its paths, so before the
    # residual check nothing said so. Its draws miss y by ~170 noise widths (mean squared
    # residual ~3e4 times the noise's); the exact posterior's draws by 1.
    from _masked import masked_mixture_problem

    from bayesfilter_diff.samplers.quality import residual_line, residual_ratio

    g = torch.Generator().manual_seed(0)
    mix, prior, problem = masked_mixture_problem(1e-3, g)
    op = problem.operator
    with pytest.warns(bfd.PosteriorQualityWarning, match="do not fit the observation"):
        res = DPS(num_steps=50).sample(prior, problem, 500, torch.Generator().manual_seed(1))
    assert [q.kind for q in res.info.quality] == ["misfit"]
    assert float(res.info.residual_ratio) > 1e3 * residual_line(op.out_dim)
    exact = mix.posterior(problem).sample(500, g)[None]
    assert float(residual_ratio(problem, exact, None)) < 2.0


def test_linear_gaussian_data_fit_in_closed_form_equals_autograd(monkeypatch):
    # -0.5 ||y - A x0||^2 with its gradient A^T (y - A x0) in closed form (autograd only
    # through the denoiser) against autograd through the operator and the squares: the same
    # draws in float64
    d = 6
    mix = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=torch.float64),
        torch.stack([-2 * torch.ones(d), 2 * torch.ones(d)]).double(),
        torch.ones(2, dtype=torch.float64),
    )
    prior = mix.diffusion(bfd.VPSchedule.linear())
    g = torch.Generator().manual_seed(0)
    A = bfd.operators.Dense(torch.randn(3, d, generator=g, dtype=torch.float64))
    problem = bfd.InverseProblem(A, torch.randn(2, 3, generator=g, dtype=torch.float64), 0.1)
    closed = DPS(num_steps=10).sample(prior, problem, 64, torch.Generator().manual_seed(1))
    monkeypatch.setattr(DPS, "_linear_gaussian", staticmethod(lambda ctx: False))
    auto = DPS(num_steps=10).sample(prior, problem, 64, torch.Generator().manual_seed(1))
    torch.testing.assert_close(closed.samples, auto.samples, rtol=1e-9, atol=1e-9)

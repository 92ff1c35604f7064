"""The shared particle loop on toy samplers with known answers."""

import math
import warnings
from dataclasses import dataclass

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.base import Move, SMCSampler


@dataclass(frozen=True)
class _State:
    x: torch.Tensor


@dataclass(frozen=True)
class _StepInfo:
    k: int
    mean_ll: torch.Tensor


@dataclass(frozen=True)
class _ToyIS(SMCSampler):
    """Particles from N(0, 1) per coordinate; weights p(y|x) split evenly over the steps.

    The evidence estimate is then an importance-sampling estimate of p(y) under a N(0, I)
    prior, and the weighted particles target the exact posterior. With ``lookahead=True`` the
    same weights come as a look-ahead potential of each move instead of its weight.
    """

    bad_problem: int = -1
    lookahead_weights: bool = False

    def init(self, ctx, setup):
        return _State(ctx.randn()), None

    def _ll(self, ctx, x, k):
        ll = ctx.problem.log_likelihood(x) / self.num_steps
        if self.bad_problem >= 0 and k == 2:
            ll = ll.clone()
            ll[self.bad_problem] = float("-inf")
        return ll

    def lookahead(self, ctx, setup, state, k):
        return self._ll(ctx, state.x, k) if self.lookahead_weights else None

    def move(self, ctx, setup, state, k, t, t_next):
        ll = None if self.lookahead_weights else self._ll(ctx, state.x, k)
        return Move(state, ll, _StepInfo(k, state.x.mean()))


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


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("thr", [0.0, 0.5, 1.0])
def test_evidence_and_posterior_mean(thr, lookahead):
    gmm, prior = _prior()
    problem = _problem()
    res = _ToyIS(num_steps=5, ess_threshold=thr, lookahead_weights=lookahead).sample(
        prior, problem, 20000, torch.Generator().manual_seed(1)
    )
    exact = gmm.log_evidence(problem)
    # resampling between reweightings keeps the estimator unbiased for Z; tolerance from a
    # crude bound: relative sd of the weights ~ sqrt(e^{chi2}) / sqrt(N)
    assert torch.allclose(res.log_evidence, exact, atol=0.05)
    post = gmm.posterior(problem)
    se = torch.sqrt(post.covariance().diagonal(dim1=-2, dim2=-1) / res.ess()[:, None])
    assert ((res.mean() - post.mean()).abs() < 5 * se).all()
    # one trace entry per reweighting: before each of the 5 moves, and the final one
    assert res.info.ess.shape == (6, 4) and res.info.resampled.shape == (6, 4)
    # the move weights of move k are applied before move k + 1; look-ahead weights before
    # move k: either way the first entry of the move-weighted run is the uniform start
    first = 1 if not lookahead else 0
    if not lookahead:
        assert torch.allclose(res.info.ess[0], torch.full((4,), 20000.0, dtype=torch.float64))
    if thr == 1.0:
        assert res.info.resampled[first:-1].all() and not res.info.resampled[-1].any()
    if thr == 0.0:
        assert not res.info.resampled.any()
    assert torch.equal(res.info.min_ess, res.info.ess.min(0).values)
    # per-step records are stacked by the loop; the mapping interface reads their fields
    assert torch.equal(res.info.steps.k, torch.arange(5)) and res.info["mean_ll"].shape == (5,)


def test_genealogy_counts_report_a_collapse():
    # every weight on one particle: the resampled cloud descends from a single ancestor and
    # (the move being the identity) holds one distinct value, while the final ESS looks fine
    @dataclass(frozen=True)
    class _OneSurvivor(SMCSampler):
        ess_threshold: float = 1.0

        def init(self, ctx, setup):
            lw = torch.full((ctx.B, ctx.N), -1e4, dtype=torch.float64)
            lw[:, 7] = 0.0
            return _State(ctx.randn()), lw

        def move(self, ctx, setup, state, k, t, t_next):
            return Move(state, torch.zeros(ctx.B, ctx.N))

    _, prior = _prior()
    with pytest.warns(bfd.PosteriorQualityWarning) as rec:
        res = _OneSurvivor(num_steps=3).sample(
            prior, _problem(), 50, torch.Generator().manual_seed(0)
        )
    # the final weights are uniform (ESS 50), yet the cloud is one particle: ess() says 1
    W = res.weights()
    assert torch.allclose(1 / (W**2).sum(-1), torch.full((4,), 50.0, dtype=torch.float64))
    assert torch.equal(res.ess(), torch.ones(4, dtype=torch.float64))
    kinds = {i.kind for i in res.info.quality}
    # (and, since the genealogy check judges clouds of N < 200 too, one lineage of 50)
    assert kinds == {"min_ess", "distinct", "genealogy"} and len(rec) == 3
    assert "more particles" in str(rec[0].message)
    assert torch.allclose(res.info.min_ess, torch.ones(4, dtype=torch.float64))
    assert torch.equal(res.info.ancestors, torch.ones(4, dtype=torch.long))
    assert torch.equal(res.info.distinct, torch.ones(4, dtype=torch.long))
    healthy = _ToyIS(num_steps=3, ess_threshold=0.0).sample(
        prior, _problem(), 50, torch.Generator().manual_seed(0)
    )
    assert (healthy.info.distinct == 50).all() and (healthy.info.ancestors > 1).all()
    assert healthy.info.quality == []


def test_genealogy_ess_counts_independent_lineages():
    g = torch.Generator().manual_seed(0)
    N, K = 600, 30
    W = torch.full((2, N), 1.0 / N, dtype=torch.float64)
    own = torch.arange(N).expand(2, N)
    x = torch.randn(2, N, 3, generator=g, dtype=torch.float64)
    # every particle its own lineage, equal weights: worth N draws
    assert torch.allclose(bfd.smc.genealogy_ess(W, x, own), torch.full((2,), float(N)).double())
    # K lineages whose particles agree: worth exactly K draws
    roots = (torch.arange(N) % K).expand(2, N)
    xk = torch.randn(2, K, 3, generator=g, dtype=torch.float64)[:, torch.arange(N) % K]
    assert torch.allclose(bfd.smc.genealogy_ess(W, xk, roots), torch.full((2,), float(K)).double())
    # ... and when they are independent within each of L >= MIN_LINEAGES lineages, again
    # about N (the estimate's relative spread is ~ sqrt(2 / L) = 0.18 here; 5 times that
    # stays below 1)
    L = 60
    assert L >= bfd.smc.particles.MIN_LINEAGES
    e = bfd.smc.genealogy_ess(W, x, (torch.arange(N) % L).expand(2, N))
    assert ((e / N - 1).abs() < 5 * math.sqrt(2 / L)).all()
    # with fewer lineages the estimate is not trusted: capped at their number (K = 30), and
    # a single lineage, whose Chan & Lai variance is zero up to rounding, is worth one draw
    # (before: N); a zero-weight particle's root does not count as a lineage
    assert torch.equal(bfd.smc.genealogy_ess(W, x, roots), torch.full((2,), float(K)).double())
    one = torch.zeros(2, N, dtype=torch.long)
    assert torch.equal(bfd.smc.genealogy_ess(W, x, one), torch.ones(2).double())
    W1 = torch.zeros(2, N, dtype=torch.float64)
    W1[:, : N // 2] = 2.0 / N
    half = torch.where(torch.arange(N) < N // 2, 0, torch.arange(N)).expand(2, N)
    assert torch.equal(bfd.smc.genealogy_ess(W1, x, half), torch.ones(2).double())
    # a cloud with no spread is worth one draw; float16 clouds are estimated in float32
    assert torch.equal(bfd.smc.genealogy_ess(W, torch.zeros(2, N, 3), own), torch.ones(2).double())
    assert bfd.smc.genealogy_ess(W, xk.half(), roots).dtype == torch.float64
    # one particle at the cloud's mean with nearly all the weight, every particle its own
    # lineage: worth about one draw, as the weights' ESS says (the Chan & Lai variance is
    # near zero there; it read N)
    Wd = torch.full((2, N), 1e-12, dtype=torch.float64)
    Wd[:, 0] = 1.0 - (N - 1) * 1e-12
    xd = x.clone()
    xd[:, 0] = 0.0
    kish = 1 / (Wd**2).sum(1)
    e = bfd.smc.genealogy_ess(Wd, xd, own)
    assert (e <= kish).all() and (e < 1.01).all()


def test_thin_genealogy_warns_although_every_step_looks_healthy():
    # resampling at every step under mildly uneven weights (ESS ~ 0.9 N each time) with a
    # jitter too small to decorrelate: the particles stay distinct and no step's ESS is low,
    # but after 150 steps the cloud descends from a few dozen lineages
    @dataclass(frozen=True)
    class _Drift(SMCSampler):
        ess_threshold: float = 1.0
        keep: float = 1.0  # x <- keep x + sqrt(1 - keep^2) z: how much a move decorrelates

        def init(self, ctx, setup):
            return _State(ctx.randn()), None

        def move(self, ctx, setup, state, k, t, t_next):
            lw = 0.3 * torch.randn(ctx.B, ctx.N, generator=ctx.generator, dtype=torch.float64)
            jitter = max(1e-3, math.sqrt(1 - self.keep**2))
            return Move(_State(self.keep * state.x + jitter * ctx.randn()), lw)

    _, prior = _prior()
    with pytest.warns(bfd.PosteriorQualityWarning, match="thin genealogy") as rec:
        res = _Drift(num_steps=150).sample(prior, _problem(), 400, torch.Generator().manual_seed(0))
    assert {i.kind for i in res.info.quality} == {"genealogy"} and len(rec) == 1
    assert (res.info.min_ess > 0.8 * 400).all() and (res.info.distinct == 400).all()
    assert (res.info.genealogy_ess < 40).all()
    # one lineage per ancestor at most, up to the estimate's noise
    assert (res.info.genealogy_ess < 2 * res.info.ancestors).all()
    # moves that forget their start (x <- 0.5 x + ...) lose lineages at the same pace, but
    # the particles of a lineage no longer agree: worth about N, and quiet (40 steps: ~80 of
    # 400 lineages left) ...
    quiet = _Drift(num_steps=40, keep=0.5).sample(
        prior, _problem(), 400, torch.Generator().manual_seed(0)
    )
    assert (quiet.info.ancestors < 0.25 * 400).all()
    assert quiet.info.quality == [] and (quiet.info.genealogy_ess > 0.5 * 400).all()
    # ... until fewer than 50 lineages survive: then the estimate is not trusted, warned, and
    # reported as the number of lineages (the uncapped estimate still says > 0.5 N here)
    with pytest.warns(bfd.PosteriorQualityWarning, match="too few for the estimate"):
        few = _Drift(num_steps=150, keep=0.5).sample(
            prior, _problem(), 400, torch.Generator().manual_seed(0)
        )
    assert (few.info.ancestors < 50).all()
    assert torch.equal(few.info.genealogy_ess, few.info.ancestors.double())


def test_index_particles_on_records():
    idx = torch.tensor([[1, 1, 0], [2, 0, 2]])
    x = torch.arange(6.0).reshape(2, 3)
    out = bfd.smc.index_particles(_State(x), idx)
    assert torch.equal(out.x, torch.tensor([[1.0, 1.0, 0.0], [5.0, 3.0, 5.0]]))
    assert torch.equal(bfd.smc.index_particles({"x": x, "c": None}, idx)["x"], out.x)
    assert torch.equal(bfd.smc.distinct_count(idx), torch.tensor([2, 2]))
    with pytest.raises(TypeError, match="particle record"):
        bfd.smc.index_particles([x], idx)


def test_degenerate_weights_raise_naming_step_and_problem():
    _, prior = _prior()
    # move 2's weight lands on the particles at times[3]: the message names that weighting
    with pytest.raises(bfd.DegenerateWeightsError, match=r"problem\(s\) \[2\].*step 3"):
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
    # the sampler's own calls, then (unweighted samplers) the quality check's, never with it
    own, check = net.grad_modes[: res.info.nfe], net.grad_modes[res.info.nfe :]
    assert own and all(m == needs_grad for m in own), net.grad_modes
    assert check == ([] if res.log_weights is not None else [False]), net.grad_modes


def test_support_ratio_is_at_most_one_for_the_priors_own_draws():
    # E ||E[x0 | x_t] - x0||^2 <= E ||x_t / alpha - x0||^2 = d sigma^2 / alpha^2 for any
    # prior: the statistic of draws of the prior is below 1 up to its Monte Carlo error (the
    # mean over N of a per-draw ratio, whose spread gives the standard error)
    from bayesfilter_diff.samplers.quality import support_ratio

    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 30.0):  # whatever the data's scale
        mix = bfd.GaussianMixture(
            torch.tensor([0.3, 0.7], dtype=torch.float64),
            scale * torch.stack([-2 * torch.ones(4), 2 * torch.ones(4)]).double(),
            scale**2 * torch.ones(2, dtype=torch.float64),
        )
        prior = mix.diffusion(bfd.VPSchedule.linear())
        x = mix.sample(4096, g)[None]  # (1, N, d)
        r = support_ratio(prior, x, 1e-3, 1.0)
        per = support_ratio(prior, x, 1e-3, 1.0, per_particle=True)
        assert torch.allclose(per.mean(-1), r)
        se = per.std() / math.sqrt(per.numel())
        assert r.shape == (1,) and r.dtype == torch.float64
        assert float(r) < 1 + 4 * float(se), (scale, float(r), float(se))
        # ... while draws shifted by 10 component standard deviations score far above it
        # where the data's scale is not far above SUPPORT_NOISE (7.4 at scale 0.1, 7.1 at
        # 1; at 30 the renoising is local and the power gone: 1.03)
        if scale <= 1.0:
            assert float(support_ratio(prior, x + 10 * scale, 1e-3, 1.0)) > 4


def test_support_ratio_of_an_exact_posterior_in_conflict_with_its_prior():
    # two of eight coordinates observed 10 prior standard deviations off the modes (a strong
    # prior-data conflict, the exact posterior pulled halfway): its exact draws stay below
    # the off_support line (1.30 +- 0.01 here; 1.9 with another operator), by more than their
    # Monte Carlo error
    from bayesfilter_diff.samplers.quality import QualityPolicy, support_ratio

    d = 8
    g = torch.Generator().manual_seed(1)
    mix = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=torch.float64),
        torch.stack([-2 * torch.ones(d), 2 * torch.ones(d)]).double(),
        torch.ones(2, dtype=torch.float64),
    )
    prior = mix.diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Dense(torch.randn(2, d, generator=g, dtype=torch.float64))
    x = mix.sample(1, g)[0]
    x[:2] += 10
    problem = bfd.InverseProblem(A, A(x), noise_std=0.1)
    draws = mix.posterior(problem).sample(4096, g)[None]
    per = support_ratio(prior, draws, 1e-3, 1.0, per_particle=True)
    r, se = float(per.mean()), float(per.std() / math.sqrt(per.numel()))
    assert r > 1.2  # the conflict shows ...
    assert r + 4 * se < QualityPolicy().support_factor  # ... below the line


def test_path_ratio_of_exact_paths_is_chi_square_and_a_far_mode_is_not_escaped():
    # on the forward process's joint law x_t = alpha_t x0 + sigma_t z, so the path ratio of
    # each kept state is chi^2_d / d whatever x0's law (mean 1, variance 2 / d); a small mode
    # 100 component widths from the rest is far from the cloud but on its paths: not escaped
    from scipy import stats

    from bayesfilter_diff.samplers import quality

    sch = bfd.VPSchedule.linear()
    times = sch.time_grid(50, "uniform", dtype=torch.float64)
    steps = quality.path_snapshot_steps(sch, times)
    ratios = [float(sch.sigma(times[k]) / sch.alpha(times[k])) for k in steps]
    levels = sorted(quality.PATH_LEVELS)
    assert len(steps) == 3 and all(0.5 < r / lv < 2 for r, lv in zip(sorted(ratios), levels))
    g = torch.Generator().manual_seed(0)
    B, N, d = 2, 4096, 4
    x0 = torch.randn(B, N, d, generator=g, dtype=torch.float64)
    x0[:, :40] += 100.0  # 1% of the draws in a far mode
    snaps = []
    for k in steps:
        a, s = sch.alpha(times[k]), sch.sigma(times[k])
        snaps.append((k, a * x0 + s * torch.randn(B, N, d, generator=g, dtype=torch.float64)))
    one = quality.path_ratio(sch, times, snaps[:1], x0)
    assert one.shape == (B, N) and one.dtype == torch.float64
    # the law of one kept state's ratio: mean within 4 standard errors, and a KS test
    assert abs(float(one.mean()) - 1) < 4 * math.sqrt(2 / d / (B * N))
    assert stats.kstest((d * one).flatten().numpy(), stats.chi2(d).cdf).pvalue > 1e-3
    ratio = quality.path_ratio(sch, times, snaps, x0)
    line = quality.path_line(d, N, len(snaps))
    policy = quality.QualityPolicy()
    assert not bool(quality.escaped_draws(ratio, x0, line, policy).any())
    # a draw moved off its path, far from the rest: escaped (and only it)
    x1 = x0.clone()
    x1[1, 7] += 30.0
    esc = quality.escaped_draws(quality.path_ratio(sch, times, snaps, x1), x1, line, policy)
    assert esc.sum(-1).tolist() == [0, 1] and bool(esc[1, 7])


def test_residual_ratio_of_exact_posterior_draws_averages_one_and_stays_below_its_line():
    # with x' an exact posterior draw of a y the model produced, (x', y) is a draw of the
    # joint law, so y - A x' is the model's noise: each draw's ratio is chi^2_{d_y} / d_y,
    # whatever the prior, and the mean over problems of the per-problem ratios is 1 (checked
    # within 4 of its standard errors); the stop-loss line is crossed with chance <= 1e-6
    from bayesfilter_diff.samplers.quality import residual_line, residual_ratio

    g = torch.Generator().manual_seed(0)
    d, m, B, N = 6, 3, 300, 64
    mix = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=torch.float64),
        torch.stack([-2 * torch.ones(d), 2 * torch.ones(d)]).double(),
        torch.ones(2, dtype=torch.float64),
    )
    A = bfd.operators.Dense(torch.randn(m, d, generator=g, dtype=torch.float64))
    line = residual_line(m)
    from scipy import stats

    # the stop-loss line lies a little above the chi^2_3 / 3 quantile at the same level
    q = float(stats.chi2.isf(1e-6, m)) / m
    assert q < line < 1.1 * q
    # the lower line: a little below the chi^2 lower quantile, at most 0.5, and useless
    # (near 0) for a few observed coordinates, where chi^2 has mass near 0
    from bayesfilter_diff.samplers.quality import residual_low_line

    q32 = float(stats.chi2.ppf(1e-6, 32)) / 32
    assert 0.9 * q32 < residual_low_line(32) < q32
    assert residual_low_line(m) < 1e-3 and residual_low_line(100_000) == 0.5
    for sigma in (0.01, 1.0):
        y = A(mix.sample(B, g)) + sigma * torch.randn(B, m, generator=g, dtype=torch.float64)
        prob = bfd.InverseProblem(A, y, sigma)
        draws = torch.stack(
            [mix.posterior(bfd.InverseProblem(A, y[b], sigma)).sample(N, g) for b in range(B)]
        )
        r = residual_ratio(prob, draws, None)
        assert r is not None and r.shape == (B,) and r.dtype == torch.float64
        se = float(r.std()) / math.sqrt(B)
        assert abs(float(r.mean()) - 1) < 4 * se, (sigma, float(r.mean()), se)
        assert float(r.max()) < line
        # weights: uniform ones change nothing, one particle's weight gives its own ratio
        zero = torch.zeros(B, N, dtype=torch.float64)
        torch.testing.assert_close(residual_ratio(prob, draws, zero), r)
        one = torch.full((B, N), -math.inf, dtype=torch.float64)
        one[:, 0] = 0.0
        own = ((y - A(draws[:, 0])) ** 2).sum(-1) / (m * sigma**2)
        torch.testing.assert_close(residual_ratio(prob, draws, one), own)
    # draws that ignore y (the prior's own) are far above the line at sigma_y = 0.01
    prior_draws = mix.sample(B * N, g).reshape(B, N, d)
    r = residual_ratio(bfd.InverseProblem(A, y, 0.01), prior_draws, None)
    assert r is not None and bool((r > 100 * line).all())
    # noiseless, or a custom likelihood without its scores: no check
    assert residual_ratio(bfd.InverseProblem(A, y, 0.0), draws, None) is None
    custom = bfd.InverseProblem(A, y, log_likelihood_fn=lambda x, _: prob.log_likelihood(x))
    assert residual_ratio(custom, draws, None) is None
    # scores that fail to compute skip the check with a warning (the run is kept)

    def broken(x):
        raise RuntimeError("no replay")

    custom = bfd.InverseProblem(
        A, y, log_likelihood_fn=lambda x, _: prob.log_likelihood(x), squared_scores_fn=broken
    )
    with pytest.warns(RuntimeWarning, match="predictive check.*skipped.*no replay"):
        assert residual_ratio(custom, draws, None) is None


def test_log_evidence_se_is_the_shares_spread():
    from bayesfilter_diff.smc import log_evidence_se

    # without resampling (each particle its own root) it is importance sampling's
    # sum_i (W_i - 1/N)^2; one surviving root gives sqrt(1 - 1/N); flat weights, 0
    g = torch.Generator().manual_seed(0)
    W = torch.softmax(torch.randn(3, 50, generator=g, dtype=torch.float64), -1)
    roots = torch.arange(50).expand(3, 50)
    torch.testing.assert_close(log_evidence_se(W, roots) ** 2, ((W - 1 / 50) ** 2).sum(-1))
    one = log_evidence_se(W, torch.zeros(3, 50, dtype=torch.long))
    torch.testing.assert_close(one, torch.full((3,), math.sqrt(1 - 1 / 50), dtype=torch.float64))
    assert float(log_evidence_se(torch.full((1, 50), 1 / 50.0), roots[:1]).max()) < 1e-7


@pytest.mark.slow
def test_log_evidence_se_matches_the_spread_of_independent_runs():
    g = torch.Generator().manual_seed(0)
    # against the spread of R independent runs (a batch of R copies of one problem): the
    # sample sd's log has standard error ~ 1 / sqrt(2 (R - 1)); the estimate is within 4 of
    # them (measured 0.97 for TDS and 0.91 for MCGdiff here, which resamples at every step)
    from _readme import readme_problem

    R = 64
    _, prior, problem = readme_problem(8, 0.1, g, copies=R)
    band = 4 / math.sqrt(2 * (R - 1))
    for sampler, N in (
        (bfd.samplers.TDS(num_steps=20), 256),
        (bfd.samplers.MCGdiff(num_steps=50), 1024),
    ):
        res = sampler.sample(prior, problem, N, generator=torch.Generator().manual_seed(3))
        se = res.info.log_evidence_se
        assert se is not None and se.shape == (R,)
        ratio = float(se.pow(2).mean().sqrt()) / float(res.log_evidence.double().std())
        assert abs(math.log(ratio)) < band, (type(sampler).__name__, ratio)


def test_an_observation_its_dtype_cannot_resolve_at_its_noise_level_is_warned():
    # float32 rounds |y| ~ 1e3 to ~6e-5, 0.06-0.12 noise sd at noise_std 1e-3: the residuals,
    # weights and evidence carry errors of that size (measured on the default sampler:
    # log-evidence a further 0.08-0.22 nats low at 0.09-0.18); float64 resolves it
    from bayesfilter_diff.samplers.quality import precision_ratio

    d = 4
    mix = bfd.GaussianMixture(torch.ones(1), torch.ones(1, d), torch.ones(1))
    A = bfd.operators.Dense(400 * torch.eye(2, d))
    y = torch.tensor([1000.0, 1000.0])
    p32 = bfd.InverseProblem(A, y, 1e-3)
    r = precision_ratio(p32, torch.float32)
    assert r is not None and float(r) == pytest.approx(torch.finfo(torch.float32).eps * 1e6)
    prior = mix.diffusion(bfd.VPSchedule.linear())
    with pytest.warns(bfd.PosteriorQualityWarning, match="cannot resolve"):
        res = bfd.samplers.DDIM(num_steps=5).sample(prior, p32, 16, torch.Generator())
    assert "precision" in [q.kind for q in res.info.quality]
    p64 = bfd.InverseProblem(bfd.operators.Dense(400 * torch.eye(2, d).double()), y.double(), 1e-3)
    assert float(precision_ratio(p64, torch.float64)) < 1e-6
    # the same observation at noise 0.1: resolved
    assert float(precision_ratio(bfd.InverseProblem(A, y, 0.1), torch.float32)) < 0.05


def _laws(g: torch.Generator, M: int):
    """(name, x -> law, x* draws) for every law the scores support, parameters spread."""
    import torch.distributions as D

    loc = 2 * torch.randn(M, 3, generator=g, dtype=torch.float64)
    pos = torch.exp(torch.randn(M, 3, generator=g, dtype=torch.float64))
    return [
        ("normal", D.Normal(loc, pos)),
        ("lognormal", D.LogNormal(loc, pos)),
        ("laplace", D.Laplace(loc, pos)),
        ("cauchy", D.Cauchy(loc, pos)),
        ("student_t", D.StudentT(0.5 + 4 * pos / (1 + pos), loc, pos)),
        ("exponential", D.Exponential(pos)),
        ("gamma", D.Gamma(pos, 1 / pos)),
        ("poisson", D.Poisson(3 * pos)),
        ("poisson_small", D.Poisson(0.05 * pos)),
        ("bernoulli", D.Independent(D.Bernoulli(logits=loc), 1)),
    ]


def test_normal_scores_of_the_models_own_draws_are_standard_normal():
    # y ~ p(y | x) makes u = F(y | x) uniform (randomised for counts) and Phi^-1(u) standard
    # normal, whatever x: the scores' mean (0) and mean square (1) within 4 standard errors
    # and their law by Kolmogorov-Smirnov at 1e-4. Without the randomisation (V = 1/2, the
    # mid-p transform) the counts' scores are not normal: the test sees it.
    from scipy import stats

    from bayesfilter_diff.samplers.scores import normal_scores, uniforms_for

    g = torch.Generator().manual_seed(0)
    M = 20_000
    for name, law in _laws(g, M):
        torch.manual_seed(1)
        y = law.sample()
        z = normal_scores(law, y, uniforms_for(y))
        assert z is not None and z.shape == y.shape and z.dtype == torch.float64, name
        z = z.reshape(-1)
        se = 1 / math.sqrt(z.numel())
        assert abs(float(z.mean())) < 4 * se, (name, float(z.mean()))
        assert abs(float((z * z).mean()) - 1) < 4 * math.sqrt(2) * se, (name, float((z * z).mean()))
        assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4, name
        if name in ("poisson_small", "bernoulli"):
            mid = normal_scores(law, y, torch.full_like(y, 0.5)).reshape(-1)
            assert stats.kstest(mid.numpy(), "norm").pvalue < 1e-4, name
    # Gaussian noise: the scores are the standardised residuals
    import torch.distributions as D

    law = D.Normal(torch.tensor([0.0, 1.0], dtype=torch.float64), 0.5)
    y = torch.tensor([1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(normal_scores(law, y, uniforms_for(y)), (y - law.loc) / 0.5)
    # far tails come from their own side: large finite scores, not a rounded u = 1
    far = [
        (D.Poisson(torch.tensor([1.0], dtype=torch.float64)), torch.tensor([60.0]), 1),
        (D.Poisson(torch.tensor([900.0], dtype=torch.float64)), torch.tensor([0.0]), -1),
        (D.Bernoulli(logits=torch.tensor([-40.0], dtype=torch.float64)), torch.tensor([1.0]), 1),
        (D.Laplace(torch.tensor([0.0], dtype=torch.float64), 1.0), torch.tensor([-60.0]), -1),
        (D.StudentT(3.0, torch.tensor([0.0], dtype=torch.float64), 1.0), torch.tensor([1e8]), 1),
    ]
    for law, y, sign in far:
        z = normal_scores(law, y.double(), uniforms_for(y))
        assert z is not None and bool(torch.isfinite(z).all()) and float(sign * z) > 8, (law, z)
    # a law without a score: None (no check)
    assert normal_scores(D.Beta(2.0, 3.0), torch.tensor(0.5), torch.tensor(0.5)) is None


def test_residual_ratio_of_poisson_and_pyro_likelihoods():
    # the posterior predictive check beyond Gaussian noise: exact posterior draws (here the
    # prior's draws given y drawn from them: (x', y) a joint draw, so each draw's statistic
    # is chi^2 / d_y) average 1 within 4 standard errors and stay below the line; through a
    # Pyro model with a Student-t and a Bernoulli site the same; draws that ignore y cross it
    import pyro
    import pyro.distributions as dist

    from bayesfilter_diff.inference import model_to_problem
    from bayesfilter_diff.samplers.quality import residual_line, residual_ratio

    g = torch.Generator().manual_seed(3)
    B, d, m = 400, 4, 12
    W = torch.randn(m, d, generator=g, dtype=torch.float64) / 2
    rate_op = bfd.operators.Dense(torch.exp(W))  # positive rates from positive x
    x = torch.rand(B, 1, d, generator=g, dtype=torch.float64) + 0.5
    y = torch.poisson(rate_op(x)[:, 0], generator=g)
    pois = bfd.InverseProblem(rate_op, y, noise="poisson")
    r = residual_ratio(pois, x, None)
    assert r is not None and r.shape == (B,)
    se = float(r.std()) / math.sqrt(B)
    assert abs(float(r.mean()) - 1) < 4 * se and float(r.max()) < residual_line(m)
    far = residual_ratio(pois, 4 * x, None)  # rates 4x the data's
    assert far is not None and bool((far > residual_line(m)).all())
    # a draw whose rate is undefined (a diverged sampler) fits nothing; weight 0 ignores it
    x_nan = x.repeat(1, 2, 1)
    x_nan[:, 1] = math.nan
    assert bool((residual_ratio(pois, x_nan, None) == math.inf).all())
    keep_first = torch.tensor([0.0, -math.inf], dtype=torch.float64).expand(B, 2)
    torch.testing.assert_close(residual_ratio(pois, x_nan, keep_first), r)

    prior = bfd.GaussianMixture(
        torch.tensor([1.0], dtype=torch.float64),
        torch.zeros(1, d, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
    ).diffusion(bfd.VPSchedule.linear())

    def model(y_t=None, y_b=None):
        z = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("t", dist.StudentT(3.0, z @ W[:6].T, 0.3).to_event(1), obs=y_t)
        pyro.sample("b", dist.Bernoulli(logits=2 * z @ W[6:].T).to_event(1), obs=y_b)

    xs = torch.randn(B, d, generator=g, dtype=torch.float64)
    ratios, ignored = [], []
    torch.manual_seed(4)
    for b in range(60):  # one Pyro problem per (x*, y) pair
        y_t = dist.StudentT(3.0, xs[b] @ W[:6].T, 0.3).sample()
        y_b = dist.Bernoulli(logits=2 * xs[b] @ W[6:].T).sample()
        _, prob, st = model_to_problem(model, y_t=y_t, y_b=y_b)
        assert st.kind == "custom" and prob.y_flat.shape[-1] == m
        ratios.append(float(residual_ratio(prob, xs[b].reshape(1, 1, d), None)))
        ignored.append(float(residual_ratio(prob, 3 + xs[b].reshape(1, 1, d), None)))
    ratios_t = torch.tensor(ratios)
    assert abs(float(ratios_t.mean()) - 1) < 4 * float(ratios_t.std()) / math.sqrt(60)
    assert max(ratios) < residual_line(m)
    assert sum(v > residual_line(m) for v in ignored) > 30  # most shifted draws cross it


def test_too_few_particles_to_check_says_so_and_has_no_error_bar():
    # 30 TDS runs at N = 1 missed the README mixture's evidence by 9 nats in sd, each with a
    # genealogy error of exactly 0 and no warning: below N = 10 the run cannot be checked
    g = torch.Generator().manual_seed(0)
    d = 4
    one = torch.ones(d, dtype=torch.float64)
    gmm = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=torch.float64),
        torch.stack([-2 * one, 2 * one]),
        torch.ones(2, dtype=torch.float64),
    )
    A = bfd.operators.Dense(torch.randn(2, d, generator=g, dtype=torch.float64))
    problem = bfd.InverseProblem(A, A(gmm.sample(1, g)[0]), noise_std=0.1)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    for N in (1, 4):
        with pytest.warns(bfd.PosteriorQualityWarning, match="too few to check"):
            res = bfd.samplers.TDS(num_steps=10).sample(prior, problem, N, g)
        assert "few_particles" in [q.kind for q in res.info.quality]
        assert res.info.log_evidence_se is not None and bool(res.info.log_evidence_se.isnan().all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bfd.PosteriorQualityWarning)
        res = bfd.samplers.TDS(num_steps=10).sample(prior, problem, 16, g)
    assert "few_particles" not in [q.kind for q in res.info.quality]
    assert res.info.log_evidence_se is not None and bool((res.info.log_evidence_se > 0).all())
    # an unweighted sampler has no such finding (its draws are independent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bfd.PosteriorQualityWarning)
        res = bfd.samplers.DPS(num_steps=10).sample(prior, problem, 4, g)
    assert "few_particles" not in [q.kind for q in res.info.quality]


@pytest.mark.parametrize("name", ["DCPS", "PnP-DM", "TDS"])
def test_registry_build_refuses_zero_steps_for_every_sampler(name):
    from bayesfilter_diff.samplers.registry import build

    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        build(name, 0)


def test_a_degenerate_run_with_an_isotropic_laplace_curvature_names_laplace_max_dim():
    from bayesfilter_diff.result import RunInfo
    from bayesfilter_diff.samplers.quality import assess
    from bayesfilter_diff.samplers.tds import TDSInfo

    N, n = 256, 4
    ess = torch.full((n + 1, 1), float(N), dtype=torch.float64)
    ess[2, 0] = 1.0
    x = torch.randn(1, N, 3, generator=torch.Generator().manual_seed(0))

    def kinds_and_text(twist: str) -> tuple[set[str], str]:
        info = RunInfo(
            times=torch.linspace(1, 0, n + 1), num_steps=n, ess=ess, min_ess=ess.min(0).values
        )
        info.extra = TDSInfo(twist)
        found = assess("TDS", info, x, N, 1.0, False)
        return {q.kind for q in found}, " ".join(q.message for q in found)

    kinds, text = kinds_and_text("laplace(inflated, isotropic)")
    assert "min_ess" in kinds and "laplace_max_dim" in text
    for fine in ("hessian", "diagonal"):
        kinds, text = kinds_and_text(f"laplace(inflated, {fine})")
        assert "min_ess" in kinds and "laplace_max_dim" not in text


def test_a_thin_genealogy_names_exactly_its_problems():
    # a batch of four problems, two of whose clouds are worth less than 20% of N by their
    # genealogy (60 and 90 of 512): the warning names those two, and only as a thin genealogy
    from bayesfilter_diff.result import RunInfo
    from bayesfilter_diff.samplers.quality import QualityPolicy, assess
    from bayesfilter_diff.samplers.tds import TDSInfo

    N, n, B = 512, 4, 4
    ess = torch.full((n + 1, B), float(N), dtype=torch.float64)
    x = torch.randn(B, N, 3, generator=torch.Generator().manual_seed(0))
    info = RunInfo(
        times=torch.linspace(1, 0, n + 1), num_steps=n, ess=ess, min_ess=ess.min(0).values
    )
    info.extra = TDSInfo("laplace(inflated, hessian)", "conditioned")
    info.genealogy_ess = torch.tensor([400.0, 60.0, 300.0, 90.0], dtype=torch.float64)
    info.ancestors = torch.tensor([500, 300, 450, 200])
    assert QualityPolicy().genealogy_fraction * N > 90  # (the line the two are below)
    found = assess("TDS", info, x, N, 1.0, True)
    assert [q.kind for q in found] == ["genealogy"]
    assert set(found[0].problems) == {1, 3}

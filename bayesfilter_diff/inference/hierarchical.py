"""Global latent sites besides the DiffusionPrior site: SMC^2 with the diffusion SMC inside.

A model such as::

    def model(y=None):
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", dist.Normal(A(x), sigma).to_event(1), obs=y)

has a posterior over ``(theta, x)`` with ``theta = sigma``. An SMC sampler run on the
problem ``p(y | x, theta)`` returns an unbiased estimate ``Z(theta)`` of ``p(y | theta)``,
which makes the following exact as the number ``K`` of theta-particles grows, for any
number ``N`` of inner particles (SMC^2, Chopin, Jacob & Papaspiliopoulos 2013, in its
density-tempered form, Duan & Fulop 2015, with particle-marginal Metropolis-Hastings
moves, Andrieu, Doucet & Holenstein 2010):

1. ``theta_k ~ p(theta)``, ``k = 1..K``; one inner run for all of them at once: the model
   is read as ``K`` independent problems (the prior site expanded to batch ``K``, theta
   substituted per problem), so the diffusion SMC runs as one ``(K, N)`` batch;
2. tempering from ``lambda = 0`` to 1 through the targets ``p(theta) Z(theta)^lambda``
   (on the extended space of theta and the inner runs' randomness): each next
   ``lambda'`` is chosen by bisection so that the incremental weights
   ``Z^(lambda' - lambda)`` keep an ESS of ``ess_target * K``; reweight, add
   ``log mean_k Z_k^(lambda' - lambda)`` to the log-evidence (the product is unbiased in
   ``p(y)``), resample the theta-particles with their draws of ``x``;
3. after each reweighting, ``moves`` particle-marginal Metropolis-Hastings moves: a
   Gaussian random walk in the unconstrained space of theta
   (``torch.distributions.biject_to``; scale ``2.38 / sqrt(D)`` times the cloud's standard
   deviation), one batched inner run for the ``K`` proposals, acceptance
   ``Z'^lambda p(theta') |J'| / (Z^lambda p(theta) |J|)``. They leave the level's target
   invariant; the acceptance rates are reported. With ``moves = 0``: one step to
   ``lambda = 1`` (pseudo-marginal importance sampling, Tran et al. 2014).

Every theta-particle keeps one draw of ``x`` from its inner cloud, so ``(theta_k, x_k)``
are joint posterior draws. Supported: continuous global latent sites and discrete ones
with a finite support (outside every plate; they may depend on each other), any
likelihood :func:`~bayesfilter_diff.infer` reads, one problem or a ``pyro.plate`` of
problems sharing the globals (the inner run then covers the (theta, problem) pairs and
``Z(theta)`` is the product over the plate). A discrete site moves by a symmetric
proposal (keep its value, or with probability 1/2 a uniform value of its support), jointly
with the random walk of the continuous ones. The
model must broadcast a global over the observation: it is substituted with shape
``(K, 1, ..., 1, *event)``, with as many unit dims as the observed value has dims less the
global's own event dims, which broadcast against the observation's rightmost ones (a
scalar ``sigma`` multiplies an observation of shape ``(m,)`` as a ``(K, 1)`` tensor; a
``w ~ N(0, I_m).to_event(1)`` enters ``x + w`` as ``(K, m)``; until 2026-12-06 it was
``(K, 1, m)``, which paired every theta with every ``x``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import Tensor
from torch.distributions import biject_to

from ..distributions import DiffusionPrior
from ..errors import DegenerateWeightsError, PosteriorQualityWarning
from ..result import Result
from ..samplers.base import Sampler
from ..samplers.quality import QualityPolicy
from ..samplers.registry import default_sampler
from ..smc.resampling import systematic
from ..smc.weights import ess as weights_ess
from ..smc.weights import log_mean_exp, normalize
from .handlers import PriorPlaceholder, is_plate_site, seeded_global_rng, unwrap
from .linearize import check_linearization
from .reading import model_to_problem
from .structure import model_error

if TYPE_CHECKING:
    from ..diagnostics.predictive import PriorPredictiveCheck

__all__ = ["HierarchicalPosterior", "global_latent_sites", "infer_hierarchical"]


class FixGlobals(Messenger):
    """Set the global latent sites to the theta-particles (shape ``(K, 1.., *event)``,
    marked fixed so that reading the model skips them) and expand the DiffusionPrior site
    to batch ``K``: the model becomes ``K`` independent problems, one per theta."""

    def __init__(self, values: dict[str, Tensor], K: int, trailing: int) -> None:
        super().__init__()
        self.values, self.K, self.trailing = values, K, trailing

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"]:
            return
        if msg["name"] in self.values:
            ev = tuple(msg["fn"].event_shape)
            v = self.values[msg["name"]]
            # (K, 1, .., *event): the global's own event dims broadcast against the right
            # of the observations' (a scalar's K against their leading dims), so that
            # `w + x` pairs each theta with its own x, never theta with theta
            msg["value"] = v.reshape((self.K,) + (1,) * max(self.trailing - len(ev), 0) + ev)
            msg["done"] = True
            msg["infer"] = {**msg["infer"], "_bfd_fixed": True}
        elif isinstance(msg["fn"], DiffusionPrior):
            msg["fn"] = msg["fn"].expand(torch.Size([self.K]) + msg["fn"].batch_shape)
            # reading: the theta-particles' dimension, before a plate of problems
            msg["infer"] = {**msg["infer"], "_bfd_outer": self.K}


@dataclass(frozen=True)
class _Global:
    name: str
    event_shape: tuple[int, ...]
    transform: Any  # constrained <- unconstrained bijection (continuous sites)
    values: Tensor | None = None  # the finite support (discrete sites), (n, *event)

    @property
    def size(self) -> int:
        return math.prod(self.event_shape)


def global_latent_sites(model: Callable, *args, **kwargs) -> list[str]:
    """The latent sample sites of ``model`` other than its DiffusionPrior site(s)."""
    with pyro.validation_enabled(False):
        try:
            tr = poutine.trace(PriorPlaceholder()(model)).get_trace(*args, **kwargs)
        except (RuntimeError, IndexError) as e:
            raise model_error(e, "with a stand-in value at its prior site") from e
    nodes = cast("dict[str, dict[str, Any]]", tr.nodes)
    return [
        n
        for n, s in nodes.items()
        if s["type"] == "sample"
        and not s["is_observed"]
        and not is_plate_site(s)
        and not isinstance(unwrap(s["fn"]), DiffusionPrior)
        and not s["infer"].get("_deterministic", False)
    ]


@dataclass(repr=False)
class HierarchicalPosterior:
    """Joint posterior draws of the global sites and the DiffusionPrior site.

    Attributes
    ----------
    theta
        Site -> ``(K, *event)`` equally weighted draws of each global site.
    x
        ``(K, *event)``: one draw of the prior site per theta-particle (from its inner
        cloud), so ``(theta_k, x_k)`` is a joint draw; ``(K, B, *event)`` for a plate of
        ``B`` problems sharing the globals.
    site
        The prior site's name.
    log_evidence
        The sum over the tempering levels of ``log mean_k Z_k^(lambda' - lambda)``: the log
        of an unbiased estimate of ``p(y)`` (the log itself is biased low by about half
        its variance).
    theta_ess
        The smallest ESS of a reweighting of the theta-particles, out of ``K``
        (``ess_target * K`` by construction while tempering; the prior draws' importance
        weights with ``moves = 0``).
    acceptance
        Acceptance rate of each particle-marginal move, in order.
    temperatures
        The tempering levels ``lambda`` reached (the last is 1).
    level_ess
        The ESS of each level's incremental weights.
    inner
        The last inner run's Result (the ``(K, N)`` batch).
    nfe
        Network evaluations per inner particle, over all inner runs.
    sampler
        The inner sampler.
    """

    theta: dict[str, Tensor]
    x: Tensor
    site: str
    log_evidence: Tensor
    theta_ess: float
    acceptance: list[float]
    inner: Result
    nfe: int
    sampler: Sampler
    log_z: Tensor = field(repr=False, default_factory=lambda: torch.empty(0))
    temperatures: list[float] = field(default_factory=list)
    level_ess: list[float] = field(default_factory=list)
    #: the model and its arguments, for :meth:`prior_predictive_check`
    call: tuple[Callable, tuple, dict] | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        sites = {k: tuple(v.shape) for k, v in self.get_samples().items()}
        return (
            f"HierarchicalPosterior(sites={sites}, log_evidence={float(self.log_evidence):.4g}, "
            f"levels={len(self.temperatures)}, theta_ess={self.theta_ess:.3g}, "
            f"distinct={self.distinct}, "
            f"acceptance={[round(a, 2) for a in self.acceptance]}, nfe={self.nfe}, "
            f"sampler={type(self.sampler).__name__})"
        )

    @property
    def distinct(self) -> int:
        """How many of the ``K`` joint draws ``(theta_k, x_k)`` differ: resampling copies
        theta-particles, and a copy whose moves were all rejected keeps its ``x`` too, so
        the draws are worth at most this many independent ones."""
        return _distinct(self.theta, self.x)

    def get_samples(self) -> dict[str, Tensor]:
        """Site -> equally weighted draws, Pyro's ``MCMC.get_samples`` convention."""
        return {**self.theta, self.site: self.x}

    def prior_predictive_check(
        self,
        num_draws: int = 2048,
        generator: torch.Generator | None = None,
        num_steps: int = 100,
        warn: bool = True,
    ) -> PriorPredictiveCheck:
        """Is the model's observation one its prior produces, globals included?
        (:func:`~bayesfilter_diff.diagnostics.prior_predictive_check`): ``num_draws``
        observations, each from globals drawn from their prior, a prior signal per problem
        and the model's observed sites, against all the model's data at once. Data whose
        noise the prior on an unknown scale rules out, or a gain it does not reach, are
        flagged; there SMC^2's theta-particles start far from the posterior."""
        from ..diagnostics.predictive import _model_with_globals_check

        if self.call is None:
            raise ValueError("this HierarchicalPosterior does not hold its model")
        model, args, kwargs = self.call
        return _model_with_globals_check(
            model, args, kwargs, num_draws, generator, num_steps, warn, stacklevel=3
        )


def _degenerate(res: Result, N: int) -> Tensor:
    """``(K,)`` bool: the inner runs whose ESS fell below the quality check's floor."""
    assert res.info.min_ess is not None
    return res.info.min_ess < max(2.0, 0.05 * N)


def _distinct(theta: dict[str, Tensor], x: Tensor) -> int:
    """The number of distinct joint draws ``(theta_k, x_k)`` among the ``K`` rows."""
    K = x.shape[0]
    rows = torch.cat(
        [x.reshape(K, -1).double()] + [v.reshape(K, -1).double() for v in theta.values()], 1
    )
    return int(torch.unique(rows, dim=0).shape[0])


def _check(
    theta_ess: float, K: int, degenerate: Tensor, acceptance: list[float], distinct: int
) -> None:
    """Warn (``PosteriorQualityWarning``) when a reweighting of the theta-particles
    degenerated, when most final theta-particles carry the evidence of an inner run that
    degenerated, when no move was accepted, or when few of the final draws differ (the
    samplers' ``distinct`` rule: fewer than a tenth), and for fewer than 10
    theta-particles (the samplers' ``few_particles`` rule: none of these can tell)."""
    msgs = []
    if K < QualityPolicy().min_particles:
        msgs.append(
            f"only {K} theta-particles: too few for any of the checks on them to tell "
            "whether the run degenerated (the hyperparameters' spread came out 0.42 of the "
            "exact posterior's with 4; remedy: more num_theta)"
        )
    if distinct < max(2.0, QualityPolicy().distinct_fraction * K):
        msgs.append(
            f"only {distinct} of the {K} joint draws (theta, x) differ: copies made by "
            "resampling that no move separated (remedies: more moves; more num_samples, "
            "whose less noisy evidence estimates are accepted more often)"
        )
    if theta_ess < max(2.0, 0.05 * K):
        msgs.append(
            f"a reweighting of the {K} theta-particles had ESS {theta_ess:.3g}: a few "
            "particles carried the posterior (remedies: more num_theta, more moves)"
        )
    frac = float(degenerate.double().mean())
    if frac > 0.5:
        msgs.append(
            f"{frac:.0%} of the final theta-particles hold the evidence estimate of an inner "
            "run whose weights degenerated: those estimates are noisy (remedies: more "
            "num_samples, more steps, an inner sampler with adaptive steps)"
        )
    if acceptance and max(acceptance) == 0:
        msgs.append("no particle-marginal move was accepted (remedy: more num_samples)")
    if msgs:
        warnings.warn("SMC^2: " + "; ".join(msgs) + ".", PosteriorQualityWarning, stacklevel=3)


def _next_temperature(log_z: Tensor, lam: float, target: float) -> float:
    """The next temperature ``lam' in (lam, 1]``: the largest whose incremental weights
    ``Z^(lam' - lam)`` keep an ESS of at least ``target`` (bisection), at least
    ``lam + 1e-4`` so that tempering always advances."""

    def ess_at(delta: float) -> float:
        return float(weights_ess(normalize(delta * log_z)))

    rest = 1.0 - lam
    if ess_at(rest) >= target:
        return 1.0
    lo, hi = 0.0, rest
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if ess_at(mid) >= target:
            lo = mid
        else:
            hi = mid
    return min(1.0, lam + max(lo, 1e-4))


def _run_device(observed: list[dict[str, Any]], generator: torch.Generator | None) -> torch.device:
    """The device of the run: the observed values' (the data's), else the generator's;
    a generator on another kind of device is refused before any work."""
    values = [s["value"] for s in observed if isinstance(s["value"], Tensor)]
    dev = values[0].device if values else (generator.device if generator else torch.device("cpu"))
    if generator is not None and generator.device.type != dev.type:
        raise ValueError(
            f"generator is on {generator.device} but the observed data are on {dev}: pass "
            f"torch.Generator(device={str(dev)!r})"
        )
    return dev


def _describe(values: dict[str, Tensor]) -> str:
    """The globals' ranges over the theta-particles, for messages."""
    parts = []
    for name, v in values.items():
        if v.numel() == 0:
            continue
        f = v.detach().double()
        parts.append(f"{name} in [{float(f.min()):.3g}, {float(f.max()):.3g}]")
    return ", ".join(parts) or "none"


def _read_globals(
    model: Callable, args: tuple, kwargs: dict, generator: torch.Generator | None
) -> tuple[list[_Global], int, str, torch.device]:
    """The model's global latent sites (refused: local latents, unbounded discrete ones), the
    observed values' largest rank, the prior site's name and the run's device."""
    with pyro.validation_enabled(False):
        tr = poutine.trace(PriorPlaceholder()(model)).get_trace(*args, **kwargs)
    nodes = cast("dict[str, dict[str, Any]]", tr.nodes)
    names = global_latent_sites(model, *args, **kwargs)
    globals_: list[_Global] = []
    for n in names:
        s = nodes[n]
        if s["cond_indep_stack"]:
            raise ValueError(
                f"latent site {n!r} is inside pyro.plate {[f.name for f in s['cond_indep_stack']]}: "
                "infer supports global latent sites (outside every plate) besides the "
                "DiffusionPrior site; local latent variables are not supported"
            )
        fn = s["fn"]
        ev = tuple(fn.event_shape)
        if fn.support.is_discrete:
            if not getattr(fn, "has_enumerate_support", False):
                raise ValueError(
                    f"latent site {n!r} is discrete with an unbounded support "
                    f"({type(unwrap(fn)).__name__}): infer supports discrete global sites "
                    "with a finite support (Categorical, Bernoulli, OneHotCategorical, ...)"
                )
            support = fn.enumerate_support(expand=False).reshape((-1,) + ev)
            globals_.append(_Global(n, ev, None, support))
        else:
            globals_.append(_Global(n, ev, biject_to(fn.support)))
    observed = [s for s in nodes.values() if s["type"] == "sample" and s["is_observed"]]
    trailing = max(torch.as_tensor(s["value"]).dim() for s in observed) if observed else 0
    priors = [
        n
        for n, s in nodes.items()
        if s["type"] == "sample" and isinstance(unwrap(s["fn"]), DiffusionPrior)
    ]
    return globals_, trailing, priors[0] if priors else "", _run_device(observed, generator)


def _draw_globals(
    model: Callable,
    args: tuple,
    kwargs: dict,
    globals_: list[_Global],
    K: int,
    trailing: int,
    generator: torch.Generator | None,
    dev: torch.device,
) -> dict[str, Tensor]:
    """``K`` draws of the globals from their prior, each given those drawn before it. Pyro's
    ``sample()`` takes torch's global generators: seeded from ``generator`` and restored
    afterwards (the device's too when the run is on one)."""
    values: dict[str, Tensor] = {}
    with seeded_global_rng(generator, dev):
        for gl in globals_:
            # the site's prior given the globals drawn so far (batched over K)
            with pyro.validation_enabled(False):
                t = poutine.trace(PriorPlaceholder()(FixGlobals(values, K, trailing)(model)))
                fn = cast(Any, t.get_trace(*args, **kwargs).nodes[gl.name]["fn"])
                # FixGlobals did not fix this one: its fn is the unbatched or K-batched prior
            v = fn.sample() if fn.batch_shape.numel() == K else fn.sample((K,))
            values[gl.name] = v.reshape((K,) + gl.event_shape)
    return values


def infer_hierarchical(
    model: Callable,
    sampler: Sampler | None = None,
    *args,
    num_samples: int = 256,
    num_theta: int = 64,
    moves: int = 3,
    generator: torch.Generator | None = None,
    linearize: bool = True,
    ess_target: float = 0.5,
    max_levels: int = 50,
    **kwargs,
) -> HierarchicalPosterior:
    """Sample ``p(theta, x | y)`` for a model with global latent sites ``theta`` (module
    docstring): ``num_theta`` theta-particles, ``num_samples`` inner particles each, then
    ``moves`` particle-marginal Metropolis-Hastings moves; ``sampler`` is the inner SMC
    sampler (default: :func:`~bayesfilter_diff.samplers.registry.default_sampler` of the
    problem with ``evidence=True``: TDS with the analytic reverse variance)."""
    for name, v, low in (
        ("num_theta", num_theta, 2),
        ("moves", moves, 0),
        ("max_levels", max_levels, 1),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if (
        isinstance(ess_target, bool)
        or not isinstance(ess_target, int | float)
        or not 0 < ess_target < 1
    ):
        raise ValueError(f"ess_target must be a number in (0, 1), got {ess_target!r}")
    K = num_theta
    globals_, trailing, site, dev = _read_globals(model, args, kwargs, generator)
    continuous = [gl for gl in globals_ if gl.values is None]
    discrete = [gl for gl in globals_ if gl.values is not None]

    def wrapped(values: dict[str, Tensor]) -> Callable:
        return FixGlobals(values, K, trailing)(model)

    def draw_prior() -> dict[str, Tensor]:
        return _draw_globals(model, args, kwargs, globals_, K, trailing, generator, dev)

    def log_prior(values: dict[str, Tensor]) -> Tensor:
        with pyro.validation_enabled(False):
            t = poutine.trace(PriorPlaceholder()(wrapped(values))).get_trace(*args, **kwargs)
        total = torch.zeros(K, dtype=torch.float64, device=dev)
        for gl in globals_:
            node = cast("dict[str, Any]", t.nodes[gl.name])
            lp = node["fn"].log_prob(node["value"])
            total = (
                total + lp.double().reshape(-1).expand(K)
                if lp.numel() == 1
                else total + lp.double().reshape(K)
            )
        return total

    def unconstrained(values: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``u`` ``(K, D)`` and ``log |d theta / d u|`` ``(K,)``."""
        us: list[Tensor] = [torch.zeros(K, 0, dtype=torch.float64, device=dev)]
        ljs: list[Tensor] = [torch.zeros(K, dtype=torch.float64, device=dev)]
        for gl in continuous:
            th = values[gl.name]
            u = gl.transform.inv(th)
            lj = gl.transform.log_abs_det_jacobian(u, th).reshape(K, -1).sum(-1)
            us.append(u.reshape(K, -1))
            ljs.append(lj)
        return torch.cat([v.double() for v in us], -1), torch.stack(ljs).double().sum(0)

    def constrained(u: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
        out, i = dict(like), 0
        for gl in continuous:
            ref = like[gl.name]
            part = u[:, i : i + gl.size].to(ref.dtype).reshape((K,) + gl.event_shape)
            out[gl.name] = gl.transform(part)
            i += gl.size
        return out

    used: list[Sampler] = []
    degenerate: list[Tensor] = []
    nfe = 0

    def inner(values: dict[str, Tensor]) -> tuple[Tensor, Tensor, Result]:
        nonlocal nfe
        prior_model, problem, st = model_to_problem(
            wrapped(values), *args, linearize=linearize, **kwargs
        )
        smp = sampler
        if smp is None:
            smp = used[0] if used else default_sampler(problem, evidence=True)
        if not used:
            used.append(smp)
        with warnings.catch_warnings():
            # an inner run for a theta far in the tail may degenerate: its Z(theta) is
            # still unbiased; the run-level check below weighs such runs by their mass
            warnings.simplefilter("ignore", PosteriorQualityWarning)
            try:
                res = smp.sample(prior_model, problem, num_samples, generator)
            except DegenerateWeightsError as e:
                dt = problem.y.dtype
                P = max(1, problem.batch_size // K)
                raise DegenerateWeightsError(
                    f"SMC^2: an inner run degenerated (its problems are the {K} "
                    f"theta-particles"
                    + (f" x {P} observations, theta-major" if P > 1 else "")
                    + f"; the globals over all theta-particles: {_describe(values)}): {e}. "
                    + (
                        f"The model runs in {str(dt).replace('torch.', '')}, where a small "
                        "noise scale's likelihood underflows: pass the prior, the operator "
                        "and y in float64; otherwise"
                        if dt != torch.float64
                        else "Remedies"
                    )
                    + ": more particles (num_samples), or a prior on the globals that keeps "
                    "them away from values the data rule out"
                ) from e
        nfe += res.info.nfe
        if st.kind == "affine_gaussian":
            check_linearization(st, problem, res.samples)
        if res.log_evidence is None:
            raise ValueError(
                f"{type(smp).__name__} gives no evidence estimate: infer needs an SMC sampler "
                "(TDS, MCGdiff, SMCDiff) for models with global latent sites"
            )
        # the problems are the theta-particles, or (theta, problem) pairs theta-major for a
        # plate of problems sharing the globals: Z(theta) is the product over the plate
        P = res.samples.shape[0] // K
        degenerate.append(_degenerate(res, num_samples).reshape(K, P).any(-1))
        # one draw of x per problem from its weighted cloud
        idx = torch.multinomial(res.weights().double(), 1, generator=generator).squeeze(-1)
        x = res.samples[torch.arange(K * P), idx]
        x = x.reshape((K,) + ((P,) if st.outer > 1 else ()) + tuple(x.shape[1:]))
        return res.log_evidence.double().reshape(K, P).sum(-1), x, res

    # 1. prior draws and one batched inner run
    theta = draw_prior()
    log_z, x, res = inner(theta)
    log_z = torch.where(torch.isnan(log_z), torch.full_like(log_z, -math.inf), log_z)
    if not bool(torch.isfinite(log_z).any()):
        raise ValueError("every inner run gave evidence 0 (or NaN): check the model and y")
    deg = degenerate[0]
    lp = log_prior(theta)
    # 2. density tempering (Duan & Fulop 2015): targets p(theta) Z(theta)^lam on the
    # extended space of theta and the inner runs' randomness, lam from 0 to 1, each level
    # chosen so that the ESS of the incremental weights Z^(lam' - lam) is ess_target * K;
    # reweight, resample, then PMMH moves invariant for the level's target. The product of
    # the mean incremental weights is unbiased for p(y). Without moves: one step to lam = 1
    # (importance sampling squared).
    lam = 0.0
    log_evidence = torch.zeros((), dtype=torch.float64, device=dev)
    temperatures: list[float] = []
    level_ess: list[float] = []
    acceptance: list[float] = []
    while lam < 1.0:
        if len(temperatures) >= max_levels:
            warnings.warn(
                f"SMC^2: stopped tempering at lambda = {lam:.3g} after {max_levels} levels "
                "(remedies: more num_theta, more moves)",
                PosteriorQualityWarning,
                stacklevel=2,
            )
            break
        new = 1.0 if moves == 0 else _next_temperature(log_z, lam, ess_target * K)
        log_w = (new - lam) * log_z
        log_evidence = log_evidence + log_mean_exp(log_w)
        w = normalize(log_w)
        level_ess.append(float(weights_ess(w)))
        temperatures.append(new)
        idx = systematic(w, K, generator)
        theta = {k: v[idx] for k, v in theta.items()}
        log_z, x, deg, lp = log_z[idx], x[idx], deg[idx], lp[idx]
        lam = new
        for _ in range(moves):
            u, lj = unconstrained(theta)
            D = u.shape[1]
            if D:  # continuous sites: Gaussian random walk in the unconstrained space
                scale = 2.38 / math.sqrt(D) * u.std(0).clamp_min(1e-3)
                noise = torch.randn(u.shape, generator=generator, dtype=u.dtype, device=u.device)
                u = u + scale * noise
            theta_new = constrained(u, theta)
            for gl in discrete:  # symmetric: keep, or a uniform value of the support
                assert gl.values is not None
                n_val = gl.values.shape[0]
                pick = torch.randint(n_val, (K,), generator=generator, device=dev)
                jump = torch.rand(K, generator=generator, device=dev) < 0.5
                cur = theta_new[gl.name]
                prop = gl.values.to(cur.device)[pick].to(cur.dtype)
                theta_new[gl.name] = torch.where(
                    jump.reshape((K,) + (1,) * (cur.dim() - 1)), prop, cur
                )
            _, lj_new = unconstrained(theta_new)
            lp_new = log_prior(theta_new)
            log_z_new, x_new, res = inner(theta_new)
            log_z_new = torch.where(
                torch.isnan(log_z_new), torch.full_like(log_z_new, -math.inf), log_z_new
            )
            # lam * (log Z' - log Z), with 0 * (-inf) read as 0 never needed: lam > 0 here
            log_a = lam * (log_z_new - log_z) + (lp_new + lj_new) - (lp + lj)
            log_a = torch.where(torch.isnan(log_a), torch.full_like(log_a, -math.inf), log_a)
            uni = torch.rand(K, generator=generator, dtype=torch.float64, device=dev)
            acc = torch.log(uni) < log_a
            acceptance.append(float(acc.double().mean()))
            theta = {
                k: torch.where(acc.reshape((K,) + (1,) * (v.dim() - 1)), theta_new[k], v)
                for k, v in theta.items()
            }
            x = torch.where(acc.reshape((K,) + (1,) * (x.dim() - 1)), x_new, x)
            log_z = torch.where(acc, log_z_new, log_z)
            lp = torch.where(acc, lp_new, lp)
            deg = torch.where(acc, degenerate[-1], deg)
    theta_ess = min(level_ess)
    _check(theta_ess, K, deg, acceptance, _distinct(theta, x))
    return HierarchicalPosterior(
        theta=theta,
        x=x,
        site=site,
        log_evidence=log_evidence,
        theta_ess=theta_ess,
        acceptance=acceptance,
        temperatures=temperatures,
        level_ess=level_ess,
        inner=res,
        nfe=nfe,
        sampler=used[0],
        log_z=log_z,
        call=(model, args, kwargs),
    )

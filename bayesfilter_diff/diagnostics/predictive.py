"""Is the observation one the prior produces? A prior predictive check (Box 1980).

``prior_predictive_check(prior, problem)`` draws ``x ~ p(x)`` with the prior's own reverse
chain, ``y' ~ p(y | x)`` with the problem's noise model, and asks how many of the draws are
at least as far from the draws' centre as the observed ``y``: an observation farther than
every draw conflicts with the prior (Evans & Moshonov 2006), or lies where the prior rarely
goes. There the posterior rests on the prior's tail, which a learned prior represents worst
and which an SMC sampler may cover partly without any sign in its own diagnostics: a mode of
prior weight 1e-6 holding 9.5% of the posterior was missed silently by a quarter of the
default's runs (docs/methods/README.md, "Runs against each other"); its observation is
farther than every one of 1024 prior predictive draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["PriorPredictiveCheck", "prior_predictive_check"]


@dataclass(frozen=True)
class PriorPredictiveCheck:
    """The observation against draws of the prior predictive (:func:`prior_predictive_check`).

    Per problem ``(B,)`` (unbatched: a scalar): ``distance``, the observation's squared
    distance from the draws' mean (Mahalanobis under the draws' covariance, or the sum of
    squared standardised entries where the observation has more than a tenth as many entries
    as the draws); ``p_value``, ``(1 + k) / (1 + M)`` with ``k`` of the ``M`` reference draws
    at least as far (each draw's own distance under the same moments: exact for any prior
    and noise model when ``y`` is a prior predictive draw, up to the moments' estimation);
    ``farthest``, the largest reference draw's distance; ``conflict``, bool: ``y`` is
    farther than every reference draw (``p_value = 1 / (1 + M)``; a false alarm for a
    typical ``y`` with probability ``1 / (1 + M)``); ``reference_draws``, ``M`` (half of the
    ``num_draws`` drawn). ``metric`` names the distance."""

    distance: Tensor
    p_value: Tensor
    farthest: Tensor
    conflict: Tensor
    reference_draws: int
    metric: str


def prior_predictive_check(
    prior: Any,
    problem: Any,
    num_draws: int = 2048,
    generator: torch.Generator | None = None,
    num_steps: int = 100,
    warn: bool = True,
    *,
    observe: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
    stacklevel: int = 2,
) -> PriorPredictiveCheck:
    """Draw ``num_draws`` prior signals (DDPM chain of ``num_steps``) and an observation of
    each with the problem's noise model; half of them give the prior predictive's mean and
    covariance, the other half the reference distances (:class:`PriorPredictiveCheck`).
    With ``warn``, a :class:`~bayesfilter_diff.PosteriorQualityWarning` says when ``y`` is
    farther than every reference draw (``stacklevel`` as :func:`warnings.warn`'s). The
    observations are drawn by ``observe(x, generator)`` (``x`` of shape ``(B, M,
    *in_shape)``, returning ``(B, M, ...)`` in ``y``'s order) when given, else by the
    problem's Gaussian or Poisson noise model: a problem with a ``log_likelihood_fn`` needs
    ``observe`` (:meth:`bayesfilter_diff.inference.Posterior.prior_predictive_check` draws
    them from a Pyro model's own sites). The prior's chain is the sampler's, so the check
    is of the model the samplers run; it costs one unconditional run of ``num_draws``
    particles."""

    from ..problem import InverseProblem

    if not isinstance(problem, InverseProblem):
        raise TypeError(f"problem must be an InverseProblem, got {type(problem).__name__}")
    if problem.log_likelihood_fn is not None and observe is None:
        raise ValueError(
            "prior_predictive_check draws observations with the problem's noise model; this "
            "problem has a log_likelihood_fn (a Pyro-defined likelihood), which cannot be "
            "sampled by the problem: pass observe=, or for a model sampled with "
            "bfd.infer call posterior.prior_predictive_check(), which draws the model's sites"
        )
    _check_counts(num_draws, num_steps)
    problem = _run_precision(prior, problem)
    x = _prior_signals(prior, None, num_draws, num_steps, generator).to(problem.y.dtype)
    B = problem.batch_size
    xb = x.unsqueeze(0).expand((B,) + tuple(x.shape))
    with torch.no_grad():
        yp = _observations(problem, xb, generator, observe)  # (B, M, *out)
    y = problem.y_batched.reshape(B, 1, -1).double()
    m_y = y.shape[-1]
    if (
        not isinstance(yp, Tensor)
        or yp.dim() < 2
        or tuple(yp.shape[:2]) != (B, num_draws)
        or yp[0, 0].numel() != m_y
    ):
        got = tuple(yp.shape) if isinstance(yp, Tensor) else type(yp).__name__
        raise ValueError(
            f"observe must return one observation per signal, shape (B, M, ...) = ({B}, "
            f"{num_draws}, ...) with y's {m_y} entries each; got {got}"
        )
    yp = yp.reshape(B, num_draws, -1).double().to(y.device)
    return _rank(y, yp, warn, stacklevel + 1, problem.batched)


def _run_precision(prior: Any, problem: Any) -> Any:
    """As the samplers: a 16-bit problem's observations and its model run in float32."""
    from ..samplers.loop import _upcast

    if problem.y.dtype in (torch.float16, torch.bfloat16):
        return _upcast(prior, problem)[1]
    return problem


def _prior_signals(
    prior: Any, batch: int | None, n: int, num_steps: int, generator: torch.Generator | None
) -> Tensor:
    """``n`` draws of the prior's own chain (DDPM, ``num_steps``): ``(n, *event)``, or
    ``(batch, n, *event)`` with one prior per problem (a labelled prior given a label per
    problem); the unconditional chain's own quality findings are not the user's."""
    import warnings

    from ..distributions import unconditional_problem
    from ..errors import PosteriorQualityWarning
    from ..samplers.ddim import DDIM

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", PosteriorQualityWarning)
        dummy = unconditional_problem(prior, batch=batch)
        return DDIM(num_steps=num_steps, eta=1.0).sample(prior, dummy, n, generator).samples


def _check_counts(num_draws: Any, num_steps: Any) -> None:
    for name, v, lo in (("num_draws", num_draws, 64), ("num_steps", num_steps, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def _observations(
    problem: Any,
    x: Tensor,
    generator: torch.Generator | None,
    observe: Callable[[Tensor, torch.Generator | None], Tensor] | None,
) -> Tensor:
    """An observation per signal ``x`` ``(B, M, *in_shape)``: ``observe``'s, or the
    problem's noise model's (a negative Poisson rate: a ValueError saying so)."""
    if observe is not None:
        return observe(x, generator)
    try:
        return problem.sample_observation(x, generator)
    except RuntimeError as e:
        raise ValueError(
            f"the problem's {problem.noise} noise model could not be drawn at the prior's "
            f"signals ({str(e).splitlines()[0] if str(e) else e!r}): a Poisson rate must be "
            "positive at every signal the prior draws"
        ) from e


def _rank(
    y: Tensor, yp: Tensor, warn: bool, stacklevel: int, batched: bool
) -> PriorPredictiveCheck:
    """The check on observations ``y`` ``(B, 1, m)`` against prior predictive draws ``yp``
    ``(B, M, m)``, both float64: moments from the first half of the draws, ``y``'s distance
    ranked among the second half's."""
    import warnings

    from ..errors import PosteriorQualityWarning

    B, num_draws = yp.shape[:2]
    bad = ~torch.isfinite(yp).all(-1)
    if bool(bad.any()):
        raise ValueError(
            f"{int(bad.sum())} of the {B * num_draws} prior predictive observations are not "
            "finite: the noise model's parameters leave their domain at some of the prior's "
            "signals (a rate, a probability or a scale computed from x), where the "
            "likelihood is not a law of data; the check needs a model whose observations "
            "are defined at every signal the prior draws"
        )
    half = num_draws // 2
    fit, ref = yp[:, :half], yp[:, half:]
    m = fit.shape[-1]
    mean = fit.mean(1, keepdim=True)
    dev = fit - mean
    if m * 10 <= half:
        metric = "mahalanobis"
        cov = dev.transpose(1, 2) @ dev / (half - 1)
        ridge = 1e-9 * cov.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-300)
        cov = cov + ridge[:, None, None] * torch.eye(m, dtype=cov.dtype, device=cov.device)
        L = torch.linalg.cholesky(cov)

        def dist(v: Tensor) -> Tensor:
            u = torch.linalg.solve_triangular(L, (v - mean).transpose(1, 2), upper=False)
            return (u**2).sum(1)

    else:
        metric = "diagonal"
        sd = dev.std(1, keepdim=True).clamp_min(1e-300)

        def dist(v: Tensor) -> Tensor:
            return (((v - mean) / sd) ** 2).sum(-1)

    d_y, d_ref = dist(y)[:, 0], dist(ref)  # (B,), (B, M_ref)
    k = (d_ref >= d_y[:, None]).sum(-1)
    M = ref.shape[1]
    p = (1.0 + k.double()) / (1.0 + M)
    farthest = d_ref.amax(-1)
    conflict = k == 0
    if warn and bool(conflict.any()):
        i = int(torch.nonzero(conflict).flatten()[0])
        probs = torch.nonzero(conflict).flatten().tolist()
        warnings.warn(
            f"the observation is farther from the prior predictive's centre than all {M} of "
            f"its reference draws{f' for problem(s) {probs}' if batched else ''} "
            f"(squared {metric} distance {float(d_y[i]):.3g} against at most "
            f"{float(farthest[i]):.3g}; p <= {1 / (1 + M):.2g}): the data conflict with the "
            "prior, or lie where it rarely goes. There the posterior rests on the prior's "
            "tail, which a learned prior represents worst and an SMC sampler may cover only "
            "in part with healthy diagnostics (a rare mode). Check the model and the data, "
            "and confirm the posterior with independent runs (bfd.infer(..., runs=4), "
            "diagnostics.runs_check) and more particles.",
            PosteriorQualityWarning,
            stacklevel=stacklevel,
        )
    if not batched:
        d_y, p, farthest, conflict = d_y[0], p[0], farthest[0], conflict[0]
    return PriorPredictiveCheck(d_y, p, farthest, conflict, M, metric)


def _model_with_globals_check(
    model: Any,
    args: tuple,
    kwargs: dict,
    num_draws: int,
    generator: torch.Generator | None,
    num_steps: int,
    warn: bool,
    stacklevel: int,
) -> PriorPredictiveCheck:
    """The check for a Pyro model with global latent sites (what SMC^2 samples): each of
    ``num_draws`` prior predictive observations from its own globals (drawn from their
    prior, each given those before), its own prior signal for every problem of a plate
    sharing them, and the model's observed sites; ``y`` is all the model's data at once."""

    from ..inference.hierarchical import FixGlobals, _draw_globals, _read_globals
    from ..inference.reading import model_to_problem

    _check_counts(num_draws, num_steps)
    globals_, trailing, _, dev = _read_globals(model, args, kwargs, generator)
    M = num_draws
    values = _draw_globals(model, args, kwargs, globals_, M, trailing, generator, dev)
    fixed = FixGlobals(values, M, trailing)(model)
    prior, problem, st = model_to_problem(fixed, *args, linearize=False, **kwargs)
    problem = _run_precision(prior, problem)
    B = problem.batch_size  # M theta draws x P problems, theta-major
    P = B // M
    # one signal per problem, each from its problem's prior: (B, 1, *event)
    x = _prior_signals(prior, B, 1, num_steps, generator).to(problem.y.dtype)
    custom = problem.log_likelihood_fn is not None
    with torch.no_grad():
        yp = _observations(problem, x, generator, st.observed_draws if custom else None)
    yp = yp.reshape(1, M, -1).double()
    y = problem.y_batched[:P].reshape(1, 1, -1).double().to(yp.device)
    return _rank(y, yp, warn, stacklevel + 1, False)

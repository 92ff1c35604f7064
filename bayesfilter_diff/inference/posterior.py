""":func:`infer`: sample the posterior of a Pyro model's DiffusionPrior site, and its
result :class:`Posterior`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..problem import InverseProblem
from ..result import Result, RunInfo
from ..samplers.base import Sampler
from ..samplers.registry import default_sampler
from .handlers import unwrap
from .hierarchical import HierarchicalPosterior, global_latent_sites, infer_hierarchical
from .linearize import check_linearization
from .reading import model_to_problem
from .structure import ModelStructure

if TYPE_CHECKING:
    from ..diagnostics.predictive import PriorPredictiveCheck
    from ..diagnostics.smc import RunsCheck, StepCheck

__all__ = ["Posterior", "infer"]


@dataclass(repr=False)
class Posterior:
    """Posterior draws of a Pyro model's DiffusionPrior site.

    Attributes
    ----------
    result
        The sampler's :class:`~bayesfilter_diff.Result`.
    site
        Name of the DiffusionPrior site.
    problem
        The :class:`~bayesfilter_diff.InverseProblem` built from the model.
    structure
        What was read from the model (``structure.kind``: how the likelihood was mapped).
    sampler
        The sampler that ran (the default one when ``infer`` was given none).
    runs
        With ``infer(..., runs=R)``: the check of the ``R`` independent runs against each
        other (:class:`~bayesfilter_diff.diagnostics.RunsCheck`, with the runs' equally
        weighted mean and pooled evidence and their errors from the runs' spread, floored at
        the runs' own combined errors);
        ``result`` is then the runs' pooled cloud
        (:func:`~bayesfilter_diff.diagnostics.pool_runs`), each run weighted by its
        evidence, so :meth:`mean` and ``runs.mean.value`` differ by a fraction of
        ``runs.mean.std_error``. ``None`` for one run.
    """

    result: Result
    site: str
    problem: InverseProblem
    structure: ModelStructure = field(repr=False)
    sampler: Sampler | None = None
    runs: RunsCheck | None = None

    def __repr__(self) -> str:
        smp = type(self.sampler).__name__ if self.sampler is not None else None
        return (
            f"Posterior(site={self.site!r}, kind={self.structure.kind!r}, sampler={smp}, "
            + (f"runs={self.runs.mean.runs}, " if self.runs is not None else "")
            + f"result={self.result!r})"
        )

    @property
    def samples(self) -> Tensor:
        """The particles, ``(B, N, *event)`` or ``(N, *event)``: *weighted* for an SMC
        sampler (average them with :meth:`weights`, as :meth:`mean` does; a plain average
        of them is not a posterior average), or take equally weighted draws with
        :meth:`get_samples` / :meth:`draws`."""
        return self.result.samples

    @property
    def log_weights(self) -> Tensor | None:
        return self.result.log_weights

    def weights(self) -> Tensor:
        """Normalised weights of :attr:`samples` (uniform for unweighted samplers), float64."""
        return self.result.weights()

    @property
    def log_evidence(self) -> Tensor | None:
        return self.result.log_evidence

    @property
    def info(self) -> RunInfo:
        """The sampler's run record (:class:`~bayesfilter_diff.result.RunInfo`)."""
        return self.result.info

    @property
    def kind(self) -> str:
        return self.structure.kind

    def draws(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` equally weighted draws (resampled when the sampler is weighted)."""
        return self.result.draws(n, generator=generator)

    def get_samples(
        self, num_samples: int | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Site -> equally weighted draws, Pyro's ``MCMC.get_samples`` convention (as
        :meth:`HierarchicalPosterior.get_samples`): ``num_samples`` of them (the run's
        ``N`` by default; ``R N`` for ``infer(..., runs=R)``), resampled when the sampler is
        weighted. The weighted form is
        :attr:`samples` with :attr:`log_weights`."""
        n = self.result.num_samples if num_samples is None else num_samples
        return {self.site: self.draws(n, generator)}

    def mean(self) -> Tensor:
        """Weighted posterior mean."""
        return self.result.mean()

    def prior_predictive_check(
        self,
        num_draws: int = 2048,
        generator: torch.Generator | None = None,
        num_steps: int = 100,
        warn: bool = True,
    ) -> PriorPredictiveCheck:
        """Is the model's observation one its prior produces?
        :func:`~bayesfilter_diff.diagnostics.prior_predictive_check` with the model's prior,
        observations drawn from the model's own observed sites at prior draws (any law:
        Student-t, Bernoulli, several sites), so it also checks the likelihoods the
        problem's noise models cannot draw. Warns (``warn``) when ``y`` is farther than
        every reference draw."""
        from ..diagnostics.predictive import prior_predictive_check

        custom = self.problem.log_likelihood_fn is not None
        return prior_predictive_check(
            self.structure.prior.model,
            self.problem,
            num_draws,
            generator,
            num_steps,
            warn,
            observe=self.structure.observed_draws if custom else None,
            stacklevel=3,
        )

    def step_check(
        self,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        warn: bool = True,
        factor: int = 2,
    ) -> StepCheck:
        """Does the answer move with the time steps?
        :func:`~bayesfilter_diff.diagnostics.step_check` of the sampler that ran (the default
        one included) on the model's problem, at its steps and ``factor`` times them, with
        ``num_samples`` particles (one run's ``N`` by default). One run is exact for its
        discretised chain only, and nothing in it shows the difference (a prior of several
        scales, data between modes); this costs a run at each of the two step counts."""
        from ..diagnostics.smc import step_check

        if self.sampler is None:
            raise ValueError("step_check needs the sampler that ran; this Posterior has none")
        if num_samples is None:
            runs = self.runs.mean.runs if self.runs is not None else 1
            num_samples = self.result.num_samples // runs
        return step_check(
            self.sampler,
            self.structure.prior.model,
            self.problem,
            num_samples,
            generator,
            warn,
            factor,
            stacklevel=3,
        )

    def to_arviz(self, **kwargs):
        """ArviZ data of the draws (:func:`bayesfilter_diff.diagnostics.to_arviz`): one
        chain, or with ``infer(..., runs=R)`` one chain per run (R-hat compares them).

        The variable is named after the prior site; keyword arguments are passed on.
        """
        try:
            from ..diagnostics import to_arviz
        except ImportError as e:  # pragma: no cover - depends on the diagnostics layer
            raise ImportError(
                f"Posterior.to_arviz needs bayesfilter_diff.diagnostics.to_arviz: {e}"
            ) from e
        kwargs.setdefault("var_name", self.site)
        return to_arviz(self, **kwargs)


def infer(
    model: Callable,
    sampler: Sampler | None = None,
    *args,
    num_samples: int = 1000,
    generator: torch.Generator | None = None,
    num_theta: int = 64,
    moves: int = 3,
    linearize: bool = True,
    runs: int = 1,
    **kwargs,
) -> Posterior | HierarchicalPosterior:
    """Sample the posterior of a Pyro model's DiffusionPrior site with ``sampler``.

    Parameters
    ----------
    model
        A Pyro model: one ``pyro.sample`` site with a
        :class:`~bayesfilter_diff.DiffusionPrior` and observed sites (see
        :mod:`bayesfilter_diff.inference` for how they are read and the vectorisation
        contract).
    sampler
        Any sampler of :mod:`bayesfilter_diff.samplers`; ``None`` (default) picks an
        asymptotically exact one suited to the model
        (:func:`~bayesfilter_diff.samplers.registry.default_sampler`: TDS with adaptive
        steps, its conditioned proposal for a linear-Gaussian site with an SVD or a small
        matrix, the analytic reverse variance otherwise), recorded in ``Posterior.sampler``.
    *args, **kwargs
        The model's arguments (the names ``num_samples``, ``generator``, ``num_theta``,
        ``moves`` and ``linearize`` are taken).
    num_samples
        Particles ``N`` per problem (per theta-particle for a model with global latent
        sites).
    num_theta, moves
        For a model with global latent sites besides the DiffusionPrior site (an unknown
        noise scale, an operator parameter): the number of theta-particles and of particle
        marginal Metropolis-Hastings moves of the SMC^2 sampler
        (:mod:`bayesfilter_diff.inference.hierarchical`), which then returns a
        :class:`~bayesfilter_diff.inference.hierarchical.HierarchicalPosterior`.
    linearize
        Read a Gaussian observation whose mean is affine in the prior value (``x @ M.T``,
        ``g * A(x) + c``) as a linear operator, so that the linear-Gaussian samplers (and
        the default TDS's conditioned proposal) apply (:mod:`bayesfilter_diff.inference.linearize`; checked
        against the model's own likelihood at the returned draws). ``False`` keeps the
        forward model a differentiable black box.
    generator
        Randomness of the sampler (the model is not run at random: the prior site gets a
        placeholder, so a LinearGaussian model gives the same draws as calling the sampler
        directly with the same generator state).
    runs
        ``R >= 2``: ``R`` independent runs of ``num_samples`` particles each, in one batch
        (``R`` copies of the observation), checked against each other
        (:func:`~bayesfilter_diff.diagnostics.runs_check`: a
        :class:`~bayesfilter_diff.PosteriorQualityWarning` when they disagree beyond the
        Monte Carlo errors they report, e.g. a mode some runs found and others missed) and
        pooled into one cloud of ``R N`` particles
        (:func:`~bayesfilter_diff.diagnostics.pool_runs`); the check is in
        ``Posterior.runs``. Costs ``R`` runs. For a model of one observation without global
        latent sites. Default 1.

    Returns
    -------
    Posterior
    """
    if sampler is not None and not isinstance(sampler, Sampler):
        raise TypeError(
            f"sampler must be a bayesfilter_diff sampler (e.g. samplers.TDS()) or None, "
            f"got {type(sampler).__name__}; pass the model's arguments by keyword "
            "(infer(model, y=y))"
        )
    from ..diagnostics.smc import _index

    runs = _index("runs", runs, 1)
    if global_latent_sites(model, *args, **kwargs):
        if runs > 1:
            raise ValueError(
                "runs > 1 is for models without global latent sites: SMC^2 (this model) "
                "pools its own theta-particles; for independent runs call infer again with "
                "other generators and compare them (diagnostics.pooled_log_evidence)"
            )
        return infer_hierarchical(
            model,
            sampler,
            *args,
            num_samples=num_samples,
            num_theta=num_theta,
            moves=moves,
            generator=generator,
            linearize=linearize,
            **kwargs,
        )
    prior, problem, st = model_to_problem(model, *args, linearize=linearize, **kwargs)
    if sampler is None:
        sampler = default_sampler(problem)
    if st.kind != "linear_gaussian":
        try:
            sampler.check(prior, problem)
        except ValueError as e:
            fns = [type(unwrap(st.trace.nodes[n]["fn"])).__name__ for n in st.observed]
            raise ValueError(
                f"{type(sampler).__name__} cannot sample this model: the observed site(s) "
                f"{list(st.observed)} ({', '.join(fns)}) give a {st.kind!r} likelihood, not a "
                f"linear operator with Gaussian noise ({e}). Use a sampler for general "
                "differentiable likelihoods (TDS; DPS for Gaussian or Poisson sites), or a "
                "LinearGaussian observation of the prior site"
            ) from e
    if runs == 1:
        res = sampler.sample(prior, problem, num_samples, generator)
        if st.kind == "affine_gaussian":
            check_linearization(st, problem, res.samples if res.batched else res.samples[None])
        return Posterior(
            result=res, site=st.prior_site, problem=problem, structure=st, sampler=sampler
        )
    from ..diagnostics.smc import pool_runs, runs_check

    copies = _copies(problem, runs)
    res = sampler.sample(prior, copies, num_samples, generator)
    if st.kind == "affine_gaussian":  # the copies' draws as one cloud of the observation
        check_linearization(st, problem, res.samples.reshape((1, -1) + res.samples.shape[2:]))
    check = runs_check(res, stacklevel=3)  # (the warning points at the caller of infer)
    return Posterior(
        result=pool_runs(res),
        site=st.prior_site,
        problem=problem,
        structure=st,
        sampler=sampler,
        runs=check,
    )


def _copies(problem: InverseProblem, runs: int) -> InverseProblem:
    """``runs`` copies of a problem of one observation, as one batched problem."""
    if problem.batched:
        raise ValueError(
            f"runs > 1 needs a model of one observation; this one holds a batch of "
            f"{problem.batch_size} problems: call infer once per problem, or run the batch "
            "several times with other generators and compare (diagnostics.runs_check)"
        )
    y = problem.y.expand((runs,) + tuple(problem.y.shape)).clone()
    out = InverseProblem(
        problem.operator,
        y,
        problem.noise_std if problem.noise == "gaussian" else 0.0,
        noise=problem.noise,
        poisson_rate=problem.poisson_rate,
        log_likelihood_fn=problem.log_likelihood_fn,
        squared_scores_fn=problem.squared_scores_fn,
    )
    out.data_dtype = problem.data_dtype
    out.data_scale_ratio = problem.data_scale_ratio
    return out

"""The sampler interface, its declared requirements, and the checks every sampler shares.

A sampler is a frozen dataclass of hyper-parameters (the paper's defaults) with
``sample(prior, problem, num_samples, generator) -> Result``. It declares what it needs of
the problem in :attr:`Sampler.requires` (checked before any heavy work, and read by the
registry) and implements pure methods over typed records, driven by
:func:`bayesfilter_diff.samplers.loop.run`:

- ``setup(ctx) -> setup``: per-run constants (a frozen dataclass; default ``None``);
- ``init(ctx, setup) -> (state, log_w or None)``: particles at ``times[0]``;
- ``lookahead(ctx, setup, state, k) -> log potential or None``: auxiliary particle filters'
  look-ahead weight for the coming move, applied before resampling (default ``None``);
- ``move(ctx, setup, state, k, t, t_next) -> Move(state, log_weight, info)``;
- ``finalize(ctx, setup, state) -> (x0, log_weight or None)`` (default: ``state.x``);
- ``run_info(ctx, setup) -> record or None``: what the run reports besides the trace.

The state is a dataclass whose fields are all per-particle tensors ``(B, N, ...)``, so that
resampling indexes every field by the ancestors. The maths the moves share is in
:mod:`.kernels` (DDIM, Tweedie, Gaussian densities) and :mod:`.spectral` (conditioning in
an operator's SVD basis).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from ..result import Result
from ..smc.resampling import RESAMPLERS
from .kernels import ddim_coefficients, gaussian_log_density
from .loop import Context, Move, run

__all__ = [
    "Sampler",
    "SMCSampler",
    "Requirements",
    "Context",
    "Move",
    "ddim_coefficients",
    "gaussian_log_density",
]


@dataclass(frozen=True)
class Requirements:
    """What a sampler needs of the problem (checked by :meth:`Sampler.check`).

    Attributes
    ----------
    svd
        A linear operator with an SVD (``U``, ``V``, singular values).
    linear
        A linear operator (an SVD or a dense solve will do).
    mask
        A masking operator (``operator.is_mask``).
    likelihoods
        The observation models accepted: ``"gaussian"``, ``"poisson"`` and ``"custom"`` (a
        ``log_likelihood_fn``, e.g. from a Pyro model).
    noise_positive
        Gaussian noise with ``noise_std > 0``.
    per_problem
        Accepts a batch of problems with different Gaussian noise scales (``noise_std`` a
        ``(B,)`` tensor) or forward models (an operator with ``per_problem = True``), e.g.
        the theta-particles of SMC^2 over an unknown noise scale or operator parameter.
    differentiates
        Whether the sampler differentiates the network or the likelihood (informative).
    remedy
        Appended to the refusal message (e.g. a setting that lifts a requirement).
    """

    svd: bool = False
    linear: bool = False
    mask: bool = False
    likelihoods: frozenset[str] = frozenset({"gaussian"})
    noise_positive: bool = False
    per_problem: bool = False
    differentiates: bool = False
    remedy: str = ""

    def _unmet(self, problem: InverseProblem) -> str | None:
        op = problem.operator
        got = type(op).__name__
        if op.per_problem and not self.per_problem:
            return (
                f"one operator shared by all problems; got {got}, one forward model per "
                "problem: use a sampler that accepts per-problem operators (TDS)"
            )
        if self.mask and not getattr(op, "is_mask", False):
            return f"a masking operator (operators.Mask, operator.is_mask=True); got {got}"
        if self.svd and not (op.is_linear and op.has_svd):
            return (
                "a linear operator with an SVD (Identity, Mask, Dense, Downsample, Blur, "
                f"Colorize); got {got}"
            )
        if self.linear and not op.is_linear:
            return f"a linear operator; got {got}"
        kind = likelihood_kind(problem)
        if kind not in self.likelihoods:
            accepted = " or ".join(sorted(self.likelihoods))
            extra = "" if "custom" in self.likelihoods else " (no custom log_likelihood_fn)"
            return f"a {accepted} observation model{extra}; got {_describe_likelihood(problem)}"
        if kind == "gaussian" and problem.per_problem_noise and not self.per_problem:
            return (
                "one noise_std shared by all problems; got one per problem (a (B,) tensor): "
                "run the problems separately, or use a sampler that accepts per-problem noise "
                "(TDS)"
            )
        if self.noise_positive and kind == "gaussian" and problem.min_noise_std <= 0:
            return (
                "Gaussian noise with noise_std > 0 (its weights or data term divide by the "
                "noise variance); got noise_std = 0"
            )
        return None

    def unmet(self, problem: InverseProblem) -> str | None:
        """What ``problem`` lacks, as "<requirement>; got <what it has>", or ``None``."""
        why = self._unmet(problem)
        return why if why is None or not self.remedy else f"{why}; {self.remedy}"

    def operator_text(self) -> str:
        """The operator it needs, in words (the README's method table)."""
        if self.mask:
            return "mask"
        if self.svd:
            return "linear with SVD"
        if self.linear:
            return "linear"
        return "any differentiable"

    def likelihood_text(self) -> str:
        """The observation models it accepts, in words (the README's method table)."""
        order = ("gaussian", "poisson", "custom")
        text = ", ".join(k for k in order if k in self.likelihoods)
        return text + (" (noise > 0)" if self.noise_positive else "")


def likelihood_kind(problem: InverseProblem) -> str:
    """``"custom"`` for a ``log_likelihood_fn``, else the noise model (``"gaussian"``, ...)."""
    return "custom" if problem.log_likelihood_fn is not None else problem.noise


def _describe_likelihood(problem: InverseProblem) -> str:
    """``"Dense with 'gaussian' noise"``, or naming the custom ``log_likelihood_fn``."""
    op = type(problem.operator).__name__
    if problem.log_likelihood_fn is not None:
        return f"{op} with a custom log_likelihood_fn"
    return f"{op} with {problem.noise!r} noise"


def _check_field_types(sampler: Sampler) -> None:
    """ValueError naming the field for a value that does not fit its annotation.

    Covers fields annotated ``int``, ``float`` or ``str`` (optionally ``| None``): ints
    (not bools) for ``int``, real numbers (not bools, not NaN) for ``float``. The range
    checks stay with each sampler's ``__post_init__``. (ValueError, as those checks raise.)
    """
    for f in dataclasses.fields(sampler):
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        parts = {p.strip() for p in ann.split("|")}
        v = getattr(sampler, f.name)
        if v is None and "None" in parts:
            continue
        kind = parts - {"None"}
        if kind == {"int"}:
            ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
        elif kind == {"float"}:
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
            if ok and math.isnan(v):
                raise ValueError(f"{type(sampler).__name__}: {f.name} must not be NaN")
        elif kind == {"str"}:
            ok = isinstance(v, str)
        else:
            continue
        if not ok:
            raise ValueError(
                f"{type(sampler).__name__}: {f.name} must be {ann}, got {v!r} ({type(v).__name__})"
            )


def check_clamp(name: str, c) -> None:
    """Raise unless ``c`` is ``None`` or a pair ``(low, high)`` of numbers with ``low < high``."""
    if c is not None and (
        not isinstance(c, tuple | list)
        or len(c) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in c)
        or not c[0] < c[1]
    ):
        raise ValueError(f"{name} must be None or a pair (low, high) with low < high, got {c!r}")


def check_finite_nonnegative(name: str, v) -> None:
    """Raise unless ``v`` is a finite real number (not a bool) ``>= 0``."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def check_positive_int(name: str, v) -> None:
    """Raise unless ``v`` is an ``int`` (not a bool) ``>= 1``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class Sampler:
    """Base class: an unweighted sampler on a time grid of ``num_steps`` steps."""

    num_steps: int = 100
    grid: str = "uniform"

    #: Whether the sampler returns weighted particles.
    weighted: ClassVar[bool] = False
    #: What the sampler needs of the problem.
    requires: ClassVar[Requirements] = Requirements()
    #: Asymptotically exact (as the number of particles grows, up to time discretisation).
    exact: ClassVar[bool] = False
    #: Draws ``x_{t_0}`` from the model's start (:meth:`Context.start`), so that it can
    #: start from a prior's exact noisy marginal (``prior.exact_start``); samplers whose
    #: first step is a closed form of the reference ``N(0, sigma_{t_0}^2 I)`` cannot.
    exact_start: ClassVar[bool] = False
    #: Each run conditions all its particles on one random draw of its own (SMCDiff's
    #: noised observation path): the run's Monte Carlo error estimates (genealogy ESS,
    #: ``log_evidence_se``) omit that draw's variance, and the quality check says so.
    shared_draw: ClassVar[bool] = False
    #: Its state's ``x`` before move ``k`` is the chain's point ``x_{t_k}`` on the model's
    #: noised path (DDIM-type updates, not an optimisation or a split Gibbs variable): the
    #: quality check then tests that the draws are where their own paths lead
    #: (:func:`~bayesfilter_diff.samplers.quality.path_ratio`).
    on_path: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_field_types(self)
        if (
            isinstance(self.num_steps, bool)
            or not isinstance(self.num_steps, int)
            or self.num_steps < 1
        ):
            raise ValueError(f"num_steps must be a positive int, got {self.num_steps!r}")
        if self.grid not in ("uniform", "ddpm"):
            raise ValueError(f"grid must be 'uniform' or 'ddpm', got {self.grid!r}")

    # ----------------------------------------------------------------- the interface
    def sample(
        self,
        prior: DiffusionModel,
        problem: InverseProblem,
        num_samples: int,
        generator: torch.Generator | None = None,
    ) -> Result:
        """Draw ``num_samples`` (weighted) samples from ``p(x | y)`` for every observation.

        Parameters
        ----------
        prior
            The diffusion model (schedule and denoiser).
        problem
            Operator, observations ``y`` (``(*out)`` or ``(B, *out)``) and noise model.
        num_samples
            Particles / samples ``N`` per observation.
        generator
            Source of randomness (on the inputs' device); ``None`` uses torch's default.

        Returns
        -------
        Result
            ``samples`` of shape ``(B, N, *event)`` (or ``(N, *event)`` for an unbatched y).
        """
        return run(self, prior, problem, num_samples, generator)

    def check(self, prior: DiffusionModel, problem: InverseProblem) -> None:
        """Raise a ``ValueError`` naming what is missing if :attr:`requires` is not met.

        Subclasses with further conditions override this and call ``super().check``.
        """
        why = self.requirements().unmet(problem)
        if why is not None:
            raise ValueError(f"{type(self).__name__} needs {why}")
        if getattr(prior, "exact_start", False) and not self.exact_start:
            raise ValueError(
                f"{type(self).__name__} starts from the reference N(0, sigma_T^2 I) in closed "
                "form and cannot start from the prior's exact noisy marginal: build the prior "
                "with exact_start=False for this sampler"
            )

    def requirements(self) -> Requirements:
        """What this instance needs (:attr:`requires`, unless a setting changes it)."""
        return self.requires

    def divergence_remedy(self, problem: InverseProblem) -> str | None:
        """The setting to change when a run returned non-finite draws (the loop adds it to
        its :class:`~bayesfilter_diff.errors.NonFiniteSamplesError`), or ``None``."""
        return None

    def time_grid(self, prior: DiffusionModel, problem: InverseProblem) -> Tensor:
        y = problem.y
        return prior.schedule.time_grid(self.num_steps, self.grid, dtype=y.dtype, device=y.device)

    def setup(self, ctx: Context) -> Any:
        """Per-run constants (a frozen dataclass), computed once before ``init``."""
        return None

    def init(self, ctx: Context, setup: Any) -> tuple[Any, Tensor | None]:  # pragma: no cover
        """The state at ``times[0]`` and its initial log-weights (``None``: uniform)."""
        raise NotImplementedError

    def lookahead(self, ctx: Context, setup: Any, state: Any, k: int) -> Tensor | None:
        """Look-ahead log-potential applied before resampling and move ``k`` (default none)."""
        return None

    def move(
        self, ctx: Context, setup: Any, state: Any, k: int, t: Tensor, t_next: Tensor
    ) -> Move:  # pragma: no cover
        """Move ``k``, from ``t = times[k]`` to ``t_next = times[k + 1]``."""
        raise NotImplementedError

    def rejuvenate(
        self, ctx: Context, setup: Any, state: Any, k: int, moved: Tensor
    ) -> tuple[Any, Tensor | None]:
        """Resample-move: moves right after resampling ``k`` that leave the current weighted
        target invariant, for the problems in ``moved`` ``(B,)``; returns the state and the
        acceptance rate per problem ``(B,)`` (NaN where none moved), or ``None`` (default: no
        moves)."""
        return state, None

    def finalize(self, ctx: Context, setup: Any, state: Any) -> tuple[Tensor, Tensor | None]:
        """The samples and a last log-weight (default: ``state.x``, none)."""
        return state.x, None

    def run_info(self, ctx: Context, setup: Any) -> Any:
        """A record the run reports besides the loop's trace (``Result.info.extra``)."""
        return None


@dataclass(frozen=True)
class SMCSampler(Sampler):
    """Base class of the weighted (sequential Monte Carlo) samplers."""

    resampling: str = "systematic"
    ess_threshold: float = 0.5

    weighted: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resampling not in RESAMPLERS:
            raise ValueError(
                f"resampling must be one of {sorted(RESAMPLERS)}, got {self.resampling!r}"
            )
        if not 0.0 <= float(self.ess_threshold) <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1], got {self.ess_threshold!r}")

"""Sampler base class and the transition kernels that several samplers share.

A sampler is a frozen dataclass of hyper-parameters with
``sample(prior, problem, num_samples, generator) -> Result``. It implements

- ``init(ctx) -> (state, log_w or None)``,
- ``step(ctx, state, i, t, t_next) -> (state, log_increment or None)``,
- ``finalize(ctx, state) -> (x0, log_increment or None)``,

and the shared loop (:func:`bayesfilter_diff.smc.run`) drives them.

The generic DDIM kernel for any Gaussian path (``alpha``, ``sigma``): going from ``t`` to
``s < t`` with a clean-data estimate ``x0`` and ``eps = (x_t - alpha_t x0) / sigma_t``,

    x_s = alpha_s x0 + sqrt(sigma_s^2 - std^2) eps + std z,
    std = eta * sqrt(sigma_{t|s}^2 sigma_s^2 / sigma_t^2),
    sigma_{t|s}^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2,

(Song, Meng & Ermon 2021, eq. 12, written for general paths): ``eta = 1`` is the DDPM
ancestral step (the exact Gaussian posterior ``q(x_s | x_t, x0)``), ``eta = 0`` the
deterministic DDIM step.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from ..result import Result
from ..schedules import Schedule
from ..smc.loop import Context, run
from ..smc.resampling import RESAMPLERS

__all__ = ["Sampler", "SMCSampler", "ddim_coefficients", "gaussian_log_density", "Context"]

_LOG2PI = math.log(2 * math.pi)


def ddim_coefficients(
    schedule: Schedule, t: Tensor, t_next: Tensor, eta: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(alpha_s, c_eps, std, alpha_t)`` of the DDIM step ``t -> s`` with parameter ``eta``.

    ``x_s = alpha_s x0 + c_eps eps + std z``.
    """
    a_t, s_t = schedule.alpha(t), schedule.sigma(t)
    a_s, s_s = schedule.alpha(t_next), schedule.sigma(t_next)
    var_ts = (s_t**2 - (a_t / a_s) ** 2 * s_s**2).clamp_min(0)
    anc = var_ts * s_s**2 / s_t**2
    std = eta * anc.sqrt()
    c_eps = (s_s**2 - std**2).clamp_min(0).sqrt()
    return a_s, c_eps, std, a_t


def gaussian_log_density(x: Tensor, mean: Tensor, var: Tensor | float, event_dim: int) -> Tensor:
    """``log N(x; mean, var I)`` summed over the last ``event_dim`` axes (``var`` broadcasts)."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    red = tuple(range(x.dim() - event_dim, x.dim()))
    k = math.prod(x.shape[x.dim() - event_dim :])
    # (x - mean)^2 / var + log var broadcasts to the full shape before the sum
    return -0.5 * (((x - mean) ** 2 / var + torch.log(var)).sum(red) + _LOG2PI * k)


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
    weighted = False

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
        """Raise if the sampler cannot handle this prior / problem (override)."""

    def time_grid(self, prior: DiffusionModel, problem: InverseProblem) -> Tensor:
        y = problem.y
        return prior.schedule.time_grid(self.num_steps, self.grid, dtype=y.dtype, device=y.device)

    def init(self, ctx: Context):  # pragma: no cover - abstract
        raise NotImplementedError

    def step(
        self, ctx: Context, state: dict, i: int, t: Tensor, t_next: Tensor
    ):  # pragma: no cover
        raise NotImplementedError

    def finalize(self, ctx: Context, state: dict):
        return state["x"], None

    # ----------------------------------------------------------------- helpers
    def _require_svd(self, problem: InverseProblem) -> None:
        op = problem.operator
        if not (op.is_linear and op.has_svd):
            raise ValueError(
                f"{type(self).__name__} needs a linear operator with an SVD "
                f"(Identity, Mask, Dense, Downsample, Blur, Colorize); got {type(op).__name__}"
            )

    def _require_gaussian(self, problem: InverseProblem) -> None:
        if not problem.is_linear_gaussian:
            raise ValueError(
                f"{type(self).__name__} needs a linear operator with Gaussian noise (and no "
                f"custom log_likelihood_fn); got {_describe_likelihood(problem)}"
            )


def _describe_likelihood(problem: InverseProblem) -> str:
    """``"Dense with 'gaussian' noise"``, or naming the custom ``log_likelihood_fn``."""
    op = type(problem.operator).__name__
    if problem.log_likelihood_fn is not None:
        return f"{op} with a custom log_likelihood_fn"
    return f"{op} with {problem.noise!r} noise"


@dataclass(frozen=True)
class SMCSampler(Sampler):
    """Base class of the weighted (sequential Monte Carlo) samplers."""

    resampling: str = "systematic"
    ess_threshold: float = 0.5

    weighted = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resampling not in RESAMPLERS:
            raise ValueError(
                f"resampling must be one of {sorted(RESAMPLERS)}, got {self.resampling!r}"
            )
        if not 0.0 <= float(self.ess_threshold) <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1], got {self.ess_threshold!r}")

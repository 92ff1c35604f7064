"""The library's exceptions and warnings (no imports: every layer may use them)."""

from __future__ import annotations

__all__ = [
    "DegenerateWeightsError",
    "NonFiniteSamplesError",
    "ODESolverError",
    "PosteriorQualityWarning",
]


class DegenerateWeightsError(RuntimeError):
    """Every particle weight of a problem became zero or NaN."""


class NonFiniteSamplesError(FloatingPointError):
    """A sampler returned NaN or inf samples (the run diverged); raised instead of them."""


class ODESolverError(RuntimeError):
    """The probability-flow ODE solver of a density failed (an adaptive step underflowed)."""


class PosteriorQualityWarning(UserWarning):
    """A run finished but its draws are not to be trusted (a degenerate or diverged run).

    Raised as an error with ``warnings.simplefilter("error", PosteriorQualityWarning)``,
    silenced with ``"ignore"``; the same findings are in ``Result.info.quality``.
    """

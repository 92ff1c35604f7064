"""The library's exceptions and warnings (no imports: every layer may use them)."""

from __future__ import annotations

__all__ = ["DegenerateWeightsError", "NonFiniteSamplesError"]


class DegenerateWeightsError(RuntimeError):
    """Every particle weight of a problem became zero or NaN."""


class NonFiniteSamplesError(FloatingPointError):
    """A sampler returned NaN or inf samples (the run diverged); raised instead of them."""

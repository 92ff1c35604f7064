"""Sequential Monte Carlo machinery: weights, resampling schemes and the particle loop."""

from .loop import Context, DegenerateWeightsError, NonFiniteSamplesError, index_state, run
from .resampling import (
    RESAMPLERS,
    get_resampler,
    inverse_cdf,
    multinomial,
    residual,
    stratified,
    systematic,
)
from .weights import ess, log_evidence_increment, log_mean_exp, normalize

__all__ = [
    "Context",
    "DegenerateWeightsError",
    "NonFiniteSamplesError",
    "index_state",
    "run",
    "RESAMPLERS",
    "get_resampler",
    "inverse_cdf",
    "multinomial",
    "residual",
    "stratified",
    "systematic",
    "ess",
    "log_evidence_increment",
    "log_mean_exp",
    "normalize",
]

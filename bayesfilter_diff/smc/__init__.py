"""Sequential Monte Carlo machinery that knows nothing of diffusions: log-space weights,
resampling schemes, and the weighted particle system (weight and resample steps).

The driver that runs samplers over these lives beside them, in
:mod:`bayesfilter_diff.samplers.loop`.
"""

from .particles import (
    ParticleWeights,
    distinct_count,
    genealogy_ess,
    genealogy_variance,
    index_particles,
    log_evidence_se,
)
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
    "ParticleWeights",
    "distinct_count",
    "genealogy_ess",
    "log_evidence_se",
    "genealogy_variance",
    "index_particles",
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

"""bayesfilter_diff: posterior sampling with diffusion and flow priors.

>>> import bayesfilter_diff as bfd
>>> sched = bfd.VPSchedule.linear()
"""

from . import diagnostics, operators, samplers, smc
from ._alloc import tune_allocator
from .distributions import DiffusionPrior, LinearGaussian
from .errors import (
    DegenerateWeightsError,
    NonFiniteSamplesError,
    ODESolverError,
    PosteriorQualityWarning,
)
from .inference import Posterior, infer
from .priors import DiffusionModel, GaussianMixture, GaussianMixtureDiffusion
from .problem import InverseProblem
from .result import Result
from .schedules import DiscreteVPSchedule, FlowSchedule, Schedule, VESchedule, VPSchedule

__version__ = "0.1.0"

__all__ = [
    "tune_allocator",
    "diagnostics",
    "operators",
    "samplers",
    "smc",
    "DiffusionModel",
    "GaussianMixture",
    "GaussianMixtureDiffusion",
    "InverseProblem",
    "Result",
    "Schedule",
    "VPSchedule",
    "VESchedule",
    "FlowSchedule",
    "DiscreteVPSchedule",
    "DegenerateWeightsError",
    "NonFiniteSamplesError",
    "ODESolverError",
    "PosteriorQualityWarning",
    "DiffusionPrior",
    "LinearGaussian",
    "infer",
    "Posterior",
]

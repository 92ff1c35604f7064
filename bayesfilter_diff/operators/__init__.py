"""Forward models: linear operators with an implicit SVD, and nonlinear ones."""

from .base import (
    LinearOperator,
    Operator,
    adjointness_error,
    conjugate_gradient,
    spectral_norm,
    svd_error,
)
from .block_average import BlockAverage, Colorize, Downsample
from .blur import Blur, gaussian_kernel, motion_kernel
from .dense import Dense, PerProblemDense, gmm_benchmark_operator
from .identity import Identity
from .mask import Mask
from .phase_retrieval import PhaseRetrieval

__all__ = [
    "Operator",
    "LinearOperator",
    "Identity",
    "Dense",
    "PerProblemDense",
    "Mask",
    "BlockAverage",
    "Downsample",
    "Colorize",
    "Blur",
    "PhaseRetrieval",
    "gaussian_kernel",
    "motion_kernel",
    "gmm_benchmark_operator",
    "adjointness_error",
    "svd_error",
    "conjugate_gradient",
    "spectral_norm",
]

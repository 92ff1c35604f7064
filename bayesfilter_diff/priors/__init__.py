"""Priors: the denoiser contract, adapters and the exact Gaussian mixture."""

from .base import DiffusionModel, broadcast_time
from .gmm import GaussianMixture, GaussianMixtureDiffusion

__all__ = ["DiffusionModel", "GaussianMixture", "GaussianMixtureDiffusion", "broadcast_time"]

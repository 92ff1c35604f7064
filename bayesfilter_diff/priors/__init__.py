"""Priors: the denoiser contract, adapters, the exact Gaussian mixture, networks, guidance."""

from .base import DiffusionModel, broadcast_time
from .diffusers_adapter import from_diffusers
from .gmm import GaussianMixture, GaussianMixtureDiffusion
from .guidance import ClassifierFreeGuidance, ClassifierGuidance
from .networks import MLP, UNet, load_pretrained, load_prior, network_from_config

__all__ = [
    "DiffusionModel",
    "GaussianMixture",
    "GaussianMixtureDiffusion",
    "broadcast_time",
    "ClassifierGuidance",
    "ClassifierFreeGuidance",
    "MLP",
    "UNet",
    "load_pretrained",
    "load_prior",
    "network_from_config",
    "from_diffusers",
]

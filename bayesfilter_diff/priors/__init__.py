"""Priors: the denoiser contract, adapters, the exact Gaussian mixture, networks, guidance.

Modules: :mod:`.base` (the contract and adapters), :mod:`.gmm`, :mod:`.networks` (small
networks and learned priors), :mod:`.checkpoint_io` (their files), :mod:`.ode_density` (the
probability-flow density of any diffusion model), :mod:`.guidance`,
:mod:`.diffusers_adapter`.
"""

from .base import DiffusionModel, broadcast_time
from .checkpoint_io import CheckpointError, pretrained_names, save_prior
from .diffusers_adapter import from_diffusers
from .gmm import GaussianMixture, GaussianMixtureDiffusion
from .guidance import ClassifierFreeGuidance, ClassifierGuidance
from .labelled import LabelledPriors
from .networks import MLP, UNet, load_pretrained, load_prior, network_from_config
from .ode_density import ode_log_prob

__all__ = [
    "DiffusionModel",
    "GaussianMixture",
    "GaussianMixtureDiffusion",
    "broadcast_time",
    "ClassifierGuidance",
    "ClassifierFreeGuidance",
    "LabelledPriors",
    "MLP",
    "UNet",
    "load_pretrained",
    "pretrained_names",
    "save_prior",
    "CheckpointError",
    "load_prior",
    "network_from_config",
    "from_diffusers",
    "ode_log_prob",
]

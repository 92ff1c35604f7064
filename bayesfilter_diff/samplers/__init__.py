"""Posterior samplers: one module per method, one interface (``sample``)."""

from .base import Sampler, SMCSampler
from .ddim import DDIM
from .fps import FPS, FPSSMC

__all__ = ["Sampler", "SMCSampler", "DDIM", "FPS", "FPSSMC"]

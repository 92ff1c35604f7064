"""Posterior samplers: one module per method, one interface (``sample``)."""

from .base import Sampler, SMCSampler
from .ddim import DDIM

__all__ = ["Sampler", "SMCSampler", "DDIM"]

"""Posterior samplers: one module per method, one interface (``sample``)."""

from .base import Sampler, SMCSampler
from .ddim import DDIM
from .fps import FPS, FPSSMC
from .mcgdiff import MCGdiff
from .smcdiff import SMCDiff

__all__ = ["Sampler", "SMCSampler", "DDIM", "FPS", "FPSSMC", "MCGdiff", "SMCDiff"]

"""Posterior samplers: one module per method, one interface (``sample``)."""

from .base import Sampler, SMCSampler
from .daps import DAPS
from .ddim import DDIM
from .dflow import DFlow
from .diffpir import DiffPIR
from .fps import FPS, FPSSMC
from .mcgdiff import MCGdiff
from .reddiff import REDDiff
from .repaint import RePaint
from .smcdiff import SMCDiff

__all__ = ["Sampler", "SMCSampler", "DDIM", "FPS", "FPSSMC", "MCGdiff", "SMCDiff", "RePaint", "REDDiff", "DiffPIR", "DAPS", "DFlow"]

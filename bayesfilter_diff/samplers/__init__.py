"""Posterior samplers: one module per method, one interface (``sample``)."""

from .base import Move, Requirements, Sampler, SMCSampler
from .daps import DAPS
from .dcps import DCPS
from .ddim import DDIM
from .ddnm import DDNM, DDNMPlus
from .ddrm import DDRM
from .ddsmc import DDSMC
from .dflow import DFlow
from .diffpir import DiffPIR
from .dps import DPS
from .filtering import FilteringSMC
from .fps import FPS, FPSSMC
from .mcgdiff import MCGdiff
from .mgps import MGPS
from .pigdm import PiGDM
from .pigdm_flow import OTODE, PiGDMFlow
from .pnpdm import PnPDM
from .reddiff import REDDiff
from .registry import REGISTRY, SamplerEntry
from .repaint import RePaint
from .smcdiff import SMCDiff
from .tds import TDS

__all__ = [
    "Sampler",
    "SMCSampler",
    "Move",
    "Requirements",
    "REGISTRY",
    "SamplerEntry",
    "DDIM",
    "DDSMC",
    "FPS",
    "FPSSMC",
    "FilteringSMC",
    "MCGdiff",
    "MGPS",
    "SMCDiff",
    "RePaint",
    "REDDiff",
    "DiffPIR",
    "DAPS",
    "DCPS",
    "DFlow",
    "TDS",
    "DPS",
    "PiGDM",
    "PiGDMFlow",
    "OTODE",
    "PnPDM",
    "DDRM",
    "DDNM",
    "DDNMPlus",
]

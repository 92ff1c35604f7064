"""Pyro effect handlers and site helpers for reading a model.

- :class:`PriorPlaceholder` puts zeros at every latent
  :class:`~bayesfilter_diff.DiffusionPrior` site, so a model can be traced without running
  the reverse diffusion;
- :class:`Substitute` sets the value of one latent site (the particles, when the model is
  replayed to evaluate its likelihood);
- :func:`unwrap`, :func:`is_plate_site`, :func:`is_unit_scale`: what a trace's site holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributions as tdist
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor

from ..distributions import DiffusionPrior

__all__ = [
    "PriorPlaceholder",
    "Substitute",
    "unwrap",
    "is_masked",
    "wrapped_masks",
    "is_plate_site",
    "is_unit_scale",
    "seeded_global_rng",
]


class PriorPlaceholder(Messenger):
    """Substitute zeros (or ``fill``) for every latent DiffusionPrior site (no reverse
    diffusion)."""

    def __init__(self, fill: float = 0.0) -> None:
        super().__init__()
        self.fill = float(fill)

    def _pyro_sample(self, msg) -> None:
        if msg["done"] or msg["is_observed"] or msg["value"] is not None:
            return
        if isinstance(unwrap(msg["fn"]), DiffusionPrior):
            fn = msg["fn"]
            prior = unwrap(fn)
            sample_shape = torch.Size(msg["kwargs"].get("sample_shape", ()))
            msg["value"] = torch.full(
                fn.shape(sample_shape), self.fill, dtype=prior.dtype, device=prior.device
            )
            msg["done"] = True


class Substitute(Messenger):
    """Set the value of the named latent site (like ``replay``, without marking it observed)."""

    def __init__(self, name: str, value: Tensor) -> None:
        super().__init__()
        self.name = name
        self.value = value

    def _pyro_sample(self, msg) -> None:
        if msg["name"] == self.name and not msg["is_observed"]:
            msg["value"] = self.value
            msg["done"] = True


def unwrap(fn: Any) -> Any:
    """Strip ``Independent`` / ``MaskedDistribution`` wrappers."""
    while isinstance(fn, tdist.Independent | MaskedDistribution):
        fn = fn.base_dist
    return fn


def wrapped_masks(fn: Any) -> list[Any]:
    """The masks of the ``.mask(m)`` wrappers around a law, outermost first."""
    out = []
    while isinstance(fn, tdist.Independent | MaskedDistribution):
        if isinstance(fn, MaskedDistribution):
            out.append(fn._mask)
        fn = fn.base_dist
    return out


def is_masked(fn: Any) -> bool:
    """Whether a site's distribution carries a mask (``.mask(m)``) anywhere in its wrappers."""
    return bool(wrapped_masks(fn))


def is_plate_site(site: dict) -> bool:
    """Whether a trace's ``"sample"`` site is a ``pyro.plate``'s subsample site."""
    return isinstance(site["fn"], _Subsample)


def is_unit_scale(scale) -> bool:
    """Whether a site's ``scale`` is 1 (no ``poutine.scale``)."""
    return (isinstance(scale, int | float) and scale == 1) or (
        isinstance(scale, Tensor) and scale.numel() == 1 and float(scale) == 1
    )


@contextmanager
def seeded_global_rng(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Run code that draws from torch's global generators (Pyro's ``sample()``) on a fork
    of them seeded from ``generator`` (from the global one when ``None``; on the
    generator's own device): the global states are restored afterwards. Only the CPU's
    and, for a CUDA ``device``, that device's generator are seeded and restored."""
    dev = generator.device if generator is not None else None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=dev))
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield

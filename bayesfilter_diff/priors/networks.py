"""Small denoising networks, and the learned priors built from them.

Two networks, both called as ``net(x, t)`` with ``x`` of shape ``(M, *event_shape)`` and
``t`` of shape ``(M,)`` in ``[0, 1]`` (the :class:`~bayesfilter_diff.DiffusionModel`
contract), returning the prediction named by ``parameterization``:

- ``"eps"``: the noise ``eps`` (DDPM, Ho et al. 2020);
- ``"x0"``: the clean signal ``E[x0 | x_t]``;
- ``"v"``: ``v = alpha eps - sigma x0`` (Salimans & Ho 2022);
- ``"velocity"``: the flow-matching velocity ``u = dalpha x0 + dsigma eps``
  (Lipman et al. 2023; ``u = eps - x0`` on :class:`~bayesfilter_diff.FlowSchedule`).

:class:`UNet` is a small DDPM-style U-Net for images ``(C, H, W)``: a 3x3 input
convolution, one level per entry of ``channels`` (``num_res_blocks`` residual blocks each,
a stride-2 convolution between levels), two middle blocks, the mirrored decoder with skip
connections, GroupNorm + SiLU everywhere and a sinusoidal time embedding (of ``1000 t``,
through a two-layer MLP) added inside every residual block. With one input channel,
``channels=(32, 32)`` (two resolutions; the shipped 8x8 digits priors) has 267 k
parameters, the default ``(32, 64)`` 634 k.
:class:`MLP` is a residual MLP for vectors ``(d,)`` with the same time embedding.

The output convolution / layer is zero-initialised, so an untrained network predicts 0.
Inputs of another floating dtype (e.g. the float64 of the exact-posterior tests) are cast
to the weights' dtype and the output cast back.

Checkpoints
-----------
:func:`load_prior` rebuilds a learned prior from its files (``NAME.json`` +
``NAME.safetensors``, the format and its checks are in
:mod:`~bayesfilter_diff.priors.checkpoint_io`): the network with
:func:`network_from_config`, wrapped in a :class:`~bayesfilter_diff.DiffusionModel` with the
adapter of its parameterisation (:func:`prior_from_network`). :func:`load_pretrained` loads
the priors shipped in ``bayesfilter_diff/priors/checkpoints`` by name
(``"digits_diffusion"``, ``"digits_flow"``, ``"moons_diffusion"``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..schedules import Schedule
from .base import DiffusionModel

# The checkpoint names were defined here before checkpoint_io; they stay importable from here.
from .checkpoint_io import (
    PRETRAINED_DIR,
    PRIOR_FORMAT,
    CheckpointError,
    file_sha256,
    load_state_checked,
    pretrained_names,
    read_checked_tensors,
    read_prior_json,
    save_prior,
    schedule_from_config,
    schedule_to_config,
)

__all__ = [
    "PARAMETERIZATIONS",
    "UNet",
    "MLP",
    "timestep_embedding",
    "network_from_config",
    "prior_from_network",
    "load_prior",
    "load_pretrained",
    # from checkpoint_io
    "schedule_to_config",
    "schedule_from_config",
    "save_prior",
    "pretrained_names",
    "file_sha256",
    "CheckpointError",
    "PRIOR_FORMAT",
]

#: What a network may predict.
PARAMETERIZATIONS = ("eps", "x0", "v", "velocity")


# ----------------------------------------------------------------------------- pieces
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``(M, dim)`` of ``1000 t`` (DDPM's steps) for ``t`` of shape ``(M,)``.

    Frequencies ``max_period^(-k / (dim/2))``, ``k = 0 .. dim/2 - 1``: ``[cos, sin]``.
    """
    half = dim // 2
    k = torch.arange(half, dtype=t.dtype, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = (1000.0 * t)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _groups(channels: int, groups: int) -> int:
    """Largest divisor of ``channels`` not above ``groups``."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


class _TimeEmbed(nn.Module):
    def __init__(self, base: int, dim: int) -> None:
        super().__init__()
        self.base = base
        self.mlp = nn.Sequential(nn.Linear(base, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.base))


class _ResBlock(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-conv (zero-init), 1x1 skip if needed."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        assert self.conv2.bias is not None
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _check_call(x: Tensor, t: Tensor, event_dim: int, name: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(t, Tensor):
        raise TypeError(f"{name} takes tensors x and t")
    if x.dim() != event_dim + 1:
        raise ValueError(f"{name}: x must have shape (M, *event_shape), got {tuple(x.shape)}")
    if t.shape != x.shape[:1]:
        raise ValueError(f"{name}: t must have shape ({x.shape[0]},), got {tuple(t.shape)}")


def _check_param(parameterization: str) -> str:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}"
        )
    return parameterization


# ----------------------------------------------------------------------------- networks
class UNet(nn.Module):
    """A small U-Net ``(x, t) -> prediction`` for images ``(C, H, W)``.

    Parameters
    ----------
    in_channels
        Image channels ``C`` (the output has as many).
    channels
        Feature channels per resolution; ``len(channels)`` resolutions (``(32, 64)``: two,
        e.g. 8x8 and 4x4). ``H`` and ``W`` are arbitrary (odd sizes are upsampled back to
        the skip connection's size).
    num_res_blocks
        Residual blocks per resolution in the encoder (the decoder has one more).
    groups
        GroupNorm groups (reduced to a divisor of each channel count).
    emb_dim
        Width of the time embedding (default ``4 * channels[0]``).
    parameterization
        ``"eps"``, ``"x0"``, ``"v"`` or ``"velocity"``: what the network predicts.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        num_res_blocks: int = 1,
        groups: int = 8,
        emb_dim: int | None = None,
        parameterization: str = "eps",
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}")
        if not isinstance(num_res_blocks, int) or num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be a positive int, got {num_res_blocks!r}")
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        emb_dim = int(emb_dim) if emb_dim is not None else 4 * channels[0]
        if emb_dim < 2:
            raise ValueError(f"emb_dim must be at least 2, got {emb_dim}")
        self.parameterization = _check_param(parameterization)
        self._config: dict[str, Any] = {
            "type": "unet",
            "in_channels": in_channels,
            "channels": list(channels),
            "num_res_blocks": num_res_blocks,
            "groups": groups,
            "emb_dim": emb_dim,
            "parameterization": parameterization,
        }
        self.time_embed = _TimeEmbed(channels[0], emb_dim)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        # Encoder: record the channel count of every skip connection.
        self.down = nn.ModuleList()
        skips = [channels[0]]
        ch = channels[0]
        for level, cout in enumerate(channels):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(_ResBlock(ch, cout, emb_dim, groups))
                ch = cout
                skips.append(ch)
            down = None
            if level < len(channels) - 1:
                down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
                skips.append(ch)
            self.down.append(nn.ModuleDict({"blocks": blocks, "down": down or nn.Identity()}))
        self.mid = nn.ModuleList(
            [_ResBlock(ch, ch, emb_dim, groups), _ResBlock(ch, ch, emb_dim, groups)]
        )
        # Decoder: num_res_blocks + 1 blocks per level, each eats one skip connection.
        self.up = nn.ModuleList()
        for level in reversed(range(len(channels))):
            cout = channels[level]
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(_ResBlock(ch + skips.pop(), cout, emb_dim, groups))
                ch = cout
            up = nn.Conv2d(ch, ch, 3, padding=1) if level > 0 else nn.Identity()
            self.up.append(nn.ModuleDict({"blocks": blocks, "up": up}))
        self.norm_out = nn.GroupNorm(_groups(ch, groups), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        assert self.conv_out.bias is not None
        nn.init.zeros_(self.conv_out.bias)
        self._num_levels = len(channels)

    @property
    def config(self) -> dict[str, Any]:
        """The JSON-serialisable arguments that rebuild this network."""
        return dict(self._config, channels=list(self._config["channels"]))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        _check_call(x, t, 3, "UNet")
        if x.shape[1] != self._config["in_channels"]:
            raise ValueError(
                f"UNet: expected {self._config['in_channels']} channels, got shape {tuple(x.shape)}"
            )
        dtype = self.conv_in.weight.dtype
        h = self.conv_in(x.to(dtype))
        emb = self.time_embed(t.to(dtype))
        hs = [h]
        for level, stage in enumerate(cast("Iterable[nn.ModuleDict]", self.down)):
            for block in cast("nn.ModuleList", stage["blocks"]):
                h = block(h, emb)
                hs.append(h)
            if level < self._num_levels - 1:
                h = stage["down"](h)
                hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for i, stage in enumerate(cast("Iterable[nn.ModuleDict]", self.up)):
            for block in cast("nn.ModuleList", stage["blocks"]):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if i < self._num_levels - 1:
                h = F.interpolate(h, size=hs[-1].shape[-2:], mode="nearest")
                h = stage["up"](h)
        return self.conv_out(F.silu(self.norm_out(h))).to(x.dtype)


class MLP(nn.Module):
    """A residual MLP ``(x, t) -> prediction`` for vectors ``(d,)``.

    ``h = W_in x``; ``depth`` blocks ``h <- h + W_2 SiLU(W_1 LayerNorm(h) + E_l(emb))``;
    output ``W_out SiLU(LayerNorm(h))`` (zero-initialised).

    Parameters
    ----------
    dim
        Dimension ``d`` of the vectors.
    hidden
        Hidden width.
    depth
        Number of residual blocks.
    emb_dim
        Width of the time embedding (default ``hidden``).
    parameterization
        ``"eps"``, ``"x0"``, ``"v"`` or ``"velocity"``.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        depth: int = 3,
        emb_dim: int | None = None,
        parameterization: str = "eps",
    ) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        emb_dim = int(emb_dim) if emb_dim is not None else hidden
        if emb_dim < 2:
            raise ValueError(f"emb_dim must be at least 2, got {emb_dim}")
        self.parameterization = _check_param(parameterization)
        self._config: dict[str, Any] = {
            "type": "mlp",
            "dim": dim,
            "hidden": hidden,
            "depth": depth,
            "emb_dim": emb_dim,
            "parameterization": parameterization,
        }
        self.time_embed = _TimeEmbed(min(emb_dim, 64), emb_dim)
        self.inp = nn.Linear(dim, hidden)
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(depth)])
        self.lin1 = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth)])
        self.embs = nn.ModuleList([nn.Linear(emb_dim, hidden) for _ in range(depth)])
        self.lin2 = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def config(self) -> dict[str, Any]:
        """The JSON-serialisable arguments that rebuild this network."""
        return dict(self._config)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        _check_call(x, t, 1, "MLP")
        if x.shape[1] != self._config["dim"]:
            raise ValueError(
                f"MLP: expected vectors of size {self._config['dim']}, got {tuple(x.shape)}"
            )
        dtype = self.inp.weight.dtype
        emb = F.silu(self.time_embed(t.to(dtype)))
        h = self.inp(x.to(dtype))
        for norm, l1, e, l2 in zip(self.norms, self.lin1, self.embs, self.lin2):
            h = h + l2(F.silu(l1(norm(h)) + e(emb)))
        return self.out(F.silu(self.norm_out(h))).to(x.dtype)


_NETWORKS: dict[str, type[UNet] | type[MLP]] = {"unet": UNet, "mlp": MLP}
_ARGS = {
    "unet": {"in_channels", "channels", "num_res_blocks", "groups", "emb_dim", "parameterization"},
    "mlp": {"dim", "hidden", "depth", "emb_dim", "parameterization"},
}


def network_from_config(config: Mapping[str, Any]) -> UNet | MLP:
    """Build a :class:`UNet` or :class:`MLP` from its ``config`` dict (e.g. read from JSON).

    ``config`` is ``{"type": "unet" | "mlp", **arguments}`` as returned by ``net.config``;
    a full prior / checkpoint JSON (with a ``"network"`` entry) is accepted too. Unknown
    types or arguments raise :class:`CheckpointError` (a ``ValueError``): nothing but these
    two classes can be built.
    """
    if not isinstance(config, Mapping):
        raise CheckpointError(f"network config must be a dict, got {type(config).__name__}")
    if "network" in config and isinstance(config["network"], Mapping):
        config = config["network"]
    kind = config.get("type")
    if kind not in _NETWORKS:
        raise CheckpointError(f"network type must be one of {sorted(_NETWORKS)}, got {kind!r}")
    kwargs = {k: v for k, v in config.items() if k != "type"}
    unknown = set(kwargs) - _ARGS[kind]
    if unknown:
        raise CheckpointError(f"unknown {kind} arguments {sorted(unknown)} in the network config")
    try:
        return _NETWORKS[kind](**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid {kind} network config {dict(config)}: {e}") from None


# ----------------------------------------------------------------------------- priors
def prior_from_network(
    net: nn.Module, schedule: Schedule, event_shape: Sequence[int], **kw: Any
) -> DiffusionModel:
    """Wrap ``net`` in a ``DiffusionModel`` with the adapter of its parameterisation."""
    p = _check_param(getattr(net, "parameterization", "x0"))
    if p == "x0":
        return DiffusionModel(net, schedule, event_shape, **kw)
    if p == "eps":
        return DiffusionModel.from_eps(net, schedule, event_shape, **kw)
    if p == "v":
        return DiffusionModel.from_v(net, schedule, event_shape, **kw)
    return DiffusionModel.from_velocity(net, schedule, event_shape, **kw)


def load_prior(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
) -> DiffusionModel:
    """Load a learned prior (``.json`` + ``.safetensors``) as a ``DiffusionModel``.

    Parameters
    ----------
    path
        The JSON file, the weights file, their common stem, or a training output folder
        (its ``prior.json``: the EMA weights of the last checkpoint).
    device
        Where to put the network (default CPU).
    chunk_size
        Passed to :class:`~bayesfilter_diff.DiffusionModel` (largest network batch).

    Returns
    -------
    DiffusionModel
        In ``eval`` mode, parameters with ``requires_grad=False`` (gradients with respect
        to ``x_t`` still flow). The JSON is kept as ``model.checkpoint_info``.

    Raises
    ------
    CheckpointError
        (a ``ValueError``) for a wrong checksum, tensor names / shapes that do not match the
        network described in the JSON, an unknown format, network type or schedule.
    """
    js, meta = read_prior_json(path)
    event_shape = meta["event_shape"]
    # JSON content (possibly missing): the *_from_config functions validate it
    net_config: Any = meta.get("network")
    schedule_config: Any = meta.get("schedule")
    net = network_from_config(net_config)
    _check_event_shape(net, event_shape, js)
    schedule = schedule_from_config(schedule_config)
    tensors = read_checked_tensors(js, meta)
    load_state_checked(net, tensors, str(js.parent / meta["weights"]))
    net.eval().requires_grad_(False)
    if device is not None:
        net.to(device)
    prior = prior_from_network(net, schedule, event_shape, chunk_size=chunk_size)
    prior.checkpoint_info = meta
    return prior


def _check_event_shape(net: UNet | MLP, event_shape: list[int], src: Any) -> None:
    cfg = net.config
    if cfg["type"] == "unet" and (len(event_shape) != 3 or event_shape[0] != cfg["in_channels"]):
        raise CheckpointError(
            f"{src}: event_shape {event_shape} does not fit a UNet with "
            f"{cfg['in_channels']} channels"
        )
    if cfg["type"] == "mlp" and event_shape != [cfg["dim"]]:
        raise CheckpointError(
            f"{src}: event_shape {event_shape} does not fit an MLP of dim {cfg['dim']}"
        )


def load_pretrained(
    name: str, *, device: torch.device | str | None = None, chunk_size: int | None = None
) -> DiffusionModel:
    """Load a prior shipped with the package, e.g. ``load_pretrained("digits_diffusion")``.

    Shipped: ``"digits_diffusion"`` (VP-linear, eps-prediction U-Net) and ``"digits_flow"``
    (rectified flow, velocity U-Net), both trained on scikit-learn's 8x8 digits scaled to
    ``[-1, 1]`` (event shape ``(1, 8, 8)``), and ``"moons_diffusion"`` (VP-linear,
    eps-prediction MLP on the 2-D two-moons data, event shape ``(2,)``: a learned prior
    small enough for exact references by quadrature or NUTS); see each JSON's
    ``training`` entry for the command that made it.
    """
    names = pretrained_names()
    if name not in names:
        raise ValueError(f"unknown pretrained prior {name!r}; available: {names}")
    return load_prior(PRETRAINED_DIR / f"{name}.json", device=device, chunk_size=chunk_size)

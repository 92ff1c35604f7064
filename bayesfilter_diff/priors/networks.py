"""Small denoising networks and the safe checkpoint format of the learned priors.

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
A learned prior is two files side by side: ``NAME.safetensors`` (the weights, read with
:func:`safetensors.torch.load_file`, which never unpickles code) and ``NAME.json``::

    {"format": "bayesfilter_diff.prior/1", "weights": "NAME.safetensors",
     "sha256": "<hex digest of the weights file>", "network": {"type": "unet", ...},
     "schedule": {"kind": "vp", "name": "linear", ...}, "event_shape": [1, 8, 8],
     "data": {...}, "training": {...}, "step": 12000}

:func:`load_prior` rebuilds the network with :func:`network_from_config`, refuses a
weights file whose SHA-256 differs from the recorded one, whose tensor names or shapes
differ from the network's, or whose name escapes the JSON file's folder, and wraps the
network in a :class:`~bayesfilter_diff.DiffusionModel` with the adapter of its
parameterisation. :func:`load_pretrained` loads the priors shipped in
``bayesfilter_diff/priors/checkpoints`` by name (``"digits_diffusion"``, ``"digits_flow"``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..schedules import FlowSchedule, Schedule, VESchedule, VPSchedule
from .base import DiffusionModel

__all__ = [
    "PARAMETERIZATIONS",
    "UNet",
    "MLP",
    "timestep_embedding",
    "network_from_config",
    "schedule_to_config",
    "schedule_from_config",
    "prior_from_network",
    "save_prior",
    "load_prior",
    "load_pretrained",
    "pretrained_names",
    "file_sha256",
    "CheckpointError",
    "PRIOR_FORMAT",
]

#: What a network may predict.
PARAMETERIZATIONS = ("eps", "x0", "v", "velocity")
#: Format tag of a prior's JSON file.
PRIOR_FORMAT = "bayesfilter_diff.prior/1"
_CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint is malformed, tampered with or does not match its network."""


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
        self._config = {
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
        for level, stage in enumerate(self.down):
            for block in stage["blocks"]:
                h = block(h, emb)
                hs.append(h)
            if level < self._num_levels - 1:
                h = stage["down"](h)
                hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for i, stage in enumerate(self.up):
            for block in stage["blocks"]:
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
        self._config = {
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


_NETWORKS: dict[str, type[nn.Module]] = {"unet": UNet, "mlp": MLP}
_ARGS = {
    "unet": {"in_channels", "channels", "num_res_blocks", "groups", "emb_dim", "parameterization"},
    "mlp": {"dim", "hidden", "depth", "emb_dim", "parameterization"},
}


def network_from_config(config: Mapping[str, Any]) -> nn.Module:
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


# ----------------------------------------------------------------------------- schedules
def schedule_to_config(schedule: Schedule) -> dict[str, Any]:
    """JSON-serialisable description of a schedule (inverse of :func:`schedule_from_config`)."""
    if isinstance(schedule, VPSchedule):
        if schedule.name == "linear":
            return {
                "kind": "vp",
                "name": "linear",
                "beta_min": schedule.beta_min,
                "beta_max": schedule.beta_max,
            }
        return {"kind": "vp", "name": "cosine", "s": schedule.cosine_s}
    if isinstance(schedule, VESchedule):
        return {"kind": "ve", "sigma_min": schedule.sigma_min, "sigma_max": schedule.sigma_max}
    if isinstance(schedule, FlowSchedule):
        return {"kind": "flow"}
    raise TypeError(f"cannot serialise a schedule of type {type(schedule).__name__}")


def schedule_from_config(config: Mapping[str, Any]) -> Schedule:
    """Rebuild a :class:`~bayesfilter_diff.Schedule` from :func:`schedule_to_config`'s dict."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"schedule config must be a dict, got {type(config).__name__}")
    try:
        kind = config.get("kind")
        if kind == "vp" and config.get("name") == "linear":
            return VPSchedule.linear(float(config["beta_min"]), float(config["beta_max"]))
        if kind == "vp" and config.get("name") == "cosine":
            return VPSchedule.cosine(float(config["s"]))
        if kind == "ve":
            return VESchedule(float(config["sigma_min"]), float(config["sigma_max"]))
        if kind == "flow":
            return FlowSchedule()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"invalid schedule config {dict(config)}: {e!r}") from None
    raise CheckpointError(f"unknown schedule config {dict(config)}")


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


# ----------------------------------------------------------------------------- files
def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_tensors(tensors: Mapping[str, Tensor], path: str | os.PathLike) -> str:
    """Write ``tensors`` to a safetensors file atomically; return its SHA-256."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return file_sha256(path)


def save_prior(
    net: nn.Module,
    schedule: Schedule,
    event_shape: Sequence[int],
    path: str | os.PathLike,
    **extra: Any,
) -> Path:
    """Save ``net``'s weights and config as ``path.safetensors`` + ``path.json``.

    ``path`` is the common stem (a ``.json`` / ``.safetensors`` suffix is dropped). ``extra``
    entries (``data``, ``training``, ``step``, ...) go into the JSON. Returns the JSON path.
    """
    stem = _stem(Path(path))
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_name(stem.name + ".safetensors")
    digest = save_tensors(net.state_dict(), weights)
    meta = {
        "format": PRIOR_FORMAT,
        "weights": weights.name,
        "sha256": digest,
        "network": net.config,
        "schedule": schedule_to_config(schedule),
        "event_shape": [int(s) for s in event_shape],
        "num_parameters": sum(p.numel() for p in net.parameters()),
        **extra,
    }
    js = stem.with_name(stem.name + ".json")
    _atomic_write_text(js, json.dumps(meta, indent=1) + "\n")
    return js


def _stem(path: Path) -> Path:
    if path.suffix in (".json", ".safetensors"):
        return path.with_suffix("")
    return path


def _resolve_json(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "prior.json"
    elif p.suffix != ".json":
        p = _stem(p).with_name(_stem(p).name + ".json")
    if not p.is_file():
        raise FileNotFoundError(f"no prior JSON at {p} (pass a folder with prior.json, or a .json)")
    return p


def read_checked_tensors(js_path: Path, meta: Mapping[str, Any]) -> dict[str, Tensor]:
    """Load the safetensors file named by ``meta["weights"]`` next to ``js_path``.

    Refuses a name that leaves the folder and a file whose SHA-256 differs from
    ``meta["sha256"]``. Only :func:`safetensors.torch.load_file` reads it (no pickle).
    """
    from safetensors.torch import load_file

    name = meta.get("weights")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise CheckpointError(
            f"{js_path}: 'weights' must be a file name in the same folder, got {name!r}"
        )
    weights = js_path.parent / name
    if not weights.is_file():
        raise CheckpointError(f"{js_path}: weights file {weights} is missing")
    expected = meta.get("sha256")
    if not isinstance(expected, str):
        raise CheckpointError(f"{js_path}: no 'sha256' checksum recorded for {name}")
    actual = file_sha256(weights)
    if actual != expected:
        raise CheckpointError(
            f"checksum mismatch for {weights}: the JSON records sha256 {expected}, the file has "
            f"{actual}; the checkpoint was modified or is incomplete, refusing to load it"
        )
    try:
        return load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {weights} as safetensors: {e}") from None


def load_state_checked(net: nn.Module, tensors: Mapping[str, Tensor], source: str) -> None:
    """``net.load_state_dict(tensors)`` after checking names, shapes and dtypes; clear errors."""
    own = net.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the network: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in own.items():
        w = tensors[k]
        if tuple(w.shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(w.shape)}, the network expects "
                f"{tuple(v.shape)}"
            )
        if not w.dtype.is_floating_point:
            raise CheckpointError(f"{source}: tensor {k!r} has non-float dtype {w.dtype}")
        if not torch.isfinite(w).all():
            raise CheckpointError(f"{source}: tensor {k!r} has non-finite values")
    net.load_state_dict({k: tensors[k].to(own[k].dtype) for k in own})


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
    js = _resolve_json(path)
    try:
        meta = json.loads(js.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{js} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != PRIOR_FORMAT:
        raise CheckpointError(f"{js}: not a prior file (format must be {PRIOR_FORMAT!r})")
    event_shape = meta.get("event_shape")
    if not isinstance(event_shape, list) or not all(
        isinstance(s, int) and s > 0 for s in event_shape
    ):
        raise CheckpointError(
            f"{js}: event_shape must be a list of positive ints, got {event_shape!r}"
        )
    net = network_from_config(meta.get("network"))
    _check_event_shape(net, event_shape, js)
    schedule = schedule_from_config(meta.get("schedule"))
    tensors = read_checked_tensors(js, meta)
    load_state_checked(net, tensors, str(js.parent / meta["weights"]))
    net.eval().requires_grad_(False)
    if device is not None:
        net.to(device)
    prior = prior_from_network(net, schedule, event_shape, chunk_size=chunk_size)
    prior.checkpoint_info = meta
    return prior


def _check_event_shape(net: nn.Module, event_shape: list[int], src: Any) -> None:
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


def pretrained_names() -> list[str]:
    """Names of the priors shipped with the package (``bayesfilter_diff/priors/checkpoints``)."""
    return sorted(p.stem for p in _CHECKPOINT_DIR.glob("*.json"))


def load_pretrained(
    name: str, *, device: torch.device | str | None = None, chunk_size: int | None = None
) -> DiffusionModel:
    """Load a prior shipped with the package, e.g. ``load_pretrained("digits_diffusion")``.

    Shipped: ``"digits_diffusion"`` (VP-linear, eps-prediction U-Net) and ``"digits_flow"``
    (rectified flow, velocity U-Net), both trained on scikit-learn's 8x8 digits scaled to
    ``[-1, 1]`` (event shape ``(1, 8, 8)``); see each JSON's ``training`` entry for the
    command that made it.
    """
    names = pretrained_names()
    if name not in names:
        raise ValueError(f"unknown pretrained prior {name!r}; available: {names}")
    return load_prior(_CHECKPOINT_DIR / f"{name}.json", device=device, chunk_size=chunk_size)

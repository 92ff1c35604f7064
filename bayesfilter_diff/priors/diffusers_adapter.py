"""Load a ``diffusers`` ``UNet2DModel`` and its scheduler as a :class:`DiffusionModel`.

``diffusers`` (Hugging Face) is an optional dependency: ``pip install "bayesfilter-diff[diffusers]"``.
Nothing is downloaded: the model and the scheduler config are read from a local folder with
``local_files_only=True`` (a folder written by ``save_pretrained``, or a downloaded
pipeline: ``model_index.json``, ``unet/``, ``scheduler/``).

Time mapping
------------
A DDPM with ``T`` training steps noises ``x0`` at step ``k = 0 .. T-1`` with
``abar_k = prod_{j <= k} (1 - beta_j)`` (the scheduler's ``alphas_cumprod``). Training step
``k`` sits at our time ``t = (k + 1) / T`` (``t = 0`` is clean data, where ``abar = 1``),
the convention of :meth:`~bayesfilter_diff.Schedule.time_grid` ``kind="ddpm"`` and of the
continuous limit :meth:`~bayesfilter_diff.VPSchedule.linear`. The network is therefore
called with the timestep ``t T - 1``: the integer training step on the training times and a
fractional one in between. Fractional timesteps are fine for ``UNet2DModel``'s default
``time_embedding_type="positional"`` (the sinusoidal embedding is computed in floating
point from the timestep tensor); ``"learned"`` (an embedding table) and ``"fourier"``
(score-SDE models that take a noise level, not a DDPM step) are refused.

Schedule
--------
``schedule="discrete"`` (default): :class:`~bayesfilter_diff.schedules.DiscreteVPSchedule`
from the scheduler's own ``alphas_cumprod`` (any ``beta_schedule`` diffusers supports,
``trained_betas``, ``rescale_betas_zero_snr``), exact at the training steps, ``log abar``
linear in between. ``schedule="continuous"``: the continuous-time limit,
``VPSchedule.linear(beta_min = beta_start T, beta_max = beta_end T)`` for
``beta_schedule="linear"`` and ``VPSchedule.cosine()`` for ``"squaredcos_cap_v2"``;
close to, but not equal to, the schedule the network was trained with.

Parameterisation
----------------
The scheduler's ``prediction_type``: ``"epsilon"`` (:meth:`DiffusionModel.from_eps`),
``"v_prediction"`` (``v = alpha eps - sigma x0``, :meth:`DiffusionModel.from_v`) or
``"sample"`` (the network predicts ``x0``). A network with twice the input channels
(``variance_type="learned"`` / ``"learned_range"``, as in improved DDPM) returns its first
half (the mean prediction); the learned variance is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..schedules import DiscreteVPSchedule, Schedule, VPSchedule
from .base import DiffusionModel

__all__ = ["from_diffusers", "DiffusersUNet", "schedule_from_diffusers"]

#: Scheduler classes whose training noise is DDPM's discrete ``alphas_cumprod``.
SUPPORTED_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "DPMSolverMultistepScheduler",
    "DDPMParallelScheduler",
    "DDIMParallelScheduler",
)
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _require_diffusers():
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            'from_diffusers needs the optional dependency diffusers: pip install "diffusers>=0.25" '
            '(or pip install "bayesfilter-diff[diffusers]")'
        ) from e
    return diffusers


class DiffusersUNet(nn.Module):
    """``net(x, t)`` on our contract around a ``diffusers`` ``UNet2DModel``.

    Calls ``unet(x, t * T - 1).sample`` (see the module docstring for the time mapping),
    casts ``x`` to the network's dtype and the output back, and keeps the first
    ``in_channels`` output channels (a learned-variance network outputs twice as many).
    """

    #: a diffusers ModelMixin (``config``, ``dtype``, outputs with ``.sample``): untyped here
    unet: Any

    def __init__(self, unet: nn.Module, num_train_steps: int) -> None:
        super().__init__()
        self.unet = unet
        self.num_train_steps = int(num_train_steps)
        self.in_channels = int(self.unet.config.in_channels)

    def timestep(self, t: Tensor) -> Tensor:
        """The network's (fractional) timestep ``t T - 1`` for our time ``t``."""
        return t * self.num_train_steps - 1.0

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        dtype = self.unet.dtype
        steps = self.timestep(t.to(torch.float32 if dtype != torch.float64 else dtype))
        out = self.unet(x.to(dtype), steps).sample
        return out[:, : self.in_channels].to(x.dtype)


def _find_scheduler_config(folder: Path, subfolder: str | None) -> Path:
    cands = [folder / "scheduler" / "scheduler_config.json"]
    if subfolder:
        cands.append(folder / subfolder / "scheduler_config.json")
    cands.append(folder / "scheduler_config.json")
    for c in cands:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"no scheduler config in {folder}: looked for "
        + ", ".join(str(c.relative_to(folder)) for c in cands)
    )


def _unet_subfolder(folder: Path, subfolder: str | None) -> str | None:
    if subfolder is not None:
        return subfolder
    if (folder / "unet" / "config.json").is_file():
        return "unet"
    if (folder / "config.json").is_file():
        return None
    raise FileNotFoundError(
        f"no UNet config in {folder} (looked for unet/config.json, config.json)"
    )


def schedule_from_diffusers(config: dict[str, Any], schedule: str = "discrete") -> Schedule:
    """Our schedule for a ``diffusers`` scheduler config (a dict as in ``scheduler_config.json``).

    ``schedule="discrete"``: :class:`DiscreteVPSchedule` of the scheduler's
    ``alphas_cumprod`` (computed by ``diffusers.DDPMScheduler`` from the config's
    ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``,
    ``trained_betas``, ``rescale_betas_zero_snr``). ``schedule="continuous"``: the
    continuous limit (``VPSchedule.linear(beta_start T, beta_end T)`` or
    ``VPSchedule.cosine()``).
    """
    cls_name = config.get("_class_name", "DDPMScheduler")
    if cls_name not in SUPPORTED_SCHEDULERS:
        raise ValueError(
            f"unsupported scheduler {cls_name!r}: need one trained with DDPM's discrete "
            f"alphas_cumprod ({', '.join(SUPPORTED_SCHEDULERS)})"
        )
    T = int(config.get("num_train_timesteps", 1000))
    beta_schedule = config.get("beta_schedule", "linear")
    if schedule == "continuous":
        if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
            raise ValueError(
                "schedule='continuous' needs a parametric beta_schedule (no trained_betas, "
                "no rescale_betas_zero_snr); use schedule='discrete'"
            )
        if beta_schedule == "linear":
            beta_start = float(config.get("beta_start", 1e-4))
            beta_end = float(config.get("beta_end", 0.02))
            return VPSchedule.linear(beta_min=beta_start * T, beta_max=beta_end * T)
        if beta_schedule == "squaredcos_cap_v2":
            return VPSchedule.cosine()
        raise ValueError(
            f"schedule='continuous' supports beta_schedule 'linear' and 'squaredcos_cap_v2', "
            f"got {beta_schedule!r}; use schedule='discrete'"
        )
    if schedule != "discrete":
        raise ValueError(f"schedule must be 'discrete' or 'continuous', got {schedule!r}")
    diffusers = _require_diffusers()
    keys = (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "rescale_betas_zero_snr",
    )
    kw = {k: config[k] for k in keys if k in config}
    try:
        sched = diffusers.DDPMScheduler(**kw)
    except (NotImplementedError, ValueError, TypeError) as e:
        raise ValueError(f"cannot build the noise schedule from {kw}: {e}") from None
    return DiscreteVPSchedule(sched.alphas_cumprod)


def from_diffusers(
    folder: str | os.PathLike,
    subfolder: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    schedule: str = "discrete",
    chunk_size: int | None = None,
) -> DiffusionModel:
    """Load a local ``diffusers`` ``UNet2DModel`` + scheduler config as a ``DiffusionModel``.

    Parameters
    ----------
    folder
        A pipeline folder (``unet/`` and ``scheduler/``) or a model folder
        (``config.json`` + weights, with ``scheduler_config.json`` beside it or in
        ``scheduler/``). Read with ``local_files_only=True``: never downloads.
    subfolder
        The UNet's subfolder (default: ``"unet"`` if present, else ``folder`` itself). The
        scheduler config is looked for in ``folder/scheduler``, ``folder/subfolder``, then
        ``folder``.
    device, dtype
        Where to put the network and in which floating dtype (default: as loaded, CPU).
        Inputs of another dtype are cast to the network's and the outputs cast back.
    schedule
        ``"discrete"`` (exact :class:`DiscreteVPSchedule`) or ``"continuous"`` (its
        continuous-time limit, see :func:`schedule_from_diffusers`).
    chunk_size
        Largest network batch (see :class:`DiffusionModel`).

    Returns
    -------
    DiffusionModel
        Event shape ``(in_channels, H, W)`` from the UNet's ``sample_size``; the network in
        ``eval`` mode with ``requires_grad=False`` (gradients with respect to ``x_t`` still
        flow). ``model.diffusers_info`` keeps the scheduler config and the UNet's class.
    """
    diffusers = _require_diffusers()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    sub = _unet_subfolder(folder, subfolder)
    sched_path = _find_scheduler_config(folder, sub)
    try:
        config = json.loads(sched_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{sched_path} is not valid JSON: {e}") from None
    pred = config.get("prediction_type", "epsilon")
    if pred not in _PREDICTIONS:
        raise ValueError(
            f"prediction_type must be one of {sorted(_PREDICTIONS)}, got {pred!r} ({sched_path})"
        )
    sch = schedule_from_diffusers(config, schedule)
    T = int(config.get("num_train_timesteps", 1000))

    unet = diffusers.UNet2DModel.from_pretrained(str(folder), subfolder=sub, local_files_only=True)
    cfg = unet.config
    if cfg.time_embedding_type != "positional":
        raise ValueError(
            f"time_embedding_type {cfg.time_embedding_type!r} is not supported: only the "
            "'positional' (sinusoidal) embedding takes DDPM's fractional timesteps"
        )
    if unet.class_embedding is not None:
        raise ValueError("class-conditional UNet2DModels (num_class_embeds) are not supported")
    out_ch, in_ch = int(cfg.out_channels), int(cfg.in_channels)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"UNet has {in_ch} input but {out_ch} output channels")
    if cfg.center_input_sample:
        raise ValueError("center_input_sample=True (inputs in [0, 1]) is not supported")
    size = cfg.sample_size
    if size is None:
        raise ValueError("the UNet config has no sample_size: cannot tell the event shape")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    unet.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        unet.to(device=device, dtype=dtype)
    net = DiffusersUNet(unet, T)
    kind = _PREDICTIONS[pred]
    event_shape = (in_ch, int(h), int(w))
    if kind == "eps":
        model = DiffusionModel.from_eps(net, sch, event_shape, chunk_size=chunk_size)
    elif kind == "v":
        model = DiffusionModel.from_v(net, sch, event_shape, chunk_size=chunk_size)
    else:
        model = DiffusionModel(net, sch, event_shape, chunk_size=chunk_size)
    model.diffusers_info = {
        "folder": str(folder),
        "unet_subfolder": sub,
        "unet_class": type(unet).__name__,
        "scheduler_config": config,
        "prediction_type": pred,
        "schedule": schedule,
    }
    return model

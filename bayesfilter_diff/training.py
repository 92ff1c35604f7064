"""Training small diffusion and flow priors on data available offline, resumably.

Objectives (``x_t = alpha(t) x0 + sigma(t) eps``, ``eps ~ N(0, I)``, ``t ~ U[t_min, 1]``,
``x0`` a minibatch of the data):

- **diffusion** (VP schedule, default ``VPSchedule.linear()``): denoising score matching
  (Vincent 2011; Ho et al. 2020, "simple" loss) ``E ||net(x_t, t) - target||^2`` with
  ``target = eps`` (eps-prediction, the default), ``x0`` (x0-prediction) or
  ``alpha eps - sigma x0`` (v-prediction);
- **flow** (:class:`~bayesfilter_diff.FlowSchedule`, ``alpha = 1 - t``, ``sigma = t``):
  conditional flow matching (Lipman et al. 2023; Liu et al. 2023) with the velocity target
  ``u = dalpha x0 + dsigma eps = eps - x0``.

Adam with a linear warm-up then a constant learning rate, gradient-norm clipping and an
exponential moving average (EMA) of the weights, whose decay ramps up as
``min(ema_decay, (1 + k) / (10 + k))`` at step ``k``; the EMA weights are the prior.

Data (:func:`load_dataset`): ``"digits"`` -- scikit-learn's ``load_digits`` (1797 8x8
images, values 0..16, scaled by ``x / 8 - 1`` to ``[-1, 1]``, event shape ``(1, 8, 8)``; a
fixed seed-0 permutation holds out 297 test images and trains on 1500); ``"moons"`` and
``"checkerboard"`` -- 2-D toy sets generated with torch from a fixed seed.

Checkpoints and resuming
------------------------
Every ``checkpoint_every`` steps (and at the end) the output folder receives

- ``checkpoint_<step>.safetensors``: model, EMA and Adam state tensors (``exp_avg``,
  ``exp_avg_sq``, ``step``) and the state of the training ``torch.Generator``;
- ``checkpoint.json`` (written last, atomically): its file name and SHA-256, the step, the
  training config, the optimiser's ``param_groups`` and the loss history;
- ``prior.safetensors`` + ``prior.json``: the EMA network as a prior for
  :func:`load_prior`.

Nothing is pickled (no ``torch.save``). ``train(..., resume=True)`` (``--resume``) restores
all of it and continues the step count; since minibatches, times and noises are drawn
from the restored generator, a run killed after a checkpoint and resumed produces the
same weights, bit for bit (on the same device and thread count), as an uninterrupted
run. Dropout is not used (it would draw from torch's global generator).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from .priors.checkpoint_io import (
    CheckpointError,
    atomic_write_text,
    config_sha256,
    load_state_checked,
    read_checked_tensors,
    read_prior_json,
    save_prior,
    save_tensors,
    schedule_from_config,
    schedule_to_config,
)
from .priors.networks import PARAMETERIZATIONS, load_prior, network_from_config
from .schedules import FlowSchedule, Schedule, VPSchedule

__all__ = [
    "TrainConfig",
    "train",
    "load_dataset",
    "load_prior",
    "export_prior",
    "training_loss",
    "DATASETS",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "bayesfilter_diff.training_checkpoint/1"
DATASETS = ("digits", "moons", "checkerboard")
_DIGITS_TEST = 297
#: Config fields that define the training run; a resume must not change them.
_IDENTITY_FIELDS = (
    "data",
    "kind",
    "parameterization",
    "network",
    "schedule",
    "batch_size",
    "lr",
    "warmup",
    "ema_decay",
    "t_min",
    "grad_clip",
    "seed",
)


# ----------------------------------------------------------------------------- data
def _moons(n: int, g: torch.Generator, noise: float = 0.05) -> Tensor:
    """Two interleaving half circles (as scikit-learn's ``make_moons``), centred and scaled."""
    u = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    upper = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
    x = torch.where(upper, torch.cos(u), 1.0 - torch.cos(u))
    y = torch.where(upper, torch.sin(u), 0.5 - torch.sin(u))
    pts = torch.stack([x, y], dim=-1) + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return (
        (pts - torch.tensor([0.5, 0.25], dtype=torch.float64))
        / torch.tensor([0.87, 0.5], dtype=torch.float64)
    ).float()


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    """Uniform on the 8 dark squares of a 4x4 checkerboard on ``[-2, 2]^2`` (FFJORD's toy)."""
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    x2 = (
        torch.rand(n, generator=g, dtype=torch.float64)
        - 2 * torch.randint(0, 2, (n,), generator=g).double()
    )
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=-1).float()


def load_dataset(name: str, split: str = "train") -> Tensor:
    """The training (``split="train"``) or held-out (``"test"``) data, float32 on CPU.

    ``"digits"``: ``(1500, 1, 8, 8)`` / ``(297, 1, 8, 8)`` in ``[-1, 1]``; ``"moons"``,
    ``"checkerboard"``: ``(8192, 2)`` / ``(2048, 2)`` drawn from seeds 0 / 1.
    """
    if name not in DATASETS:
        raise ValueError(f"data must be one of {DATASETS}, got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "digits":
        from sklearn.datasets import load_digits

        X = torch.as_tensor(load_digits().data, dtype=torch.float32)  # (1797, 64), 0..16
        X = (X / 8.0 - 1.0).reshape(-1, 1, 8, 8)
        perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
        idx = perm[:_DIGITS_TEST] if split == "test" else perm[_DIGITS_TEST:]
        return X[idx.sort().values].contiguous()
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = 8192 if split == "train" else 2048
    return _moons(n, g) if name == "moons" else _checkerboard(n, g)


def _data_info(name: str) -> dict[str, Any]:
    if name == "digits":
        return {
            "name": "digits",
            "source": "sklearn.datasets.load_digits (8x8, values 0..16)",
            "scaling": "x / 8 - 1 (values in [-1, 1])",
            "split": f"torch.randperm(1797, generator=manual_seed(0)): first {_DIGITS_TEST} "
            f"test, remaining {1797 - _DIGITS_TEST} train",
        }
    return {"name": name, "source": "bayesfilter_diff.training.load_dataset (torch, seed 0)"}


# ----------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (all JSON-serialisable).

    Parameters
    ----------
    data
        ``"digits"``, ``"moons"`` or ``"checkerboard"``.
    kind
        ``"diffusion"`` (VP schedule, denoising score matching) or ``"flow"`` (flow matching).
    steps
        Total number of optimiser steps (a resumed run continues up to it).
    parameterization
        What the network predicts; default ``"eps"`` for diffusion, ``"velocity"`` for flow.
    network
        Network config for :func:`~bayesfilter_diff.priors.networks.network_from_config`
        without ``parameterization``; default: a ``UNet(channels=(32, 32))`` for digits, an
        ``MLP(hidden=128, depth=3)`` for 2-D data.
    schedule
        Schedule config; default ``VPSchedule.linear()`` for diffusion, ``FlowSchedule()``
        for flow.
    batch_size, lr, warmup, ema_decay, grad_clip
        Minibatch size, Adam learning rate after ``warmup`` linear warm-up steps, EMA decay,
        gradient-norm clipping threshold.
    t_min
        Times are drawn from ``U[t_min, 1]``.
    checkpoint_every, log_every
        Steps between checkpoints / between entries of the loss history.
    seed
        Seed of the training generator (minibatches, times, noise) and of the initial weights.
    """

    data: str = "digits"
    kind: str = "diffusion"
    steps: int = 10000
    parameterization: str | None = None
    network: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    t_min: float = 1e-3
    checkpoint_every: int = 1000
    log_every: int = 100
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data not in DATASETS:
            raise ValueError(f"data must be one of {DATASETS}, got {self.data!r}")
        if self.kind not in ("diffusion", "flow"):
            raise ValueError(f"kind must be 'diffusion' or 'flow', got {self.kind!r}")
        if self.parameterization is None:
            self.parameterization = "eps" if self.kind == "diffusion" else "velocity"
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be one of {PARAMETERIZATIONS}, "
                f"got {self.parameterization!r}"
            )
        if self.kind == "diffusion" and self.parameterization == "velocity":
            raise ValueError("parameterization 'velocity' needs kind='flow'")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {self.warmup!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip!r}")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"t_min must be in [0, 1), got {self.t_min!r}")
        if self.network is None:
            if self.data == "digits":
                self.network = {
                    "type": "unet",
                    "in_channels": 1,
                    "channels": [32, 32],
                    "num_res_blocks": 1,
                    "groups": 8,
                }
            else:
                self.network = {"type": "mlp", "dim": 2, "hidden": 128, "depth": 3}
        self.network = {k: v for k, v in dict(self.network).items() if k != "parameterization"}
        if self.schedule is None:
            sched: Schedule = VPSchedule.linear() if self.kind == "diffusion" else FlowSchedule()
            self.schedule = schedule_to_config(sched)
        sched = schedule_from_config(self.schedule)
        if (self.kind == "flow") != isinstance(sched, FlowSchedule):
            raise ValueError(f"kind {self.kind!r} does not match the schedule {self.schedule}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def build_network(self) -> nn.Module:
        # network and schedule are dicts after __post_init__
        network = cast(dict[str, Any], self.network)
        return network_from_config({**network, "parameterization": self.parameterization})

    def build_schedule(self) -> Schedule:
        return schedule_from_config(cast(dict[str, Any], self.schedule))


# ----------------------------------------------------------------------------- the loss
def _pad(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(t.shape + (1,) * (x.dim() - 1))


def training_loss(net: nn.Module, schedule: Schedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Mean squared error of ``net(x_t, t)`` against its parameterisation's target.

    ``x_t = alpha(t) x0 + sigma(t) eps``; targets: ``eps``; ``x0``; ``v = alpha eps - sigma
    x0``; ``velocity = dalpha x0 + dsigma eps``. Averaged over batch and event dimensions.
    """
    tt = _pad(t, x0)
    a, s = schedule.alpha(tt), schedule.sigma(tt)
    x_t = a * x0 + s * eps
    p = net.parameterization
    if p == "eps":
        target = eps
    elif p == "x0":
        target = x0
    elif p == "v":
        target = a * eps - s * x0
    else:
        target = schedule.dalpha(tt) * x0 + schedule.dsigma(tt) * eps
    return (net(x_t, t) - target).square().mean()


def _draw(
    cfg: TrainConfig, data: Tensor, g: torch.Generator, n: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Minibatch ``x0``, times ``t ~ U[t_min, 1]`` and noise, all from ``g`` (on CPU)."""
    idx = torch.randint(data.shape[0], (n,), generator=g)
    t = cfg.t_min + (1.0 - cfg.t_min) * torch.rand(n, generator=g)
    eps = torch.randn((n,) + tuple(data.shape[1:]), generator=g)
    return idx, t, eps


@torch.no_grad()
def _eval_loss(cfg: TrainConfig, net: nn.Module, schedule: Schedule, data: Tensor, device) -> float:
    """Held-out loss of ``net``, fixed times and noises (seed 12345): comparable across steps."""
    g = torch.Generator().manual_seed(12345)
    n = min(4 * data.shape[0], 4096)
    tot = 0.0
    for start in range(0, n, 1024):
        m = min(1024, n - start)
        idx, t, eps = _draw(cfg, data, g, m)
        loss = training_loss(net, schedule, data[idx].to(device), t.to(device), eps.to(device))
        tot += float(loss) * m
    return tot / n


# ----------------------------------------------------------------------------- checkpoints
def _save_checkpoint(
    out: Path,
    cfg: TrainConfig,
    net: nn.Module,
    ema: nn.Module,
    opt: torch.optim.Optimizer,
    g: torch.Generator,
    step: int,
    history: dict[str, Any],
    event_shape: tuple[int, ...],
) -> None:
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    sd = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"optim.{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    tensors["rng"] = g.get_state()
    name = f"checkpoint_{step:08d}.safetensors"
    digest = save_tensors(tensors, out / name)
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in grp.items()}
        for grp in sd["param_groups"]
    ]
    meta = {
        "format": CHECKPOINT_FORMAT,
        "weights": name,
        "sha256": digest,
        "step": step,
        "config": cfg.to_dict(),
        "event_shape": list(event_shape),
        "optimizer": {"type": "Adam", "param_groups": groups, "scalars": scalars},
        "torch_version": torch.__version__,
        **history,
    }
    # The JSON is replaced last: a kill at any point leaves a consistent (old or new) pair.
    atomic_write_text(out / "checkpoint.json", json.dumps(meta, indent=1) + "\n")
    for old in out.glob("checkpoint_*.safetensors"):
        if old.name != name:
            old.unlink()
    save_prior(
        ema,
        cfg.build_schedule(),
        event_shape,
        out / "prior",
        step=step,
        data=_data_info(cfg.data),
        training={"config": cfg.to_dict(), **history},
    )


def _load_checkpoint(
    out: Path,
    cfg: TrainConfig,
    net: nn.Module,
    ema: nn.Module,
    opt: torch.optim.Optimizer,
    g: torch.Generator,
) -> tuple[int, dict[str, Any]]:
    js = out / "checkpoint.json"
    try:
        meta = json.loads(js.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{js} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{js}: not a training checkpoint (format {CHECKPOINT_FORMAT!r})")
    tensors = read_checked_tensors(js, meta)
    src = str(out / meta["weights"])
    load_state_checked(net, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, src)
    load_state_checked(ema, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, src)
    params = list(net.parameters())
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pidx, key = k.split(".", 2)
            state.setdefault(int(pidx), {})[key] = v
    for idx, sc in meta["optimizer"].get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    for idx, st in state.items():
        if not 0 <= idx < len(params):
            raise CheckpointError(f"{src}: optimiser state for unknown parameter {idx}")
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st and tuple(st[key].shape) != tuple(params[idx].shape):
                raise CheckpointError(
                    f"{src}: optimiser {key} of parameter {idx} has shape {tuple(st[key].shape)}, "
                    f"expected {tuple(params[idx].shape)}"
                )
    groups = [
        {k: (tuple(v) if k == "betas" else v) for k, v in grp.items()}
        for grp in meta["optimizer"]["param_groups"]
    ]
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
        g.set_state(tensors["rng"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{src}: cannot restore the optimiser / generator state: {e}"
        ) from None
    history = {
        k: meta[k]
        for k in ("loss_history", "eval_history", "loss_window", "wall_time_s")
        if k in meta
    }
    return int(meta["step"]), history


def _stored_config(out: Path) -> dict[str, Any]:
    return json.loads((out / "checkpoint.json").read_text())["config"]


# ----------------------------------------------------------------------------- train
def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train a prior; checkpoints go to ``out`` (see the module docstring).

    Parameters
    ----------
    config
        The run's hyper-parameters.
    out
        Output folder (created).
    resume
        Continue from ``out/checkpoint.json`` when it exists (its stored config is used;
        only ``steps``, ``checkpoint_every`` and ``log_every`` may differ). Without it, an
        existing checkpoint in ``out`` is an error.
    device
        Torch device of the network; all randomness is drawn on CPU from one generator.
    progress
        Show a tqdm progress bar.
    callback
        ``callback(step, loss)`` after every step (``step`` counts completed steps).

    Returns
    -------
    dict
        ``step``, ``loss_history`` (``[step, mean training loss]``), ``eval_history``
        (``[step, held-out loss of the EMA weights]``), ``wall_time_s``, ``out``, ``prior``
        (the path of ``prior.json``).
    """
    out = Path(out)
    ck = out / "checkpoint.json"
    if ck.exists() and not resume:
        raise ValueError(
            f"{out} already holds a checkpoint (step {json.loads(ck.read_text()).get('step')}); "
            "pass resume=True (--resume) to continue it or choose another output folder"
        )
    if resume and ck.exists():
        stored = _stored_config(out)
        mine = config.to_dict()
        for name in _IDENTITY_FIELDS:
            if stored.get(name) != mine.get(name):
                raise ValueError(
                    f"cannot resume {out}: {name} is {mine.get(name)!r} here but "
                    f"{stored.get(name)!r} in the checkpoint"
                )
        extra = dict(stored.get("extra") or {})
        if config.extra.get("command"):
            # keep the original command and append each resuming one
            done = json.loads(ck.read_text())["step"]
            extra["resumed"] = list(extra.get("resumed", [])) + [
                {"at_step": done, "command": config.extra["command"]}
            ]
        config = TrainConfig(
            **{
                **stored,
                "steps": config.steps,
                "checkpoint_every": config.checkpoint_every,
                "log_every": config.log_every,
                "extra": extra,
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    cfg = config
    device = torch.device(device)

    data = load_dataset(cfg.data, "train").to(device)
    test = load_dataset(cfg.data, "test").to(device)
    event_shape = tuple(data.shape[1:])
    schedule = cfg.build_schedule()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = cfg.build_network()
    net.to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    step = 0
    history: dict[str, Any] = {
        "loss_history": [],
        "eval_history": [],
        "loss_window": [0.0, 0],
        "wall_time_s": 0.0,
    }
    if resume and ck.exists():
        step, loaded = _load_checkpoint(out, cfg, net, ema, opt, g)
        history.update(loaded)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=min(step, cfg.steps),
        desc=f"train {cfg.data} {cfg.kind}",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    t_start = time.perf_counter() - float(history["wall_time_s"])
    window = history["loss_window"]
    net.train()
    try:
        while step < cfg.steps:
            # 1. minibatch x0, t ~ U[t_min, 1], eps ~ N(0, I) from the training generator
            idx, t, eps = _draw(cfg, data, g, cfg.batch_size)
            x0, t, eps = data[idx.to(device)], t.to(device), eps.to(device)
            # 2. warm-up learning rate (stateless in the step count, so resuming is exact)
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
            for grp in opt.param_groups:
                grp["lr"] = lr
            # 3. regression on the parameterisation's target, clipped Adam step
            loss = training_loss(net, schedule, x0, t, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            # 4. EMA of the weights with a ramped decay
            decay = min(cfg.ema_decay, (1.0 + step) / (10.0 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(p, 1.0 - decay)
            step += 1
            lval = float(loss.detach())
            if not math.isfinite(lval):
                raise FloatingPointError(f"training loss became {lval} at step {step}")
            window[0] += lval
            window[1] += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                history["loss_history"].append([step, window[0] / window[1]])
                bar.set_postfix(loss=f"{window[0] / window[1]:.4f}")
                window[0], window[1] = 0.0, 0
            bar.update(1)
            if callback is not None:
                callback(step, lval)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                ema.eval()
                history["eval_history"].append([step, _eval_loss(cfg, ema, schedule, test, device)])
                history["wall_time_s"] = time.perf_counter() - t_start
                _save_checkpoint(out, cfg, net, ema, opt, g, step, history, event_shape)
    finally:
        bar.close()
    return {
        "step": step,
        "loss_history": history["loss_history"],
        "eval_history": history["eval_history"],
        "wall_time_s": history["wall_time_s"],
        "out": str(out),
        "prior": str(out / "prior.json"),
    }


def export_prior(src: str | Path, dest: str | Path) -> Path:
    """Copy a prior (``prior.json`` of a training folder, or any prior JSON) to the stem ``dest``.

    Writes ``dest.safetensors`` and ``dest.json`` (its ``weights`` entry renamed, checksum
    verified first). Returns the new JSON path.
    """
    src = Path(src)
    js, meta = read_prior_json(src)  # verifies the model description's checksum
    read_checked_tensors(js, meta)  # and the weights' checksum
    dest = Path(dest)
    if dest.suffix in (".json", ".safetensors"):
        dest = dest.with_suffix("")
    dest.parent.mkdir(parents=True, exist_ok=True)
    weights = dest.with_name(dest.name + ".safetensors")
    weights.write_bytes((js.parent / meta["weights"]).read_bytes())
    meta["weights"] = weights.name
    meta["config_sha256"] = config_sha256(meta)  # the weights' file name is covered
    out = dest.with_name(dest.name + ".json")
    atomic_write_text(out, json.dumps(meta, indent=1) + "\n")
    load_prior(out)  # round-trip check
    return out

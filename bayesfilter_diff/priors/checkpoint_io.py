"""Checkpoint files of the learned priors: safetensors weights + a JSON description.

A learned prior is two files side by side: ``NAME.safetensors`` (the weights, read with
:func:`safetensors.torch.load_file`, which never unpickles code) and ``NAME.json``::

    {"format": "bayesfilter_diff.prior/1", "weights": "NAME.safetensors",
     "sha256": "<hex digest of the weights file>", "network": {"type": "unet", ...},
     "schedule": {"kind": "vp", "name": "linear", ...}, "event_shape": [1, 8, 8],
     "data": {...}, "training": {...}, "step": 12000}

:func:`save_prior` writes them (the weights first, the JSON last and atomically).
:func:`read_prior_json` reads and validates the JSON; :func:`read_checked_tensors` refuses a
weights file whose SHA-256 differs from the recorded one or whose name escapes the JSON
file's folder, and :func:`load_state_checked` one whose tensor names, shapes or dtypes
differ from the network's. :func:`~bayesfilter_diff.priors.networks.load_prior` puts these
together with the network built from the JSON's ``"network"`` entry; the training
checkpoints of :mod:`bayesfilter_diff.training` use the same pieces. The priors shipped with
the package live in :data:`PRETRAINED_DIR` (:func:`pretrained_names`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..schedules import FlowSchedule, Schedule, VESchedule, VPSchedule

__all__ = [
    "PRIOR_FORMAT",
    "PRETRAINED_DIR",
    "CheckpointError",
    "file_sha256",
    "config_sha256",
    "atomic_write_text",
    "save_tensors",
    "read_checked_tensors",
    "load_state_checked",
    "schedule_to_config",
    "schedule_from_config",
    "save_prior",
    "read_prior_json",
    "pretrained_names",
]

#: Format tag of a prior's JSON file.
PRIOR_FORMAT = "bayesfilter_diff.prior/1"
#: Folder of the priors shipped with the package (``bayesfilter_diff/priors/checkpoints``).
PRETRAINED_DIR = Path(__file__).resolve().parent / "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint is malformed, tampered with or does not match its network."""


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


# ----------------------------------------------------------------------------- files
def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
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
    meta["config_sha256"] = config_sha256(meta)
    js = stem.with_name(stem.name + ".json")
    atomic_write_text(js, json.dumps(meta, indent=1) + "\n")
    return js


#: The JSON fields that define the model; ``config_sha256`` covers them, so an edited
#: network, schedule or event shape is refused like edited weights.
MODEL_FIELDS = ("format", "weights", "sha256", "network", "schedule", "event_shape")


def config_sha256(meta: Mapping[str, Any]) -> str:
    """SHA-256 of the model-defining fields of a prior JSON (canonical JSON encoding)."""
    fields = {k: meta.get(k) for k in MODEL_FIELDS}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


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


def read_prior_json(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The JSON file of a prior and its validated contents.

    ``path`` is the JSON file, the weights file, their common stem, or a training output
    folder (its ``prior.json``). Checks the format tag and the event shape; the weights are
    not read (:func:`read_checked_tensors`).

    Raises
    ------
    FileNotFoundError
        No JSON at ``path``.
    CheckpointError
        Invalid JSON, another format, or an event shape that is not a list of positive ints.
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
    recorded = meta.get("config_sha256")
    if not isinstance(recorded, str):
        raise CheckpointError(
            f"{js}: no 'config_sha256' recorded (written by an older version, or edited); "
            "re-save the prior with bayesfilter_diff.priors.save_prior"
        )
    if recorded != config_sha256(meta):
        raise CheckpointError(
            f"{js}: the model description ({', '.join(MODEL_FIELDS[1:])}) does not match its "
            "recorded config_sha256: the JSON was edited after saving, refusing to load it"
        )
    return js, meta


def pretrained_names() -> list[str]:
    """Names of the priors shipped with the package (``bayesfilter_diff/priors/checkpoints``)."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.json"))

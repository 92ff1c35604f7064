"""Input handling shared by the diagnostics: sample sets, weights, random directions.

A *sample set* is a tensor ``(N, d)`` (one problem) or ``(B, N, d)`` (a batch of ``B``
independent problems), or a :class:`~bayesfilter_diff.Result` (its samples are flattened
to ``(…, N, d)`` and its normalised weights are used when it carries log-weights).
Weights are non-negative numbers of the same leading shape, normalised here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..result import Result

__all__ = ["random_directions"]


def random_directions(
    num: int,
    dim: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``num`` directions drawn uniformly on the unit sphere of ``R^dim``: ``(num, dim)``.

    Normalised standard normal draws, made with ``generator`` on ``device`` and ``dtype``
    (the same generator state gives the same directions).
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    z = torch.randn(num, dim, generator=generator, device=device, dtype=dtype)
    return z / z.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def sample_set(x, weights, name: str) -> tuple[Tensor, Tensor | None, bool]:
    """Return ``(X (B, N, d), W (B, N) float64 normalised or None, batched)``.

    ``W`` is ``None`` for uniform weights.
    """
    if isinstance(x, Result):
        s = x.samples
        batched = x.batched
        X = s.reshape(s.shape[0], s.shape[1], -1) if batched else s.reshape(1, s.shape[0], -1)
        if weights is None and x.log_weights is not None:
            weights = x.weights()
    elif isinstance(x, Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() == 2:
            X, batched = x.unsqueeze(0), False
        elif x.dim() == 3:
            X, batched = x, True
        else:
            raise ValueError(f"{name} must have shape (N, d) or (B, N, d), got {tuple(x.shape)}")
    else:
        raise TypeError(f"{name} must be a torch.Tensor or a Result, got {type(x).__name__}")
    if X.shape[1] < 1 or X.shape[2] < 1:
        raise ValueError(
            f"{name} must have at least one sample and one dimension, got {tuple(X.shape)}"
        )
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    W = None
    if weights is not None:
        W = check_weights(weights, X.shape[:2], batched, name)
        if W.device != X.device:
            raise ValueError(f"the weights of {name} are on {W.device} but {name} is on {X.device}")
    return X, W, batched


def check_weights(weights, lead: torch.Size, batched: bool, name: str) -> Tensor:
    """Validate non-negative weights ``(N,)`` / ``(B, N)``; return them normalised, ``(B, N)``."""
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights of {name} must be a torch.Tensor, got {type(weights).__name__}")
    w = weights.double()
    if w.dim() == 1:
        w = w.unsqueeze(0)
    if w.dim() != 2 or w.shape[-1] != lead[1] or w.shape[0] not in (1, lead[0]):
        want = f"({lead[0]}, {lead[1]})" if batched else f"({lead[1]},)"
        raise ValueError(f"weights of {name} must have shape {want}, got {tuple(weights.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weights of {name} must be finite and non-negative")
    tot = w.sum(-1, keepdim=True)
    if (tot <= 0).any():
        raise ValueError(f"weights of {name} must not all be zero")
    return (w / tot).expand(lead[0], lead[1])


def broadcast_pair(
    X: Tensor, WX: Tensor | None, bx: bool, Y: Tensor, WY: Tensor | None, by: bool
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, bool]:
    """Broadcast two sample sets over the problem axis; check dimensions and devices."""
    if X.shape[-1] != Y.shape[-1]:
        raise ValueError(
            f"x and y must have the same dimension d, got {X.shape[-1]} and {Y.shape[-1]}"
        )
    if X.device != Y.device:
        raise ValueError(f"x is on {X.device} but y is on {Y.device}; move one")
    Bx, By = X.shape[0], Y.shape[0]
    if Bx != By:
        if Bx == 1:
            X = X.expand(By, *X.shape[1:])
            WX = None if WX is None else WX.expand(By, -1)
        elif By == 1:
            Y = Y.expand(Bx, *Y.shape[1:])
            WY = None if WY is None else WY.expand(Bx, -1)
        else:
            raise ValueError(f"x and y have different numbers of problems: {Bx} and {By}")
    return X, WX, Y, WY, (bx or by)


def uniform_or(W: Tensor | None, lead: torch.Size, device) -> Tensor:
    """``W`` or uniform ``(B, N)`` float64 weights."""
    if W is not None:
        return W
    return torch.full(tuple(lead), 1.0 / lead[1], dtype=torch.float64, device=device)


def log_prob_fn(posterior):
    """A ``log p(x)`` callable from a GaussianMixture (or any object with ``log_prob``)."""
    if hasattr(posterior, "log_prob"):
        return posterior.log_prob
    if callable(posterior):
        return posterior
    raise TypeError(
        "posterior must be a GaussianMixture or a callable log-density, "
        f"got {type(posterior).__name__}"
    )

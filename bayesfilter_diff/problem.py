"""Inverse problems: an operator, observations ``y`` and a noise model.

``y = A(x) + sigma_y n`` (Gaussian noise, the default) or ``y ~ Poisson(A(x))``.
``y`` has the operator's output shape, or a leading batch ``(B, *out_shape)`` of
independent observations sharing the operator. Everything a sampler needs about the
likelihood goes through :meth:`InverseProblem.log_likelihood` and
:meth:`InverseProblem.grad_log_likelihood`, batched over ``(B, N)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor

from .operators.base import LinearOperator, Operator

__all__ = ["InverseProblem"]

_LOG2PI = math.log(2 * math.pi)


class InverseProblem:
    """An observation model ``p(y | x)`` with its data.

    Parameters
    ----------
    operator
        The forward model ``A`` (an :class:`~bayesfilter_diff.operators.Operator`).
    y
        Observations of shape ``operator.out_shape`` or ``(B, *operator.out_shape)``.
    noise_std
        ``sigma_y >= 0`` for Gaussian noise (0: noiseless). Ignored for Poisson noise.
    noise
        ``"gaussian"`` or ``"poisson"`` (``y ~ Poisson(rate * A(x))``, ``A(x) > 0``).
    poisson_rate
        Scale of the Poisson intensity.
    log_likelihood_fn
        Optional custom ``log p(y | x)``: ``fn(x, y) -> (...)`` for ``x`` of shape
        ``(B, N, *in_shape)`` and ``y`` of shape ``(B, 1, *out_shape)``; overrides the noise
        model (used by :func:`bayesfilter_diff.infer` for likelihoods written in Pyro).
    """

    def __init__(
        self,
        operator: Operator,
        y: Tensor,
        noise_std: float | Tensor = 0.0,
        *,
        noise: str = "gaussian",
        poisson_rate: float = 1.0,
        log_likelihood_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        if not isinstance(operator, Operator):
            raise TypeError(f"operator must be an Operator, got {type(operator).__name__}")
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if not y.is_floating_point():
            raise TypeError(f"y must be a floating-point tensor, got {y.dtype}")
        out = tuple(operator.out_shape)
        if tuple(y.shape) == out:
            batched = False
        elif y.dim() == len(out) + 1 and tuple(y.shape[1:]) == out:
            batched = True
            if y.shape[0] < 1:
                raise ValueError("y has an empty batch (B = 0)")
        else:
            raise ValueError(
                f"y must have the operator's output shape {out} or (B, *{out}), got {tuple(y.shape)}"
            )
        if not torch.isfinite(y).all():
            raise ValueError("y must be finite (no NaN or inf)")
        ref = operator._ref()
        if ref is not None and ref.device != y.device:
            raise ValueError(f"y is on {y.device} but the operator is on {ref.device}; move one")
        if ref is not None and ref.dtype != y.dtype:
            raise ValueError(
                f"y has dtype {y.dtype} but the operator has dtype {ref.dtype}; "
                f"use operator.to({y.dtype}) or cast y"
            )
        if noise not in ("gaussian", "poisson"):
            raise ValueError(f"noise must be 'gaussian' or 'poisson', got {noise!r}")
        if isinstance(noise_std, Tensor):
            if noise_std.numel() != 1:
                raise ValueError(
                    f"noise_std must be a scalar, got a tensor of shape {tuple(noise_std.shape)}"
                )
            noise_std = float(noise_std)
        if (
            isinstance(noise_std, bool)
            or not isinstance(noise_std, int | float)
            or not math.isfinite(noise_std)
            or noise_std < 0
        ):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        fi = torch.finfo(y.dtype)
        if 0 < noise_std < math.sqrt(fi.tiny):
            # 1 / noise_std^2 would overflow and the log-likelihood turn into inf / NaN
            raise ValueError(
                f"noise_std={noise_std!r} is too small for {y.dtype}: noise_std**2 underflows "
                f"(needs noise_std >= {math.sqrt(fi.tiny):.3g}); use noise_std=0 for a "
                "noiseless problem"
            )
        if noise_std > math.sqrt(fi.max):
            raise ValueError(
                f"noise_std={noise_std!r} is too large for {y.dtype}: noise_std**2 overflows "
                f"(needs noise_std <= {math.sqrt(fi.max):.3g})"
            )
        if noise == "poisson":
            if poisson_rate <= 0:
                raise ValueError(f"poisson_rate must be > 0, got {poisson_rate}")
            if (y < 0).any():
                raise ValueError("Poisson observations y must be non-negative")
        self.operator = operator
        self.y = y
        self.noise_std = float(noise_std)
        self.noise = noise
        self.poisson_rate = float(poisson_rate)
        self.batched = batched
        self.log_likelihood_fn = log_likelihood_fn

    # ------------------------------------------------------------------ shapes
    @property
    def batch_size(self) -> int:
        """Number of independent observations ``B`` (1 for an unbatched ``y``)."""
        return self.y.shape[0] if self.batched else 1

    @property
    def y_batched(self) -> Tensor:
        """``y`` with a leading batch axis: ``(B, *out_shape)``."""
        return self.y if self.batched else self.y.unsqueeze(0)

    @property
    def y_flat(self) -> Tensor:
        """``(B, m)``."""
        return self.y_batched.reshape(self.batch_size, -1)

    @property
    def is_linear_gaussian(self) -> bool:
        return (
            self.operator.is_linear and self.noise == "gaussian" and self.log_likelihood_fn is None
        )

    def to(self, *args, **kwargs) -> InverseProblem:
        """A copy with operator and ``y`` moved (``torch.Tensor.to`` arguments)."""
        return InverseProblem(
            self.operator.to(*args, **kwargs),
            self.y.to(*args, **kwargs),
            self.noise_std,
            noise=self.noise,
            poisson_rate=self.poisson_rate,
            log_likelihood_fn=self.log_likelihood_fn,
        )

    def check_signal(self, x: Tensor, name: str = "x") -> None:
        """Raise if ``x`` is not ``(B, N, *in_shape)`` for this problem's ``B``."""
        k = len(self.operator.in_shape)
        if x.dim() != k + 2 or tuple(x.shape[2:]) != tuple(self.operator.in_shape):
            raise ValueError(
                f"{name} must have shape (B, N, *{tuple(self.operator.in_shape)}), got {tuple(x.shape)}"
            )
        if x.shape[0] != self.batch_size:
            raise ValueError(f"{name} has batch {x.shape[0]}, the problem has B={self.batch_size}")

    # ------------------------------------------------------------------ likelihood
    def _y_for(self, x: Tensor) -> Tensor:
        """``y`` shaped ``(B, 1, *out)`` to broadcast against ``A(x)`` of shape ``(B, N, *out)``."""
        return self.y_batched.unsqueeze(1)

    def log_likelihood(self, x: Tensor) -> Tensor:
        """``log p(y | x)`` for ``x`` of shape ``(B, N, *in_shape)``; returns ``(B, N)``."""
        y = self._y_for(x)
        if self.log_likelihood_fn is not None:
            ll = self.log_likelihood_fn(x, y)
            if not isinstance(ll, Tensor) or tuple(ll.shape) != tuple(x.shape[:2]):
                got = tuple(ll.shape) if isinstance(ll, Tensor) else type(ll).__name__
                raise ValueError(
                    f"log_likelihood_fn must return one value per particle, shape (B, N) = "
                    f"{tuple(x.shape[:2])} for x of shape {tuple(x.shape)}; got {got}"
                )
            return ll
        Ax = self.operator(x)
        red = tuple(range(2, Ax.dim()))
        if self.noise == "poisson":
            rate = self.poisson_rate * Ax
            return (y * torch.log(rate) - rate - torch.lgamma(y + 1)).sum(red)
        if self.noise_std == 0:
            raise ValueError("the Gaussian log-likelihood needs noise_std > 0")
        s2 = self.noise_std**2
        m = self.operator.out_dim
        return -0.5 * ((y - Ax) ** 2).sum(red) / s2 - 0.5 * m * (math.log(s2) + _LOG2PI)

    def grad_log_likelihood(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(log p(y|x), grad_x log p(y|x))``, exact for linear-Gaussian problems."""
        if self.is_linear_gaussian and self.noise_std > 0:
            op = cast(LinearOperator, self.operator)
            r = self._y_for(x) - op(x)
            red = tuple(range(2, r.dim()))
            s2 = self.noise_std**2
            ll = -0.5 * (r**2).sum(red) / s2 - 0.5 * op.out_dim * (math.log(s2) + _LOG2PI)
            return ll, op.adjoint(r) / s2
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            ll = self.log_likelihood(xr)
            (g,) = torch.autograd.grad(ll.sum(), xr)
        return ll.detach(), g

    def residual_gradient(self, x: Tensor) -> Tensor:
        """``grad_x ||A(x) - y||^2 / 2`` per particle, ``x`` of shape ``(B, N, *in_shape)``.

        ``A^T (A x - y)`` for linear operators, autograd otherwise (the data-fit gradient of
        the squared-residual samplers, independent of the noise model).
        """
        op = self.operator
        y = self._y_for(x)
        if op.is_linear:
            return cast(LinearOperator, op).adjoint(op(x) - y)
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            r = op(xr) - y
            (g,) = torch.autograd.grad(0.5 * (r**2).sum(), xr)
        return g

    def sample_observation(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``y ~ p(y | x)`` for a signal ``x`` of shape ``(..., *in_shape)``."""
        Ax = self.operator(x)
        if self.noise == "poisson":
            return torch.poisson(self.poisson_rate * Ax, generator=generator)
        n = torch.randn(Ax.shape, generator=generator, dtype=Ax.dtype, device=Ax.device)
        return Ax + self.noise_std * n

    def __repr__(self) -> str:
        return (
            f"InverseProblem(operator={type(self.operator).__name__}, y={tuple(self.y.shape)}, "
            f"noise={self.noise!r}, noise_std={self.noise_std})"
        )

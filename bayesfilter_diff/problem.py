"""Inverse problems: an operator, observations ``y`` and a noise model.

``y = A(x) + sigma_y n`` (Gaussian noise, the default) or ``y ~ Poisson(A(x))``.
``y`` has the operator's output shape, or a leading batch ``(B, *out_shape)`` of
independent observations sharing the operator. Everything a sampler needs about the
likelihood goes through :meth:`InverseProblem.log_likelihood` and
:meth:`InverseProblem.grad_log_likelihood`, batched over ``(B, N)``.
"""

from __future__ import annotations

import copy
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
        ``sigma_y >= 0`` for Gaussian noise (0: noiseless), or a ``(B,)`` tensor of
        per-problem scales ``> 0`` for a batched ``y`` (e.g. the theta-particles of SMC^2;
        only samplers declaring ``Requirements.per_problem_noise`` accept it). Ignored for
        Poisson noise.
    noise
        ``"gaussian"`` or ``"poisson"`` (``y ~ Poisson(rate * A(x))``, ``A(x) > 0``).
    poisson_rate
        Scale of the Poisson intensity.
    log_likelihood_fn
        Optional custom ``log p(y | x)``: ``fn(x, y) -> (...)`` for ``x`` of shape
        ``(B, N, *in_shape)`` and ``y`` of shape ``(B, 1, *out_shape)``; overrides the noise
        model (used by :func:`bayesfilter_diff.infer` for likelihoods written in Pyro).
    squared_scores_fn
        Optional, with ``log_likelihood_fn``: ``fn(x) -> (B, N)`` float64, the sum over
        ``y``'s ``d_y`` entries of their squared normal scores under ``p(y | x)``
        (:mod:`bayesfilter_diff.samplers.scores`), or ``None``; the posterior predictive check
        (``info.residual_ratio``) reads it. :func:`bayesfilter_diff.infer` supplies it for
        Pyro sites of the laws that module lists; without it a custom likelihood is not
        checked.
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
        squared_scores_fn: Callable[[Tensor], Tensor | None] | None = None,
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
        if operator.per_problem:
            B_op = cast(int, getattr(operator, "batch_size", 0))
            if not batched or y.shape[0] != B_op:
                raise ValueError(
                    f"the operator has one forward model per problem (B={B_op}); y must have "
                    f"shape (B, *{out}) with that B, got {tuple(y.shape)}"
                )
        if noise not in ("gaussian", "poisson"):
            raise ValueError(f"noise must be 'gaussian' or 'poisson', got {noise!r}")
        per_problem: Tensor | None = None
        if isinstance(noise_std, Tensor):
            B = y.shape[0] if batched else 1
            flat = noise_std.detach().reshape(-1)
            if flat.numel() == 1:
                noise_std = float(flat[0])
            elif batched and flat.numel() == B and noise_std.dim() >= 1 and noise_std.shape[0] == B:
                if not bool(torch.isfinite(flat).all()) or bool((flat < 0).any()):
                    raise ValueError("noise_std must hold finite numbers >= 0 (one per problem)")
                if bool((flat == flat[0]).all()):
                    noise_std = float(flat[0])
                else:
                    # float16 data: the scales in float32 (the samplers run a 16-bit problem
                    # in float32; float16 squares scales below 0.0078 to 0, which SMC^2's
                    # theta-particles of an unknown scale reach)
                    keep = torch.float32 if y.dtype == torch.float16 else y.dtype
                    per_problem = flat.to(dtype=keep, device=y.device)
                    noise_std = float(flat.min())
            else:
                raise ValueError(
                    "noise_std must be a number, a one-element tensor, or one value per problem "
                    f"(shape (B,) = ({B},) for y of shape {tuple(y.shape)}); got a tensor of "
                    f"shape {tuple(noise_std.shape)}"
                )
        if (
            isinstance(noise_std, bool)
            or not isinstance(noise_std, int | float)
            or not math.isfinite(noise_std)
            or noise_std < 0
        ):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        fi = torch.finfo(y.dtype if per_problem is None else per_problem.dtype)
        low = noise_std if per_problem is None else float(per_problem.min())
        high = noise_std if per_problem is None else float(per_problem.max())
        if per_problem is not None and low == 0:
            raise ValueError(
                "per-problem noise_std must be > 0 for every problem (noiseless problems "
                "cannot share a batch with noisy ones)"
            )
        if 0 < low < math.sqrt(fi.tiny):
            # 1 / noise_std^2 would overflow and the log-likelihood turn into inf / NaN
            raise ValueError(
                f"noise_std={low!r} is too small for {y.dtype}: noise_std**2 underflows "
                f"(needs noise_std >= {math.sqrt(fi.tiny):.3g}); use noise_std=0 for a "
                "noiseless problem"
            )
        if high > math.sqrt(fi.max):
            raise ValueError(
                f"noise_std={high!r} is too large for {y.dtype}: noise_std**2 overflows "
                f"(needs noise_std <= {math.sqrt(fi.max):.3g})"
            )
        dropped = float(getattr(operator, "dropped_singular_value", 0.0) or 0.0)
        if noise == "gaussian" and log_likelihood_fn is None and 0 < low < 10 * dropped:
            # the SVD samplers would ignore a direction that the likelihood still counts
            raise ValueError(
                f"the operator's SVD counts singular value(s) up to {dropped:.3g} as zero "
                f"(rtol={getattr(operator, 'rtol', None)!r} for its {_dtype_of(operator)} "
                f"values), but at noise_std={low!r} that direction still carries "
                f"information (s / noise_std = {dropped / low:.3g} > 0.1): samplers working "
                "in the SVD would ignore it while the likelihood counts it. Build the "
                "operator from a float64 matrix, or pass a smaller rtol"
            )
        if noise == "poisson":
            if poisson_rate <= 0:
                raise ValueError(f"poisson_rate must be > 0, got {poisson_rate}")
            if (y < 0).any():
                raise ValueError("Poisson observations y must be non-negative")
        self.operator = operator
        self.y = y
        self._noise_std = float(noise_std)
        self._per_problem = per_problem
        self.noise = noise
        self.poisson_rate = float(poisson_rate)
        self.batched = batched
        self.log_likelihood_fn = log_likelihood_fn
        if squared_scores_fn is not None and log_likelihood_fn is None:
            raise ValueError(
                "squared_scores_fn goes with a log_likelihood_fn (the Gaussian and Poisson "
                "noise models have their own scores); pass both or neither"
            )
        self.squared_scores_fn = squared_scores_fn
        #: the coarsest dtype the observation has been held in (``y``'s own unless it was
        #: cast from a coarser one, e.g. bfloat16 data upcast by ``bfd.infer``): the
        #: quality check's ``precision`` test reads it (its rounding is in ``y`` for good)
        self.data_dtype: torch.dtype = y.dtype
        #: for a likelihood given as a function (Pyro sites): the largest ``max |y| /
        #: scale`` over the observed sites whose scale parameter does not depend on the
        #: signal (Laplace, Student-t, ...; set by ``bfd.infer``), else ``None``; the
        #: ``precision`` test reads it as Gaussian noise's ``max |y| / noise_std``
        self.data_scale_ratio: float | None = None

    # ------------------------------------------------------------------ noise
    @property
    def per_problem_noise(self) -> bool:
        """Whether the ``B`` problems have different Gaussian noise scales."""
        return self._per_problem is not None

    @property
    def noise_std(self) -> float:
        """The Gaussian noise scale shared by all problems.

        Raises ``ValueError`` for per-problem noise (:attr:`per_problem_noise`): code that
        handles it reads :attr:`noise_stds` or :meth:`noise_variance` instead, and samplers
        that do not are refused before the run (``Requirements.per_problem_noise``).
        """
        if self._per_problem is not None:
            raise ValueError(
                "this problem has one noise_std per problem (a (B,) tensor); this code path "
                "needs one noise_std shared by all problems (read noise_stds instead)"
            )
        return self._noise_std

    @property
    def noise_stds(self) -> Tensor:
        """``(B,)``: each problem's noise scale (all equal for a shared ``noise_std``)."""
        if self._per_problem is not None:
            return self._per_problem
        return torch.full(
            (self.batch_size,), self._noise_std, dtype=self.y.dtype, device=self.y.device
        )

    @property
    def min_noise_std(self) -> float:
        """The smallest noise scale over the problems (the most informative one)."""
        return self._noise_std  # the minimum for per-problem noise (set in __init__)

    def noise_variance(self, event_dim: int = 0) -> Tensor | float:
        """``sigma_y^2`` broadcasting against ``(B, N, *event)``: a float for a shared scale,
        a ``(B, 1, 1 * event_dim)`` tensor for per-problem noise."""
        if self._per_problem is None:
            return self._noise_std**2
        return (self._per_problem**2).reshape((-1, 1) + (1,) * event_dim)

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
        """A copy with operator and ``y`` moved (``torch.Tensor.to`` arguments); ``self`` is
        left as it was (``nn.Module.to`` moves a module in place, so the operator is copied
        first)."""
        out = InverseProblem(
            copy.deepcopy(self.operator).to(*args, **kwargs),
            self.y.to(*args, **kwargs),
            self._noise_std if self._per_problem is None else self._per_problem.to(*args, **kwargs),
            noise=self.noise,
            poisson_rate=self.poisson_rate,
            log_likelihood_fn=self.log_likelihood_fn,
            squared_scores_fn=self.squared_scores_fn,
        )
        out.data_dtype = coarser_dtype(self.data_dtype, out.y.dtype)
        out.data_scale_ratio = self.data_scale_ratio
        return out

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
        if self.min_noise_std == 0:
            raise ValueError("the Gaussian log-likelihood needs noise_std > 0")
        return self._gaussian_log_likelihood(y - Ax)

    def _gaussian_log_likelihood(self, r: Tensor) -> Tensor:
        """``log N(r; 0, sigma_y^2 I)`` per particle for residuals ``r`` ``(B, N, *out)``."""
        red = tuple(range(2, r.dim()))
        m = self.operator.out_dim
        if self._per_problem is None:
            s2 = self._noise_std**2
            return -0.5 * (r**2).sum(red) / s2 - 0.5 * m * (math.log(s2) + _LOG2PI)
        dt = torch.promote_types(r.dtype, self._per_problem.dtype)  # (float16 data: float32)
        r = r.to(dt)
        s2t = (self._per_problem**2).to(dt)[:, None]  # (B, 1)
        return -0.5 * (r**2).sum(red) / s2t - 0.5 * m * (torch.log(s2t) + _LOG2PI)

    def grad_log_likelihood(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(log p(y|x), grad_x log p(y|x))``, exact for linear-Gaussian problems."""
        if self.is_linear_gaussian and self.min_noise_std > 0:
            op = cast(LinearOperator, self.operator)
            r = self._y_for(x) - op(x)
            s2 = self.noise_variance(len(op.out_shape))
            return self._gaussian_log_likelihood(r), op.adjoint(r / s2)
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
        if self._per_problem is not None:
            # per-problem noise: x carries the problems' axis first, (B, ..., *in_shape)
            k = Ax.dim() - 1
            return Ax + self._per_problem.reshape((-1,) + (1,) * k).to(Ax.dtype) * n
        return Ax + self._noise_std * n

    def __repr__(self) -> str:
        return (
            f"InverseProblem(operator={type(self.operator).__name__}, y={tuple(self.y.shape)}, "
            f"noise={self.noise!r}, noise_std="
            f"{'per-problem' if self._per_problem is not None else self._noise_std})"
        )


def _dtype_of(operator: Operator) -> str:
    ref = operator._ref()
    return str(ref.dtype).replace("torch.", "") if ref is not None else "unknown"


def coarser_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """Of two floating dtypes, the one with the larger machine epsilon."""
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b

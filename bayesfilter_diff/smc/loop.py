"""The shared particle loop that drives every sampler's ``init`` / ``step`` / ``finalize``.

A sampler is a frozen dataclass with a pure step over a small state record (a dict of
tensors with leading ``(B, N)`` axes). The loop (blackjax ``smc/base.py`` style):

1. ``state, log_w = sampler.init(ctx)``;
2. for each pair of grid times ``t > t_next``:
   ``state, g = sampler.step(ctx, state, i, t, t_next)``; the log-evidence estimate gains
   ``log sum_i W_i exp(g_i)`` (float64), ``log_w += g``; then, where a problem's
   ``ESS < ess_threshold * N``, every field of its state is indexed by the ancestors drawn
   by the resampling scheme and its weights reset to uniform (batched, no host syncs: the
   decision is a per-problem mask);
3. ``x, g = sampler.finalize(ctx, state)`` (a last weight such as ``p(y|x0) / p~(y|x_1)``).

Unweighted samplers return ``g = None`` and skip the weight bookkeeping. A problem whose
weights all become zero or NaN raises :class:`DegenerateWeightsError` naming the first
bad step and the problems, never NaN samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from ..result import Result
from .resampling import get_resampler
from .weights import ess, log_evidence_increment, normalize

__all__ = [
    "Context",
    "DegenerateWeightsError",
    "NonFiniteSamplesError",
    "run",
    "index_state",
    "check_inputs",
]


class DegenerateWeightsError(RuntimeError):
    """Every particle weight of a problem became zero or NaN."""


class NonFiniteSamplesError(FloatingPointError):
    """A sampler returned NaN or inf samples (the run diverged); raised instead of them."""


@dataclass
class Context:
    """What a sampler's ``init`` / ``step`` see besides the state: inputs and counters."""

    prior: DiffusionModel
    problem: InverseProblem
    num_samples: int
    generator: torch.Generator | None
    times: Tensor
    cache: dict[str, Any] = field(default_factory=dict)
    nfe: int = 0
    backprop: bool = False

    @property
    def B(self) -> int:
        return self.problem.batch_size

    @property
    def N(self) -> int:
        return self.num_samples

    @property
    def y(self) -> Tensor:
        """Observations with a leading batch axis, ``(B, *out_shape)``."""
        return self.problem.y_batched

    @property
    def dtype(self) -> torch.dtype:
        return self.problem.y.dtype

    @property
    def device(self) -> torch.device:
        return self.problem.y.device

    @property
    def shape(self) -> tuple[int, ...]:
        """Particle tensor shape ``(B, N, *event_shape)``."""
        return (self.B, self.N) + tuple(self.prior.event_shape)

    def randn(self, shape: tuple[int, ...] | None = None) -> Tensor:
        """Standard normal noise drawn with the context's generator, device and dtype."""
        return torch.randn(
            self.shape if shape is None else shape,
            generator=self.generator,
            dtype=self.dtype,
            device=self.device,
        )

    def denoise(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``E[x0 | x_t]``, counting one network evaluation per particle."""
        self.nfe += 1
        return self.prior.denoise(x, t)

    def denoise_with_grad(self, x: Tensor, t: Tensor | float, fn) -> tuple[Tensor, Tensor, Tensor]:
        """``x0_hat``, ``v = fn(x0_hat)`` (per particle, ``(B, N)``) and ``grad_x v``.

        Backpropagates through the network; per-particle values are summed only to get the
        gradient, which is exact per particle since particles do not interact.
        """
        self.nfe += 1
        self.backprop = True
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            x0 = self.prior.denoise(xr, t)
            v = fn(x0)
            (g,) = torch.autograd.grad(v.sum(), xr)
        return x0.detach(), v.detach(), g


def check_inputs(prior: Any, problem: Any, num_samples: Any, generator: Any = None) -> None:
    """Raise a clear error for bad sampler inputs before any heavy work.

    Besides types and shapes this re-checks what may have changed since the inputs were
    built (``y`` finite, no NaN in the prior's parameters / buffers), the generator, and
    evaluates a custom ``log_likelihood_fn`` once on two placeholder particles per problem
    (its output must have shape ``(B, N)``).
    """
    if not isinstance(prior, DiffusionModel):
        raise TypeError(f"prior must be a DiffusionModel, got {type(prior).__name__}")
    if not isinstance(problem, InverseProblem):
        raise TypeError(f"problem must be an InverseProblem, got {type(problem).__name__}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        kind = type(num_samples).__name__
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r} ({kind})")
    if tuple(prior.event_shape) != tuple(problem.operator.in_shape):
        raise ValueError(
            f"the operator's input shape {tuple(problem.operator.in_shape)} does not match the "
            f"prior's event shape {tuple(prior.event_shape)}"
        )
    y = problem.y
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        if generator.device.type != y.device.type:
            raise ValueError(
                f"generator is on {generator.device} but y is on {y.device}; use "
                f"torch.Generator(device={str(y.device)!r})"
            )
    tensors = [
        (n, p)
        for n, p in list(prior.named_parameters()) + list(prior.named_buffers())
        if p.is_floating_point()
    ]
    if tensors:
        ref = tensors[0][1]
        if ref.device != y.device:
            raise ValueError(f"y is on {y.device} but the prior is on {ref.device}")
        low = (torch.float16, torch.bfloat16)
        if ref.dtype in low and y.dtype not in low:
            # mixed precision: a 16-bit network must cast its input (and output back); one
            # call on a single row checks that before the run
            _check_mixed_precision(prior, y, ref.dtype)
        elif ref.dtype != y.dtype:
            raise ValueError(
                f"y has dtype {y.dtype} but the prior has dtype {ref.dtype}; cast one to the other"
            )
        # one host sync for all tensors (-inf is legitimate, e.g. log-weights of zero)
        nan = torch.stack([torch.isnan(p.detach()).any() for _, p in tensors])
        if bool(nan.any()):
            bad = [n for (n, _), b in zip(tensors, nan.tolist()) if b]
            raise ValueError(f"the prior has NaN in its parameters / buffers {bad}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(
            "y must be finite (no NaN or inf); was problem.y changed after it was built?"
        )
    if problem.log_likelihood_fn is not None:
        shape = (problem.batch_size, 2) + tuple(problem.operator.in_shape)
        x = torch.zeros(shape, dtype=y.dtype, device=y.device)
        try:
            problem.log_likelihood(x)  # raises ValueError for an output of the wrong shape
        except (RuntimeError, IndexError) as e:
            raise ValueError(
                f"log_likelihood_fn failed on placeholder particles x of shape {tuple(x.shape)} "
                f"(B, N, *in_shape): {e}"
            ) from e


def _check_mixed_precision(prior: DiffusionModel, y: Tensor, dtype: torch.dtype) -> None:
    """A 16-bit prior with higher-precision ``y``: denoise one row in ``y``'s dtype."""
    x = torch.zeros((1,) + tuple(prior.event_shape), dtype=y.dtype, device=y.device)
    t = torch.full((1,), 0.5, dtype=y.dtype, device=y.device)
    try:
        with torch.no_grad():
            out = prior.denoise(x, t)
    except RuntimeError as e:
        raise ValueError(
            f"y has dtype {y.dtype} but the prior has dtype {dtype}, and the network failed on "
            f"a {y.dtype} input ({e}); a mixed-precision network must cast its input to "
            f"{dtype} and its output back, or cast y / the prior"
        ) from e
    if out.dtype != y.dtype:
        raise ValueError(
            f"y has dtype {y.dtype} but the prior ({dtype}) returned {out.dtype} for a "
            f"{y.dtype} input; a mixed-precision network must cast its output back"
        )


def index_state(state: dict[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    """Index every ``(B, N, ...)`` field of ``state`` by ancestors ``idx`` of shape ``(B, N)``."""
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
    return {k: v[rows, idx] for k, v in state.items()}


@torch.no_grad()
def run(
    sampler: Any,
    prior: DiffusionModel,
    problem: InverseProblem,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> Result:
    """Drive ``sampler`` over its time grid and return a :class:`Result`.

    Runs without autograd (a network whose parameters require gradients would otherwise
    keep every activation of every call alive until the step ends: ~16 MB per particle for
    a 28x28 U-Net); samplers that differentiate the network or a likelihood do it inside
    ``torch.enable_grad()`` (:meth:`Context.denoise_with_grad`, D-Flow's objective).
    """
    check_inputs(prior, problem, num_samples, generator)
    sampler.check(prior, problem)
    start = time.perf_counter()
    times = sampler.time_grid(prior, problem)
    ctx = Context(prior, problem, num_samples, generator, times)
    B, N = ctx.B, ctx.N
    weighted = sampler.weighted
    state, log_w = sampler.init(ctx)
    if weighted:
        log_w = (
            torch.zeros(B, N, dtype=torch.float64, device=ctx.device)
            if log_w is None
            else log_w.double()
        )
        log_z = torch.logsumexp(log_w, -1) - math.log(N)
        log_w = normalize(log_w)
        resample = get_resampler(sampler.resampling)
        thr = float(sampler.ess_threshold)
        arange = torch.arange(N, device=ctx.device).expand(B, N)
    ess_trace, res_trace, z_trace = [], [], []
    n = times.numel() - 1
    for i in range(n):
        state, incr = sampler.step(ctx, state, i, times[i], times[i + 1])
        if not weighted:
            continue
        if incr is None:  # no reweighting this step: no resampling either
            ess_trace.append(ess(log_w))
            z_trace.append(log_z)
            res_trace.append(torch.zeros(B, dtype=torch.bool, device=ctx.device))
            continue
        incr = incr.double()
        log_z = log_z + log_evidence_increment(log_w, incr)
        log_w = normalize(log_w + incr)
        e = ess(log_w)
        ess_trace.append(e)
        z_trace.append(log_z)
        if i == n - 1 or thr <= 0:
            res_trace.append(torch.zeros(B, dtype=torch.bool, device=ctx.device))
            continue
        do = e < thr * N if thr < 1 else torch.ones(B, dtype=torch.bool, device=ctx.device)
        idx = torch.where(do[:, None], resample(log_w, N, generator), arange)
        state = index_state(state, idx)
        log_w = torch.where(do[:, None], torch.full_like(log_w, -math.log(N)), log_w)
        res_trace.append(do)
    x, incr = sampler.finalize(ctx, state)
    info: dict[str, Any] = {
        "times": times,
        "nfe": ctx.nfe,
        "backprop": ctx.backprop,
        "num_steps": n,
    }
    out_w = out_z = None
    if weighted:
        if incr is not None:
            incr = incr.double()
            log_z = log_z + log_evidence_increment(log_w, incr)
            log_w = normalize(log_w + incr)
            z_trace.append(log_z)
        zt = torch.stack(z_trace) if z_trace else log_z[None]
        bad = ~torch.isfinite(log_z) | ~torch.isfinite(log_w).any(-1)
        if bool(bad.any()):
            probs = torch.nonzero(bad).flatten().tolist()
            finite = torch.isfinite(zt[:, probs]).all(-1)
            first = int(torch.nonzero(~finite)[0]) if (~finite).any() else n
            raise DegenerateWeightsError(
                f"{type(sampler).__name__}: all particle weights of problem(s) {probs} became "
                f"zero or NaN at step {first} (t = {float(times[min(first, n)]):.4g}); check the "
                "noise level, the observation and the prior's support"
            )
        info["ess"] = torch.stack(ess_trace) if ess_trace else None
        info["resampled"] = torch.stack(res_trace) if res_trace else None
        info["log_evidence"] = zt
        out_w = log_w
        # samplers whose normalising constant is not log p(y) (FPS-SMC: the likelihood of
        # its own y-sequence) keep it in the trace only
        out_z = log_z if getattr(sampler, "estimates_evidence", True) else None
    bad = ~torch.isfinite(x.reshape(B, N, -1)).all(-1)  # (B, N)
    if bool(bad.any()):
        probs = torch.nonzero(bad.any(-1)).flatten().tolist()
        raise NonFiniteSamplesError(
            f"{type(sampler).__name__} returned NaN or inf samples for problem(s) {probs} "
            f"({int(bad.sum())} of {B * N} particles): the run diverged; check the noise level "
            f"(noise_std={problem.noise_std:g}), the sampler's step sizes and the prior"
        )
    info["wall_time"] = time.perf_counter() - start
    info.update(ctx.cache.get("info", {}))
    if not problem.batched:
        x = x[0]
        out_w = None if out_w is None else out_w[0]
        out_z = None if out_z is None else out_z[0]
    return Result(
        samples=x, log_weights=out_w, log_evidence=out_z, info=info, batched=problem.batched
    )

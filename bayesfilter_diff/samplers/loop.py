"""The driver of every sampler: ``setup`` -> ``init`` -> (weight -> resample -> move)* -> ``finalize``.

A sampler (``samplers/base.py``) is a frozen dataclass of hyper-parameters with pure
methods over typed records; this loop runs them (blackjax ``smc/base.py``, particles
``core.py``):

1. ``setup = sampler.setup(ctx)``: the per-run constants (a frozen record);
2. ``state, log_w = sampler.init(ctx, setup)``: particles at ``times[0]`` and their initial
   log-weights (``None``: uniform);
3. for each move ``k`` from ``times[k]`` to ``times[k + 1]``:

   - **weight** ``G_k``: the previous move's incremental weight plus, for auxiliary
     particle filters, ``sampler.lookahead(ctx, setup, state, k)`` (the look-ahead potential
     of the coming move, e.g. MCGdiff's ``int p(x'|x) g_{k+1}(x') dx' / g_k(x)``); the
     evidence estimate gains ``log sum_i W_i exp(G_i)`` (float64) and the ESS is recorded
     before any resampling;
   - **resample** ``R_k`` where a problem's ``ESS < ess_threshold * N`` (a per-problem mask,
     no host synchronisation); every tensor field of the state is indexed by the ancestors;
   - **rejuvenate** (optional, resample-move): ``sampler.rejuvenate(ctx, setup, state, k,
     resampled)`` right after resampling, moves that leave the current target invariant
     (TDS's ``rejuvenation_steps``), their acceptance in ``Result.info.acceptance``;
   - **move** ``M_k``: ``sampler.move(ctx, setup, state, k, t, t_next) -> Move(state,
     log_weight, info)``, with the move's remaining incremental weight and an optional
     per-step record (stacked into ``Result.info.steps``);

4. ``x, log_g = sampler.finalize(ctx, setup, state)``: the samples and a last weight, applied
   with the last move's weight.

Log-weights and evidence accumulate in float64. A 16-bit problem (``y`` in float16 or
bfloat16) runs in float32 (a copy of the operator), only a 16-bit network's calls staying in
16 bits; its draws are returned in its dtype.

Unweighted samplers return no weights and skip the bookkeeping. A problem whose weights all
become zero or NaN raises :class:`~bayesfilter_diff.DegenerateWeightsError` naming the first
bad step and the problems; NaN or inf samples raise
:class:`~bayesfilter_diff.NonFiniteSamplesError`, never returned.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..errors import DegenerateWeightsError, NonFiniteSamplesError
from ..priors.base import DiffusionModel
from ..problem import InverseProblem, coarser_dtype
from ..result import Result, RunInfo
from ..smc.particles import (
    ParticleWeights,
    distinct_count,
    genealogy_ess,
    index_particles,
    log_evidence_se,
)
from . import quality
from .kernels import DDIMCoefficients, ddim_weights, time_at_log_snr

__all__ = ["Context", "Move", "run", "check_inputs"]


class Move(NamedTuple):
    """What a move returns: the new state, its incremental log-weight ``(B, N)`` (or
    ``None``) and an optional per-step record (a dataclass of tensors or numbers)."""

    state: Any
    log_weight: Tensor | None = None
    info: Any = None


@dataclass
class Context:
    """What a sampler's methods see besides its records: the inputs and the counters."""

    prior: DiffusionModel
    problem: InverseProblem
    num_samples: int
    generator: torch.Generator | None
    times: Tensor
    nfe: int = 0
    backprop: bool = False
    #: per-run values a sampler derives from the inputs (e.g. from the grid), by name
    cache: dict[Any, Any] = field(default_factory=dict)

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

    def start(self) -> Tensor:
        """``x_{t_0}`` ``(B, N, *event)``: from the prior's exact noisy marginal
        ``p_{t_0}`` when it has one (``prior.exact_start``, e.g. a Gaussian mixture's
        ``diffusion(schedule, exact_start=True)``), else from the reference
        ``N(0, sigma_{t_0}^2 I)``, which ignores ``alpha_{t_0} x0`` (the chain of every
        trained network and of the published codes)."""
        t0 = self.times[0]
        if getattr(self.prior, "exact_start", False):
            x = self.prior.sample_noisy(t0, (self.B, self.N), self.generator)
            return x.to(dtype=self.dtype, device=self.device)
        return self.prior.schedule.sigma(t0) * self.randn()

    def denoise(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``E[x0 | x_t]``, counting one network evaluation per particle."""
        self.nfe += 1
        return self.prior.denoise(x, t)

    def denoise_mean(
        self,
        x: Tensor,
        t: Tensor,
        coef: DDIMCoefficients[Tensor] | DDIMCoefficients[float],
        sigma_t: Tensor | float,
    ) -> Tensor:
        """The DDIM mean ``alpha_s x0_hat + c_eps (x - alpha_t x0_hat) / sigma_t`` of the step
        ``coef`` from ``x`` at the scalar time ``t`` (one network evaluation per particle),
        from the network's own output (:meth:`DiffusionModel.denoise_affine`)."""
        self.nfe += 1
        return self.prior.denoise_affine(x, t, *ddim_weights(coef, sigma_t))

    def denoise_with_grad(self, x: Tensor, t: Tensor | float, fn) -> tuple[Tensor, Tensor, Tensor]:
        """``x0_hat``, ``v = fn(x0_hat)`` (per particle, ``(B, N)``) and ``grad_x v``.

        Backpropagates through the network; per-particle values are summed only to get the
        gradient, which is exact per particle since particles do not interact.
        """
        x0, v, g, _ = self.denoise_backward(x, t, fn, direction=False)
        return x0, v, g

    def denoise_backward(
        self,
        x: Tensor,
        t: Tensor | float,
        fn: Callable[[Tensor], Any],
        *,
        direction: bool,
        probe: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``x0_hat``, ``v`` and a gradient: with ``direction``, ``(v, u) = fn(x0_hat)`` and
        ``J^T u`` (``fn`` sees ``x0_hat`` detached); else ``v = fn(x0_hat)`` and
        ``grad_x sum v`` through the network. With ``probe`` ``(P, *event)`` (shared by the particles), also
        ``sum_p z_p^T J z_p`` per particle, ``(B, N)``: Hutchinson's estimate of ``tr J``
        for one Rademacher vector (exact for an isotropic ``J``), the exact trace for the
        coordinate basis; one more backward pass per probe."""
        self.nfe += 1
        self.backprop = True
        vjp = getattr(self.prior, "denoise_vjp", None)
        if direction and probe is None and vjp is not None:
            x0, v, g = vjp(x, t, fn)
            return x0, v.detach(), g, None
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            x0 = self.prior.denoise(xr, t)
            keep = probe is not None
            if direction:
                v, u = fn(x0.detach())
                (g,) = torch.autograd.grad(x0, xr, grad_outputs=u, retain_graph=keep)
            else:
                v = fn(x0)
                (g,) = torch.autograd.grad(v.sum(), xr, retain_graph=keep)
            tr = None if probe is None else _probe_trace(x0, xr, probe)
        return x0.detach(), v.detach(), g, tr

    def denoise_trace(self, x: Tensor, t: Tensor | float, probe: Tensor) -> tuple[Tensor, Tensor]:
        """``x0_hat`` and ``sum_p z_p^T J z_p`` per particle ``(B, N)`` (as in
        :meth:`denoise_backward`) without a gradient of any function: one backward pass per
        probe."""
        self.nfe += 1
        self.backprop = True
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            x0 = self.prior.denoise(xr, t)
            tr = _probe_trace(x0, xr, probe)
        return x0.detach(), tr

    def denoise_jacobian(self, x: Tensor, t: Tensor | float, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``x0_hat`` and ``R J`` per particle, ``(B, N, m, d)``, for rows ``R`` ``(B | 1, m,
        *event)`` and ``J = d x0_hat / d x`` the denoiser's Jacobian: one network call and
        one backward pass per row."""
        self.nfe += 1
        self.backprop = True
        m = rows.shape[1]
        out = []
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            x0 = self.prior.denoise(xr, t)
            for i in range(m):
                u = rows[:, i : i + 1].expand_as(x0)
                (ri,) = torch.autograd.grad(x0, xr, grad_outputs=u, retain_graph=i < m - 1)
                out.append(ri.reshape(ri.shape[:2] + (-1,)))
        return x0.detach(), torch.stack(out, -2)


def _probe_trace(x0: Tensor, xr: Tensor, probe: Tensor) -> Tensor:
    """``sum_p z_p^T (d x0 / d xr) z_p`` per particle for probes ``(P, *event)`` with
    ``E[sum_p z_p z_p^T] = I`` (a Rademacher vector, or the coordinate basis: then the sum is
    the exact trace); frees the graph after the last probe."""
    tr = torch.zeros(xr.shape[:2], dtype=x0.dtype, device=x0.device)
    for i, zi in enumerate(probe):
        z = zi.expand_as(x0)
        last = i == probe.shape[0] - 1
        (jz,) = torch.autograd.grad(x0, xr, grad_outputs=z, retain_graph=not last)
        tr = tr + (jz * z).reshape(xr.shape[:2] + (-1,)).sum(-1).detach()
    return tr


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
    op_ref = problem.operator._ref()
    if op_ref is not None and (op_ref.dtype != y.dtype or op_ref.device != y.device):
        raise ValueError(
            f"the operator holds {op_ref.dtype} on {op_ref.device} but y is {y.dtype} on "
            f"{y.device}: was the operator cast or moved after the InverseProblem was built? "
            "Use problem.to(...) to move both"
        )
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


def _stack(records: list[Any]) -> Any:
    """Stack per-step records field by field (tensors with ``torch.stack``, numbers into a
    tensor); ``None`` when no step returned one."""
    recs = [r for r in records if r is not None]
    if not recs:
        return None

    def col(vals: list[Any]) -> Any:
        if all(isinstance(v, Tensor) for v in vals):
            return torch.stack(vals)
        if all(isinstance(v, bool | int | float) for v in vals):
            return torch.tensor(vals)
        return vals

    first = recs[0]
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        names = [f.name for f in dataclasses.fields(first)]
        return type(first)(**{n: col([getattr(r, n) for r in recs]) for n in names})
    return col(recs)


_LOW = (torch.float16, torch.bfloat16)


class _LowPrecisionCall(torch.nn.Module):
    """A 16-bit prior's denoiser called from a float32 run: inputs cast down, output up."""

    def __init__(self, prior: DiffusionModel, dtype: torch.dtype) -> None:
        super().__init__()
        self.prior = prior
        self.dtype = dtype

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.prior.denoise(x.to(self.dtype), t.to(self.dtype)).to(x.dtype)


class _UpcastModel(DiffusionModel):
    """The float32 run's view of a 16-bit prior: its denoiser through
    :class:`_LowPrecisionCall`, and what else it knows of itself (``x0_variance``)."""

    net: _LowPrecisionCall

    def _x0_variance_lookup(self) -> tuple[Tensor, Tensor] | None:
        return self.net.prior._x0_variance_lookup()


def _upcast(
    prior: DiffusionModel, problem: InverseProblem
) -> tuple[DiffusionModel, InverseProblem]:
    """Run a 16-bit problem in float32: weights, evidence and linear algebra never in 16 bits.

    The operator is copied to float32 (the caller's is left as it is) with ``y``; a 16-bit
    prior keeps its precision for the network call only.
    """
    low = problem.y.dtype
    op = problem.operator.float32_copy()
    problem32 = InverseProblem(
        op,
        problem.y.to(torch.float32),
        problem.noise_stds.float() if problem.per_problem_noise else problem.noise_std,
        noise=problem.noise,
        poisson_rate=problem.poisson_rate,
        log_likelihood_fn=problem.log_likelihood_fn,
        squared_scores_fn=problem.squared_scores_fn,
    )
    problem32.data_dtype = coarser_dtype(low, problem.data_dtype)

    floats = [p for p in list(prior.parameters()) + list(prior.buffers()) if p.is_floating_point()]
    if floats and floats[0].dtype != low:
        return prior, problem32  # a float32 network already (cast y / operator only)
    net = _LowPrecisionCall(prior, low)
    return _UpcastModel(net, prior.schedule, prior.event_shape, prior.chunk_size), problem32


def _distinct_samples(x: Tensor) -> Tensor:
    """Distinct rows of ``x`` ``(B, N, ...)`` per problem: values of a fixed projection."""
    flat = x.reshape(x.shape[0], x.shape[1], -1).double()
    w = torch.cos(torch.arange(flat.shape[-1], dtype=torch.float64, device=x.device) * 0.7) + 1.3
    return distinct_count(flat @ w)


def _raise_degenerate(
    sampler: Any,
    w: ParticleWeights,
    z_trace: list[Tensor],
    times: Tensor,
    problem: InverseProblem | None = None,
):
    """DegenerateWeightsError naming the problems and the first step where it happened,
    with the sampler's own hint where it has one (``sampler.degenerate_hint(problem)``)."""
    bad = ~torch.isfinite(w.log_z) | ~torch.isfinite(w.log_w).any(-1)
    if not bool(bad.any()):
        return
    n = times.numel() - 1
    probs = torch.nonzero(bad).flatten().tolist()
    finite = torch.isfinite(torch.stack(z_trace)[:, probs]).all(-1)
    first = int(torch.nonzero(~finite)[0]) if bool((~finite).any()) else n
    hint_fn = getattr(sampler, "degenerate_hint", None)
    hint = hint_fn(problem) if callable(hint_fn) and problem is not None else None
    raise DegenerateWeightsError(
        f"{type(sampler).__name__}: all particle weights of problem(s) {probs} became "
        f"zero or NaN at step {first} (t = {float(times[min(first, n)]):.4g}); check the "
        "noise level, the observation and the prior's support" + (f"; {hint}" if hint else "")
    )


def _intermediate_time(schedule: Any, t: Tensor, t_next: Tensor) -> Tensor | None:
    """A time strictly between ``t_next < t``: the log-SNR midpoint, or the time midpoint
    where an end's log-SNR is infinite (``t = 0`` on VP and flow paths); ``None`` when the
    step is too short to split."""
    lam = schedule.log_snr(torch.stack([t, t_next]))
    if bool(torch.isfinite(lam).all()):
        mid = time_at_log_snr(schedule, 0.5 * (lam[0] + lam[1]), t_next, t)
    else:
        mid = 0.5 * (t + t_next)
    if not bool((mid < t) & (mid > t_next)) or float(t - t_next) < 1e-7:
        return None
    return mid


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return None if b is None else b.double()
    return a.double() if b is None else a.double() + b.double()


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
    out_dtype = problem.y.dtype
    # can the input's dtype resolve y at its noise level? (16-bit inputs are computed in
    # float32, finer than their own rounding; data cast from a coarser dtype keep its rounding)
    data_dtype = coarser_dtype(out_dtype, getattr(problem, "data_dtype", out_dtype))
    precision = quality.precision_ratio(problem, data_dtype)
    model = prior  # the caller's (the upcast below may wrap a 16-bit network)
    if out_dtype in _LOW:
        prior, problem = _upcast(prior, problem)
    times = sampler.time_grid(prior, problem)
    ctx = Context(prior, problem, num_samples, generator, times)
    B, N = ctx.B, ctx.N
    weighted = bool(sampler.weighted)
    # adaptive steps (samplers whose move carries its whole incremental weight, e.g. TDS)
    adaptive = float(getattr(sampler, "adaptive_ess", 0.0)) if weighted else 0.0
    max_insert = int(getattr(sampler, "max_inserted_steps", 0))
    inserted = 0
    setup = sampler.setup(ctx)
    state, log_w0 = sampler.init(ctx, setup)
    w = ParticleWeights.start(None, B, N, ctx.device)
    ess_trace: list[Tensor] = []
    res_trace: list[Tensor] = []
    z_trace: list[Tensor] = []
    step_records: list[Any] = []
    acc_trace: dict[int, Tensor] = {}  # rejuvenation's acceptance after reweighting k
    no = torch.zeros(B, dtype=torch.bool, device=ctx.device)
    # an approximate sampler's states at a few noise levels, for the path test at the end
    snap_steps = (
        quality.path_snapshot_steps(prior.schedule, ctx.times)
        if not weighted
        and getattr(sampler, "on_path", False)
        and N >= quality.QualityPolicy().min_particles
        else ()
    )
    snapshots: list[tuple[int, Tensor]] = []
    # the weight still to apply: the initial weights, then each move's incremental weight
    pending: Tensor | None = log_w0
    k = 0
    while True:
        last = k == ctx.times.numel() - 1
        if last:
            x, log_g = sampler.finalize(ctx, setup, state)
            g = _add(pending, log_g)
        else:
            g = _add(pending, sampler.lookahead(ctx, setup, state, k) if weighted else None)
        if weighted:
            # weight G_k (ESS recorded before resampling), then resample R_k
            if g is not None:
                w = w.reweight(g)
            ess_trace.append(w.ess())
            z_trace.append(w.log_z)
            if g is None or last:
                res_trace.append(no)
            else:
                w, idx, did = w.resample(
                    sampler.resampling, float(sampler.ess_threshold), generator
                )
                if idx is not None:
                    # (no problem resampled: the ancestors are the identity, and copying
                    # every per-particle array is skipped where asking costs no host sync)
                    if idx.device.type != "cpu" or bool(did.any()):
                        state = index_particles(state, idx)
                    state, acc = sampler.rejuvenate(ctx, setup, state, k, did)
                    if acc is not None:
                        acc_trace[len(res_trace)] = acc
                res_trace.append(did)
        if last:
            break
        # move M_k
        t, t_next = ctx.times[k], ctx.times[k + 1]
        if k in snap_steps:
            snapshots.append((k, state.x.detach().clone()))
        out = sampler.move(ctx, setup, state, k, t, t_next)
        while adaptive > 0 and inserted < max_insert and out.log_weight is not None:
            # a move whose weights would leave less than `adaptive` of N (conditional ESS)
            # is redone to an intermediate time, halving the step in log-SNR (in time
            # towards t = 0): the discarded move costs its network calls
            if bool((w.reweight(out.log_weight).ess() >= adaptive * N).all()):
                break
            mid = _intermediate_time(prior.schedule, t, t_next)
            if mid is None:
                break
            ctx.times = torch.cat([ctx.times[: k + 1], mid.reshape(1), ctx.times[k + 1 :]])
            inserted += 1
            t_next = mid
            out = sampler.move(ctx, setup, state, k, t, t_next)
        state, pending = out.state, out.log_weight
        step_records.append(out.info)
        k += 1
    times = ctx.times
    info = RunInfo(
        times=times,
        num_steps=times.numel() - 1,
        inserted_steps=inserted,
        nfe=ctx.nfe,
        backprop=ctx.backprop,
        steps=_stack(step_records),
        extra=sampler.run_info(ctx, setup),
    )
    out_w = out_z = None
    if weighted:
        _raise_degenerate(sampler, w, z_trace, times, problem)
        info.ess = torch.stack(ess_trace)
        info.resampled = torch.stack(res_trace)
        info.log_evidence = torch.stack(z_trace)
        info.min_ess = info.ess.min(0).values
        if acc_trace:
            acc = torch.full(info.ess.shape, math.nan, dtype=torch.float64, device=ctx.device)
            for i, a in acc_trace.items():
                acc[i] = a.double()
            info.acceptance = acc
        info.ancestors = distinct_count(w.roots)
        info.roots = w.roots
        out_w = w.log_w
        # samplers whose normalising constant is not log p(y) (FPS-SMC: the likelihood of
        # its own y-sequence) keep it in the trace only
        out_z = w.log_z if getattr(sampler, "estimates_evidence", True) else None
    bad = ~torch.isfinite(x.reshape(B, N, -1)).all(-1)  # (B, N)
    if bool(bad.any()):
        probs = torch.nonzero(bad.any(-1)).flatten().tolist()
        remedy = sampler.divergence_remedy(problem)
        raise NonFiniteSamplesError(
            f"{type(sampler).__name__} returned NaN or inf samples for problem(s) {probs} "
            f"({int(bad.sum())} of {B * N} particles): the run diverged; check the noise level "
            f"(noise_std={problem.min_noise_std:g}), the sampler's step sizes and the prior"
            + (f". {remedy}" if remedy else "")
        )
    info.distinct = _distinct_samples(x)
    divergence = getattr(model, "start_divergence", None)  # (a duck-typed prior may lack it)
    info.start_kl = divergence(times[0]) if divergence is not None else None
    if weighted:
        info.genealogy_ess = genealogy_ess(w.log_w.exp(), x, w.roots)
        if out_z is not None:  # the evidence's Monte Carlo error, from the same genealogy
            se = log_evidence_se(w.log_w.exp(), w.roots)
            # with a handful of lineages the estimate is 0 or far too small: unknown
            small = N < quality.QualityPolicy().min_particles
            info.log_evidence_se = torch.full_like(se, math.nan) if small else se
    else:  # where the prior puts the draws: overshooting steps of an approximate sampler
        t_lo, t_hi = float(ctx.times.min()), float(ctx.times.max())
        info.support_ratio = quality.support_ratio(prior, x, t_lo, t_hi)
        if snapshots:  # draws their own paths do not lead to, far from the cloud
            ratio = quality.path_ratio(prior.schedule, times, snapshots, x)
            line = quality.path_line(x[0, 0].numel(), N, len(snapshots))
            info.path_ratio = ratio.max(-1).values
            info.escaped = quality.escaped_draws(ratio, x, line, quality.QualityPolicy()).sum(-1)
    # does the cloud fit y as the noise model says (a posterior predictive check)?
    info.residual_ratio = quality.residual_ratio(problem, x, out_w)
    # the quality check: findings in info.quality, each warned with its remedy
    start_scale = float(prior.schedule.sigma(times[0])) * math.sqrt(max(1, x[0, 0].numel()))
    info.quality = quality.assess(
        type(sampler).__name__,
        info,
        x,
        N,
        max(start_scale, 1.0),
        problem.batched,
        log_weights=out_w,
        obs_dim=problem.y_flat.shape[-1],
        precision=precision,
        dtype=data_dtype,
        gaussian=problem.noise == "gaussian" and problem.log_likelihood_fn is None,
        shared_draw=bool(getattr(sampler, "shared_draw", False)),
    )
    quality.warn(info.quality)
    info.wall_time = time.perf_counter() - start
    x = x.to(out_dtype)  # a 16-bit problem's draws, computed in float32, in its dtype
    if not problem.batched:
        x = x[0]
        out_w = None if out_w is None else out_w[0]
        out_z = None if out_z is None else out_z[0]
    return Result(
        samples=x, log_weights=out_w, log_evidence=out_z, info=info, batched=problem.batched
    )

"""The denoiser contract: a :class:`DiffusionModel` maps ``(x_t, t)`` to ``E[x0 | x_t]``.

Every sampler talks to a prior through :meth:`DiffusionModel.denoise` and the schedule.
Networks trained with another parameterisation are wrapped at the edge
(:meth:`DiffusionModel.from_eps`, :meth:`~DiffusionModel.from_v`,
:meth:`~DiffusionModel.from_score`, :meth:`~DiffusionModel.from_velocity`), in the spirit
of k-diffusion's ``external.py``.

A network is called as ``net(x, t)`` with ``x`` of shape ``(M, *event_shape)`` and ``t`` of
shape ``(M,)``; the model flattens any leading dimensions of ``x_t`` into ``M`` and calls
the network in chunks of at most ``chunk_size`` rows to bound memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..schedules import (
    Schedule,
    eps_to_x0,
    score_to_x0,
    v_to_x0,
    velocity_to_x0,
    x0_to_eps,
    x0_to_score,
    x0_to_velocity,
)

__all__ = ["DiffusionModel", "broadcast_time"]

Denoiser = Callable[[Tensor, Tensor], Tensor]


def broadcast_time(t: Tensor | float, x: Tensor, event_dim: int) -> Tensor:
    """Return ``t`` as a tensor of shape ``x.shape[:-event_dim]`` on ``x``'s device and dtype.

    ``t`` may be a Python number, a 0-d tensor or a tensor whose shape broadcasts to the
    leading (non-event) shape of ``x``.
    """
    lead = x.shape[: x.dim() - event_dim]
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    try:
        return t.expand(lead)
    except RuntimeError:
        raise ValueError(
            f"t of shape {tuple(t.shape)} does not broadcast to the leading shape "
            f"{tuple(lead)} of x_t"
        ) from None


def _pad(t: Tensor, event_dim: int) -> Tensor:
    return t.reshape(t.shape + (1,) * event_dim)


class DiffusionModel(nn.Module):
    """A diffusion (or flow) prior: a schedule and a denoiser ``E[x0 | x_t]``.

    Parameters
    ----------
    denoiser
        ``denoiser(x, t) -> x0_hat`` on flat batches: ``x`` of shape ``(M, *event_shape)``,
        ``t`` of shape ``(M,)``. A ``torch.nn.Module`` is registered as a sub-module so
        ``.to(device)`` moves it.
    schedule
        The path ``x_t = alpha(t) x0 + sigma(t) eps`` the denoiser was trained on.
    event_shape
        Shape of one sample, e.g. ``(d,)`` or ``(C, H, W)``.
    chunk_size
        Largest number of rows per network call (``None``: one call).
    """

    #: Whether samplers start from the exact noisy marginal ``p_{t_0}``
    #: (:meth:`sample_noisy`) instead of the reference ``N(0, sigma_{t_0}^2 I)``; only
    #: models that know their marginals (a Gaussian mixture's ``diffusion(...,
    #: exact_start=True)``) offer it.
    exact_start: bool = False

    #: Whether the denoiser is the exact posterior mean of a known prior (a Gaussian
    #: mixture's closed form), so that its Jacobian is Tweedie's covariance at every noise
    #: level; a network's carries its error times ``1 / alpha_t`` (TDS's
    #: ``twist_variance="jacobian"`` trusts it only where the twist is sharp).
    exact_denoiser: bool = False

    #: Set only on models loaded from files: the prior JSON (``load_prior``) and the
    #: diffusers folder's description (``from_diffusers``).
    checkpoint_info: dict[str, Any]
    diffusers_info: dict[str, Any]

    def __init__(
        self,
        denoiser: Denoiser,
        schedule: Schedule,
        event_shape: Sequence[int],
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable, got {type(denoiser).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
        event_shape = tuple(int(s) for s in event_shape)
        if not event_shape or any(s < 1 for s in event_shape):
            raise ValueError(
                f"event_shape must be a non-empty tuple of positive ints, got {event_shape}"
            )
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.net = denoiser
        self.schedule = schedule
        self.event_shape = torch.Size(event_shape)
        self.chunk_size = chunk_size

    @property
    def event_dim(self) -> int:
        return len(self.event_shape)

    def start_divergence(self, t: Tensor) -> float | None:
        """``KL(N(0, sigma_t^2 I) || p_t)`` in nats for a model that knows its noisy
        marginal ``p_t`` and starts from the reference, ``None`` otherwise (a network)."""
        return None

    def sample_noisy(
        self, t: Tensor | float, lead: tuple[int, ...], generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact draws ``(*lead, *event)`` of the noisy marginal ``p_t``, for models that
        know it (``exact_start``); a network prior does not."""
        raise NotImplementedError(
            f"{type(self).__name__} does not know its noisy marginals (exact_start=False)"
        )

    # ------------------------------------------------------------------ Var[x0 | x_t]
    def x0_variance(self, t: Tensor | float) -> Tensor | None:
        """The prior's average posterior variance of ``x0`` per coordinate at times ``t``,
        ``E_{x_t ~ p_t}[tr Var[x0 | x_t]] / d`` (the exact denoiser's mean squared error per
        coordinate), or ``None`` where the model does not know it (a network).

        It depends on ``t`` through the log-SNR ``lambda = log(alpha^2 / sigma^2)`` only; a
        model that knows it keeps a table in ``lambda`` of its log-ratio to a unit Gaussian
        prior's ``sigma^2 / (alpha^2 + sigma^2)`` (:meth:`_x0_variance_lookup`), read here
        linearly between the levels and constant past the ends (where the ratio tends to the
        prior's variance per coordinate at ``alpha = 0`` and to 1 at ``sigma = 0``)."""
        table = self._x0_variance_lookup()
        if table is None:
            return None
        tt = torch.as_tensor(t)
        out_dtype = tt.dtype if tt.is_floating_point() else torch.float64
        t64 = tt.to(torch.float64)  # (a 16-bit time's sigma may overflow: all in float64)
        grid, log_ratio = self._x0_variance_on(table, tt.device)
        a, s = self.schedule.alpha(t64), self.schedule.sigma(t64)
        lam = 2 * (torch.log(a) - torch.log(s))  # -inf at alpha = 0, inf at sigma = 0
        at = lam.clamp(grid[0], grid[-1])
        hi = torch.searchsorted(grid, at).clamp(1, grid.numel() - 1)
        g0, g1 = grid[hi - 1], grid[hi]
        w = ((at - g0) / (g1 - g0)).clamp(0.0, 1.0)
        lr = torch.lerp(log_ratio[hi - 1], log_ratio[hi], w)
        return (lr.exp() * torch.sigmoid(-lam)).to(out_dtype)  # sigma^2 / (alpha^2 + sigma^2)

    def _x0_variance_lookup(self) -> tuple[Tensor, Tensor] | None:
        """``(log_snr, log_ratio)`` behind :meth:`x0_variance` (float64, increasing
        log-SNR), ``None`` here: a model that knows it overrides this."""
        return None

    def _x0_variance_on(
        self, table: tuple[Tensor, Tensor], device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """``table`` on ``device``, copied there once per table (not at every step)."""
        if table[0].device == device:
            return table
        key = (id(table[0]), device)
        cached = self.__dict__.get("_x0_variance_device")
        if cached is None or cached[0] != key:
            moved = (table[0].to(device), table[1].to(device))
            cached = self.__dict__["_x0_variance_device"] = (key, moved, table)
        return cached[1]

    # ------------------------------------------------------------------ adapters
    @classmethod
    def from_eps(cls, net: Denoiser, schedule: Schedule, event_shape, **kw) -> DiffusionModel:
        """Wrap an eps-predicting network ``net(x_t, t) -> eps``."""
        return cls(
            _Adapter(net, schedule, "eps", len(tuple(event_shape))), schedule, event_shape, **kw
        )

    @classmethod
    def from_v(cls, net: Denoiser, schedule: Schedule, event_shape, **kw) -> DiffusionModel:
        """Wrap a v-predicting network (``v = alpha eps - sigma x0``)."""
        return cls(
            _Adapter(net, schedule, "v", len(tuple(event_shape))), schedule, event_shape, **kw
        )

    @classmethod
    def from_score(cls, net: Denoiser, schedule: Schedule, event_shape, **kw) -> DiffusionModel:
        """Wrap a score network ``net(x_t, t) -> grad log p_t(x_t)``."""
        return cls(
            _Adapter(net, schedule, "score", len(tuple(event_shape))), schedule, event_shape, **kw
        )

    @classmethod
    def from_velocity(cls, net: Denoiser, schedule: Schedule, event_shape, **kw) -> DiffusionModel:
        """Wrap a flow-matching velocity network ``u = dalpha x0 + dsigma eps``."""
        return cls(
            _Adapter(net, schedule, "velocity", len(tuple(event_shape))),
            schedule,
            event_shape,
            **kw,
        )

    # ------------------------------------------------------------------ contract
    def _check(self, x_t: Tensor) -> None:
        if not isinstance(x_t, Tensor):
            raise TypeError(f"x_t must be a torch.Tensor, got {type(x_t).__name__}")
        if tuple(x_t.shape[x_t.dim() - self.event_dim :]) != tuple(self.event_shape):
            raise ValueError(
                f"x_t must end with the event shape {tuple(self.event_shape)}, "
                f"got shape {tuple(x_t.shape)}"
            )

    def denoise(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """``E[x0 | x_t]`` for ``x_t`` of shape ``(*lead, *event_shape)``.

        ``t`` is a scalar or a tensor broadcasting to ``lead``.
        """
        net = self.net
        if isinstance(net, _Adapter) and torch.as_tensor(t).dim() == 0:
            # at a scalar time x0 = p x_t + q out: two passes (and two in a backward pass)
            # where the conversion at per-particle times takes three (and four)
            tt = torch.as_tensor(t).to(dtype=x_t.dtype, device=x_t.device)
            p, q = net.affine(tt)
            out = self._evaluate(net.net, x_t, t)
            # the second pass in place (autograd keeps q and p, not the product it overwrites)
            return (out * q).addcmul_(x_t, p)
        return self._evaluate(net, x_t, t)

    def denoise_vjp(
        self, x_t: Tensor, t: Tensor | float, fn: Callable[[Tensor], tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``x0_hat``, ``v`` and ``J^T u`` where ``(v, u) = fn(x0_hat)`` (``fn`` sees
        ``x0_hat`` detached; ``J = d x0_hat / d x_t``), by one backward pass.

        For an eps / v / score / velocity network at a scalar time ``x0_hat = p x_t + q
        out``, so ``J^T u = q J_out^T u + p u``: autograd runs through the network only,
        with ``q u`` as its output's cotangent, and ``p u`` is added in place (two passes,
        where autograd through the affine map takes three, each a fresh array). Otherwise
        autograd runs through :meth:`denoise`."""
        net = self.net
        if isinstance(net, _Adapter) and torch.as_tensor(t).dim() == 0:
            tt = torch.as_tensor(t).to(dtype=x_t.dtype, device=x_t.device)
            p, q = net.affine(tt)
            with torch.enable_grad():
                xr = x_t.detach().requires_grad_(True)
                out = self._evaluate(net.net, xr, t)
            x0 = (out.detach() * q).addcmul_(x_t, p)
            v, u = fn(x0)
            (g,) = torch.autograd.grad(out, xr, grad_outputs=u * q)
            # (a network's input gradient may come back as a broadcast view: out of place)
            return x0, v, g.addcmul_(u, p) if g.is_contiguous() else g.addcmul(u, p)
        with torch.enable_grad():
            xr = x_t.detach().requires_grad_(True)
            x0 = self.denoise(xr, t)
            v, u = fn(x0.detach())
            (g,) = torch.autograd.grad(x0, xr, grad_outputs=u)
        return x0.detach(), v, g

    def _evaluate(self, net: Denoiser, x_t: Tensor, t: Tensor | float) -> Tensor:
        """``net`` on the flattened batch (in chunks of ``chunk_size``), in ``x_t``'s shape."""
        self._check(x_t)
        tt = broadcast_time(t, x_t, self.event_dim)
        flat = x_t.reshape((-1,) + tuple(self.event_shape))
        tf = tt.reshape(-1)
        if self.chunk_size is None or flat.shape[0] <= self.chunk_size:
            out = _checked_call(net, flat, tf)
        else:
            out = torch.cat(
                [
                    _checked_call(net, xc, tc)
                    for xc, tc in zip(flat.split(self.chunk_size), tf.split(self.chunk_size))
                ]
            )
        return out.reshape(x_t.shape)

    def denoise_affine(
        self, x_t: Tensor, t: Tensor | float, c_x: Tensor | float, c_x0: Tensor | float
    ) -> Tensor:
        """``c_x x_t + c_x0 E[x0 | x_t]`` for a scalar time ``t`` and scalar coefficients.

        For an eps / v / score / velocity network ``x0_hat = p x_t + q out`` is affine in
        the network's own output, so this is ``(c_x + c_x0 p) x_t + c_x0 q out``: two scaled
        passes, and no ``x0_hat`` formed and converted back (a DDIM mean costs 3 passes
        instead of ~8). Other denoisers (x0 networks, closed-form priors) evaluate
        ``denoise`` and combine.
        """
        net = self.net
        tt = torch.as_tensor(t)
        native = type(self).denoise is DiffusionModel.denoise  # a subclass may override it
        if native and isinstance(net, _Adapter) and tt.dim() == 0:
            p, q = net.affine(tt.to(dtype=x_t.dtype, device=x_t.device))
            out = self._evaluate(net.net, x_t, t)
            return (out * (c_x0 * q)).addcmul_(x_t, c_x + c_x0 * p)
        return torch.addcmul(x_t * c_x, self.denoise(x_t, t), torch.as_tensor(c_x0))

    def coefficients(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha(t)`` and ``sigma(t)`` shaped to broadcast against ``x``."""
        tt = _pad(broadcast_time(t, x, self.event_dim), self.event_dim)
        return self.schedule.alpha(tt), self.schedule.sigma(tt)

    def eps(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Predicted noise ``(x_t - alpha x0_hat) / sigma``."""
        a, s = self.coefficients(t, x_t)
        return x0_to_eps(x_t, self.denoise(x_t, t), a, s)

    def score(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """``grad log p_t(x_t) = (alpha x0_hat - x_t) / sigma^2`` (Tweedie)."""
        a, s = self.coefficients(t, x_t)
        return x0_to_score(x_t, self.denoise(x_t, t), a, s)

    def velocity(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Probability-flow velocity ``dx_t/dt = dalpha E[x0|x_t] + dsigma E[eps|x_t]``."""
        tt = _pad(broadcast_time(t, x_t, self.event_dim), self.event_dim)
        sch = self.schedule
        return x0_to_velocity(
            x_t,
            self.denoise(x_t, t),
            sch.alpha(tt),
            sch.sigma(tt),
            sch.dalpha(tt),
            sch.dsigma(tt),
        )


def _checked_call(net: Denoiser, x: Tensor, t: Tensor) -> Tensor:
    """``net(x, t)``, with a clear error when it does not return a floating-point tensor of
    ``x``'s shape (cast to ``x``'s dtype otherwise)."""
    out = net(x, t)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the network returned a {type(out).__name__}, not a tensor: net(x, t) must return "
            f"a tensor of x's shape {tuple(x.shape)}"
        )
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(
            f"the network returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}: "
            "net(x, t) must return one value per input entry, of x's shape (batch first, "
            "then the event shape)"
        )
    if not out.is_floating_point():
        raise TypeError(f"the network returned {out.dtype} values; it must return floating point")
    return out if out.dtype == x.dtype else out.to(x.dtype)


class _Adapter(nn.Module):
    """Turn an eps / v / score / velocity network into an x0-denoiser."""

    def __init__(self, net: Denoiser, schedule: Schedule, kind: str, event_dim: int) -> None:
        super().__init__()
        if not callable(net):
            raise TypeError(f"net must be callable, got {type(net).__name__}")
        self.net = net
        self.schedule = schedule
        self.kind = kind
        self.event_dim = event_dim

    def affine(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(p, q)`` with ``x0 = p x_t + q out`` at the scalar time ``t``: every
        parameterisation's conversion is affine in ``(x_t, out)``, so its coefficients are
        the conversion itself evaluated at ``(1, 0)`` and ``(0, 1)``."""
        one, zero = torch.ones_like(t), torch.zeros_like(t)
        return self._to_x0(one, zero, t), self._to_x0(zero, one, t)

    def _to_x0(self, x: Tensor, out: Tensor, tt: Tensor) -> Tensor:
        """The network's output ``out`` at ``(x, tt)`` converted to ``x0`` (``tt``
        broadcasting against ``x``)."""
        sch = self.schedule
        a, s = sch.alpha(tt), sch.sigma(tt)
        if self.kind == "eps":
            return eps_to_x0(x, out, a, s)
        if self.kind == "v":
            return v_to_x0(x, out, a, s)
        if self.kind == "score":
            return score_to_x0(x, out, a, s)
        return velocity_to_x0(x, out, a, s, sch.dalpha(tt), sch.dsigma(tt))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out = _checked_call(self.net, x, t)
        return self._to_x0(x, out, _pad(t, self.event_dim))

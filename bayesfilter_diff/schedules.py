"""Gaussian noising paths ``x_t = alpha(t) x0 + sigma(t) eps`` on ``t in [0, 1]``.

``t = 0`` is the data, ``t = 1`` the (near-)pure-noise end, for every schedule:

- :class:`VPSchedule` -- variance preserving, ``alpha^2 + sigma^2 = 1``.
  ``VPSchedule.linear()`` is the continuous limit of DDPM's linear betas (``1e-4 .. 0.02``
  over 1000 steps, Ho et al. 2020): ``beta(t) = beta_min + t (beta_max - beta_min)`` with
  ``beta_min = 0.1``, ``beta_max = 20`` and ``alpha(t) = exp(-1/2 int_0^t beta)`` (Song et al.
  2021, VP-SDE). ``VPSchedule.cosine()`` is Nichol & Dhariwal's cosine schedule
  ``alpha^2(t) = f(t) / f(0)``, ``f(t) = cos^2((t + s) / (1 + s) pi / 2)``, ``s = 0.008``,
  clipped so that ``alpha(1) > 0``.
- :class:`VESchedule` -- variance exploding, ``alpha = 1``,
  ``sigma(t) = sigma_min (sigma_max / sigma_min)^t`` (Song et al. 2021, VE-SDE).
- :class:`FlowSchedule` -- rectified flow / conditional OT path, ``alpha = 1 - t``,
  ``sigma = t``.
- :class:`DiscreteVPSchedule` -- the VP path of a discrete-time DDPM (e.g. a ``diffusers``
  scheduler's ``alphas_cumprod``), interpolated in ``log alpha^2`` and exact at the
  training steps.

Each gives ``alpha``, ``sigma``, their time derivatives, the log-SNR
``lambda = log(alpha^2 / sigma^2)`` and time grids for ``n`` steps. The conversions between
x0-, eps-, score- and velocity-predictions live here too, since they only need the path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "VPSchedule",
    "VESchedule",
    "FlowSchedule",
    "DiscreteVPSchedule",
    "eps_to_x0",
    "x0_to_eps",
    "score_to_x0",
    "x0_to_score",
    "v_to_x0",
    "velocity_to_x0",
    "x0_to_velocity",
]


def _as_tensor(t: Tensor | float, like: Tensor | None = None) -> Tensor:
    if isinstance(t, Tensor):
        return t
    if like is not None:
        return torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return torch.as_tensor(t, dtype=torch.get_default_dtype())


class Schedule:
    """A Gaussian path ``x_t = alpha(t) x0 + sigma(t) eps``.

    Subclasses implement :meth:`alpha`, :meth:`sigma`, :meth:`dalpha` and :meth:`dsigma`
    for tensors ``t`` in ``[0, 1]`` (any shape, elementwise).
    """

    #: ``"vp"``, ``"ve"`` or ``"flow"``.
    kind: str = ""

    def alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dalpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dsigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_snr(self, t: Tensor) -> Tensor:
        """``log(alpha(t)^2 / sigma(t)^2)`` (``+inf`` where ``sigma = 0``)."""
        t = _as_tensor(t)
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def time_grid(
        self,
        num_steps: int,
        kind: str = "uniform",
        *,
        t_max: float = 1.0,
        t_min: float = 0.0,
        num_train_steps: int = 1000,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Decreasing times ``t_0 = t_max > t_1 > ... > t_n = t_min`` for ``n`` steps.

        Parameters
        ----------
        num_steps
            Number of steps ``n`` (the grid has ``n + 1`` points).
        kind
            ``"uniform"``: evenly spaced in ``[t_min, t_max]``. ``"ddpm"``: the respaced
            DDPM grid used by DDIM (Song et al. 2021): the discrete training steps
            ``i = 0, k, 2k, ..., (n - 1) k`` with ``k = num_train_steps // n``, at times
            ``(i + 1) / num_train_steps``, followed by ``t_min``.
        t_max, t_min
            End points.
        num_train_steps
            Number of discrete training steps for ``kind="ddpm"``.
        """
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        dtype = dtype or torch.get_default_dtype()
        if kind == "uniform":
            return torch.linspace(t_max, t_min, num_steps + 1, dtype=dtype, device=device)
        if kind == "ddpm":
            if num_steps > num_train_steps:
                raise ValueError(
                    f"num_steps ({num_steps}) must not exceed num_train_steps ({num_train_steps})"
                )
            skip = num_train_steps // num_steps
            idx = torch.arange(num_steps - 1, -1, -1, dtype=dtype, device=device) * skip
            ts = (idx + 1.0) / num_train_steps * t_max
            return torch.cat([ts, torch.full((1,), t_min, dtype=dtype, device=device)])
        raise ValueError(f"kind must be 'uniform' or 'ddpm', got {kind!r}")


@dataclass(frozen=True)
class VPSchedule(Schedule):
    """Variance-preserving path; construct with :meth:`linear` or :meth:`cosine`."""

    name: str = "linear"
    beta_min: float = 0.1
    beta_max: float = 20.0
    cosine_s: float = 0.008
    #: Largest ``t`` maps to ``alpha >= alpha_min`` for the cosine schedule.
    alpha_min: float = 1e-3
    kind: str = "vp"

    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0) -> VPSchedule:
        """DDPM's linear betas in the continuous limit (``beta_min=0.1``, ``beta_max=20``)."""
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        return cls(name="linear", beta_min=beta_min, beta_max=beta_max)

    @classmethod
    def cosine(cls, s: float = 0.008) -> VPSchedule:
        """Nichol & Dhariwal's cosine schedule with offset ``s``."""
        if s <= 0:
            raise ValueError(f"s must be positive, got {s}")
        return cls(name="cosine", cosine_s=s)

    def _log_alpha(self, t: Tensor) -> Tensor:
        if self.name == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        s = self.cosine_s
        f = torch.cos((t + s) / (1 + s) * math.pi / 2)
        f0 = math.cos(s / (1 + s) * math.pi / 2)
        return torch.log(torch.clamp(f / f0, min=self.alpha_min))

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self._log_alpha(_as_tensor(t)))

    def sigma(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        # sqrt(1 - alpha^2) = sqrt(-expm1(2 log alpha)) keeps precision for small t.
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha(t)))

    def dalpha(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        if self.name == "linear":
            dlog = -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min
        else:
            s = self.cosine_s
            u = (t + s) / (1 + s) * math.pi / 2
            dlog = -torch.tan(u) * math.pi / 2 / (1 + s)
        return self.alpha(t) * dlog

    def dsigma(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        a = self.alpha(t)
        return -a * self.dalpha(t) / self.sigma(t)

    def log_snr(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        la = self._log_alpha(t)
        return 2.0 * la - torch.log(-torch.expm1(2.0 * la))


@dataclass(frozen=True)
class VESchedule(Schedule):
    """Variance-exploding path: ``alpha = 1``, ``sigma = sigma_min (sigma_max/sigma_min)^t``."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    kind: str = "ve"

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_as_tensor(t))

    def sigma(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def dalpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def dsigma(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)


@dataclass(frozen=True)
class FlowSchedule(Schedule):
    """Rectified-flow path ``alpha = 1 - t``, ``sigma = t`` (data at ``t = 0``)."""

    kind: str = "flow"

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - _as_tensor(t)

    def sigma(self, t: Tensor) -> Tensor:
        return _as_tensor(t).clone()

    def dalpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(_as_tensor(t))

    def dsigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(_as_tensor(t))


class DiscreteVPSchedule(Schedule):
    """The VP path of a discrete-time DDPM, exact at its training steps.

    A DDPM with ``T`` training steps noises ``x0`` at step ``k = 0 .. T-1`` to
    ``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps`` with
    ``abar_k = prod_{j <= k} (1 - beta_j)`` (``alphas_cumprod`` in ``diffusers``). Step
    ``k`` has had ``k + 1`` noising steps applied, so it sits at time ``t_{k+1} = (k+1)/T``
    on the knots ``t_j = j / T``, ``j = 0 .. T``, with ``abar(t_0 = 0) = 1`` (clean data).
    This is the convention of :meth:`Schedule.time_grid` ``kind="ddpm"`` (training step
    ``i`` at time ``(i + 1) / T``) and of the continuous limit :meth:`VPSchedule.linear`.

    Between the knots ``log abar`` is linear in ``t``: the continuous-time noise rate
    ``beta(t) = -d log abar / dt`` is piecewise constant, ``beta(t) = -T log(1 - beta_k)``
    on ``(k/T, (k+1)/T]``, so that integrating it over one step gives back DDPM's
    ``1 - beta_k`` exactly. :meth:`dalpha` and :meth:`dsigma` are the derivatives of this
    interpolant (one-sided at a knot: the interval ``[t_j, t_{j+1})`` is used, the last one
    at ``t = 1``); they jump at the knots, as ``beta(t)`` does.

    Parameters
    ----------
    alphas_cumprod
        ``(T,)`` values ``abar_0 >= abar_1 >= ... >= abar_{T-1}`` in ``(0, 1]``, e.g.
        ``scheduler.alphas_cumprod``. Values below ``min_alphas_cumprod`` are raised to it so
        that ``alpha(1) > 0``: a zero-terminal-SNR schedule ends with ``abar = 0`` (use a
        v-prediction network there; an eps-network's ``x0 = (x - sigma eps) / alpha`` is
        then ill-conditioned at ``t = 1``).
    min_alphas_cumprod
        Smallest ``abar`` kept (default ``1e-12``; diffusers' cosine schedule ends near
        ``2.4e-9``, kept exactly).
    """

    kind: str = "vp"

    def __init__(self, alphas_cumprod: Tensor, min_alphas_cumprod: float = 1e-12) -> None:
        ac = torch.as_tensor(alphas_cumprod).detach()
        if ac.dim() != 1 or ac.numel() < 1 or not ac.is_floating_point():
            raise ValueError(
                f"alphas_cumprod must be a non-empty 1-D floating tensor, got shape "
                f"{tuple(ac.shape)} and dtype {ac.dtype}"
            )
        ac = ac.to(device="cpu", dtype=torch.float64)
        if not 0.0 < min_alphas_cumprod < 1.0:
            raise ValueError(f"min_alphas_cumprod must be in (0, 1), got {min_alphas_cumprod}")
        if not torch.isfinite(ac).all() or (ac < 0).any() or (ac > 1).any():
            raise ValueError("alphas_cumprod must be finite and lie in [0, 1]")
        if (ac[1:] > ac[:-1]).any():
            raise ValueError("alphas_cumprod must be non-increasing")
        ac = ac.clamp_min(min_alphas_cumprod)
        #: Number of training steps ``T``.
        self.num_train_steps = int(ac.numel())
        #: ``log abar`` at the knots ``t_j = j / T``, ``j = 0 .. T`` (float64, CPU).
        self.log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(ac)])
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"DiscreteVPSchedule(num_train_steps={self.num_train_steps}, "
            f"alphas_cumprod[-1]={float(self.log_abar[-1].exp()):.3g})"
        )

    def __getstate__(self) -> dict:
        return {"num_train_steps": self.num_train_steps, "log_abar": self.log_abar}

    def __setstate__(self, state: dict) -> None:
        self.num_train_steps = state["num_train_steps"]
        self.log_abar = state["log_abar"]
        self._cache = {}

    @property
    def alphas_cumprod(self) -> Tensor:
        """``abar_k`` at the training steps ``k = 0 .. T-1`` (float64)."""
        return self.log_abar[1:].exp()

    def _knots(self, t: Tensor) -> Tensor:
        key = (t.device, t.dtype)
        L = self._cache.get(key)
        if L is None:
            L = self.log_abar.to(device=t.device, dtype=t.dtype)
            self._cache[key] = L
        return L

    def _interp(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``log abar(t)`` and its slope ``d log abar / dt`` (piecewise linear)."""
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        L = self._knots(t)
        T = self.num_train_steps
        u = (t * T).clamp(0.0, float(T))
        j = torch.floor(u).clamp(max=T - 1)
        w = u - j
        j = j.long()
        lo, hi = L[j], L[j + 1]
        return lo + w * (hi - lo), (hi - lo) * T

    def _log_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * self._interp(_as_tensor(t))[0]

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self._log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha(t)))

    def dalpha(self, t: Tensor) -> Tensor:
        la, slope = self._interp(_as_tensor(t))
        return torch.exp(0.5 * la) * 0.5 * slope

    def dsigma(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        return -self.alpha(t) * self.dalpha(t) / self.sigma(t)

    def log_snr(self, t: Tensor) -> Tensor:
        la = 2.0 * self._log_alpha(t)
        return la - torch.log(-torch.expm1(la))

    def time_grid(self, num_steps: int, kind: str = "uniform", **kw) -> Tensor:
        """As :meth:`Schedule.time_grid`, with ``num_train_steps`` defaulting to ``T``."""
        kw.setdefault("num_train_steps", self.num_train_steps)
        return super().time_grid(num_steps, kind, **kw)

    def training_time(self, step: Tensor | int) -> Tensor:
        """The time ``(k + 1) / T`` of training step ``k`` (float64)."""
        return (torch.as_tensor(step, dtype=torch.float64) + 1.0) / self.num_train_steps


# --------------------------------------------------------------------------------------
# Conversions between parameterisations. ``alpha`` and ``sigma`` broadcast against x.


def eps_to_x0(x_t: Tensor, eps: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """``x0 = (x_t - sigma eps) / alpha``."""
    return (x_t - sigma * eps) / alpha


def x0_to_eps(x_t: Tensor, x0: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """``eps = (x_t - alpha x0) / sigma``."""
    return (x_t - alpha * x0) / sigma


def score_to_x0(x_t: Tensor, score: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie: ``x0 = (x_t + sigma^2 score) / alpha``."""
    return (x_t + sigma**2 * score) / alpha


def x0_to_score(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``score = (alpha x0 - x_t) / sigma^2``."""
    return (alpha * x0 - x_t) / sigma**2


def v_to_x0(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v-prediction (Salimans & Ho 2022, VP paths): ``x0 = alpha x_t - sigma v``.

    For general paths ``v = alpha eps - sigma x0`` gives
    ``x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)``.
    """
    return (alpha * x_t - sigma * v) / (alpha**2 + sigma**2)


def velocity_to_x0(
    x_t: Tensor, u: Tensor, alpha: Tensor, sigma: Tensor, dalpha: Tensor, dsigma: Tensor
) -> Tensor:
    """Flow-matching velocity ``u = dalpha x0 + dsigma eps`` to ``x0``.

    Solving ``x_t = alpha x0 + sigma eps`` and ``u`` for ``x0``:
    ``x0 = (dsigma x_t - sigma u) / (alpha dsigma - sigma dalpha)``.
    """
    return (dsigma * x_t - sigma * u) / (alpha * dsigma - sigma * dalpha)


def x0_to_velocity(
    x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor, dalpha: Tensor, dsigma: Tensor
) -> Tensor:
    """``u = dalpha x0 + dsigma eps`` with ``eps = (x_t - alpha x0) / sigma``."""
    return dalpha * x0 + dsigma * (x_t - alpha * x0) / sigma

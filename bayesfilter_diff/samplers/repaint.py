"""RePaint: inpainting with an unconditional diffusion prior (Lugmayr et al., CVPR 2022).

Reference code: andreas128/RePaint ``guided_diffusion/scheduler.py::get_schedule_jump``,
``guided_diffusion/gaussian_diffusion.py``. See ``docs/methods/repaint.md``.

Update (paper, Alg. 1, ``m`` the mask of known pixels), for each transition of the jump
schedule:

1. reverse ``t -> s < t``, unknown region: ``x_s^unknown ~ p_theta(x_s | x_t)``, the DDPM
   ancestral step (DDIM kernel with ``eta = 1``, :func:`.kernels.ddim_coefficients`);
2. reverse, known region: ``x_s^known = alpha_s y + sigma_s z`` (forward-noised ``y``);
3. merge: ``x_s = m * x_s^known + (1 - m) * x_s^unknown``;
4. forward ("undo") ``t -> s > t``: ``x_s ~ q(x_s | x_t) = N((alpha_s / alpha_t) x_t,
   (sigma_s^2 - (alpha_s / alpha_t)^2 sigma_t^2) I)`` on the whole signal.

The jump schedule (:func:`repaint_jump_schedule`, the code's ``get_schedule_jump``) is the
non-monotone time grid returned by :meth:`RePaint.time_grid`; ``jump_n_sample = 1`` is plain
replacement inpainting. Masking operators only (``operator.is_mask``).

Defaults (all ``confs/test_*.yml`` of the official code, and the paper): ``num_steps = 250``,
``jump_length = 10``, ``jump_n_sample = 10`` (2410 reverse transitions = NFEs, 2160 forward).

Departures from the official code (details in the notes):

- merge at the new level after the model call (the paper), so the output's known entries
  equal ``y`` exactly on VP and flow paths; the code merges before the call, returns ``x0_hat``;
- ``x0_hat`` unclipped and the exact posterior variance (``eta = 1``), not ADM's learned one;
- ``noise_std`` is ignored: the known entries are replaced by (forward-noised) ``y`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ..operators.mask import Mask
from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from .base import Context, Move, Requirements, Sampler
from .kernels import ddim_coefficients

__all__ = ["RePaint", "repaint_jump_schedule"]


def repaint_jump_schedule(t_T: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's resampling schedule of discrete indices ``t_T - 1, ..., -1``.

    Port of ``get_schedule_jump`` (andreas128/RePaint ``guided_diffusion/scheduler.py``)
    with ``n_sample = 1`` and the unused ``jump2`` / ``jump3`` / ``start_resampling``
    options at their defaults (off). Every ``j`` in ``range(0, t_T - jump_length,
    jump_length)`` is, after being reached, followed by a jump back up by ``jump_length``
    indices, ``jump_n_sample - 1`` times.

    Parameters
    ----------
    t_T
        Number of diffusion steps.
    jump_length
        How far (in steps) each jump goes back up.
    jump_n_sample
        How many times each jump start is passed (``1``: no jumps).

    Returns
    -------
    list of int
        Consecutive entries differ by exactly one.
    """
    jumps = {j: jump_n_sample - 1 for j in range(0, t_T - jump_length, jump_length)}
    t = t_T
    ts: list[int] = []
    while t >= 1:
        t -= 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                ts.append(t)
    ts.append(-1)
    return ts


@dataclass(frozen=True)
class RePaintSetup:
    """The observation on the signal grid ``(B, 1, *event)`` and the mask ``(*event)``."""

    y_embed: Tensor
    mask: Tensor


@dataclass(frozen=True)
class RePaintState:
    x: Tensor


@dataclass(frozen=True)
class RePaintInfo:
    """Transitions made: reverse ones (one network call each) and forward ("undo") ones."""

    reverse_steps: int
    forward_steps: int


@dataclass(frozen=True)
class RePaint(Sampler):
    """RePaint inpainting: replace the known region, resample with forward jumps.

    Parameters
    ----------
    num_steps
        Number of diffusion steps ``t_T`` of the base grid (default 250, the official code).
    grid
        Base grid kind (``"uniform"`` or ``"ddpm"``).
    jump_length
        Jump length ``j`` (default 10).
    jump_n_sample
        Number of passes ``r`` over every jump segment (default 10; ``1`` = no jumps).
    """

    requires = Requirements(mask=True)
    exact_start = True
    on_path = True

    num_steps: int = 250
    jump_length: int = 10
    jump_n_sample: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("jump_length", "jump_n_sample"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    def time_grid(self, prior: DiffusionModel, problem: InverseProblem) -> Tensor:
        """The full non-monotone sequence of times visited (reverse and forward).

        Index ``k`` of the jump schedule is the point ``g[n - 1 - k]`` of the base grid ``g``
        of ``n = num_steps`` steps (``g[0] = 1``, ``g[n] = 0``): ``t_T - 1`` is ``t = 1``,
        ``-1`` is ``t = 0``. A move with ``t_next > t`` is a forward transition.
        """
        g = super().time_grid(prior, problem)
        n = self.num_steps
        ks = repaint_jump_schedule(n, self.jump_length, self.jump_n_sample)
        idx = torch.tensor([n - 1 - k for k in ks], device=g.device)
        return g[idx]

    def setup(self, ctx: Context) -> RePaintSetup:
        op = cast(Mask, ctx.problem.operator)
        return RePaintSetup(op.embed(ctx.y).unsqueeze(1), op.mask)

    def init(self, ctx: Context, setup: RePaintSetup) -> tuple[RePaintState, None]:
        # x_T ~ N(0, sigma_T^2 I) (alpha_T x0 neglected, as in DDIM / the official code).
        return RePaintState(ctx.start()), None

    def move(
        self, ctx: Context, setup: RePaintSetup, state: RePaintState, k: int, t, t_next
    ) -> Move:
        sch = ctx.prior.schedule
        x = state.x
        if t_next > t:
            # 4. Forward ("undo") transition x_s ~ q(x_s | x_t) on the whole signal.
            a_t, s_t = sch.alpha(t), sch.sigma(t)
            a_s, s_s = sch.alpha(t_next), sch.sigma(t_next)
            ratio = a_s / a_t.clamp_min(torch.finfo(x.dtype).tiny)
            std = (s_s**2 - ratio**2 * s_t**2).clamp_min(0).sqrt()
            return Move(RePaintState(ratio * x + std * ctx.randn()))
        # 1. Unknown region: DDPM ancestral step x_s ~ p(x_s | x_t) (DDIM kernel, eta = 1).
        coef = ddim_coefficients(sch, t, t_next, 1.0)
        x_next = ctx.denoise_mean(x, t, coef, sch.sigma(t)) + coef.std * ctx.randn()
        # 2. Known region: forward-noised observation at the new level, alpha_s y + sigma_s z;
        # 3. merge with the mask.
        known = coef.alpha_s * setup.y_embed + sch.sigma(t_next) * ctx.randn()
        return Move(RePaintState(torch.where(setup.mask, known, x_next)))

    def run_info(self, ctx: Context, setup: RePaintSetup) -> RePaintInfo:
        """How many reverse and forward transitions the jump schedule made."""
        forward = int((ctx.times[1:] > ctx.times[:-1]).sum())
        return RePaintInfo(ctx.times.numel() - 1 - forward, forward)

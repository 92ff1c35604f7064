"""RePaint: inpainting with an unconditional diffusion prior (Lugmayr et al., CVPR 2022).

Reference code: andreas128/RePaint ``guided_diffusion/scheduler.py::get_schedule_jump``,
``guided_diffusion/gaussian_diffusion.py`` (``p_sample``, ``p_sample_loop_progressive``,
``undo``).

Update (paper, Alg. 1, in the paper's notation with ``m`` the mask of known pixels)::

    x_{t-1}^known   = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1}) eps      (forward-noised y)
    x_{t-1}^unknown ~ p_theta(x_{t-1} | x_t)                              (ancestral step)
    x_{t-1}         = m * x_{t-1}^known + (1 - m) * x_{t-1}^unknown
    and, for a jump ("resampling", "undo"):  x_t ~ N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

In our notation (``x_t = alpha(t) x0 + sigma(t) eps``, ``t = 1`` noise) the reverse
transition ``t -> s < t`` is the DDPM ancestral step (the generic DDIM kernel with
``eta = 1``, :func:`~bayesfilter_diff.samplers.base.ddim_coefficients`) followed by the
merge ``x_s <- m * (alpha_s y + sigma_s z) + (1 - m) * x_s``; the forward transition
``t -> s > t`` is the exact forward kernel of the path,
``q(x_s | x_t) = N((alpha_s / alpha_t) x_t, (sigma_s^2 - (alpha_s / alpha_t)^2 sigma_t^2) I)``
(for VP this is ``undo``'s ``N(sqrt(1 - beta) x, beta I)`` over one step), applied to the
whole signal.

Jump schedule: :meth:`RePaint.time_grid` returns the full, non-monotone sequence of times.
``get_schedule_jump(t_T, n_sample=1, jump_length, jump_n_sample)`` lists discrete indices
``t_T - 1, ..., -1``; every ``j`` in ``range(0, t_T - jump_length, jump_length)`` is, after
being reached, followed by a jump back up by ``jump_length`` indices, ``jump_n_sample - 1``
times. Index ``k`` is mapped to the point ``g[n - 1 - k]`` of the base grid ``g`` of
``n = num_steps`` steps (``g[0] = 1``, ``g[n] = 0``), so index ``t_T - 1`` is ``t = 1`` and
``-1`` is ``t = 0``. The shared loop iterates the grid pairwise; :meth:`RePaint.step` treats
``t_next > t`` as a forward transition. ``jump_n_sample = 1`` gives no jumps (plain
"replacement" inpainting).

Defaults (all ``confs/test_*.yml`` of the official code, also the paper's setting):
``num_steps = 250`` (``t_T``, ``timestep_respacing: '250'``), ``jump_length = 10``,
``jump_n_sample = 10``. That is 2410 reverse transitions (= NFEs) and 2160 forward ones.

Where the official code departs from the paper, and what is done here:

- The code merges at the current level ``t`` *before* the model call (skipped on the first
  call), the paper merges at the new level ``t - 1`` after sampling. Both give the model
  the same input distribution; they differ at the two ends. We follow the paper, so the
  output at ``t = 0`` has the known entries equal to ``y`` exactly (VP and flow paths, where
  ``sigma(0) = 0``). The code returns the model's ``x0_hat`` everywhere (the known region is
  not pasted back at the end).
- The code clips ``x0_hat`` to ``[-1, 1]`` and uses ADM's learned-range variance; we use the
  prior's ``x0_hat`` unclipped and the exact posterior variance ``q(x_s | x_t, x0)``
  (``eta = 1``), the only variance available for a generic denoiser.
- RePaint assumes noise-free observations and ignores ``sigma_y``; with ``noise_std > 0``
  the known entries are still replaced by (forward-noised) ``y`` itself.
- ImageNet configurations add classifier guidance with a random class; not applicable here.

Only masking operators (``operator.is_mask``, :class:`~bayesfilter_diff.operators.Mask`)
are supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from .base import Context, Sampler, _describe_likelihood, ddim_coefficients

__all__ = ["RePaint", "repaint_jump_schedule"]


def repaint_jump_schedule(t_T: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's resampling schedule of discrete indices ``t_T - 1, ..., -1``.

    Port of ``get_schedule_jump`` (andreas128/RePaint ``guided_diffusion/scheduler.py``)
    with ``n_sample = 1`` and the unused ``jump2`` / ``jump3`` / ``start_resampling``
    options at their defaults (off).

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

    num_steps: int = 250
    jump_length: int = 10
    jump_n_sample: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("jump_length", "jump_n_sample"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    def check(self, prior: DiffusionModel, problem: InverseProblem) -> None:
        if not getattr(problem.operator, "is_mask", False):
            raise ValueError(
                "RePaint needs a masking operator (operators.Mask, operator.is_mask=True) "
                f"with Gaussian or no noise; got {type(problem.operator).__name__}"
            )
        if problem.noise != "gaussian" or problem.log_likelihood_fn is not None:
            raise ValueError(
                "RePaint needs a Gaussian (or noise-free) masking problem without a custom "
                f"log_likelihood_fn; got {_describe_likelihood(problem)}"
            )

    def time_grid(self, prior: DiffusionModel, problem: InverseProblem) -> Tensor:
        """The full non-monotone sequence of times visited (reverse and forward)."""
        g = super().time_grid(prior, problem)
        n = self.num_steps
        ks = repaint_jump_schedule(n, self.jump_length, self.jump_n_sample)
        idx = torch.tensor([n - 1 - k for k in ks], device=g.device)
        return g[idx]

    def init(self, ctx: Context):
        sch = ctx.prior.schedule
        op = ctx.problem.operator
        # Known entries on the signal grid, (B, 1, *event), and the mask (*event).
        ctx.cache["y_embed"] = op.embed(ctx.y).unsqueeze(1)
        ctx.cache["mask"] = op.mask
        info = ctx.cache.setdefault("info", {})
        info["reverse_steps"] = 0
        info["forward_steps"] = 0
        # x_T ~ N(0, sigma_T^2 I) (alpha_T x0 neglected, as in DDIM / the official code).
        return {"x": sch.sigma(ctx.times[0]) * ctx.randn()}, None

    def step(self, ctx: Context, state, i, t, t_next):
        sch = ctx.prior.schedule
        x = state["x"]
        info = ctx.cache["info"]
        if t_next > t:
            # Forward ("undo") transition x_s ~ q(x_s | x_t) on the whole signal.
            a_t, s_t = sch.alpha(t), sch.sigma(t)
            a_s, s_s = sch.alpha(t_next), sch.sigma(t_next)
            ratio = a_s / a_t.clamp_min(torch.finfo(x.dtype).tiny)
            std = (s_s**2 - ratio**2 * s_t**2).clamp_min(0).sqrt()
            info["forward_steps"] += 1
            return {"x": ratio * x + std * ctx.randn()}, None
        # 1. Unknown region: DDPM ancestral step x_s ~ p(x_s | x_t) (DDIM kernel, eta = 1).
        x0 = ctx.denoise(x, t)
        a_s, c_eps, std, a_t = ddim_coefficients(sch, t, t_next, 1.0)
        eps = (x - a_t * x0) / sch.sigma(t)
        x_next = a_s * x0 + c_eps * eps + std * ctx.randn()
        # 2. Known region: forward-noised observation at the new level,
        #    x_s^known = alpha_s y + sigma_s z; merge with the mask.
        known = a_s * ctx.cache["y_embed"] + sch.sigma(t_next) * ctx.randn()
        x_next = torch.where(ctx.cache["mask"], known, x_next)
        info["reverse_steps"] += 1
        return {"x": x_next}, None

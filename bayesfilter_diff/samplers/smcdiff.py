"""SMCDiff: the replacement particle filter for inpainting (masks).

Trippe, Yim, Tischer, Baker, Broderick, Barzilay & Jaakkola, "Diffusion probabilistic modeling
of protein backbones in 3D for the motif-scaffolding problem", ICLR 2023 (arXiv 2206.04119).
Reference code: blt2114/ProtDiff_SMCDiff (``inpainting/particle_filter.py``,
``inpainting/inpaint.py``, ``data/diffuser.py``). See ``docs/methods/smcdiff.md``.

Update (paper notation: motif ``x^M`` = observed entries, scaffold ``x^S`` = the others)
----------------------------------------------------------------------------------------
0. Forward-diffuse the observation once, shared by all particles (drawn first, with the
   run's generator): ``x^M_{t_n} = y`` and, going up the grid,
   ``x^M_{t_k} = (alpha_k / alpha_{k+1}) x^M_{t_{k+1}} + sigma_{k|k+1} z_k`` (the noising
   transition ``q(x_{t_k} | x_{t_{k+1}})`` of the path), so ``x^M_{t_k} ~ q(x_{t_k} | x_0 = y)``.
1. ``x_{t_0} ~ N(0, sigma_{t_0}^2 I)``, uniform weights. For each step ``t = t_k -> s = t_{k+1}``:
2. *Replace* the motif entries of every particle by ``x^M_t``;
3. *Weight* by the likelihood of the next motif under the prior's reverse transition,
   ``w = p_theta(x^M_s | x_t) = N(x^M_s; mu_t(x_t)^M, std_t^2 I)`` (DDIM kernel of
   :mod:`.kernels` with ``eta``; ``eta = 1`` is the paper's DDPM ancestral kernel);
4. *Resample*;
5. *Propagate* all entries with the unconditional kernel ``x_s = mu_t(x_t) + std_t z`` (the
   motif entries are replaced again at the next step).
6. Output: the final cloud, motif entries equal to ``y``.

The weight of 3 depends on ``x_t`` only and the move of 5 not on ``x^M_s``, so :meth:`move`
draws 5 and returns 3 as its weight, which the loop applies and resamples on before the
next move (the same law as 3-4-5). The filter targets ``p(x^S_0 | x^M_0 = y)`` only when the
model's joint law equals the forward one (exact denoiser, ``eta = 1``, many steps); on a
finite grid it is biased (measured in ``docs/methods/smcdiff.md``). ``Result.log_evidence``
is ``None``: it would estimate the likelihood of the noised motif path, not ``log p(y)``
(the running value is in ``Result.info["log_evidence"]``).

Defaults and departures
-----------------------
- ``eta = 1`` (DDPM); ``eta = 0`` makes every transition deterministic and is refused. On VP
  and flow paths the last reverse step is deterministic and carries no weight (as the code).
- The motif is inserted at the particle's own noise level (the code's is one level less
  noisy); residual resampling (as the code) with the loop's ESS trigger,
  ``ess_threshold = 0.5`` (the code: a total-variation criterion).
- Noisy observations (not in the paper; Cardoso et al. 2024's baseline): the path starts at
  the grid time ``tau`` where ``sigma_tau / alpha_tau`` best matches ``sigma_y``
  (:func:`.spectral.observation_time_indices`) with ``x^M_tau = alpha_tau y``; below ``tau``
  the motif entries are free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import Tensor

from ..operators.mask import Mask
from .base import Context, Move, Requirements, SMCSampler
from .kernels import ddim_coefficients, gaussian_log_density
from .spectral import observation_time_indices

__all__ = ["SMCDiff"]


@dataclass(frozen=True)
class SMCDiffSetup:
    """The forward-noised observation path ``x^M_{t_k}`` ``(n + 1, B, m)`` (zero below
    ``tau``), shared by the particles, and the grid index ``k_tau`` of ``tau``."""

    path: Tensor
    k_tau: int


@dataclass(frozen=True)
class SMCDiffState:
    """Particles ``x_t``."""

    x: Tensor


@dataclass(frozen=True)
class SMCDiffInfo:
    """The time ``tau`` where the observation path starts, and the path itself."""

    tau: Tensor
    observation_path: Tensor


@dataclass(frozen=True)
class SMCDiff(SMCSampler):
    """SMCDiff (Trippe et al., ICLR 2023): replacement particle filter for masks.

    Parameters
    ----------
    num_steps, grid
        Time grid of the run (inherited).
    eta
        DDIM parameter of the reverse kernel, in ``(0, 1]`` (``1``: DDPM ancestral, the
        paper's kernel).
    resampling, ess_threshold
        Resampling scheme (residual, as in the code) and ESS trigger.
    """

    requires = Requirements(mask=True)
    exact_start = True
    shared_draw = True  # one noised observation path per run (docs/methods/smcdiff.md)
    #: ``log_evidence`` would be the likelihood of the noised observation path, not log p(y).
    estimates_evidence: ClassVar[bool] = False

    resampling: str = "residual"
    ess_threshold: float = 0.5
    eta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < float(self.eta) <= 1.0:
            raise ValueError(
                f"eta must be in (0, 1] (the weights need a stochastic kernel), got {self.eta!r}"
            )

    # ------------------------------------------------------------------ helpers
    def _replace(self, ctx: Context, x: Tensor, values: Tensor) -> Tensor:
        """``x`` with its observed entries set to ``values`` (``(B, m)``, shared by particles)."""
        op = cast(Mask, ctx.problem.operator)
        xf = op.flat_in(x).clone()
        xf[..., op.obs_idx] = values[:, None, :].expand(xf.shape[0], xf.shape[1], -1)
        return xf.reshape(x.shape)

    # ------------------------------------------------------------------ interface
    def setup(self, ctx: Context) -> SMCDiffSetup:
        """Step 0: one forward-noised observation path ``x^M_{t_k}``, ``k <= k_tau``."""
        op = cast(Mask, ctx.problem.operator)
        sch = ctx.prior.schedule
        times = ctx.times
        n = times.numel() - 1
        alpha, sigma = sch.alpha(times), sch.sigma(times)
        one = torch.ones(1, dtype=ctx.dtype, device=ctx.device)
        k_tau = int(observation_time_indices(sch, times, one, float(ctx.problem.noise_std))[0])
        y = op.flat_out(ctx.y)  # (B, m)
        path = torch.zeros((n + 1,) + tuple(y.shape), dtype=ctx.dtype, device=ctx.device)
        path[k_tau] = alpha[k_tau] * y
        for k in range(k_tau - 1, -1, -1):
            ratio = alpha[k] / alpha[k + 1]
            std = (sigma[k] ** 2 - ratio**2 * sigma[k + 1] ** 2).clamp_min(0).sqrt()
            path[k] = ratio * path[k + 1] + std * ctx.randn(tuple(y.shape))
        return SMCDiffSetup(path, k_tau)

    def init(self, ctx: Context, setup: SMCDiffSetup) -> tuple[SMCDiffState, None]:
        # Step 1: x_{t_0} from the reference N(0, sigma_{t_0}^2 I).
        return SMCDiffState(ctx.start()), None

    def move(
        self, ctx: Context, setup: SMCDiffSetup, state: SMCDiffState, k: int, t, t_next
    ) -> Move:
        path, k_tau = setup.path, setup.k_tau
        op = cast(Mask, ctx.problem.operator)
        sch = ctx.prior.schedule
        x = state.x
        # Step 2: replace the motif entries (while t >= tau).
        if k <= k_tau:
            x = self._replace(ctx, x, path[k])
        coef = ddim_coefficients(sch, t, t_next, float(self.eta))
        mu = ctx.denoise_mean(x, t, coef, sch.sigma(t))
        std = coef.std
        # Step 3: weight = p_theta(x^M_s | x_t), skipped where the kernel is deterministic.
        if k + 1 <= k_tau and float(std) > 0:
            mu_m = op.flat_in(mu)[..., op.obs_idx]
            lw = gaussian_log_density(path[k + 1][:, None, :], mu_m, std**2, event_dim=1)
        else:
            lw = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        # Step 5: propagate with the unconditional kernel (step 4, resampling on the weight of
        # step 3, is the loop's, before the next move); keep the next motif in the state.
        x_new = mu + std * ctx.randn()
        if k + 1 <= k_tau:
            x_new = self._replace(ctx, x_new, path[k + 1])
        return Move(SMCDiffState(x_new), lw)

    def run_info(self, ctx: Context, setup: SMCDiffSetup) -> SMCDiffInfo:
        return SMCDiffInfo(ctx.times[setup.k_tau], setup.path)

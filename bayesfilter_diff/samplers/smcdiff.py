"""SMCDiff: the replacement particle filter for inpainting (masks).

Trippe, Yim, Tischer, Baker, Broderick, Barzilay & Jaakkola, "Diffusion probabilistic modeling
of protein backbones in 3D for the motif-scaffolding problem", ICLR 2023 (arXiv 2206.04119).
Reference code: blt2114/ProtDiff_SMCDiff (``inpainting/particle_filter.py``,
``inpainting/inpaint.py``, ``data/diffuser.py``).

Update (paper notation: motif ``x^M`` = observed entries, scaffold ``x^S`` = the others)
----------------------------------------------------------------------------------------
0. Forward-diffuse the observation once, shared by all particles (drawn in ``init`` with the
   run's generator): ``x^M_{t_n} = y`` and, going up the grid,
   ``x^M_{t_k} = (alpha_k / alpha_{k+1}) x^M_{t_{k+1}} + sigma_{k|k+1} z_k`` (the noising
   transition ``q(x_{t_k} | x_{t_{k+1}})`` of the path), so ``x^M_{t_k} ~ q(x_{t_k} | x_0 = y)``.
1. ``x_{t_0} ~ N(0, sigma_{t_0}^2 I)``, uniform weights. For each step ``t = t_k -> s = t_{k+1}``:
2. *Replace* the motif entries of every particle by ``x^M_t``;
3. *Weight* by the likelihood of the next motif under the prior's reverse transition,
   ``w = p_theta(x^M_s | x_t) = N(x^M_s; mu_t(x_t)^M, std_t^2 I)`` (DDIM kernel of
   ``samplers/base.py`` with ``eta``; ``eta = 1`` is DDPM's ancestral kernel used in the
   paper);
4. *Propagate* all entries with the unconditional kernel ``x_s = mu_t(x_t) + std_t z`` (the
   motif entries are replaced again at the next step); then the loop resamples (the move of
   the scaffold given ``x_t`` does not depend on ``x^M_s``, so weighting and moving before
   resampling is the same as the paper's weight / resample / move order).
5. Output: the final cloud, motif entries equal to ``y``.

Bias
----
With one observation path per run (replaced at every level, the last step unweighted) the
filter targets ``p_theta(x^S_0 | x^M_{t_0:t_{n-1}} = path)`` as ``N -> inf``. Under the
forward process ``q`` the noised motif carries no information on the scaffold beyond ``y``
(``x^S_0`` is independent of ``x^M_{1:T}`` given ``x^M_0``), so this is the posterior
``p(x^S_0 | x^M_0 = y)`` when the model's joint law equals the forward one,
``p_theta(x_{0:T}) = q(x_{0:T})``: the assumption of the paper's asymptotic-exactness result.
It holds for an exact denoiser with ``eta = 1`` in the limit of many steps, never on a finite
grid, where the DDPM kernel's variance deficit biases the output and the path does carry
information under ``p_theta`` (each run is conditioned on its own path). Measured on the
Gaussian problem of ``tests/test_smcdiff.py`` (noiseless, 64 replicate runs of N = 250, VP
linear, uniform grid): within-run variance of the unobserved entries 0.82-0.87 of the exact
one at 50 steps, 0.93-0.95 at 200, 0.985-0.995 at 800; mean error 0.04-0.06 posterior sd at
50 steps, ~0.01 at 200 and 800. The noisy generalisation below has no correction for the
snapping of ``tau`` to the grid and few steps below ``tau``: the observed entries' variance
was 0.58 of the exact one at 50 steps (``sigma_y = 0.5``). ``Result.log_evidence`` of this
sampler would estimate the likelihood of the noised motif path, not ``log p(y)``: it is
``None``, the running value is kept in ``Result.info["log_evidence"]``.

On VP and flow paths ``sigma(0) = 0``: the last reverse step is deterministic, its motif
likelihood is a point mass, and (as the code, which sets the last log-weight to 0) the last
step carries no weight. ``eta = 0`` makes every transition deterministic and is refused.

Where the code departs from the paper, and our choices
------------------------------------------------------
- *One-level offset.* In ``inpaint.py`` the motif inserted at loop index ``t`` is
  ``motif_forward_diffusion[t]`` (``t`` noising steps) while the network and the reverse step
  at that index use ``abar_t`` of ``t + 1`` steps: the motif is one level less noisy than the
  scaffold. We insert the motif at the noise level of the particle (``x^M_{t_k}`` at ``t_k``),
  as the paper's algorithm states (as described to us; the paper text was not available).
- *Resampling.* The code resamples with residual resampling when ``sum_k |K w_k - 1| > 0.75
  K`` (a total-variation criterion, not an ESS). We use residual resampling with the shared
  loop's ESS trigger, ``ess_threshold = 0.5``; ``ess_threshold = 1`` resamples at every step.
- *Noisy observations* (not in the paper; the generalisation used as a baseline by Cardoso et
  al. 2024, ``ipwdp/smc_diff.py``): for ``sigma_y > 0`` the path starts at the grid time
  ``tau`` where ``sigma_tau / alpha_tau`` best matches ``sigma_y`` (as in
  :class:`~bayesfilter_diff.samplers.mcgdiff.MCGdiff`) with ``x^M_tau = alpha_tau y``; below
  ``tau`` the motif entries are free. Their weight keeps the Gaussian normalisation of the
  official code (``1 / std^2``), which the MCGdiff authors' version drops.
- The code's network works on protein frames; here any denoiser, through ``ctx.denoise``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Context, SMCSampler, ddim_coefficients
from .mcgdiff import observation_time_indices

__all__ = ["SMCDiff"]

_LOG2PI = math.log(2 * math.pi)


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

    #: ``log_evidence`` would be the likelihood of the noised observation path, not log p(y).
    estimates_evidence = False

    resampling: str = "residual"
    ess_threshold: float = 0.5
    eta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < float(self.eta) <= 1.0:
            raise ValueError(
                f"eta must be in (0, 1] (the weights need a stochastic kernel), got {self.eta!r}"
            )

    def check(self, prior, problem) -> None:
        op = problem.operator
        if not getattr(op, "is_mask", False):
            raise ValueError(
                f"SMCDiff needs a Mask operator (inpainting: observed entries are replaced); "
                f"got {type(op).__name__}"
            )
        self._require_gaussian(problem)

    # ------------------------------------------------------------------ helpers
    def _replace(self, ctx: Context, x: Tensor, values: Tensor) -> Tensor:
        """``x`` with its observed entries set to ``values`` (``(B, m)``, shared by particles)."""
        op = ctx.problem.operator
        xf = op.flat_in(x).clone()
        xf[..., op.obs_idx] = values[:, None, :].expand(xf.shape[0], xf.shape[1], -1)
        return xf.reshape(x.shape)

    # ------------------------------------------------------------------ interface
    def init(self, ctx: Context):
        op = ctx.problem.operator
        sch = ctx.prior.schedule
        times = ctx.times
        n = times.numel() - 1
        alpha, sigma = sch.alpha(times), sch.sigma(times)
        sy = float(ctx.problem.noise_std)
        one = torch.ones(1, dtype=ctx.dtype, device=ctx.device)
        k_tau = int(observation_time_indices(sch, times, one, sy)[0])
        y = op.flat_out(ctx.y)  # (B, m)
        # Step 0: one forward-noised observation path x^M_{t_k}, k <= k_tau (shared).
        path = torch.zeros((n + 1,) + tuple(y.shape), dtype=ctx.dtype, device=ctx.device)
        path[k_tau] = alpha[k_tau] * y
        for k in range(k_tau - 1, -1, -1):
            ratio = alpha[k] / alpha[k + 1]
            std = (sigma[k] ** 2 - ratio**2 * sigma[k + 1] ** 2).clamp_min(0).sqrt()
            path[k] = ratio * path[k + 1] + std * ctx.randn(tuple(y.shape))
        ctx.cache["smcdiff"] = {"path": path, "k_tau": k_tau}
        info = ctx.cache.setdefault("info", {})
        info["tau"] = times[k_tau]
        info["observation_path"] = path
        # Step 1: x_{t_0} from the reference N(0, sigma_{t_0}^2 I).
        return {"x": sigma[0] * ctx.randn()}, None

    def step(self, ctx: Context, state, i, t, t_next):
        c = ctx.cache["smcdiff"]
        path, k_tau = c["path"], c["k_tau"]
        op = ctx.problem.operator
        sch = ctx.prior.schedule
        x = state["x"]
        # Step 2: replace the motif entries (while t >= tau).
        if i <= k_tau:
            x = self._replace(ctx, x, path[i])
        x0 = ctx.denoise(x, t)
        a_s, c_eps, std, a_t = ddim_coefficients(sch, t, t_next, float(self.eta))
        mu = a_s * x0 + c_eps * (x - a_t * x0) / sch.sigma(t)
        # Step 3: weight = p_theta(x^M_s | x_t), skipped where the kernel is deterministic.
        if i + 1 <= k_tau and float(std) > 0:
            r = path[i + 1][:, None, :] - op.flat_in(mu)[..., op.obs_idx]
            m = r.shape[-1]
            lw = -0.5 * (r**2).sum(-1) / std**2 - 0.5 * m * (torch.log(std**2) + _LOG2PI)
        else:
            lw = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        # Step 4: propagate with the unconditional kernel; keep the next motif in the state.
        x_new = mu + std * ctx.randn()
        if i + 1 <= k_tau:
            x_new = self._replace(ctx, x_new, path[i + 1])
        return {"x": x_new}, lw

"""PiGDM: pseudoinverse-guided diffusion models (Song, Vahdat, Mardani & Kautz, ICLR 2023).

Reference code: NVlabs/RED-diff ``algos/pgdm.py`` (the official re-implementation).
See ``docs/methods/pigdm.md``.

PiGDM approximates ``p(x0 | x_t)`` by ``N(x0_hat(x_t), r_t^2 I)``, so that
``p~_t(y | x_t) = N(y; A x0_hat, r_t^2 A A^T + sigma_y^2 I)``, with
``r_t^2 = sigma_t^2 / (alpha_t^2 + sigma_t^2)`` (``1 - abar_t`` on a VP path;
:func:`pigdm_r2`). Update for a step ``t -> s``:

1. ``x0_hat = E[x0 | x_t]`` and the guidance (a vector-Jacobian product, the gradient of
   ``<stopgrad(v), x0_hat(x_t)>``)::

       g = grad_{x_t} log p~_t(y | x_t) = J^T v,
       v = A^T (r_t^2 A A^T + sigma_y^2 I)^-1 (y - A x0_hat)      (:func:`pigdm_vector`),

   ``v`` from the operator's SVD or by conjugate gradients
   (:meth:`~bayesfilter_diff.operators.LinearOperator.damped_pinv`);
2. ``weighting="tweedie"`` (default): conditional Tweedie
   ``x0_y = x0_hat + scale (sigma_t^2 / alpha_t) g``, then the DDIM step with ``eps``
   re-derived from ``x0_y``: ``x_s = alpha_s x0_y + c_eps eps_y + std z``. Exact for a
   standard normal prior up to the time discretisation.
   ``weighting="official"``: the unguided DDIM step plus
   ``scale alpha_s alpha_t r_t^2 g`` (the official code; does not converge to the
   posterior as the steps grow).

Defaults and departures:

- ``num_steps = 100`` on the respaced ``"ddpm"`` grid, ``eta = 1``, ``scale = 1``.
- ``x_init="pinv"``: ``x_T = alpha_T A^+ y + sigma_T z`` as in the code, damped to
  ``A^T (A A^T + sigma_y^2 I)^-1 y`` for noisy ``y``; ``"noise"``: ``x_T = sigma_T z``.
- ``x0_hat`` is never clipped; one network call with backpropagation per step.
- Linear operators and Gaussian noise only (``sigma_y = 0`` allowed); ``alpha(t_max) > 0``
  (use :class:`~bayesfilter_diff.samplers.pigdm_flow.PiGDMFlow` on flow paths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

from torch import Tensor

from ..operators.base import LinearOperator
from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from .base import Context, Move, Requirements, Sampler, check_positive_int
from .kernels import ddim_coefficients, ddim_mean, tweedie_shift

__all__ = ["PiGDM", "pigdm_vector", "pigdm_r2"]


def pigdm_r2(alpha: Tensor, sigma: Tensor) -> Tensor:
    """``r_t^2 = sigma_t^2 / (alpha_t^2 + sigma_t^2)``: ``Var[x0 | x_t]`` for ``x0 ~ N(0, I)``."""
    return sigma**2 / (alpha**2 + sigma**2)


def pigdm_vector(
    op: LinearOperator,
    y: Tensor,
    x0: Tensor,
    r2: Tensor | float,
    s2: float,
    cg_iters: int = 100,
) -> Tensor:
    """``A^T (r2 A A^T + s2 I)^-1 (y - A x0)``, the vector PiGDM pulls back through ``J^T``.

    Parameters
    ----------
    op
        Linear operator; with an SVD the inverse is exact and matrix-free, otherwise it is
        solved by ``cg_iters`` conjugate-gradient iterations
        (:meth:`~bayesfilter_diff.operators.LinearOperator.damped_pinv`).
    y
        Observations broadcasting against ``A(x0)``, e.g. ``(B, 1, *out_shape)``.
    x0
        Clean-data estimates ``(B, N, *in_shape)``.
    r2, s2
        ``r_t^2 > 0`` and ``sigma_y^2 >= 0``.
    """
    return op.damped_pinv(y - op(x0), r2, s2, cg_iters=cg_iters)


@dataclass(frozen=True)
class PiGDMSetup:
    """Per-run constants: observations ``(B, 1, *out)`` and ``sigma_y^2``."""

    y: Tensor
    s2: float


@dataclass(frozen=True)
class PiGDMState:
    x: Tensor


@dataclass(frozen=True)
class PiGDM(Sampler):
    """Pseudoinverse-guided DDIM (Song et al., ICLR 2023) for linear-Gaussian problems.

    Parameters
    ----------
    num_steps
        DDIM steps (paper: 100).
    grid
        ``"ddpm"`` (default: the respaced DDPM indices of the official code,
        ``range(0, 1000, 1000 // num_steps)`` at times ``(k + 1) / 1000``) or ``"uniform"``.
    eta
        DDIM stochasticity, ``0`` deterministic, ``1`` ancestral (default 1.0; see module).
    weighting
        ``"tweedie"`` (default; exact conditional-Tweedie shift ``sigma_t^2 / alpha_t * g``
        with ``eps`` re-derived, exact for a standard normal prior) or ``"official"`` (the
        official code's ``alpha_s alpha_t r_t^2 g`` added to the unguided DDIM step).
    scale
        Multiplier of the guidance (``grad_term_weight``; 1 in the paper and code).
    x_init
        ``"pinv"``: ``x_T = alpha_T A^+ y + sigma_T z`` (official code; damped to
        ``A^T (A A^T + sigma_y^2 I)^-1 y`` for noisy ``y``); ``"noise"``: ``x_T = sigma_T z``.
    cg_iters
        Conjugate-gradient iterations for operators without an SVD.
    """

    requires = Requirements(linear=True, differentiates=True)
    on_path = True

    num_steps: int = 100
    grid: str = "ddpm"
    eta: float = 1.0
    weighting: str = "tweedie"
    scale: float = 1.0
    x_init: str = "pinv"
    cg_iters: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        if self.weighting not in ("tweedie", "official"):
            raise ValueError(f"weighting must be 'tweedie' or 'official', got {self.weighting!r}")
        if not (self.scale >= 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be a finite number >= 0, got {self.scale!r}")
        if self.x_init not in ("pinv", "noise"):
            raise ValueError(f"x_init must be 'pinv' or 'noise', got {self.x_init!r}")
        check_positive_int("cg_iters", self.cg_iters)

    def check(self, prior: DiffusionModel, problem: InverseProblem) -> None:
        super().check(prior, problem)
        t_max = self.time_grid(prior, problem)[0]
        if not float(prior.schedule.alpha(t_max)) > 0:
            raise ValueError(
                f"{type(self).__name__} needs alpha(t_max) > 0 (the Tweedie shift divides by "
                f"alpha); the {type(prior.schedule).__name__} has alpha({float(t_max):g}) = 0: "
                "use PiGDMFlow for flow paths"
            )

    def setup(self, ctx: Context) -> PiGDMSetup:
        return PiGDMSetup(ctx.y.unsqueeze(1), ctx.problem.noise_std**2)

    def init(self, ctx: Context, setup: PiGDMSetup) -> tuple[PiGDMState, None]:
        sch = ctx.prior.schedule
        t0 = ctx.times[0]
        x = sch.sigma(t0) * ctx.randn()
        if self.x_init == "pinv":
            # A^+ y (sigma_y = 0), or the damped A^T (A A^T + sigma_y^2 I)^-1 y, which does not
            # blow up the noise along tiny singular values (e.g. a blur).
            op = cast(LinearOperator, ctx.problem.operator)
            back = op.damped_pinv(setup.y, 1.0, setup.s2, cg_iters=self.cg_iters)
            x = x + sch.alpha(t0) * back
        return PiGDMState(x), None

    def divergence_remedy(self, problem: InverseProblem) -> str | None:
        if self.weighting != "tweedie":
            return None
        return (
            "PiGDM's weighting='tweedie' shifts x0_hat by (sigma_t^2 / alpha_t) J^T v, which "
            "multiplies a learned network's Jacobian error by about sigma_t^2 / alpha_t^2 at "
            "low signal-to-noise (exact only for an exact denoiser): weighting='official' "
            "(stable on the shipped moons and digits priors, docs/methods/pigdm.md)"
        )

    def move(
        self, ctx: Context, setup: PiGDMSetup, state: PiGDMState, k: int, t: Tensor, t_next: Tensor
    ) -> Move:
        sch = ctx.prior.schedule
        op = cast(LinearOperator, ctx.problem.operator)
        x = state.x
        a_t, s_t = sch.alpha(t), sch.sigma(t)
        r2 = pigdm_r2(a_t, s_t)
        red = tuple(range(2, x.dim()))

        # 1. x0_hat and the guidance g = J^T A^T (r2 A A^T + s2 I)^-1 (y - A x0_hat) as the
        #    gradient of <stopgrad(v), x0_hat(x_t)> (pseudoinverse guidance).
        def fn(x0: Tensor) -> Tensor:
            v = pigdm_vector(op, setup.y, x0.detach(), r2, setup.s2, self.cg_iters)
            return (v * x0).sum(red)

        x0, _, g = ctx.denoise_with_grad(x, t, fn)
        coef = ddim_coefficients(sch, t, t_next, self.eta)
        noise = ctx.randn() if self.eta > 0 else 0.0
        if self.weighting == "tweedie":
            # 2a. conditional Tweedie: E[x0 | x_t, y] ~= x0_hat + sigma_t^2 / alpha_t * g,
            #     then DDIM with eps re-derived from the guided x0.
            x0 = tweedie_shift(x0, self.scale * g, a_t, s_t)
            x_next = ddim_mean(x, x0, coef, s_t) + coef.std * noise
        else:
            # 2b. official code: unguided DDIM step + alpha_s alpha_t r_t^2 g.
            x_next = ddim_mean(x, x0, coef, s_t) + coef.std * noise
            x_next = x_next + self.scale * coef.alpha_s * a_t * r2 * g
        return Move(PiGDMState(x_next))

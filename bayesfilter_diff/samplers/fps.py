"""FPS and FPS-SMC: filtering posterior sampling (Dou & Song, ICLR 2024).

Z. Dou and Y. Song, "Diffusion Posterior Sampling for Linear Inverse Problem Solving: A
Filtering Perspective", ICLR 2024 (OpenReview ``tplXNcHZs1``); official code
``ZehaoDou-official/FPS-SMC-2023`` (``guided_diffusion/gaussian_diffusion.py``). See
``docs/methods/fps.md``.

Update
------
For ``y = A x0 + sigma_y n`` with ``A = U S V^T`` (singular values ``lambda``), FPS noises the
observation with the signal's noise, ``y_t = alpha_t y + sigma_t A eps``, so that
``y_t = A x_t + alpha_t sigma_y n``, and filters the backward sequence
``y_{t_0}, ..., y_{t_n} = y`` as the observations of a hidden Markov model (the *filtering
model*)::

    x_{t_0} ~ N(0, sigma_{t_0}^2 I),   x_s | x_t ~ N(mu(x_t), v_s I),
    y_t | x_t ~ N(A x_t, r_t^2 I),     r_t^2 = alpha_t^2 sigma_y^2.

With ``c`` = ``c_rate``, for each step from ``t`` to ``s`` on the grid:

1. y-sequence (drawn before the x chain, from ``y_{t_0}`` down to ``y_{t_n} = y``)::

       y_{t_0} = alpha_{t_0} y + sigma_{t_0} A z,
       y_s = alpha_s y + sqrt(1 - c) sigma_s (y_t - alpha_t y) / sigma_t + sqrt(c) sigma_s A z,

   the DDIM kernel (:mod:`.kernels`) in y-space with ``x0 -> y`` and noise ``A z``.
2. Prior kernel, with ``x0_hat = E[x0 | x_t]`` and ``eps_hat = (x_t - alpha_t x0_hat) / sigma_t``::

       mu = alpha_s x0_hat + sqrt(1 - c) sigma_s eps_hat,     v_s = c sigma_s^2.

3. Proposal ``q(x_s | x_t, y_s) ∝ N(x_s; mu, v_s I) N(y_s; A x_s, r_s^2 I)``, per
   V-coordinate ``i`` (``mu~ = V^T mu``, ``y~ = U^T y_s``; :func:`.spectral.condition`)::

       mean_i = (r_s^2 mu~_i + v_s lambda_i y~_i) / (r_s^2 + v_s lambda_i^2),
       var_i  = v_s r_s^2 / (r_s^2 + v_s lambda_i^2);     null space: mu~_i, v_s.

4. FPS-SMC weight, computed as the predictive likelihood (exact; it does not depend on
   ``x_s``)::

       log w = log N(y_s; A x_s, r_s^2) + log N(x_s; mu, v_s) - log q(x_s | x_t, y_s)
             = log N(y_s; A mu, r_s^2 I + v_s A A^T).

5. FPS-SMC resampling: multinomial, after every weighting, before the next proposal.

The chain starts from ``x_{t_0} ~ p(x_{t_0} | y_{t_0})`` (3 with ``mu = 0``,
``v = sigma_{t_0}^2``; FPS-SMC's first weight is ``p(y_{t_0})``). The last step conditions on
``y`` itself; on VP / flow paths ``v = 0`` there, so it returns ``x0_hat`` weighted by
``N(y; A x0_hat, sigma_y^2 I)`` (the final cloud holds duplicates).

``FPS`` is the same chain with one particle and no weights: each of the ``N`` samples is an
independent FPS run with its own y-sequence (drawn one bridge step per step). ``FPSSMC``
shares one y-sequence per observation between its particles (drawn first;
:meth:`FPSSMC.y_sequence` reproduces it) and returns all weighted particles. FPS-SMC targets
the filtering model's posterior for its y-sequence, **not** ``p(x0 | y)`` (over-concentrated,
more so with more steps; ``Result.log_evidence`` is ``None``, the running
``log p_F(y_{t_0:t_n})`` is in ``Result.info["log_evidence"]``).

Defaults and departures
-----------------------
- ``c_rate = 0.95`` (the code's ``--c_rate``); ``eta = None`` selects that kernel, a number
  the DDIM(``eta``) kernel for both the y-bridge and the x kernel.
- ``resampling = "multinomial"`` at every step (``ess_threshold = 1``), as the code;
  ``num_steps = 100`` (the code: 1000 DDPM steps and ``M = 5`` particles).
- The paper's indexing (the code is off by one level), ``problem.noise_std`` (the code
  hard-codes 0.05), the exact start and last step, all particles returned, any Gaussian path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor
from torch.nn.functional import pad

from ..operators.base import LinearOperator
from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from ..schedules import Schedule
from .base import Context, Move, Requirements, Sampler, SMCSampler
from .kernels import DDIMCoefficients, ddim_coefficients, ddim_mean
from .spectral import PixelClasses, condition, condition_pixels, condition_range, pixel_classes

__all__ = ["FPS", "FPSSMC", "FPSGrid", "fps_grid", "fps_y_sequence"]


# --------------------------------------------------------------------------------------
# Shared pieces (module-level so that FPS and FPS-SMC use the same code)


@dataclass(frozen=True)
class FPSGrid:
    """Path values and kernel coefficients of FPS on a time grid (Python floats).

    ``alpha[k]``, ``sigma[k]`` at ``times[k]`` (``k = 0..n``); for step ``k`` (``times[k] ->
    times[k+1]``) the kernel ``x_s = alpha_s x0 + c_eps[k] eps + std[k] z``.
    """

    alpha: list[float]
    sigma: list[float]
    c_eps: list[float]
    std: list[float]

    def step(self, k: int) -> DDIMCoefficients[float]:
        """The kernel of step ``k`` as :class:`~.kernels.DDIMCoefficients`."""
        return DDIMCoefficients(self.alpha[k + 1], self.c_eps[k], self.std[k], self.alpha[k])


def fps_grid(schedule: Schedule, times: Tensor, c_rate: float, eta: float | None = None) -> FPSGrid:
    """Coefficients of FPS's Markov kernel (y-bridge and x prior kernel) on ``times``.

    Parameters
    ----------
    schedule
        The Gaussian path.
    times
        Decreasing grid ``(n + 1,)``.
    c_rate
        The paper's correlation rate ``c``: ``std = sqrt(c) sigma_s``,
        ``c_eps = sqrt(1 - c) sigma_s`` (used when ``eta`` is None).
    eta
        If given, the DDIM(``eta``) kernel of :func:`~.kernels.ddim_coefficients` instead.
    """
    t, s = times[:-1], times[1:]
    sig = schedule.sigma(times)
    if eta is None:
        c_eps = math.sqrt(1.0 - c_rate) * sig[1:]
        std = math.sqrt(c_rate) * sig[1:]
    else:
        _, c_eps, std, _ = ddim_coefficients(schedule, t, s, eta)
    # Python floats (one host transfer per run) keep every scalar formula exact and simple.
    return FPSGrid(
        alpha=schedule.alpha(times).double().tolist(),
        sigma=sig.double().tolist(),
        c_eps=c_eps.double().tolist(),
        std=std.double().tolist(),
    )


def _spectral_noise(s: Tensor, m: int, lead: tuple[int, ...], like: Tensor, generator) -> Tensor:
    """``U^T A z`` for ``z ~ N(0, I_d)``: ``s * N(0, I_r)`` padded with zeros to ``m``."""
    r = s.numel()
    z = torch.randn(lead + (r,), generator=generator, dtype=like.dtype, device=like.device)
    return pad(s * z, (0, m - r))


def _y_start(y0: Tensor, noise: Tensor, grid: FPSGrid) -> Tensor:
    """Step 1, start: ``y_{t_0} = alpha_{t_0} y + sigma_{t_0} A z`` (spectral coordinates)."""
    return grid.alpha[0] * y0 + grid.sigma[0] * noise


def _y_bridge(y_t: Tensor, y0: Tensor, noise: Tensor, grid: FPSGrid, k: int) -> Tensor:
    """Step 1, bridge ``k``: ``y_s = alpha_s y + c_eps (y_t - alpha_t y) / sigma_t + std A z``."""
    return ddim_mean(y_t, y0, grid.step(k), grid.sigma[k]) + grid.std[k] * noise


def _y_path(s: Tensor, y0: Tensor, m: int, grid: FPSGrid, num_paths: int, generator) -> Tensor:
    """Step 1: the backward y-sequence in U-coordinates, ``(n + 1, B, num_paths, m)``.

    ``y0 = U^T y`` of shape ``(B, 1, m)``.
    """
    lead = (y0.shape[0], num_paths)
    cur = _y_start(y0, _spectral_noise(s, m, lead, y0, generator), grid)
    out = [cur]
    for k in range(len(grid.c_eps)):
        cur = _y_bridge(cur, y0, _spectral_noise(s, m, lead, y0, generator), grid, k)
        out.append(cur)
    return torch.stack(out)


def fps_y_sequence(
    problem: InverseProblem,
    grid: FPSGrid,
    num_paths: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw FPS's backward observation sequence ``y_{t_0}, ..., y_{t_n}``.

    Parameters
    ----------
    problem
        A linear problem whose operator has an SVD; ``y`` of shape ``(*out)`` or
        ``(B, *out)``.
    grid
        From :func:`fps_grid`.
    num_paths
        Independent sequences per observation.
    generator
        Source of randomness.

    Returns
    -------
    Tensor
        ``(n + 1, B, num_paths, *out_shape)``; the last entry is ``alpha_{t_n} y`` plus
        ``sigma_{t_n}``-scaled noise, i.e. ``y`` itself when ``sigma(t_n) = 0``.
    """
    op = cast(LinearOperator, problem.operator)
    y = problem.y_batched
    s = op.singular_values().to(dtype=y.dtype, device=y.device)
    return op.U(_y_path(s, op.Ut(y)[:, None, :], op.out_dim, grid, num_paths, generator))


def _validate(sampler: Any) -> None:
    """``c_rate`` and ``eta`` of FPS, FPS-SMC and :class:`~.filtering.FilteringSMC`."""
    c = sampler.c_rate
    if isinstance(c, bool) or not isinstance(c, int | float) or not 0.0 <= c <= 1.0:
        raise ValueError(f"c_rate must be a number in [0, 1], got {c!r}")
    e = sampler.eta
    if e is not None and (
        isinstance(e, bool) or not isinstance(e, int | float) or not 0.0 <= e <= 1.0
    ):
        raise ValueError(f"eta must be None or a number in [0, 1], got {e!r}")


#: Both need an SVD and Gaussian noise with sigma_y > 0: the last step weights (FPS-SMC) or
#: conditions (FPS) on N(y; A x0_hat, sigma_y^2 I), a point mass when sigma_y = 0.
_REQUIRES = Requirements(svd=True, noise_positive=True)


@dataclass(frozen=True)
class FPSSetup:
    """Per-run constants: the kernel, ``s`` ``(r,)``, ``U^T y`` ``(B, 1, m)`` and, for FPS-SMC,
    the shared y-sequence in U-coordinates ``(n + 1, B, 1, m)``."""

    grid: FPSGrid
    s: Tensor
    y_tilde: Tensor
    y_path: Tensor | None = None
    pixels: PixelClasses | None = None  # (``op.pixel_svd``) the pixels by singular value


@dataclass(frozen=True)
class FPSState:
    """Particles ``x_t`` and, for FPS, each sample's own ``U^T y_t`` ``(B, N, m)``."""

    x: Tensor
    y: Tensor | None = None


def _setup(sampler: FPS | FPSSMC, ctx: Context) -> FPSSetup:
    grid = fps_grid(ctx.prior.schedule, ctx.times, sampler.c_rate, sampler.eta)
    op = cast(LinearOperator, ctx.problem.operator)
    s = op.singular_values().to(dtype=ctx.dtype, device=ctx.device)
    pixels = pixel_classes(op, ctx.dtype, ctx.device) if op.pixel_svd else None
    return FPSSetup(grid, s, op.Ut(ctx.y)[:, None, :], pixels=pixels)


def _init_x(ctx: Context, setup: FPSSetup, y_tilde: Tensor) -> tuple[Tensor, Tensor]:
    """Start: ``x_{t_0} ~ p(x_{t_0} | y_{t_0})`` under the prior ``N(0, sigma_{t_0}^2 I)``."""
    op = cast(LinearOperator, ctx.problem.operator)
    d, grid = op.in_dim, setup.grid
    mu = torch.zeros((ctx.B, ctx.N) + tuple(op.in_shape), dtype=ctx.dtype, device=ctx.device)
    r2 = (grid.alpha[0] * ctx.problem.noise_std) ** 2
    z = ctx.randn((ctx.B, ctx.N, d))
    return _condition(op, setup, mu, grid.sigma[0] ** 2, r2, y_tilde, z)


def _condition(
    op: LinearOperator,
    setup: FPSSetup,
    mu: Tensor,
    v: Tensor | float,
    r2: Tensor | float,
    y_tilde: Tensor,
    z: Tensor,
) -> tuple[Tensor, Tensor]:
    """Step 3-4 for a prior mean ``mu`` on the signal grid: elementwise for operators whose
    SVD is diagonal in pixels (masks: no permutation gathers), on the signal grid with the
    range's coordinates only for a thin range (wide dense matrices), else in the SVD basis."""
    s = setup.s
    if setup.pixels is not None:
        return condition_pixels(op, mu, v, r2, op.pixel_observation(y_tilde), z, setup.pixels)
    if op.thin_range:
        return condition_range(op, s, mu, v, r2, y_tilde, z)
    return condition(op, s, op.Vt(mu), v, r2, y_tilde, z)


def _move_x(
    ctx: Context, setup: FPSSetup, x: Tensor, k: int, t: Tensor, y_tilde: Tensor
) -> tuple[Tensor, Tensor]:
    """Steps 2-4 for ``times[k] -> times[k + 1]``: new particles and ``log p(y_s | x_t)``."""
    op = cast(LinearOperator, ctx.problem.operator)
    coef = setup.grid.step(k)
    # 2. prior kernel: mu = alpha_s x0_hat + c_eps eps_hat, v = std^2
    mu = ctx.denoise_mean(x, t, coef, setup.grid.sigma[k])
    r2 = (coef.alpha_s * ctx.problem.noise_std) ** 2
    # 3-4. proposal given y_s and the predictive log-likelihood
    z = ctx.randn((ctx.B, ctx.N, op.in_dim))
    return _condition(op, setup, mu, coef.std**2, r2, y_tilde, z)


# --------------------------------------------------------------------------------------
# The samplers


@dataclass(frozen=True)
class FPSSMC(SMCSampler):
    """FPS-SMC: a particle filter on FPS's filtering model (Dou & Song, ICLR 2024).

    Targets the filtering model's posterior for one drawn y-sequence, not ``p(x0 | y)``
    (module docstring, docs/methods/fps.md). Returns all ``N`` weighted particles.

    Parameters
    ----------
    num_steps
        Steps of the time grid (the code: 1000 DDPM steps).
    c_rate
        The paper's correlation rate ``c`` in ``[0, 1]`` (default 0.95).
    eta
        None (default): the paper's ``c_rate`` kernel. A number in ``[0, 1]``: the DDIM(eta)
        kernel for the y-bridge and the x kernel (``c_rate`` is then unused).
    resampling, ess_threshold
        Multinomial resampling at every step (``ess_threshold = 1``), as the code.

    Notes
    -----
    ``Result.log_evidence`` is ``None``: the normalising constant this filter estimates is
    the filtering model's likelihood of its y-sequence, not ``log p(y)``; its running value
    is in ``Result.info["log_evidence"]``.
    """

    requires = _REQUIRES
    #: The normalising constant is not an estimate of log p(y).
    estimates_evidence: ClassVar[bool] = False
    #: One y-sequence per observation, shared by the particles (the quality check says so).
    shared_draw: ClassVar[bool] = True

    num_steps: int = 100
    c_rate: float = 0.95
    eta: float | None = None
    resampling: str = "multinomial"
    ess_threshold: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate(self)

    def y_sequence(
        self,
        prior: DiffusionModel,
        problem: InverseProblem,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The y-sequence ``sample`` draws first from ``generator``: ``(n + 1, B, *out)``.

        Called with a generator in the state ``sample`` receives, it returns the sequence that
        run used (the first thing the run draws, in ``setup``).
        """
        self.check(prior, problem)
        grid = fps_grid(prior.schedule, self.time_grid(prior, problem), self.c_rate, self.eta)
        return fps_y_sequence(problem, grid, 1, generator)[:, :, 0]

    def setup(self, ctx: Context) -> FPSSetup:
        c = _setup(self, ctx)
        # 1. one y-sequence per observation, shared by the particles (drawn first).
        op = cast(LinearOperator, ctx.problem.operator)
        path = _y_path(c.s, c.y_tilde, op.out_dim, c.grid, 1, ctx.generator)
        return FPSSetup(c.grid, c.s, c.y_tilde, path, c.pixels)

    def init(self, ctx: Context, setup: FPSSetup) -> tuple[FPSState, Tensor]:
        assert setup.y_path is not None
        # x_{t_0} ~ p(x_{t_0} | y_{t_0}); its weight p(y_{t_0}) is the same for all particles.
        x, log_w = _init_x(ctx, setup, setup.y_path[0])
        return FPSState(x), log_w

    def move(self, ctx: Context, setup: FPSSetup, state: FPSState, k: int, t, t_next) -> Move:
        assert setup.y_path is not None
        # 2-4: propose x_s given y_s; the weight log p(y_s | x_t) (step 5, resampling, is the
        # loop's, after this weight and before the next move).
        x, log_pred = _move_x(ctx, setup, state.x, k, t, setup.y_path[k + 1])
        return Move(FPSState(x), log_pred)


@dataclass(frozen=True)
class FPS(Sampler):
    """FPS: the single-particle filtering chain, unweighted (Dou & Song, ICLR 2024).

    Each of the ``N`` samples is an independent FPS run with its own y-sequence (drawn one
    bridge step at a time). Approximate: see docs/methods/fps.md.

    Parameters
    ----------
    num_steps
        Steps of the time grid.
    c_rate
        The paper's correlation rate ``c`` in ``[0, 1]`` (default 0.95).
    eta
        None (default): the paper's ``c_rate`` kernel; a number: the DDIM(eta) kernel.
    """

    requires = _REQUIRES
    on_path = True

    num_steps: int = 100
    c_rate: float = 0.95
    eta: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate(self)

    def setup(self, ctx: Context) -> FPSSetup:
        return _setup(self, ctx)

    def init(self, ctx: Context, setup: FPSSetup) -> tuple[FPSState, None]:
        m = ctx.problem.operator.out_dim
        # 1. y_{t_0} per sample; the bridge continues in move().
        noise = _spectral_noise(setup.s, m, (ctx.B, ctx.N), setup.y_tilde, ctx.generator)
        y = _y_start(setup.y_tilde, noise, setup.grid)
        x, _ = _init_x(ctx, setup, y)
        return FPSState(x, y), None

    def move(self, ctx: Context, setup: FPSSetup, state: FPSState, k: int, t, t_next) -> Move:
        assert state.y is not None
        m = ctx.problem.operator.out_dim
        noise = _spectral_noise(setup.s, m, (ctx.B, ctx.N), setup.y_tilde, ctx.generator)
        y = _y_bridge(state.y, setup.y_tilde, noise, setup.grid, k)
        x, _ = _move_x(ctx, setup, state.x, k, t, y)
        return Move(FPSState(x, y))

"""FPS and FPS-SMC: filtering posterior sampling (Dou & Song, ICLR 2024).

Z. Dou and Y. Song, "Diffusion Posterior Sampling for Linear Inverse Problem Solving: A
Filtering Perspective", ICLR 2024 (OpenReview ``tplXNcHZs1``); official code
``ZehaoDou-official/FPS-SMC-2023`` (``guided_diffusion/gaussian_diffusion.py``).

Model
-----
For ``y = A x0 + sigma_y n`` with ``A = U S V^T`` (singular values ``lambda``), FPS noises the
observation with the same noise as the signal: ``x_t = alpha_t x0 + sigma_t eps`` and
``y_t = alpha_t y + sigma_t A eps``, so that ``y_t = A x_t + alpha_t sigma_y n``. It then treats
the backward sequence ``y_{t_0}, ..., y_{t_n} = y`` as observations of a hidden Markov
model (the *filtering model*)::

    x_{t_0} ~ N(0, sigma_{t_0}^2 I),   x_s | x_t ~ N(mu(x_t), v_s I),
    y_t | x_t ~ N(A x_t, r_t^2 I),     r_t^2 = alpha_t^2 sigma_y^2,

and filters it. In VP notation (``alpha_t^2 = abar_t``) the paper's / code's steps, with
``c`` = ``c_rate``, going from ``t`` to ``s = t - 1``, map to ours as follows.

1. y-sequence (drawn once, before the x chain, from ``y_T`` down to ``y_0 = y``)::

       y_T = alpha_T y + sigma_T A z,
       y_s = alpha_s y + sqrt(1 - c) sigma_s (y_t - alpha_t y) / sigma_t + sqrt(c) sigma_s A z.

   Code: ``coef_1 .. coef_4`` in ``p_sample_loop``. It is the DDIM kernel of
   ``samplers/base.py`` applied in y-space with ``x0 -> y`` and noise ``A z``, with
   stochastic std ``sqrt(c) sigma_s``; it keeps the marginals
   ``N(alpha_t y, sigma_t^2 A A^T)`` for every ``c`` in ``[0, 1]``.
2. Prior kernel (code: ``EpsilonXMeanProcessor``, ``posterior_variance``), with
   ``x0_hat = E[x0 | x_t]`` and ``eps_hat = (x_t - alpha_t x0_hat) / sigma_t``::

       mu = alpha_s x0_hat + sqrt(1 - c) sigma_s eps_hat,     v_s = c sigma_s^2.

3. Conditional proposal ``q(x_s | x_t, y_s) ∝ N(x_s; mu, v_s I) N(y_s; A x_s, r_s^2 I)``,
   per V-coordinate ``i`` (``mu~ = V^T mu``, ``y~ = U^T y_s``)::

       mean_i = (r_s^2 mu~_i + v_s lambda_i y~_i) / (r_s^2 + v_s lambda_i^2),
       var_i  = v_s r_s^2 / (r_s^2 + v_s lambda_i^2);     null space: mu~_i, v_s.

   Code: ``get_mean`` / ``get_noise`` of ``svd_replacement.py``.
4. FPS-SMC weight (code: ``prob_y + prob_x - prob_prev`` in ``p_sample``)::

       log w = log N(y_s; A x_s, r_s^2) + log N(x_s; mu, v_s) - log q(x_s | x_t, y_s)
             = log N(y_s; A mu, r_s^2 I + v_s A A^T)      (the predictive likelihood),

   which does not depend on ``x_s``; we compute the right-hand side (exact, lower variance).
   Multinomial resampling after every step, as in the code (the shared loop; since the weight
   depends on ``x_t`` only, resampling after the move targets the same law as resampling
   before it). The move to ``t = 0`` is deterministic for VP / flow paths, so the returned
   cloud holds duplicates, weighted by ``N(y; A x0_hat(x_{t_{n-1}}), sigma_y^2 I)``.
5. Initial particles ``x_{t_0} ~ p(x_{t_0} | y_{t_0})`` (prior ``N(0, sigma_{t_0}^2 I)``, the
   same formula as 3 with ``mu = 0``, ``v = sigma_{t_0}^2``); the last step ``t_{n-1} -> 0``
   conditions on ``y`` itself (``r^2 = sigma_y^2``; ``v = 0`` at ``t = 0`` for VP / flow paths,
   so the proposal is ``x0_hat`` and the weight ``N(y; A x0_hat, sigma_y^2 I)``).

``FPS`` is the same chain with one particle and no weights: each of the ``N`` samples is an
independent FPS run with its own y-sequence (drawn online, one bridge step per step).
``FPSSMC`` shares one y-sequence (per observation) between its particles, built in ``init``
(``FPSSMC.y_sequence`` reproduces it from the generator) and returns all weighted particles.

Defaults and their source
-------------------------
``c_rate = 0.95`` (``--c_rate`` default of ``sample_condition.py``, README and
``scripts/run_sampling.sh``); ``resampling = "multinomial"`` at every step
(``ess_threshold = 1``), as the code's ``random.choices``. ``num_steps = 100`` here; the code
uses 1000 DDPM steps and ``M = 5`` particles. ``eta = None`` selects the paper's
``c_rate`` kernel; a number selects the DDIM(``eta``) kernel of ``samplers/base.py`` for both
the y-bridge and the x kernel (``eta = 1``: DDPM, the only choice whose kernel becomes the
exact reverse kernel as the number of steps grows).

Where the official code departs from the paper, and what we do
---------------------------------------------------------------
- Index off-by-one: at level ``k`` the code conditions ``x_{k-1}`` on ``y_k`` with variances
  mixing ``abar_k`` (proposal) and ``abar_{k-1}`` (weight). We use the paper's indexing:
  ``x_s`` conditioned on ``y_s`` with ``r_s^2 = alpha_s^2 sigma_y^2`` everywhere.
- ``sigma = 0.05`` is hard-coded in ``GaussianDiffusion``: we use ``problem.noise_std``.
- Batch size 1 and Python loops over particles: batched over ``B`` problems and ``N``
  particles.
- The code returns the first particle only; we return all weighted particles.
- ``y_T = A z`` (drops ``sqrt(abar_T) y``) and an initial mean missing a ``1 / r_T^2``
  factor, with one initial particle: we draw every particle from the exact
  ``p(x_T | y_T)``.
- The code's last step returns the unconditioned ``x0_hat(x_1)``; we follow the paper's final
  update conditioned on ``y_0 = y`` (weight ``N(y; A x0_hat, sigma_y^2)``).
- ``x0_hat`` clipped to ``[-1, 1]``, ``+1e-6`` in ``ex_values``, singular values below
  ``1e-3`` zeroed: not done (the toolkit has no data range; the operator's own rank
  tolerance applies).
- Super-resolution / deblurring use one operator for the proposal (the SVD class) and
  another for ``y`` and the weights; we use one ``A`` everywhere.
- Not VP-only: the construction above only uses ``alpha_t`` and ``sigma_t`` and applies to
  any Gaussian path (VP, VE, flow). The initial prior ``N(0, sigma_{t_0}^2 I)`` ignores
  ``alpha_{t_0} x0`` (negligible for VP and flow at ``t = 1``), as ``DDIM.init`` does.

Exactness: what FPS-SMC targets
-------------------------------
As ``N -> inf`` (and with an exact denoiser), FPS-SMC samples the filtering model's
posterior ``p_F(x_0 | y_{t_0:t_n})`` for the drawn y-sequence, and averaged over y-sequences
``E[p_F(x_0 | y_{t_0:t_n}) | y]``. This is **not** the posterior ``p(x_0 | y)``: given ``x_t``
the ``y_t`` share one noise ``n`` (they are not conditionally independent), so the filtering
model counts the information in ``y`` once per step and its output is over-concentrated.
``res.log_evidence`` likewise estimates the filtering model's ``log p_F(y_{t_0:t_n})``, not
``log p(y)``. The tests check FPS-SMC against the exact Kalman filter of the filtering model
for the same y-sequence (``tests/test_fps.py``).

Measured bias, 1-D Gaussian: ``x0 ~ N(0, 1)``, ``A = 1``, ``y = 1.3``, VP linear, uniform grid.
"limit" is the exact ``N -> inf`` FPS-SMC answer (Kalman filter of the filtering model with
the exact denoiser) pooled over 20000 y-sequences; "runs" pools 200 actual FPS-SMC runs of
``N = 1000`` (one y-sequence each); "FPS" is the exact output law of unweighted FPS. Entries
are mean / variance (``python tests/test_fps.py`` regenerates the 20- and 100-step rows)::

  sigma_y steps  true p(x0|y)    FPS-SMC c=0.95 limit (runs)       FPS-SMC eta=1  FPS c=0.95
  0.05       20  1.2968/0.00249  1.2746/0.00863 (1.2689/0.00953)  1.2740/0.00943 1.2521/0.02856
  0.05      100  1.2968/0.00249  1.2958/0.00162 (1.2958/0.00160)  1.2960/0.00213 1.2906/0.00377
  0.05     1000  1.2968/0.00249  1.2990/0.00056                   1.2992/0.00065 1.2962/0.00151
  0.5        20  1.0400/0.20000  1.1096/0.07499 (1.1132/0.07494)  1.1196/0.09311 0.9132/0.14032
  0.5       100  1.0400/0.20000  1.2339/0.03831 (1.2368/0.03824)  1.2460/0.04284 1.0249/0.11143
  0.5      1000  1.0400/0.20000  1.2807/0.01512                   1.2890/0.01163 1.0678/0.10470

The filtering posterior is too narrow and pulled towards the data, and more so as the number
of steps grows (at ``sigma_y = 0.5`` the variance falls from 0.2 to 0.075, 0.038 and 0.015). At
``sigma_y = 0.05`` with 20 steps the *pooled* variance is too large: each y-sequence gives a
narrow posterior (variance 0.0012) whose mean moves from one sequence to the next (0.0075).
The 1000-step ``c = 0.95`` entry agrees with an independent numpy Kalman check on the
discrete 1000-step DDPM schedule (1.282 / 0.0149). Unweighted FPS is closer to the truth at
``sigma_y = 0.5`` (it samples the guided proposal chain, not the filtering posterior) but is
not exact either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import pad

from ..operators.base import LinearOperator
from ..priors.base import DiffusionModel
from ..problem import InverseProblem
from ..schedules import Schedule
from .base import Context, Sampler, SMCSampler, ddim_coefficients

__all__ = ["FPS", "FPSSMC", "FPSGrid", "fps_grid", "fps_y_sequence"]

_LOG2PI = math.log(2 * math.pi)


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
        If given, the DDIM(``eta``) kernel of :func:`~.base.ddim_coefficients` instead.
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


def _spectral_noise(lam: Tensor, m: int, lead: tuple[int, ...], like: Tensor, generator) -> Tensor:
    """``U^T A z`` for ``z ~ N(0, I_d)``: ``lambda * N(0, I_r)`` padded with zeros to ``m``."""
    r = lam.numel()
    z = torch.randn(lead + (r,), generator=generator, dtype=like.dtype, device=like.device)
    return pad(lam * z, (0, m - r))


def _y_start(y0: Tensor, noise: Tensor, grid: FPSGrid) -> Tensor:
    """Step 1, start: ``y_{t_0} = alpha_{t_0} y + sigma_{t_0} A z`` (spectral coordinates)."""
    return grid.alpha[0] * y0 + grid.sigma[0] * noise


def _y_bridge(y_t: Tensor, y0: Tensor, noise: Tensor, grid: FPSGrid, k: int) -> Tensor:
    """Step 1, bridge ``k``: ``y_s = alpha_s y + c_eps (y_t - alpha_t y) / sigma_t + std A z``."""
    a_t, s_t, a_s = grid.alpha[k], grid.sigma[k], grid.alpha[k + 1]
    return a_s * y0 + grid.c_eps[k] * (y_t - a_t * y0) / s_t + grid.std[k] * noise


def _y_path(lam: Tensor, y0: Tensor, m: int, grid: FPSGrid, num_paths: int, generator) -> Tensor:
    """Step 1: the backward y-sequence in U-coordinates, ``(n + 1, B, num_paths, m)``.

    ``y0 = U^T y`` of shape ``(B, 1, m)``.
    """
    lead = (y0.shape[0], num_paths)
    cur = _y_start(y0, _spectral_noise(lam, m, lead, y0, generator), grid)
    out = [cur]
    for k in range(len(grid.c_eps)):
        cur = _y_bridge(cur, y0, _spectral_noise(lam, m, lead, y0, generator), grid, k)
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
    op = problem.operator
    y = problem.y_batched
    lam = op.singular_values().to(dtype=y.dtype, device=y.device)
    return op.U(_y_path(lam, op.Ut(y)[:, None, :], op.out_dim, grid, num_paths, generator))


def _condition(
    op: LinearOperator, lam: Tensor, mu_spec: Tensor, v: float, r2: float, y_spec: Tensor, z: Tensor
) -> tuple[Tensor, Tensor]:
    """Steps 3-4: draw ``x ~ q(x | mu, y) ∝ N(x; mu, v I) N(y; A x, r2 I)``, return ``log p(y)``.

    Parameters
    ----------
    mu_spec
        ``V^T mu``, ``(B, N, d)``.
    v, r2
        Prior and observation variances (``r2 + v > 0``).
    y_spec
        ``U^T y``, ``(B, P, m)`` with ``P`` = 1 (shared) or ``N``.
    z
        Standard normal ``(B, N, d)`` (spectral coordinates).

    Returns
    -------
    (x, log_pred)
        ``x = V(...)`` of shape ``(B, N, *in)`` and ``log N(y; A mu, r2 I + v A A^T)``,
        ``(B, N)``.
    """
    r = lam.numel()
    mr, yr = mu_spec[..., :r], y_spec[..., :r]
    den = r2 + v * lam**2  # (r,)
    mean = (r2 * mr + (v * lam) * yr) / den
    sd = torch.sqrt(v * r2 / den)
    w = torch.cat([mean + sd * z[..., :r], mu_spec[..., r:] + math.sqrt(v) * z[..., r:]], dim=-1)
    log_pred = -0.5 * (((yr - lam * mr) ** 2 / den).sum(-1) + torch.log(2 * math.pi * den).sum())
    yn = y_spec[..., r:]
    if yn.shape[-1] and r2 > 0:
        # Directions outside A's range: y~ ~ N(0, r2), the same for every particle.
        log_pred = log_pred - 0.5 * ((yn**2).sum(-1) / r2 + yn.shape[-1] * (_LOG2PI + math.log(r2)))
    return op.V(w), log_pred


def _check(sampler: Sampler, problem: InverseProblem) -> None:
    sampler._require_svd(problem)
    sampler._require_gaussian(problem)
    if problem.noise_std <= 0:
        raise ValueError(
            f"{type(sampler).__name__} needs Gaussian noise with noise_std > 0: its last step "
            "weights particles by N(y; A x0_hat, sigma_y^2 I), a point mass when sigma_y = 0"
        )


def _validate(sampler: Sampler) -> None:
    c = sampler.c_rate
    if isinstance(c, bool) or not isinstance(c, int | float) or not 0.0 <= c <= 1.0:
        raise ValueError(f"c_rate must be a number in [0, 1], got {c!r}")
    e = sampler.eta
    if e is not None and (
        isinstance(e, bool) or not isinstance(e, int | float) or not 0.0 <= e <= 1.0
    ):
        raise ValueError(f"eta must be None or a number in [0, 1], got {e!r}")


def _setup(sampler: Sampler, ctx: Context) -> tuple[FPSGrid, Tensor, Tensor]:
    """Grid coefficients, singular values and ``U^T y`` ``(B, 1, m)``, cached in ``ctx``."""
    grid = fps_grid(ctx.prior.schedule, ctx.times, sampler.c_rate, sampler.eta)
    op = ctx.problem.operator
    lam = op.singular_values().to(dtype=ctx.dtype, device=ctx.device)
    y0 = op.Ut(ctx.y)[:, None, :]
    ctx.cache.update(fps_grid=grid, fps_lam=lam, fps_y0=y0)
    return grid, lam, y0


def _init_x(ctx: Context, grid: FPSGrid, lam: Tensor, y_spec: Tensor) -> tuple[Tensor, Tensor]:
    """Step 5: ``x_{t_0} ~ p(x_{t_0} | y_{t_0})`` under the prior ``N(0, sigma_{t_0}^2 I)``."""
    op = ctx.problem.operator
    d = op.in_dim
    mu = torch.zeros((ctx.B, ctx.N, d), dtype=ctx.dtype, device=ctx.device)
    r2 = (grid.alpha[0] * ctx.problem.noise_std) ** 2
    return _condition(op, lam, mu, grid.sigma[0] ** 2, r2, y_spec, ctx.randn((ctx.B, ctx.N, d)))


def _move_x(ctx: Context, x: Tensor, k: int, t: Tensor, y_spec: Tensor) -> tuple[Tensor, Tensor]:
    """Steps 2-4 for ``times[k] -> times[k + 1]``: new particles and ``log p(y_s | x_t)``."""
    grid: FPSGrid = ctx.cache["fps_grid"]
    lam: Tensor = ctx.cache["fps_lam"]
    op = ctx.problem.operator
    a_t, s_t, a_s = grid.alpha[k], grid.sigma[k], grid.alpha[k + 1]
    # 2. prior kernel: mu = alpha_s x0_hat + c_eps eps_hat, v = std^2
    x0 = ctx.denoise(x, t)
    eps = (x - a_t * x0) / s_t
    mu = a_s * x0 + grid.c_eps[k] * eps
    v = grid.std[k] ** 2
    r2 = (a_s * ctx.problem.noise_std) ** 2
    # 3-4. conditional proposal given y_s and the predictive log-likelihood
    z = ctx.randn((ctx.B, ctx.N, op.in_dim))
    return _condition(op, lam, op.Vt(mu), v, r2, y_spec, z)


# --------------------------------------------------------------------------------------
# The samplers


@dataclass(frozen=True)
class FPSSMC(SMCSampler):
    """FPS-SMC: a particle filter on FPS's filtering model (Dou & Song, ICLR 2024).

    Targets the filtering model's posterior for one drawn y-sequence, not ``p(x0 | y)``
    (see the module docstring). Returns all ``N`` weighted particles.

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

    #: The normalising constant is not an estimate of log p(y).
    estimates_evidence = False

    num_steps: int = 100
    c_rate: float = 0.95
    eta: float | None = None
    resampling: str = "multinomial"
    ess_threshold: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate(self)

    def check(self, prior: DiffusionModel, problem: InverseProblem) -> None:
        _check(self, problem)

    def y_sequence(
        self,
        prior: DiffusionModel,
        problem: InverseProblem,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The y-sequence ``sample`` draws first from ``generator``: ``(n + 1, B, *out)``.

        Called with a generator in the state ``sample`` receives, it returns the sequence that
        run used (the first thing ``init`` draws).
        """
        _check(self, problem)
        grid = fps_grid(prior.schedule, self.time_grid(prior, problem), self.c_rate, self.eta)
        return fps_y_sequence(problem, grid, 1, generator)[:, :, 0]

    def init(self, ctx: Context):
        grid, lam, y0 = _setup(self, ctx)
        # 1. one y-sequence per observation, shared by the particles (drawn first).
        ys = _y_path(lam, y0, ctx.problem.operator.out_dim, grid, 1, ctx.generator)
        ctx.cache["fps_y"] = ys
        # 5. x_{t_0} ~ p(x_{t_0} | y_{t_0}); its weight p(y_{t_0}) is the same for all particles.
        x, log_w = _init_x(ctx, grid, lam, ys[0])
        return {"x": x}, log_w

    def step(self, ctx: Context, state, i, t, t_next):
        x, log_pred = _move_x(ctx, state["x"], i, t, ctx.cache["fps_y"][i + 1])
        return {"x": x}, log_pred


@dataclass(frozen=True)
class FPS(Sampler):
    """FPS: the single-particle filtering chain, unweighted (Dou & Song, ICLR 2024).

    Each of the ``N`` samples is an independent FPS run with its own y-sequence (drawn one
    bridge step at a time). Approximate: see the module docstring.

    Parameters
    ----------
    num_steps
        Steps of the time grid.
    c_rate
        The paper's correlation rate ``c`` in ``[0, 1]`` (default 0.95).
    eta
        None (default): the paper's ``c_rate`` kernel; a number: the DDIM(eta) kernel.
    """

    num_steps: int = 100
    c_rate: float = 0.95
    eta: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate(self)

    def check(self, prior: DiffusionModel, problem: InverseProblem) -> None:
        _check(self, problem)

    def init(self, ctx: Context):
        grid, lam, y0 = _setup(self, ctx)
        op = ctx.problem.operator
        # 1. y_{t_0} per sample; the bridge continues in step().
        y = _y_start(y0, _spectral_noise(lam, op.out_dim, (ctx.B, ctx.N), y0, ctx.generator), grid)
        x, _ = _init_x(ctx, grid, lam, y)
        return {"x": x, "y": y}, None

    def step(self, ctx: Context, state, i, t, t_next):
        grid, lam, y0 = ctx.cache["fps_grid"], ctx.cache["fps_lam"], ctx.cache["fps_y0"]
        noise = _spectral_noise(
            lam, ctx.problem.operator.out_dim, (ctx.B, ctx.N), y0, ctx.generator
        )
        y = _y_bridge(state["y"], y0, noise, grid, i)
        x, _ = _move_x(ctx, state["x"], i, t, y)
        return {"x": x, "y": y}, None

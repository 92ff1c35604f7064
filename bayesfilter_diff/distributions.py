"""Pyro distributions: a diffusion prior and a linear-Gaussian likelihood.

:class:`DiffusionPrior` wraps a :class:`~bayesfilter_diff.priors.base.DiffusionModel` as a
``pyro.distributions.TorchDistribution`` so that it can stand at a ``pyro.sample`` site,
and :class:`LinearGaussian` is the observation ``y ~ N(A x, sigma_y^2 I)`` of the toolkit's
inverse problems. Together they make the "Pyro front door" of :func:`bayesfilter_diff.infer`::

    def model(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", bfd.LinearGaussian(A, x, noise_std=0.05), obs=y)

Both follow Pyro's shape algebra (``batch_shape``, ``event_shape``, ``expand``,
``to_event``, broadcasting inside ``pyro.plate``).

Sampling a :class:`DiffusionPrior` runs the reverse process (ancestral DDPM or
deterministic DDIM, :class:`~bayesfilter_diff.samplers.DDIM`); its density is the
probability-flow ODE estimate of Song et al. (ICLR 2021, Sec. 4.3 and App. D.2),
:meth:`DiffusionPrior.ode_log_prob`, computed by :mod:`bayesfilter_diff.priors.ode_density`
(see there for the approximations and the cost).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.util import broadcast_shape
from torch import Tensor

from .errors import PosteriorQualityWarning
from .operators.base import Operator
from .operators.identity import Identity
from .priors import ode_density
from .priors.base import DiffusionModel
from .problem import InverseProblem

__all__ = ["DiffusionPrior", "LinearGaussian"]

_LOG2PI = math.log(2 * math.pi)
_SAMPLERS = ("ddpm", "ddim")


def _model_ref(model: DiffusionModel) -> tuple[torch.dtype, torch.device]:
    """dtype and device of the model's first floating-point parameter or buffer."""
    for p in list(model.parameters()) + list(model.buffers()):
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.get_default_dtype(), torch.device("cpu")


def unconditional_problem(model: DiffusionModel, batch: int | None = None) -> InverseProblem:
    """A problem the DDIM sampler can run on to draw from ``model`` itself; DDIM never reads
    its observation. With ``batch``, ``batch`` problems (a prior conditioned per problem,
    such as a labelled prior given one label per problem, draws each from its own)."""
    dtype, device = _model_ref(model)
    event = tuple(model.event_shape)
    op = Identity(event, dtype=dtype).to(device)
    shape = event if batch is None else (batch,) + event
    return InverseProblem(op, torch.zeros(shape, dtype=dtype, device=device), noise_std=1.0)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_solver(solver, rtol, atol, adjoint) -> None:
    methods = tuple(m for m in ode_density.SOLVERS if m != "scipy_solver")
    if solver not in methods:
        raise ValueError(f"solver must be one of {methods}, got {solver!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol > 0:
            raise ValueError(f"{name} must be a positive number, got {tol!r}")
    if not isinstance(adjoint, bool):
        raise ValueError(f"adjoint must be a bool, got {adjoint!r}")


class DiffusionPrior(TorchDistribution):
    r"""A diffusion model as a Pyro distribution over its event shape.

    Parameters
    ----------
    model
        The diffusion model (schedule and denoiser).
    sampler
        ``"ddpm"`` (default): ancestral sampling, the DDIM kernel with ``eta = 1``;
        ``"ddim"``: deterministic DDIM (``eta = 0``) from Gaussian noise.
    num_steps
        Steps of the reverse process used by :meth:`sample`.
    grid
        ``"uniform"`` or ``"ddpm"`` time grid for :meth:`sample`.
    ode_steps
        Steps of the probability-flow ODE used by :meth:`log_prob` (fixed-grid solvers).
    ode_grid
        Fixed grid of the ODE: ``"quadratic"`` (default; ``t = t_min + (t_max - t_min)
        u^2`` with ``u`` uniform, i.e. uniform in ``sigma`` near ``t = 0`` for VP paths,
        where the flow of a concentrated prior is stiffest) or ``"uniform"`` in ``t``.
    solver
        The ``torchdiffeq`` solver of that ODE: ``"rk4"`` (default; fixed grid of
        ``ode_steps`` steps, a density smooth in ``x``), another fixed-grid method, or an
        adaptive one (``"dopri5"``, ``"bosh3"``, ...) with tolerances ``rtol`` / ``atol``
        (its steps depend on the whole batch of points).
    rtol, atol
        Tolerances of an adaptive ``solver``.
    adjoint
        Differentiate :meth:`log_prob` by the adjoint method (memory independent of the
        number of solver steps, one more solve) rather than through the solver's steps.
    t_min, t_max
        Integration interval of the ODE. ``t = 0`` itself is singular for VP and flow
        paths (``sigma(0) = 0``: the velocity is ``0 / 0``), so the density returned is that
        of the noisy marginal ``p_{t_min}``, which differs from ``p_0`` by ``O(t_min)``
        (for the linear VP schedule ``sigma^2(t_min) ~ 0.1 t_min``). Use ``t_max < 1`` for
        schedules whose derivative blows up at ``t = 1``; ``t_max=None`` (default) is 1,
        or 0.999 for the clipped cosine VP schedule (``dalpha/dt ~ tan(pi/2)`` at 1).
    exact_divergence_max_dim
        Event sizes ``d`` up to this use the exact divergence (``d`` vector-Jacobian
        products); larger ones use Hutchinson's estimator.
    num_probes
        Rademacher probes per velocity evaluation of Hutchinson's estimator.
    probe_seed
        Seed of the probes' generator (a fresh ``torch.Generator`` per call, so
        :meth:`log_prob` is deterministic).
    generator
        Generator used by :meth:`sample` (``None``: torch's default generator).
    batch_shape
        Batch shape (default ``()``; :meth:`expand` and ``pyro.plate`` set it). All batch
        elements are the same distribution.
    validate_args
        Validate the samples passed to :meth:`log_prob` (torch's default if ``None``).

    Notes
    -----
    ``sample`` runs :class:`~bayesfilter_diff.samplers.DDIM` through the shared particle
    loop. The loop needs an :class:`~bayesfilter_diff.InverseProblem`; DDIM ignores the
    observation, so a dummy one is used (an ``Identity`` operator of the model's dtype and
    device, ``y = 0``, ``noise_std = 1``). The samples are those of the discretised chain
    (``num_steps`` network calls), not exact draws of ``p_0``. ``has_rsample`` is
    ``False``: no gradient flows through the samples.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self,
        model: DiffusionModel,
        sampler: str = "ddpm",
        num_steps: int = 100,
        *,
        grid: str = "uniform",
        ode_steps: int = 100,
        ode_grid: str = "quadratic",
        solver: str = "rk4",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        adjoint: bool = False,
        t_min: float = 1e-5,
        t_max: float | None = None,
        exact_divergence_max_dim: int = 16,
        num_probes: int = 1,
        probe_seed: int = 0,
        generator: torch.Generator | None = None,
        batch_shape: Sequence[int] = (),
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(model, DiffusionModel):
            raise TypeError(f"model must be a DiffusionModel, got {type(model).__name__}")
        if sampler not in _SAMPLERS:
            raise ValueError(f"sampler must be one of {_SAMPLERS}, got {sampler!r}")
        _positive_int(num_steps, "num_steps")
        if grid not in ("uniform", "ddpm"):
            raise ValueError(f"grid must be 'uniform' or 'ddpm', got {grid!r}")
        _positive_int(ode_steps, "ode_steps")
        _check_solver(solver, rtol, atol, adjoint)
        if ode_grid not in ("quadratic", "uniform"):
            raise ValueError(f"ode_grid must be 'quadratic' or 'uniform', got {ode_grid!r}")
        if t_max is None:
            # The clipped cosine VP schedule has dalpha/dt ~ tan(pi/2) at t = 1.
            cosine = getattr(model.schedule, "kind", "") == "vp" and (
                getattr(model.schedule, "name", "") == "cosine"
            )
            t_max = 0.999 if cosine else 1.0
        if not (isinstance(t_min, int | float) and isinstance(t_max, int | float)) or not (
            0.0 <= t_min < t_max <= 1.0
        ):
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min!r}, t_max={t_max!r}")
        if isinstance(exact_divergence_max_dim, bool) or not isinstance(
            exact_divergence_max_dim, int
        ):
            raise ValueError(
                f"exact_divergence_max_dim must be an int, got {exact_divergence_max_dim!r}"
            )
        _positive_int(num_probes, "num_probes")
        if isinstance(probe_seed, bool) or not isinstance(probe_seed, int):
            raise ValueError(f"probe_seed must be an int, got {probe_seed!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        self.model = model
        self.sampler = sampler
        self.num_steps = num_steps
        self.grid = grid
        self.ode_steps = ode_steps
        self.ode_grid = ode_grid
        self.solver = solver
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.adjoint = adjoint
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        self.exact_divergence_max_dim = exact_divergence_max_dim
        self.num_probes = num_probes
        self.probe_seed = probe_seed
        self.generator = generator
        super().__init__(torch.Size(batch_shape), model.event_shape, validate_args=validate_args)

    # ------------------------------------------------------------------ Pyro plumbing
    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def dtype(self) -> torch.dtype:
        return _model_ref(self.model)[0]

    @property
    def device(self) -> torch.device:
        return _model_ref(self.model)[1]

    def expand(self, batch_shape, _instance=None) -> DiffusionPrior:
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(DiffusionPrior, _instance)
        for k in (
            "model",
            "sampler",
            "num_steps",
            "grid",
            "ode_steps",
            "ode_grid",
            "solver",
            "rtol",
            "atol",
            "adjoint",
            "t_min",
            "t_max",
            "exact_divergence_max_dim",
            "num_probes",
            "probe_seed",
            "generator",
        ):
            setattr(new, k, getattr(self, k))
        super(DiffusionPrior, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    # ------------------------------------------------------------------ sampling
    def sample(
        self, sample_shape: Sequence[int] = torch.Size(), generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw ``sample_shape + batch_shape`` independent samples with the reverse process.

        ``generator`` overrides the distribution's ``generator`` attribute.
        """
        from .samplers.ddim import DDIM

        shape = self._extended_shape(torch.Size(sample_shape))
        n = math.prod(shape[: len(shape) - len(self.event_shape)])
        dtype, device = _model_ref(self.model)
        if n == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        sampler = DDIM(
            num_steps=self.num_steps, grid=self.grid, eta=1.0 if self.sampler == "ddpm" else 0.0
        )
        gen = self.generator if generator is None else generator
        with torch.no_grad():
            res = sampler.sample(self.model, unconditional_problem(self.model), n, gen)
        return res.samples.reshape(shape)

    # ------------------------------------------------------------------ density
    def log_prob(self, value: Tensor) -> Tensor:
        """Probability-flow ODE estimate of ``log p(value)`` (see :meth:`ode_log_prob`).

        Returns shape ``broadcast(value.shape[:-event_dim], batch_shape)``, differentiable
        in ``value`` when ``value`` requires grad (Pyro's HMC / NUTS get the prior's
        gradient), detached otherwise.
        """
        if self._validate_args:
            self._validate_sample(value)
        lp = self.ode_log_prob(value)
        return lp.expand(broadcast_shape(lp.shape, self.batch_shape))

    def ode_log_prob(
        self,
        x: Tensor,
        *,
        ode_steps: int | None = None,
        num_probes: int | None = None,
        exact: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""``log p(x)`` by the instantaneous change of variables along the probability flow.

        ``log p_{t_min}(x) = log p_{t_max}(x_{t_max}) + int_{t_min}^{t_max} div v(x_t, t) dt``
        solved by ``torchdiffeq`` from ``x_{t_min} = x`` (``solver``), a second-order
        Gaussian approximation of the terminal density, and the exact divergence or
        Hutchinson's estimator: see :mod:`bayesfilter_diff.priors.ode_density` for the
        approximations, their errors and the cost (RK4: ``4 ode_steps + 2`` network calls,
        each with ``d`` or ``num_probes`` vector-Jacobian products; a gradient adds one
        backward solve).

        Parameters
        ----------
        x
            Points of shape ``(*lead, *event_shape)``.
        ode_steps, num_probes
            Override the distribution's settings.
        exact
            Force the exact divergence (``True``) or Hutchinson's estimator (``False``);
            default: exact when ``prod(event_shape) <= exact_divergence_max_dim``.
        generator
            Generator of the probes (default: a fresh one seeded with ``probe_seed``).

        Returns
        -------
        Tensor
            ``(*lead)``, in ``x``'s dtype; differentiable in ``x`` when ``x`` requires grad.
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point torch.Tensor")
        ev = tuple(self.event_shape)
        k = len(ev)
        if x.dim() < k or tuple(x.shape[x.dim() - k :]) != ev:
            raise ValueError(f"x must end with the event shape {ev}, got shape {tuple(x.shape)}")
        ode_steps = _positive_int(self.ode_steps if ode_steps is None else ode_steps, "ode_steps")
        num_probes = _positive_int(
            self.num_probes if num_probes is None else num_probes, "num_probes"
        )
        if exact is None:
            exact = math.prod(ev) <= self.exact_divergence_max_dim
        if not exact and torch.is_grad_enabled() and x.requires_grad:
            warnings.warn(
                "DiffusionPrior.log_prob is differentiated with Hutchinson's divergence "
                f"estimator (event size {math.prod(ev)} > exact_divergence_max_dim = "
                f"{self.exact_divergence_max_dim}): the density is then a random estimate, "
                "and HMC / NUTS on it sample a perturbed posterior, not the model's; raise "
                "exact_divergence_max_dim to the event size for an exact reference (d "
                "vector-Jacobian products per network call)",
                PosteriorQualityWarning,
                stacklevel=2,
            )
        dev = self.device
        if x.device != dev:
            raise ValueError(f"x is on {x.device} but the diffusion prior is on {dev}; move one")
        out_dtype = x.dtype
        x = x.to(self.dtype)  # the network's precision; returned in x's dtype
        if not exact and generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.probe_seed)
        return ode_density.ode_log_prob(
            self.model,
            x,
            t_min=self.t_min,
            t_max=self.t_max,
            ode_steps=ode_steps,
            exact=exact,
            num_probes=num_probes,
            generator=generator,
            method=self.solver,
            rtol=self.rtol,
            atol=self.atol,
            adjoint=self.adjoint,
            ode_grid=self.ode_grid,
        ).to(out_dtype)

    # ------------------------------------------------------------------ not available
    def _unavailable(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"DiffusionPrior.{what} is not available in closed form for a diffusion model; "
            "estimate it from draws (prior.sample((n,))) or, for a Gaussian-mixture prior, "
            "use the GaussianMixture itself"
        )

    @property
    def mean(self) -> Tensor:
        raise self._unavailable("mean")

    @property
    def variance(self) -> Tensor:
        raise self._unavailable("variance")

    def entropy(self) -> Tensor:
        raise self._unavailable("entropy()")

    def rsample(self, sample_shape: Sequence[int] = torch.Size()) -> Tensor:
        raise NotImplementedError(
            "DiffusionPrior.rsample: the reverse diffusion is not reparameterised here "
            "(has_rsample is False); use sample(), or a sampler of bayesfilter_diff.samplers "
            "for posterior draws"
        )


class LinearGaussian(TorchDistribution):
    r"""The observation model ``y ~ N(A x, sigma_y^2 I)`` over the operator's output shape.

    Parameters
    ----------
    operator
        The forward model ``A`` (any :class:`~bayesfilter_diff.operators.Operator`; a
        nonlinear one makes this ``N(A(x), sigma_y^2 I)``).
    x
        Signals of shape ``(*batch, *operator.in_shape)``; ``batch_shape`` is ``*batch``.
    noise_std
        ``sigma_y >= 0`` (a number or a one-element tensor, stored as a float), or a tensor
        of scales ``> 0``, one per batch element (broadcasting against
        ``batch_shape + event_shape`` with unit trailing event dims, e.g. a global noise
        scale of shape ``(K, 1)`` set per theta-particle). With ``sigma_y = 0`` the
        distribution is a point mass: :meth:`sample` returns ``A x`` and :meth:`log_prob`
        raises.
    validate_args
        Validate values passed to :meth:`log_prob`.

    Notes
    -----
    :func:`bayesfilter_diff.infer` reads ``operator`` and ``noise_std`` from the observed
    site to build an :class:`~bayesfilter_diff.InverseProblem`, so every sampler (including
    the SVD-based ones) can run on the model.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(
        self,
        operator: Operator,
        x: Tensor,
        noise_std: float | Tensor,
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(operator, Operator):
            raise TypeError(f"operator must be an Operator, got {type(operator).__name__}")
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        ins = tuple(operator.in_shape)
        k = len(ins)
        if x.dim() < k or tuple(x.shape[x.dim() - k :]) != ins:
            raise ValueError(
                f"x must end with the operator's input shape {ins}, got shape {tuple(x.shape)}"
            )
        batch = tuple(x.shape[: x.dim() - k])
        if isinstance(noise_std, Tensor) and noise_std.numel() == 1:
            noise_std = float(noise_std.detach().reshape(-1)[0])
        if isinstance(noise_std, Tensor):
            # one scale per batch element (e.g. a global latent noise scale set per
            # theta-particle by SMC^2): broadcasting against batch_shape + event_shape
            out = tuple(operator.out_shape)
            try:
                full = torch.broadcast_shapes(noise_std.shape, batch + out)
            except RuntimeError:
                full = None
            if full != torch.Size(batch + out) or noise_std.dim() > len(batch) + len(out):
                raise ValueError(
                    f"noise_std of shape {tuple(noise_std.shape)} must broadcast against the "
                    f"batch and event shape {batch + out} (one scale per batch element: shape "
                    f"({', '.join(map(str, batch))}{',' if len(batch) == 1 else ''}"
                    f"{', 1' * len(out)}))"
                )
            if noise_std.dim() <= len(out) or any(
                noise_std.shape[i] != 1 for i in range(noise_std.dim() - len(out), noise_std.dim())
            ):
                raise ValueError(
                    "noise_std must be one scale per batch element, the same for every output "
                    f"coordinate (trailing dims of size 1); got shape {tuple(noise_std.shape)}"
                )
            if not bool(torch.isfinite(noise_std).all()) or bool((noise_std <= 0).any()):
                raise ValueError("a noise_std tensor must hold finite numbers > 0")
        elif (
            isinstance(noise_std, bool)
            or not isinstance(noise_std, int | float)
            or not math.isfinite(noise_std)
            or noise_std < 0
        ):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        self.operator = operator
        self.x = x
        self.noise_std: float | Tensor = (
            noise_std if isinstance(noise_std, Tensor) else float(noise_std)
        )
        # The tensor the user passed (kept through expand), so infer can tell whether the
        # observation is of the prior site's value itself.
        self._source_x = x
        super().__init__(x.shape[: x.dim() - k], torch.Size(operator.out_shape), validate_args)

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def expand(self, batch_shape, _instance=None) -> LinearGaussian:
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(LinearGaussian, _instance)
        new.operator = self.operator
        new.x = self.x.expand(batch_shape + tuple(self.operator.in_shape))
        new.noise_std = self.noise_std
        new._source_x = self._source_x
        super(LinearGaussian, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> Tensor:
        """``A x``, shape ``batch_shape + event_shape``."""
        return self.operator(self.x)

    @property
    def variance(self) -> Tensor:
        return torch.zeros_like(self.mean) + self.noise_std**2

    def rsample(
        self, sample_shape: Sequence[int] = torch.Size(), generator: torch.Generator | None = None
    ) -> Tensor:
        """``A x + sigma_y n`` with ``n ~ N(0, I)`` drawn with ``generator``."""
        loc = self.mean
        shape = self._extended_shape(torch.Size(sample_shape))
        if isinstance(self.noise_std, float) and self.noise_std == 0:
            return loc.expand(shape).clone()
        n = torch.randn(shape, generator=generator, dtype=loc.dtype, device=loc.device)
        return loc + self.noise_std * n

    def sample(
        self, sample_shape: Sequence[int] = torch.Size(), generator: torch.Generator | None = None
    ) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape, generator)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log N(value; A x, sigma_y^2 I)`` summed over the event; shape ``sample + batch``."""
        if self._validate_args:
            self._validate_sample(value)
        if isinstance(self.noise_std, float) and self.noise_std == 0:
            raise ValueError("LinearGaussian.log_prob needs noise_std > 0 (a point mass otherwise)")
        loc = self.mean
        k = len(self.event_shape)
        r = value - loc
        red = tuple(range(r.dim() - k, r.dim()))
        s2 = self.noise_std**2
        m = math.prod(self.event_shape)
        if isinstance(s2, Tensor):  # one scale per batch element, constant over the event
            s2b = s2.reshape(s2.shape[: s2.dim() - k])
            return -0.5 * (r**2).sum(red) / s2b - 0.5 * m * (torch.log(s2b) + _LOG2PI)
        return -0.5 * (r**2).sum(red) / s2 - 0.5 * m * (math.log(s2) + _LOG2PI)

"""Posterior sampling on Pyro models: :func:`infer` reads a model and runs a sampler.

A model has one latent site with a :class:`~bayesfilter_diff.DiffusionPrior` and one or more
observed sites (``obs=`` or ``pyro.poutine.condition``)::

    def model(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", bfd.LinearGaussian(A, x, noise_std=0.05), obs=y)

    post = bfd.infer(model, bfd.samplers.TDS(num_steps=100), y=y, num_samples=1000)

How the model is read
---------------------
1. The model is traced once with a placeholder (zeros of the site's shape) substituted for
   the DiffusionPrior site, so the reverse diffusion never runs. Exactly one DiffusionPrior
   site and at least one observed site are required; any other latent site is an error.
2. The prior site's batch shape gives the problems: ``()`` (one problem) or one non-unit
   dimension of size ``B`` (``pyro.plate`` over ``B`` independent observations), which maps
   onto the samplers' ``(B, N)`` layout.
3. The observation becomes an :class:`~bayesfilter_diff.InverseProblem`, by the first rule
   that applies:

   - ``"linear_gaussian"``: a single :class:`~bayesfilter_diff.LinearGaussian` site whose
     ``x`` is the prior site's value: ``InverseProblem(operator, y, noise_std)``; every
     sampler applies, and calling the sampler directly gives the same draws bit for bit.
   - ``"gaussian"`` / ``"poisson"``: a single ``Normal`` (``.to_event`` allowed) site with one
     scale that does not depend on ``x``, a ``LinearGaussian`` of a function of ``x``, or a
     ``Poisson`` site: the forward model ``x -> loc`` (or ``rate``) is read by replaying the
     model (:class:`PyroForward`, a nonlinear operator), with Gaussian or Poisson noise, so
     gradient samplers that need a forward model (DPS) apply.
   - ``"custom"``: anything else (Laplace, Student-t, Bernoulli, several observed sites,
     heteroscedastic noise, ``poutine.scale`` / ``mask``): ``log_likelihood_fn`` replays
     the model with the particles substituted at the prior site and sums the observed
     sites' ``log_prob`` (scaled and masked as Pyro would) per particle. The operator is a
     placeholder (:class:`PyroForward` in ``"custom"`` mode) whose ``out_shape`` is the
     observed value's shape (the concatenated flattened values for several sites) and
     whose ``forward`` raises: a sampler that needs ``A`` cannot use such a likelihood.

Vectorisation contract (as Pyro's ``vectorize_particles``): when the likelihood is
evaluated, the prior site's value carries all particles at once, with shape
``(N, *layout, *event_shape)`` where ``layout`` is the model's batch layout (the prior
site's batch shape, padded on the left to the model's largest batch rank ``L``): ``(N, B,
*event)`` for a model with one ``pyro.plate`` of problems, ``(N, *event)`` for a model
without plates. The model must compute with ``x`` by broadcasting over these leading
dimensions (``x[..., i]``, ``x @ W.T``, operators, ...). Distribution validation is off
during the replays, so a particle outside a parameter's domain gives NaN / -inf (weight 0 in
the SMC samplers) instead of an exception.

Samplers that need a linear-Gaussian problem (an SVD, a Gaussian noise model) raise a clear
error naming the sampler and the likelihood. :class:`~bayesfilter_diff.samplers.DDIM`
ignores the observation: with it, :func:`infer` returns prior draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
import torch.distributions as tdist
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.util import broadcast_shape, scale_and_mask
from pyro.poutine.messenger import Messenger
from torch import Tensor

from .distributions import DiffusionPrior, LinearGaussian
from .operators.base import Operator
from .priors.base import DiffusionModel
from .problem import InverseProblem
from .result import Result
from .samplers.base import Sampler

__all__ = ["infer", "Posterior", "model_to_problem", "PyroForward", "ModelStructure"]


# --------------------------------------------------------------------------------------
# Effect handlers


class _PriorPlaceholder(Messenger):
    """Substitute zeros for every latent DiffusionPrior site (no reverse diffusion)."""

    def _pyro_sample(self, msg) -> None:
        if msg["done"] or msg["is_observed"] or msg["value"] is not None:
            return
        if isinstance(_unwrap(msg["fn"]), DiffusionPrior):
            fn = msg["fn"]
            prior = _unwrap(fn)
            sample_shape = torch.Size(msg["kwargs"].get("sample_shape", ()))
            msg["value"] = torch.zeros(
                fn.shape(sample_shape), dtype=prior.dtype, device=prior.device
            )
            msg["done"] = True


class _Substitute(Messenger):
    """Set the value of the named latent site (like ``replay``, without marking it observed)."""

    def __init__(self, name: str, value: Tensor) -> None:
        super().__init__()
        self.name = name
        self.value = value

    def _pyro_sample(self, msg) -> None:
        if msg["name"] == self.name and not msg["is_observed"]:
            msg["value"] = self.value
            msg["done"] = True


def _unwrap(fn: Any) -> Any:
    """Strip ``Independent`` / ``MaskedDistribution`` wrappers."""
    while isinstance(fn, tdist.Independent | MaskedDistribution):
        fn = fn.base_dist
    return fn


def _is_plate_site(site: dict) -> bool:
    from pyro.poutine.subsample_messenger import _Subsample

    return isinstance(site["fn"], _Subsample)


def _one(scale) -> bool:
    return (isinstance(scale, int | float) and scale == 1) or (
        isinstance(scale, Tensor) and scale.numel() == 1 and float(scale) == 1
    )


# --------------------------------------------------------------------------------------
# The model's structure and its replay with particles


@dataclass
class ModelStructure:
    """What :func:`model_to_problem` read from a model (for replays and reports)."""

    model: Callable
    args: tuple
    kwargs: dict
    prior_site: str
    prior: DiffusionPrior
    observed: tuple[str, ...]
    layout: tuple[int, ...]  # the prior value's batch layout, length L
    batched: bool
    B: int
    bdim: int  # position of B in the layout (negative), or 0 when unbatched
    kind: str = ""
    trace: Any = field(default=None, repr=False)

    @property
    def event_shape(self) -> torch.Size:
        return self.prior.event_shape

    # ---- particles <-> the model's layout
    def to_value(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        """``x`` (``(B, N, *event)``, or any leading shape when unbatched) -> model layout.

        Returns the prior value ``(M, *layout, *event)`` and the leading shape to restore.
        """
        k = len(self.event_shape)
        if x.dim() < k or tuple(x.shape[x.dim() - k :]) != tuple(self.event_shape):
            raise ValueError(
                f"particles must end with the event shape {tuple(self.event_shape)}, "
                f"got {tuple(x.shape)}"
            )
        L = len(self.layout)
        if self.batched:
            if x.dim() != k + 2 or x.shape[0] != self.B:
                raise ValueError(
                    f"particles must have shape (B={self.B}, N, *event), got {tuple(x.shape)}"
                )
            lead = x.shape[:2]
            v = x.transpose(0, 1)  # (N, B, *event)
            shape = [1] * L
            shape[self.bdim] = self.B
            v = v.reshape((x.shape[1],) + tuple(shape) + tuple(self.event_shape))
        else:
            lead = x.shape[: x.dim() - k]
            v = x.reshape((-1,) + (1,) * L + tuple(self.event_shape))
        return v, lead

    def from_layout(
        self, t: Tensor, full: tuple[int, ...], trailing: tuple[int, ...], lead: torch.Size
    ) -> Tensor:
        """``t`` broadcastable to ``(M, *full, *trailing)`` -> the problem layout.

        ``full`` is an observed site's batch shape padded to the layout's rank (with ``B``
        at the problems' dimension). Returns ``(B, N, *rest, *trailing)`` (``rest``: ``full``
        without the problems' dimension), or ``(*lead, *full, *trailing)`` when unbatched.
        """
        L = len(self.layout)
        M = lead[1] if self.batched else math.prod(lead)
        nt = len(trailing)
        if t.dim() > 1 + L + nt:
            raise ValueError(
                f"a tensor of shape {tuple(t.shape)} computed from the particles has more "
                f"leading dimensions than the model's layout (N, {L} batch dims); the model must "
                "broadcast over the leading dimensions of the prior site's value"
            )
        t = t.reshape((1,) * (1 + L + nt - t.dim()) + tuple(t.shape))
        t = t.expand((M,) + tuple(full) + tuple(trailing))
        if self.batched:
            return t.movedim(1 + L + self.bdim, 0)
        return t.reshape(tuple(lead) + tuple(t.shape[1:]))

    def replay(self, x: Tensor):
        """Run the model with the particles ``x`` at the prior site; return its trace."""
        value, _ = self.to_value(x)
        with pyro.validation_enabled(False):
            handled = poutine.trace(_Substitute(self.prior_site, value)(self.model))
            return handled.get_trace(*self.args, **self.kwargs)

    def observed_log_prob(self, x: Tensor) -> Tensor:
        """Sum of the observed sites' ``log_prob`` per particle: ``(B, N)``."""
        value, lead = self.to_value(x)
        tr = self.replay(x)
        L = len(self.layout)
        total = None
        for name in self.observed:
            site = tr.nodes[name]
            lp = site["fn"].log_prob(site["value"])
            lp = scale_and_mask(lp, site["scale"], site["mask"])
            if not isinstance(lp, Tensor):
                lp = torch.as_tensor(lp, dtype=value.dtype, device=value.device)
            if lp.dim() > 1 + L:
                raise ValueError(
                    f"log_prob of site {name!r} has shape {tuple(lp.shape)}, more than the "
                    f"(N, {L} batch dims) layout; the model must broadcast over the leading "
                    "dimensions of the prior site's value"
                )
            lp = lp.reshape((1,) * (1 + L - lp.dim()) + tuple(lp.shape))
            # Sum every layout dimension but the problems' one.
            keep = [0] + ([1 + L + self.bdim] if self.batched else [])
            red = [i for i in range(1, 1 + L) if i not in keep]
            if red:
                lp = lp.sum(red, keepdim=True)
            total = lp if total is None else total + lp
        N = lead[1] if self.batched else math.prod(lead)
        shape = [N] + [1] * L
        if self.batched:
            shape[1 + L + self.bdim] = self.B
        total = total.expand(shape)
        if self.batched:
            return total.reshape(N, self.B).transpose(0, 1)
        return total.reshape(tuple(lead))


class PyroForward(Operator):
    """The forward model of a Pyro observation, read by replaying the model.

    ``forward(x)`` substitutes the particles ``x`` (``(B, N, *event)``; any leading shape
    for an unbatched model) at the prior site, replays the model and returns the observed
    site's ``loc`` (Gaussian) or ``rate`` (Poisson) in the problem layout ``(B, N, *out)``.
    It is differentiable in ``x`` and nonlinear in general (``is_linear = False``).

    In ``"custom"`` mode the operator is a placeholder that carries the shapes (``out_shape``
    is the observed value's shape) and ``forward`` raises: the likelihood is only available
    through ``problem.log_likelihood``.
    """

    is_linear = False

    def __init__(
        self,
        structure: ModelStructure,
        out_shape: tuple[int, ...],
        mode: str,
        site_layout: tuple[tuple[int, ...], tuple[int, ...]] = ((), ()),
    ) -> None:
        super().__init__(tuple(structure.event_shape), out_shape)
        self.structure = structure
        self.mode = mode
        self._full, self._trailing = site_layout

    def forward(self, x: Tensor) -> Tensor:
        st = self.structure
        if self.mode == "custom":
            raise ValueError(
                f"the likelihood of the Pyro site(s) {list(st.observed)} has no forward operator "
                "(it is only available as problem.log_likelihood); use a sampler that works "
                "with a general differentiable likelihood, such as TDS"
            )
        tr = st.replay(x)
        _, lead = st.to_value(x)
        fn = _unwrap(tr.nodes[st.observed[0]]["fn"])
        t = (
            fn.mean
            if isinstance(fn, LinearGaussian)
            else (fn.loc if self.mode == "gaussian" else fn.rate)
        )
        t = st.from_layout(t, self._full, self._trailing, lead)
        lead_out = t.shape[: 2 if st.batched else len(lead)]
        return t.reshape(tuple(lead_out) + tuple(self.out_shape))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, site={self.structure.observed}, " + super().extra_repr()


# --------------------------------------------------------------------------------------
# Reading a model


def model_to_problem(
    model: Callable, *args, **kwargs
) -> tuple[DiffusionModel, InverseProblem, ModelStructure]:
    """Read a Pyro model: its diffusion prior, the inverse problem and the model structure.

    Parameters
    ----------
    model
        A Pyro model with one DiffusionPrior site and observed sites (see the module).
    *args, **kwargs
        The model's arguments (data).

    Returns
    -------
    (DiffusionModel, InverseProblem, ModelStructure)
        ``structure.kind`` is ``"linear_gaussian"``, ``"gaussian"``, ``"poisson"`` or
        ``"custom"``.
    """
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    # 1. Trace with a placeholder at the prior site (no reverse diffusion).
    with pyro.validation_enabled(False):
        tr = poutine.trace(_PriorPlaceholder()(model)).get_trace(*args, **kwargs)
    sites = [
        (name, s)
        for name, s in tr.nodes.items()
        if s["type"] == "sample"
        and not _is_plate_site(s)
        and not s["infer"].get("_deterministic", False)
    ]
    priors = [(n, s) for n, s in sites if isinstance(_unwrap(s["fn"]), DiffusionPrior)]
    if not priors:
        raise ValueError(
            "the model has no DiffusionPrior site: sample the signal with "
            "pyro.sample(name, bfd.DiffusionPrior(diffusion_model))"
        )
    if len(priors) > 1:
        raise ValueError(
            f"the model has {len(priors)} DiffusionPrior sites {[n for n, _ in priors]}; "
            "infer supports exactly one"
        )
    prior_name, psite = priors[0]
    if psite["is_observed"]:
        raise ValueError(
            f"the DiffusionPrior site {prior_name!r} is observed; infer needs it latent"
        )
    if not isinstance(psite["fn"], DiffusionPrior):
        raise ValueError(
            f"the DiffusionPrior at site {prior_name!r} is wrapped in "
            f"{type(psite['fn']).__name__} (to_event / mask); infer needs it plain "
            "(use pyro.plate for a batch of independent problems)"
        )
    prior: DiffusionPrior = psite["fn"]
    observed = [n for n, s in sites if s["is_observed"] and n != prior_name]
    if not observed:
        raise ValueError(
            "the model has no observed site: pass the data with obs= or "
            "pyro.poutine.condition(model, data={...})"
        )
    latent = [n for n, s in sites if not s["is_observed"] and n != prior_name]
    if latent:
        raise ValueError(
            f"the model has latent sites {latent} besides the DiffusionPrior site "
            f"{prior_name!r}; infer supports one latent site: observe or remove them"
        )
    # 2. Problems: the prior's batch shape has at most one non-unit dimension.
    P = tuple(psite["value"].shape[: psite["value"].dim() - len(prior.event_shape)])
    # The layout's rank L: the largest batch rank of the prior and observed sites (an
    # observed value may carry more leading dims than its distribution's batch shape).
    L = max(
        [len(P)]
        + [
            max(len(s["fn"].batch_shape), torch.as_tensor(s["value"]).dim() - s["fn"].event_dim)
            for n, s in sites
            if n in observed
        ]
    )
    layout = (1,) * (L - len(P)) + P
    big = [i for i, s in enumerate(layout) if s != 1]
    if len(big) > 1:
        raise ValueError(
            f"the DiffusionPrior site {prior_name!r} has batch shape {P}; infer supports "
            "one batch dimension of independent problems (one pyro.plate)"
        )
    batched = len(big) == 1
    B = layout[big[0]] if batched else 1
    bdim = big[0] - L if batched else 0
    st = ModelStructure(
        model, args, kwargs, prior_name, prior, tuple(observed), layout, batched, B, bdim, trace=tr
    )
    dtype, device = prior.dtype, prior.device

    # 3a. A LinearGaussian of the prior value itself: the toolkit's own problem.
    if len(observed) == 1:
        s = tr.nodes[observed[0]]
        fn = s["fn"]
        if (
            isinstance(fn, LinearGaussian)
            and fn._source_x is psite["value"]
            and _one(s["scale"])
            and s["mask"] is None
            and tuple(fn.batch_shape) == P
            and tuple(s["value"].shape) == P + tuple(fn.event_shape)
        ):
            out = tuple(fn.event_shape)
            y = s["value"].reshape(((B,) if batched else ()) + out)
            st.kind = "linear_gaussian"
            return prior.model, InverseProblem(fn.operator, y, fn.noise_std), st

    # 3b. A single Gaussian / Poisson observation: forward model by replay.
    y, out, site_layout = _observed_data(st, tr, dtype, device)
    if len(observed) == 1:
        s = tr.nodes[observed[0]]
        kind, noise_std = _structured_kind(st, s)
        if kind is not None:
            st.kind = kind
            op = PyroForward(st, out, kind, site_layout)
            if kind == "poisson":
                problem = InverseProblem(op, y, noise="poisson")
            else:
                problem = InverseProblem(op, y, noise_std)
            _probe(st, problem)
            return prior.model, problem, st

    # 3c. Anything else: the summed log_prob of the observed sites.
    st.kind = "custom"
    op = PyroForward(st, out, "custom")

    def log_likelihood_fn(x: Tensor, y_unused: Tensor) -> Tensor:
        return st.observed_log_prob(x)

    problem = InverseProblem(op, y, log_likelihood_fn=log_likelihood_fn)
    _probe(st, problem)
    return prior.model, problem, st


def _observed_data(st: ModelStructure, tr, dtype, device) -> tuple[Tensor, tuple[int, ...], tuple]:
    """``y`` in the problem layout ``(B, *out)`` (or ``(*out)``), ``out`` and the event shape.

    One site: its value (expanded to the site's batch shape, the problems' dimension first).
    Several: the per-problem concatenation of the flattened values.
    """
    L = len(st.layout)
    parts, site_layout = [], ((), ())
    for name in st.observed:
        s = tr.nodes[name]
        fn = s["fn"]
        ev = tuple(fn.event_shape)
        v = torch.as_tensor(s["value"])
        full = tuple(broadcast_shape(tuple(fn.batch_shape), tuple(v.shape[: v.dim() - len(ev)])))
        full = (1,) * (L - len(full)) + full
        v = v.expand(full + ev)
        if st.batched and full[L + st.bdim] == 1:
            full = full[: L + st.bdim] + (st.B,) + full[L + st.bdim + 1 :]
        site_layout = (full, ev)
        if st.batched:
            pos = L + st.bdim
            if v.shape[pos] == 1:
                v = v.expand(v.shape[:pos] + (st.B,) + v.shape[pos + 1 :])
            v = v.movedim(pos, 0)  # (B, *rest, *ev)
        parts.append(v)
    if len(parts) == 1:
        y = parts[0]
        lead = 1 if st.batched else 0
        out = tuple(y.shape[lead:])
        if not out:
            out = (1,)
            y = y.reshape(y.shape[:lead] + out)
        return y.to(device=device, dtype=dtype), out, site_layout
    if st.batched:
        y = torch.cat([p.reshape(st.B, -1).to(device=device, dtype=dtype) for p in parts], dim=1)
    else:
        y = torch.cat([p.reshape(-1).to(device=device, dtype=dtype) for p in parts])
    return y, (y.shape[-1],), ((), ())


def _structured_kind(st: ModelStructure, s: dict) -> tuple[str | None, float]:
    """``("gaussian", sigma)`` / ``("poisson", 0)`` for a site that maps onto a noise model."""
    if not (_one(s["scale"]) and s["mask"] is None):
        return None, 0.0
    fn = s["fn"]
    while isinstance(fn, tdist.Independent):
        fn = fn.base_dist
    if isinstance(fn, LinearGaussian):
        return ("gaussian", fn.noise_std) if fn.noise_std > 0 else (None, 0.0)
    if isinstance(fn, tdist.Poisson):
        return "poisson", 0.0
    if type(fn) in (tdist.Normal, pyro.distributions.Normal):
        # The scale must not depend on x: replay with particles that require grad.
        x = torch.zeros(
            ((st.B,) if st.batched else (1,)) + (2,) + tuple(st.event_shape),
            dtype=st.prior.dtype,
            device=st.prior.device,
        ).requires_grad_(True)
        with torch.enable_grad():
            probe = _unwrap(st.replay(x).nodes[st.observed[0]]["fn"])
        scale = probe.scale
        if scale.requires_grad or not bool((scale == scale.reshape(-1)[0]).all()):
            return None, 0.0
        sd = float(scale.reshape(-1)[0])
        return ("gaussian", sd) if sd > 0 else (None, 0.0)
    return None, 0.0


def _probe(st: ModelStructure, problem: InverseProblem) -> None:
    """Evaluate the likelihood on a few placeholder particles: shape errors before the run."""
    n = 3
    x = torch.zeros(
        (problem.batch_size, n) + tuple(st.event_shape),
        dtype=st.prior.dtype,
        device=st.prior.device,
    )
    msg = (
        f"the model's likelihood could not be evaluated for {n} particles at once (prior value "
        f"of shape {tuple(st.to_value(x)[0].shape)}); the model must broadcast over the leading "
        "dimensions of the prior site's value (see bayesfilter_diff.inference)"
    )
    try:
        ll = problem.log_likelihood(x)
    except RuntimeError as e:
        raise ValueError(f"{msg}: {e}") from e
    if tuple(ll.shape) != (problem.batch_size, n):
        raise ValueError(f"{msg}: got a log-likelihood of shape {tuple(ll.shape)}")


# --------------------------------------------------------------------------------------
# infer and its result


@dataclass
class Posterior:
    """Posterior draws of a Pyro model's DiffusionPrior site.

    Attributes
    ----------
    result
        The sampler's :class:`~bayesfilter_diff.Result`.
    site
        Name of the DiffusionPrior site.
    problem
        The :class:`~bayesfilter_diff.InverseProblem` built from the model.
    structure
        What was read from the model (``structure.kind``: how the likelihood was mapped).
    """

    result: Result
    site: str
    problem: InverseProblem
    structure: ModelStructure = field(repr=False)

    @property
    def samples(self) -> Tensor:
        """``(B, N, *event)`` or ``(N, *event)``."""
        return self.result.samples

    @property
    def log_weights(self) -> Tensor | None:
        return self.result.log_weights

    @property
    def log_evidence(self) -> Tensor | None:
        return self.result.log_evidence

    @property
    def info(self) -> dict:
        return self.result.info

    @property
    def kind(self) -> str:
        return self.structure.kind

    def draws(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` equally weighted draws (resampled when the sampler is weighted)."""
        return self.result.draws(n, generator=generator)

    def mean(self) -> Tensor:
        """Weighted posterior mean."""
        return self.result.mean()

    def to_arviz(self, **kwargs):
        """ArviZ data of the draws (:func:`bayesfilter_diff.diagnostics.to_arviz`).

        The variable is named after the prior site; keyword arguments are passed on.
        """
        try:
            from .diagnostics import to_arviz
        except ImportError as e:  # pragma: no cover - depends on the diagnostics layer
            raise ImportError(
                f"Posterior.to_arviz needs bayesfilter_diff.diagnostics.to_arviz: {e}"
            ) from e
        kwargs.setdefault("var_name", self.site)
        return to_arviz(self.result, **kwargs)


def infer(
    model: Callable,
    sampler: Sampler,
    *args,
    num_samples: int = 1000,
    generator: torch.Generator | None = None,
    **kwargs,
) -> Posterior:
    """Sample the posterior of a Pyro model's DiffusionPrior site with ``sampler``.

    Parameters
    ----------
    model
        A Pyro model: one ``pyro.sample`` site with a
        :class:`~bayesfilter_diff.DiffusionPrior` and observed sites (see the module
        docstring for how they are read and the vectorisation contract).
    sampler
        Any sampler of :mod:`bayesfilter_diff.samplers`.
    *args, **kwargs
        The model's arguments (the names ``num_samples`` and ``generator`` are taken).
    num_samples
        Particles ``N`` per problem.
    generator
        Randomness of the sampler (the model is not run at random: the prior site gets a
        placeholder, so a LinearGaussian model gives the same draws as calling the sampler
        directly with the same generator state).

    Returns
    -------
    Posterior
    """
    if not isinstance(sampler, Sampler):
        raise TypeError(
            f"sampler must be a bayesfilter_diff sampler (e.g. samplers.TDS()), "
            f"got {type(sampler).__name__}"
        )
    prior, problem, st = model_to_problem(model, *args, **kwargs)
    if st.kind != "linear_gaussian":
        try:
            sampler.check(prior, problem)
        except ValueError as e:
            fns = [type(_unwrap(st.trace.nodes[n]["fn"])).__name__ for n in st.observed]
            raise ValueError(
                f"{type(sampler).__name__} cannot sample this model: the observed site(s) "
                f"{list(st.observed)} ({', '.join(fns)}) give a {st.kind!r} likelihood, not a "
                f"linear operator with Gaussian noise ({e}). Use a sampler for general "
                "differentiable likelihoods (TDS; DPS for Gaussian or Poisson sites), or a "
                "LinearGaussian observation of the prior site"
            ) from e
    res = sampler.sample(prior, problem, num_samples, generator)
    return Posterior(result=res, site=st.prior_site, problem=problem, structure=st)

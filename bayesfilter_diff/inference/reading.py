"""Reading a Pyro model: its diffusion prior, the inverse problem and the model structure.

See :mod:`bayesfilter_diff.inference` for the rules (steps 1-3 below follow them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, cast

import pyro
import torch
import torch.distributions as tdist
from pyro import poutine
from pyro.distributions.util import broadcast_shape
from torch import Tensor

from ..distributions import DiffusionPrior, LinearGaussian
from ..priors.base import DiffusionModel
from ..problem import InverseProblem, coarser_dtype
from .forward import PyroForward
from .handlers import PriorPlaceholder, is_masked, is_plate_site, is_unit_scale, unwrap
from .linearize import linearize as linearize_forward
from .structure import ModelStructure, _first_line, model_error

__all__ = ["model_to_problem"]


def model_to_problem(
    model: Callable, *args, linearize: bool = True, **kwargs
) -> tuple[DiffusionModel, InverseProblem, ModelStructure]:
    """Read a Pyro model: :func:`_read_model`, with the problem's ``data_dtype`` the coarsest
    dtype of the observed values (bfloat16 data are upcast to the prior's dtype, but keep
    their rounding: the quality check's ``precision`` test reads it)."""
    out = _read_model(model, *args, linearize=linearize, **kwargs)
    problem, st = out[1], out[2]
    for name in st.observed:
        v = st.trace.nodes[name]["value"] if st.trace is not None else None
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            problem.data_dtype = coarser_dtype(problem.data_dtype, v.dtype)
    if problem.log_likelihood_fn is not None and st.trace is not None:
        problem.data_scale_ratio = _data_scale_ratio(model, args, kwargs, st)
    return out


#: location-scale laws whose ``scale`` is the noise's scale in the data's units
_NOISE_SCALE_LAWS = frozenset(
    {"Normal", "Laplace", "StudentT", "Cauchy", "Gumbel", "SoftLaplace", "AsymmetricLaplace"}
)


def _data_scale_ratio(model: Callable, args: tuple, kwargs: dict, st: Any) -> float | None:
    """The largest ``max |y| / scale`` over the observed sites of a location-scale law
    (Normal, Laplace, Student-t, Cauchy, ...) whose ``scale`` is the same at three prior
    values (a constant, not a function of the signal), unmasked and unscaled; ``None`` if
    none is."""
    assert st.trace is not None
    others = []
    try:
        with pyro.validation_enabled(False):
            for value in (0.377, -2.71):
                tr = poutine.trace(PriorPlaceholder(value)(model)).get_trace(*args, **kwargs)
                others.append(tr.nodes)
    except Exception:  # the model fails at another value: no ratio
        return None
    best: float | None = None
    for name in st.observed:
        site = st.trace.nodes[name]
        v, fn = site["value"], site["fn"]
        if type(unwrap(fn)).__name__ not in _NOISE_SCALE_LAWS or not isinstance(v, Tensor):
            continue
        if site.get("mask") is not None or is_masked(fn) or not is_unit_scale(site["scale"]):
            continue  # masked entries may hold anything; a scaled site's noise is not `scale`
        a = unwrap(fn).__dict__.get("scale")
        if not isinstance(a, Tensor) or not v.is_floating_point():
            continue
        same = True
        for nodes in others:
            b = unwrap(nodes[name]["fn"]).__dict__.get("scale") if name in nodes else None
            same = same and isinstance(b, Tensor) and b.shape == a.shape and bool((a == b).all())
        lo = float(a.detach().abs().min())
        if not same or lo <= 0 or not math.isfinite(lo):
            continue
        r = float(v.detach().abs().max()) / lo
        best = r if best is None else max(best, r)
    return best


def _read_model(
    model: Callable, *args, linearize: bool = True, **kwargs
) -> tuple[DiffusionModel, InverseProblem, ModelStructure]:
    """Read a Pyro model: its diffusion prior, the inverse problem and the model structure.

    Parameters
    ----------
    model
        A Pyro model with one DiffusionPrior site and observed sites (see
        :mod:`bayesfilter_diff.inference`).
    *args, **kwargs
        The model's arguments (data; the name ``linearize`` is taken).
    linearize
        Read a Gaussian site whose mean is affine in the prior value as a linear operator
        (:mod:`bayesfilter_diff.inference.linearize`; ``kind = "affine_gaussian"``).

    Returns
    -------
    (DiffusionModel, InverseProblem, ModelStructure)
        ``structure.kind`` is ``"linear_gaussian"``, ``"affine_gaussian"``, ``"gaussian"``,
        ``"poisson"`` or ``"custom"``.
    """
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    linear = linearize
    if not isinstance(linear, bool):
        raise TypeError(f"linearize must be a bool, got {linear!r}")
    # 1. Trace with a placeholder at the prior site (no reverse diffusion).
    with pyro.validation_enabled(False):
        try:
            tr = poutine.trace(PriorPlaceholder()(model)).get_trace(*args, **kwargs)
        except (RuntimeError, IndexError) as e:
            raise model_error(e, "with a stand-in value at its prior site") from e
    # The trace's sites as plain dicts: pyro types a Message's fn as any callable and its
    # value / infer as optional; at a traced sample site they are a distribution and set.
    nodes = cast("dict[str, dict[str, Any]]", tr.nodes)
    for name, s in nodes.items():
        if s["type"] == "sample" and is_plate_site(s):
            size, sub = s["fn"].size, s["fn"].subsample_size
            if sub is not None and sub < size:
                raise ValueError(
                    f"pyro.plate({name!r}, {size}, subsample_size={sub}): infer does not "
                    "support subsampling: the SMC weights need the whole likelihood p(y | x) "
                    "(a rescaled minibatch is an estimate of log p(y | x), not of p(y | x)); "
                    "remove subsample_size"
                )
    sites = [
        (name, s)
        for name, s in nodes.items()
        if s["type"] == "sample"
        and not is_plate_site(s)
        and not s["infer"].get("_deterministic", False)
        and not s["infer"].get("_bfd_fixed", False)  # globals set by SMC^2 (hierarchical)
    ]
    priors = [(n, s) for n, s in sites if isinstance(unwrap(s["fn"]), DiffusionPrior)]
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
    alt: dict[str, Any] = {}

    def other_fn(site: str) -> Any:
        """The site's distribution in a trace at another prior value (built once, on
        demand): a parameter that differs there depends on the prior value."""
        if not alt:
            # a generic value (not 0 or 1, the ends of an image's range, where a scale like
            # sqrt(x (1 - x)) vanishes at both)
            with pyro.validation_enabled(False):
                tr1 = poutine.trace(PriorPlaceholder(0.377)(model)).get_trace(*args, **kwargs)
                alt.update(tr1.nodes)
        return alt[site]["fn"]

    for n in observed:
        _check_observed_value(n, nodes[n], prior, functools.partial(other_fn, n))
    latent = [n for n, s in sites if not s["is_observed"] and n != prior_name]
    if latent:
        raise ValueError(
            f"the model has latent sites {latent} besides the DiffusionPrior site "
            f"{prior_name!r}: model_to_problem reads one latent site; bfd.infer samples "
            "global latent sites too (SMC^2, bayesfilter_diff.inference.hierarchical)"
        )
    # 2. Problems: the prior's batch shape has at most one non-unit dimension.
    P = tuple(psite["value"].shape[: psite["value"].dim() - len(prior.event_shape)])
    # Plates around an observed site but not around the prior site index observations
    # (iid data, or a per-coordinate pyro.plate whose dim the model computes from the
    # event): they must be the rightmost batch dims.
    prior_plates = {f.name for f in psite["cond_indep_stack"]}
    obs_plates: dict[str, int] = {}
    for n in observed:
        own = [f for f in nodes[n]["cond_indep_stack"] if f.name not in prior_plates]
        dims = sorted(f.dim for f in own)
        if dims != list(range(-len(own), 0)):
            raise ValueError(
                f"observed site {n!r} is in plate(s) {[f.name for f in own]} (dims {dims}) "
                f"that do not contain the DiffusionPrior site {prior_name!r}: infer needs "
                "such observation plates at the rightmost dims (dim=-1, -2, ...), with the "
                "plates shared with the prior site to their left"
            )
        obs_plates[n] = len(own)
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
    # SMC^2 (hierarchical.FixGlobals) puts the theta-particles in a dimension of their own,
    # right before a plate of problems: the problems are then the (theta, problem) pairs
    outer = int(psite["infer"].get("_bfd_outer", 1))
    if len(big) == 2 and outer > 1 and big[1] == big[0] + 1 and layout[big[0]] == outer:
        big = big[1:]
    else:
        outer = 1
    if len(big) > 1:
        raise ValueError(
            f"the DiffusionPrior site {prior_name!r} has batch shape {P}; infer supports "
            "one batch dimension of independent problems (one pyro.plate)"
        )
    batched = len(big) == 1
    B = layout[big[0]] * outer if batched else 1
    bdim = big[0] - L if batched else 0
    st = ModelStructure(
        model,
        args,
        kwargs,
        prior_name,
        prior,
        tuple(observed),
        layout,
        batched,
        B,
        bdim,
        trace=tr,
        obs_plates=obs_plates,
        outer=outer,
    )
    dtype, device = prior.dtype, prior.device

    # 3a. A LinearGaussian of the prior value itself: the toolkit's own problem.
    if len(observed) == 1:
        s = nodes[observed[0]]
        fn = s["fn"]
        if (
            isinstance(fn, LinearGaussian)
            and fn._source_x is psite["value"]
            and is_unit_scale(s["scale"])
            and s["mask"] is None
            and tuple(fn.batch_shape) == P
            and _broadcasts(tuple(s["value"].shape), P + tuple(fn.event_shape))
        ):
            out = tuple(fn.event_shape)
            y = s["value"].expand(P + out).reshape(((B,) if batched else ()) + out)
            noise: float | Tensor = fn.noise_std
            if isinstance(noise, Tensor):  # one scale per problem (e.g. set by SMC^2)
                per = noise.reshape(noise.shape[: noise.dim() - len(out)])
                noise = per.expand(P).reshape(-1) if batched else per.reshape(-1)
            st.kind = "linear_gaussian"
            return prior.model, InverseProblem(fn.operator, y, noise), st

    # 3b. A single Gaussian / Poisson observation: forward model by replay.
    y, out, site_layout = _observed_data(st, tr, dtype, device)
    if len(observed) == 1:
        s = nodes[observed[0]]
        kind, noise_std = _structured_kind(st, s, site_layout)
        if kind is not None:
            st.kind = kind
            op = PyroForward(st, out, kind, site_layout)
            lin = linearize_forward(st, op, y) if kind == "gaussian" and linear else None
            if kind == "poisson":
                problem = InverseProblem(op, y, noise="poisson")
            elif lin is not None:
                # the mean is affine in x: a linear-Gaussian problem (y - c = M x + noise)
                st.kind, st.affine = "affine_gaussian", lin
                problem = InverseProblem(lin.operator, lin.data, noise_std)
            else:
                problem = InverseProblem(op, y, noise_std)
            _probe(st, problem)
            return prior.model, problem, st

    # 3c. Anything else: the summed log_prob of the observed sites.
    st.kind = "custom"
    op = PyroForward(st, out, "custom")

    def log_likelihood_fn(x: Tensor, y_unused: Tensor) -> Tensor:
        return st.observed_log_prob(x)

    problem = InverseProblem(
        op, y, log_likelihood_fn=log_likelihood_fn, squared_scores_fn=st.observed_squared_scores
    )
    _probe(st, problem)
    return prior.model, problem, st


def _check_observed_value(
    name: str, s: dict, prior: DiffusionPrior, other_fn: Callable[[], Any] | None = None
) -> None:
    """A clear error for observed data that is not a tensor of the site's event shape on
    the prior's device (before any replay)."""
    v = s["value"]
    if not isinstance(v, Tensor):
        raise TypeError(
            f"the observed value of site {name!r} is a {type(v).__name__}; pass a torch.Tensor "
            f"(e.g. torch.as_tensor(y, dtype={prior.dtype}))"
        )
    if v.device.type == "meta":
        raise ValueError(f"the observed value of site {name!r} is on the meta device (no data)")
    if v.is_complex():
        raise ValueError(
            f"the observed value of site {name!r} is complex ({v.dtype}); the likelihoods "
            "take real data: pass its real and imaginary parts as separate coordinates "
            "(torch.view_as_real) with a site for them"
        )
    if v.dtype == torch.bool:
        # (OneHotCategorical and Categorical evaluate bool data; Bernoulli does not)
        try:
            s["fn"].log_prob(v)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(
                f"the observed value of site {name!r} is a bool tensor, which its "
                f"{type(unwrap(s['fn'])).__name__} distribution cannot evaluate ({e}): pass "
                f"it as numbers, e.g. y.to({prior.dtype})"
            ) from None
    if v.device != prior.device:
        raise ValueError(
            f"the observed value of site {name!r} is on {v.device} but the prior is on "
            f"{prior.device}; move one"
        )
    ev = tuple(s["fn"].event_shape)
    k = len(ev)
    if v.dim() < k or tuple(v.shape[v.dim() - k :]) != ev:
        raise ValueError(
            f"the observed value of site {name!r} has shape {tuple(v.shape)}, but the site's "
            f"distribution has event shape {ev} (and batch shape {tuple(s['fn'].batch_shape)}): "
            "the value must end with the event shape"
        )
    try:
        torch.broadcast_shapes(tuple(v.shape[: v.dim() - k]), tuple(s["fn"].batch_shape))
    except RuntimeError:
        raise ValueError(
            f"the observed value of site {name!r} has batch dims {tuple(v.shape[: v.dim() - k])} "
            f"that do not broadcast against the distribution's batch shape "
            f"{tuple(s['fn'].batch_shape)}"
        ) from None
    _check_support_and_parameters(name, s["fn"], v, other_fn)


def _check_support_and_parameters(
    name: str, fn: Any, v: Tensor, other_fn: Callable[[], Any] | None = None
) -> None:
    """The observed value inside the site's support (non-integer Poisson counts, Bernoulli
    data other than 0 / 1, non-positive Gamma data) and the site's parameters that do not
    depend on the prior value inside their constraints (a negative or NaN scale): replays
    run without Pyro's validation, so these would otherwise surface as a degenerate run.
    Supports and parameters that depend on the prior value (not known before the run) are
    not checked."""
    from torch.distributions import constraints

    support = getattr(fn, "support", None)
    finite = bool(torch.isfinite(v).all()) if v.is_floating_point() else True
    # (non-finite data are refused later with their own message)
    if support is not None and finite and not constraints.is_dependent(support):
        try:
            ok = bool(torch.as_tensor(support.check(v)).all())
        except (RuntimeError, TypeError, ValueError):
            ok = True  # a support that cannot be checked on this value is left to the run
        if not ok and other_fn is not None:
            # a support whose bounds move with the prior value (a Uniform around A x) is
            # not known before the run
            try:
                other_support = getattr(other_fn(), "support", None)
            except Exception:  # the model fails at the other value: left to the run
                other_support = None
            ok = not _same_constraint(support, other_support)
        if not ok:
            raise ValueError(
                f"the observed value of site {name!r} lies outside the support of its "
                f"{type(unwrap(fn)).__name__} distribution ({support}): e.g. non-integer counts "
                "for a Poisson site, values other than 0 / 1 for a Bernoulli one"
            )
    base = unwrap(fn)
    for param, constraint in getattr(base, "arg_constraints", {}).items():
        if constraints.is_dependent(constraint) or param not in base.__dict__:
            continue  # lazily computed (e.g. probs from logits): the given one is checked
        value = base.__dict__[param]
        if not isinstance(value, Tensor) or value.device.type == "meta":
            continue
        try:
            ok = bool(torch.as_tensor(constraint.check(value)).all())
        except (RuntimeError, TypeError, ValueError):
            ok = True
        if not ok and other_fn is not None:
            # only a parameter that does not depend on the prior value is known to be wrong
            try:
                other = unwrap(other_fn()).__dict__.get(param)
            except Exception:  # the model fails at the other value: left to the run
                other = None
            same = isinstance(other, Tensor) and other.shape == value.shape
            if same:
                assert isinstance(other, Tensor)
                same = bool(((other == value) | (other.isnan() & value.isnan())).all())
            ok = not same
        if not ok:
            raise ValueError(
                f"site {name!r}: the {type(base).__name__} distribution's {param} must satisfy "
                f"{constraint}, got {value.detach().flatten()[:4].tolist()}"
                + (" ..." if value.numel() > 4 else "")
                + " (for a noise scale: a finite number > 0)"
            )


def _same_constraint(a: Any, b: Any) -> bool:
    """Whether two constraints are the same: the same kind with equal tensor bounds (an
    ``IndependentConstraint`` compared through its base)."""
    if a is None or b is None or type(a) is not type(b):
        return False
    for key, va in vars(a).items():
        vb = vars(b).get(key)
        if isinstance(va, Tensor) or isinstance(vb, Tensor):
            ta, tb = torch.as_tensor(va), torch.as_tensor(vb)
            if ta.shape != tb.shape or not bool(((ta == tb) | (ta.isnan() & tb.isnan())).all()):
                return False
        elif hasattr(va, "check") and hasattr(vb, "check"):
            if not _same_constraint(va, vb):
                return False
        elif va != vb:
            return False
    return True


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` (without growing it)."""
    try:
        return tuple(torch.broadcast_shapes(shape, target)) == target
    except RuntimeError:
        return False


def _observed_data(st: ModelStructure, tr, dtype, device) -> tuple[Tensor, tuple[int, ...], tuple]:
    """``y`` in the problem layout ``(B, *out)`` (or ``(*out)``), ``out`` and the event shape.

    One site: its value (expanded to the site's batch shape, the problems' dimension first).
    Several: the per-problem concatenation of the flattened values.
    """
    L = len(st.layout)
    parts: list[Tensor] = []
    site_layout: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    for name in st.observed:
        s = tr.nodes[name]
        fn = s["fn"]
        ev = tuple(fn.event_shape)
        v = torch.as_tensor(s["value"])
        full = tuple(broadcast_shape(tuple(fn.batch_shape), tuple(v.shape[: v.dim() - len(ev)])))
        full = (1,) * (L - len(full)) + full
        v = v.expand(full + ev)
        if st.batched:
            full = st.with_problems(full)
        site_layout = (full, ev)
        if st.batched:
            try:
                v = st.problems_first(v.expand(full + ev), 0)  # (B, *rest, *ev)
            except RuntimeError as e:
                raise ValueError(
                    f"the observed site {name!r} (batch shape {tuple(fn.batch_shape)}) does not "
                    f"fit the problems' layout {tuple(full)}: its plate dims collide with the "
                    "problems' (with global latent sites, SMC^2 puts the theta-particles "
                    "right before a plate of problems, or last when there is none). Write a "
                    "plate over an observation's coordinates as .to_event(1) instead "
                    f"({_first_line(e)})"
                ) from e
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


def _structured_kind(
    st: ModelStructure, s: dict, site_layout: tuple
) -> tuple[str | None, float | Tensor]:
    """``("gaussian", sigma)`` / ``("poisson", 0)`` for a site that maps onto a noise model;
    ``sigma`` is a ``(B,)`` tensor when the scale differs between problems but not within one
    (e.g. a global noise scale set per theta-particle by SMC^2)."""
    if not (is_unit_scale(s["scale"]) and s["mask"] is None):
        return None, 0.0
    fn = s["fn"]
    while isinstance(fn, tdist.Independent):
        fn = fn.base_dist
    if isinstance(fn, tdist.Poisson):
        return "poisson", 0.0
    if not isinstance(fn, LinearGaussian) and type(fn) not in (
        tdist.Normal,
        pyro.distributions.Normal,
    ):
        return None, 0.0
    # The scale must not depend on x: replay with particles that require grad.
    x = torch.zeros(
        ((st.B,) if st.batched else (1,)) + (2,) + tuple(st.event_shape),
        dtype=st.prior.dtype,
        device=st.prior.device,
    ).requires_grad_(True)
    with torch.enable_grad():
        probe = unwrap(st.replay(x).nodes[st.observed[0]]["fn"])
    if isinstance(probe, LinearGaussian):
        if isinstance(probe.noise_std, float):
            return ("gaussian", probe.noise_std) if probe.noise_std > 0 else (None, 0.0)
        scale = probe.noise_std + torch.zeros_like(probe.mean)
    else:
        scale = probe.scale
    if scale.requires_grad:
        return None, 0.0
    if bool((scale == scale.reshape(-1)[0]).all()):
        sd = float(scale.reshape(-1)[0])
        return ("gaussian", sd) if sd > 0 else (None, 0.0)
    if not st.batched:
        return None, 0.0
    # one scale per problem? (the problem layout (B, 2, *out), constant past the B axis)
    _, lead = st.to_value(x.detach())
    full, trailing = site_layout
    try:
        per = st.from_layout(
            scale.detach(), full, trailing, lead, st.obs_plates.get(st.observed[0], 0)
        ).reshape(st.B, -1)
    except (ValueError, RuntimeError):
        return None, 0.0
    if not bool((per == per[:, :1]).all()) or not bool((per[:, 0] > 0).all()):
        return None, 0.0
    return "gaussian", per[:, 0].clone()


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

"""What :func:`~bayesfilter_diff.inference.model_to_problem` reads from a model, and the
map between the samplers' particle layout and the model's batch layout (the vectorisation
contract of :mod:`bayesfilter_diff.inference`)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from torch import Tensor

from ..distributions import DiffusionPrior
from .handlers import Substitute, is_unit_scale, unwrap, wrapped_masks

if TYPE_CHECKING:
    from .linearize import Affine

__all__ = ["ModelStructure"]

#: torch's words for an operation on tensors of two dtypes
_DTYPE_CLASH = re.compile(
    r"scalar type|same dtype|dtype mismatch|but found (Half|BFloat16|Float|Double)|"
    r"expected (both|all) .*dtype",
    re.IGNORECASE,
)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def model_error(e: Exception, what: str) -> ValueError:
    """The library's error for a model that raised ``e`` when run ``what`` (e.g. "with a
    stand-in value at its prior site"): a dtype clash gets its own explanation."""
    first = _first_line(e)
    if _DTYPE_CLASH.search(first):
        return ValueError(
            f"the model failed when run {what}: a computation mixes dtypes. The prior "
            "site's value carries the prior's dtype (a 16-bit prior runs in float32: weights, "
            "evidence and linear algebra never run in 16 bits), so tensors the model builds "
            f"must follow x's dtype, e.g. W.to(x.dtype). The model's error: {first}"
        )
    return ValueError(f"the model failed when run {what}: {type(e).__name__}: {first}")


def _masks(mask: Any) -> bool:
    """Whether a site's or a law's mask leaves some entry out (``True`` / all-true: none)."""
    if mask is None or (isinstance(mask, bool) and mask):
        return False
    return not (isinstance(mask, Tensor) and bool(mask.all()))


class _DrawObserved(Messenger):
    """Replace each observed site's value by ``draw(name, fn)`` (kept in ``values``), so
    that later sites see the draws."""

    def __init__(self, draw: Callable[[str, Any], Tensor], names: tuple[str, ...]) -> None:
        super().__init__()
        self.draw, self.names = draw, names
        self.values: dict[str, Tensor] = {}

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] and msg["name"] in self.names:
            msg["value"] = self.values[msg["name"]] = self.draw(msg["name"], msg["fn"])


@dataclass
class ModelStructure:
    """What :func:`~bayesfilter_diff.inference.model_to_problem` read from a model (for
    replays and reports)."""

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
    #: observed site -> how many of its rightmost batch dims are observation plates (plates
    #: that do not contain the prior site; summed in the log-likelihood)
    obs_plates: dict[str, int] = field(default_factory=dict)
    #: SMC^2 over a plate of problems: the theta-particles' dimension, right before the
    #: plate's (``bdim - 1``), of this size; the problems are the ``B = outer * inner``
    #: pairs, theta-major
    outer: int = 1
    #: ``kind == "affine_gaussian"``: the site's mean (a replay of the model) and its shift
    #: ``c`` in the problem layout, for :func:`~bayesfilter_diff.inference.linearize.check_linearization`
    affine: Affine | None = field(default=None, repr=False)

    # ---- the problems' dimension(s) of the layout
    def problem_dims(self) -> list[int]:
        """Positions (negative, in the layout) of the problems' dimension(s)."""
        return [self.bdim - 1, self.bdim] if self.outer > 1 else [self.bdim]

    def problem_sizes(self) -> list[int]:
        return [self.outer, self.B // self.outer] if self.outer > 1 else [self.B]

    def with_problems(self, full: tuple[int, ...]) -> tuple[int, ...]:
        """A batch shape of the layout's rank with the problems' sizes at their dims."""
        out = list(full)
        L = len(full)
        for d, n in zip(self.problem_dims(), self.problem_sizes()):
            if out[L + d] == 1:
                out[L + d] = n
        return tuple(out)

    def problems_first(self, t: Tensor, offset: int) -> Tensor:
        """Move the problems' dim(s) (at ``offset + L + dim``) to the front, flattened."""
        L = len(self.layout)
        pos = [offset + L + d for d in self.problem_dims()]
        t = t.movedim(pos, list(range(len(pos))))
        return t.reshape((self.B,) + tuple(t.shape[len(pos) :]))

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
            shape = self.with_problems((1,) * L)
            v = v.reshape((x.shape[1],) + tuple(shape) + tuple(self.event_shape))
        else:
            lead = x.shape[: x.dim() - k]
            v = x.reshape((-1,) + (1,) * L + tuple(self.event_shape))
        return v, lead

    def from_layout(
        self,
        t: Tensor,
        full: tuple[int, ...],
        trailing: tuple[int, ...],
        lead: torch.Size,
        plates: int = 0,
    ) -> Tensor:
        """``t`` broadcastable to ``(M, *full, *trailing)`` -> the problem layout.

        ``full`` is an observed site's batch shape padded to the layout's rank (with ``B``
        at the problems' dimension); up to ``plates`` unit dims after the first, pushed
        there by observation plates the model computed from the event, are dropped
        (unbatched models). Returns ``(B, N, *rest, *trailing)`` (``rest``: ``full``
        without the problems' dimension), or ``(*lead, *full, *trailing)`` when unbatched.
        """
        L = len(self.layout)
        M = lead[1] if self.batched else math.prod(lead)
        nt = len(trailing)
        extra = t.dim() - 1 - L - nt
        if 0 < extra <= plates and not self.batched and all(n == 1 for n in t.shape[1 : 1 + extra]):
            # observation plates computed from the event pushed the layout's unit dims left
            t = t.reshape((t.shape[0],) + tuple(t.shape[1 + extra :]))
        if t.dim() > 1 + L + nt:
            raise ValueError(
                f"a tensor of shape {tuple(t.shape)} computed from the particles has more "
                f"leading dimensions than the model's layout (N, {L} batch dims); the model must "
                "broadcast over the leading dimensions of the prior site's value"
            )
        t = t.reshape((1,) * (1 + L + nt - t.dim()) + tuple(t.shape))
        t = t.expand((M,) + tuple(full) + tuple(trailing))
        if self.batched:
            return self.problems_first(t, 1)
        return t.reshape(tuple(lead) + tuple(t.shape[1:]))

    def replay(self, x: Tensor, handler: Callable[[Callable], Callable] | None = None):
        """Run the model with the particles ``x`` at the prior site (wrapped in ``handler``
        when given); return its trace.

        An error raised by the model itself (typically a computation that does not
        broadcast over the particles) becomes a ``ValueError`` explaining the vectorisation
        contract of :mod:`bayesfilter_diff.inference`."""
        value, _ = self.to_value(x)
        with pyro.validation_enabled(False):
            model = Substitute(self.prior_site, value)(self.model)
            handled = poutine.trace(model if handler is None else handler(model))
            try:
                return handled.get_trace(*self.args, **self.kwargs)
            except (RuntimeError, IndexError) as e:
                first = _first_line(e)
                if _DTYPE_CLASH.search(first):
                    raise model_error(
                        e,
                        f"with particles of dtype {value.dtype} at the prior site {self.prior_site!r}",
                    ) from e
                raise ValueError(
                    f"the model failed when run with {value.shape[0]} particles at the prior "
                    f"site {self.prior_site!r} (a value of shape {tuple(value.shape)}): it must "
                    "compute with x by broadcasting over the leading dimensions (x @ W.T, "
                    f"x[..., i], operators), not A @ x or x.reshape(-1) (see "
                    f"bayesfilter_diff.inference). The model's error: {first}"
                ) from e

    def observed_log_prob(self, x: Tensor) -> Tensor:
        """Sum of the observed sites' ``log_prob`` per particle: ``(B, N)``."""

        def log_prob(name: str, site: dict) -> Tensor:
            lp = site["fn"].log_prob(site["value"])
            return scale_and_mask(lp, site["scale"], site["mask"])

        out = self._per_particle(x, log_prob)
        assert out is not None
        return out

    def observed_draws(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """An observation ``y' ~ p(y | x)`` per particle: the model run at ``x`` with each
        observed site drawn from its law in turn (a site whose law reads an earlier observed
        site sees that site's draw), flattened per particle in the order of ``y`` (the
        problem's, several sites concatenated): ``(B, N, d_y)``, or ``(*lead, d_y)`` for an
        unbatched model. Pyro's laws draw from torch's global generators, here on a fork of
        them seeded from ``generator`` (the global states are left as they were), or without
        one from the global generator (advanced by one draw). Refused
        with a ``ValueError`` naming the site: a masked or scaled site or a
        ``pyro.factor`` (not a law of the data), a law without ``sample``, or parameters
        outside their domain at some signal."""
        from pyro.distributions import Unit
        from pyro.distributions.util import broadcast_shape

        from .handlers import seeded_global_rng

        for name in self.observed:
            site = self.trace.nodes[name]
            if isinstance(unwrap(site["fn"]), Unit):
                raise ValueError(
                    f"the observed site {name!r} is a pyro.factor: a weight on the prior, not "
                    "a law of data, so the prior predictive cannot be drawn"
                )
            if _masks(site.get("mask")) or any(_masks(m) for m in wrapped_masks(site["fn"])):
                raise ValueError(
                    f"the observed site {name!r} is masked: its masked entries are not "
                    "modelled, so observations of it cannot be drawn"
                )
            if not is_unit_scale(site["scale"]):
                raise ValueError(
                    f"the observed site {name!r} is scaled (poutine.scale): its log_prob is "
                    "not a law of the observation, so observations of it cannot be drawn"
                )
        _, lead = self.to_value(x)
        M = lead[1] if self.batched else math.prod(lead)
        L = len(self.layout)
        layouts: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for name in self.observed:
            fn0 = self.trace.nodes[name]["fn"]
            ev = tuple(fn0.event_shape)
            v = torch.as_tensor(self.trace.nodes[name]["value"])
            full = tuple(
                broadcast_shape(tuple(fn0.batch_shape), tuple(v.shape[: v.dim() - len(ev)]))
            )
            full = (1,) * (L - len(full)) + full
            layouts[name] = (self.with_problems(full) if self.batched else full, ev)

        def draw(name: str, fn: Any) -> Tensor:
            full = layouts[name][0]
            target = tuple(torch.broadcast_shapes(tuple(fn.batch_shape), full))
            # one draw per particle: the particles' dimension first (a law that does not
            # depend on x has none)
            target = (M,) + (target[1:] if len(target) > len(full) else target)
            try:
                out = fn.expand(target).sample()
            except (NotImplementedError, RuntimeError, ValueError) as e:
                raise ValueError(
                    f"the observed site {name!r} ({type(unwrap(fn)).__name__}) could not be "
                    f"drawn at the prior's signals: {_first_line(e)}. A law needs sample() "
                    "for the prior predictive, and its parameters must stay in their domain "
                    "at every signal the prior draws"
                ) from e
            return cast(Tensor, out)

        drawn = _DrawObserved(draw, self.observed)
        with torch.no_grad(), seeded_global_rng(generator, x.device):
            self.replay(x, drawn)
        parts = [
            self.from_layout(drawn.values[n], *layouts[n], lead, self.obs_plates.get(n, 0))
            for n in self.observed
        ]
        return torch.cat([t.reshape(tuple(lead) + (-1,)) for t in parts], dim=-1)

    def observed_squared_scores(self, x: Tensor) -> Tensor | None:
        """Sum over the observed entries of their squared normal scores under the replayed
        sites' laws, per particle: ``(B, N)`` float64
        (:mod:`~bayesfilter_diff.samplers.scores`; ``chi^2_{d_y}`` for exact posterior draws
        of data the model produced). ``None`` when a site's law is not one that module
        supports, or a site is scaled or masked."""
        from ..samplers.scores import normal_scores, uniforms_for

        def scores(name: str, site: dict) -> Tensor | None:
            if not is_unit_scale(site["scale"]) or site["mask"] is not None:
                return None
            fn, value = site["fn"], torch.as_tensor(site["value"])
            z = normal_scores(fn, value, uniforms_for(value, self.observed.index(name)))
            if z is None:
                return None
            k = len(fn.event_shape)
            return (z * z).sum(tuple(range(-k, 0))) if k else z * z

        with torch.no_grad():
            return self._per_particle(x, scores)

    def _check_layout(self, name: str, lp: Tensor, site: dict) -> None:
        """``lp`` ``(N, *batch)`` of the layout's rank: each batch dim must be 1, the layout's
        size there (the problems'), the observed value's size there or that of a plate the
        site sits in. A larger one comes from a computation that broadcast two particle
        dims against each other (e.g. a global latent stacked along the last dim in SMC^2,
        where it is ``(K, 1)``: every theta paired with every ``x``), which would otherwise
        be summed as if it were the model's own batch."""
        L = lp.dim() - 1
        want = list(self.with_problems(tuple(self.layout)) if self.batched else self.layout)
        want = [1] * (L - len(want)) + want[-L:] if L else []
        allowed: list[set[int]] = [{1, w} for w in want]
        value, fn = site.get("value"), site.get("fn")
        if isinstance(value, Tensor) and fn is not None:
            k = len(getattr(fn, "event_shape", ()))
            vb = tuple(value.shape[: value.dim() - k])[-L:] if L else ()
            for i, n in enumerate(vb):
                allowed[L - len(vb) + i].add(int(n))
        for frame in site.get("cond_indep_stack", ()):
            dim, size = getattr(frame, "dim", None), getattr(frame, "size", None)
            if isinstance(dim, int) and dim < 0 and -dim <= L and isinstance(size, int):
                allowed[L + dim].add(size)
        got = tuple(lp.shape[1:])
        bad = [i for i, g in enumerate(got) if g not in allowed[i]]
        if bad:
            raise ValueError(
                f"log_prob of site {name!r} has batch shape {got}, whose dimension(s) {bad} "
                f"match neither the model's layout {tuple(want)} nor the observed value nor a "
                "plate: the model broadcast particles against each other. A value computed "
                "from a latent site (the prior's, or a global one such as a noise scale, "
                "which SMC^2 replays with batch dimensions of its own) must broadcast from "
                "the right, not add dimensions at its right end. SMC^2 replays a global as "
                "(K, 1), which broadcasts against a vector site's event: write s * "
                "torch.tensor([1., 1., 2., 2.]), not torch.stack([s, s, 2 * s, 2 * s], -1) "
                "or s[..., None]; for a site computed from a scalar slice such as x[..., 0], "
                "use s.squeeze(-1)"
            )

    def _per_particle(
        self, x: Tensor, per_site: Callable[[str, dict], Tensor | None]
    ) -> Tensor | None:
        """``per_site(name, site)`` (shaped like the site's ``log_prob``) of the model
        replayed at ``x``, summed over the observed sites and every layout dimension but the
        problems': ``(B, N)`` (``None`` as soon as one site gives ``None``)."""
        value, lead = self.to_value(x)
        tr = self.replay(x)
        L = len(self.layout)
        total = None
        for name in self.observed:
            site = tr.nodes[name]
            with pyro.validation_enabled(False):  # (a law's support may move with x)
                lp = per_site(name, site)
            if lp is None:
                return None
            if not isinstance(lp, Tensor):
                lp = torch.as_tensor(lp, dtype=value.dtype, device=value.device)
            extra = lp.dim() - 1 - L
            if 0 < extra <= self.obs_plates.get(name, 0):
                # observation plates computed from the event (x @ W.T in a plate of the
                # output coordinates): batch dims beyond the layout, summed
                lp = lp.sum(tuple(range(-extra, 0)))
            if lp.dim() > 1 + L:
                raise ValueError(
                    f"log_prob of site {name!r} has shape {tuple(lp.shape)}, more than the "
                    f"(N, {L} batch dims) layout; the model must broadcast over the leading "
                    "dimensions of the prior site's value"
                )
            lp = lp.reshape((1,) * (1 + L - lp.dim()) + tuple(lp.shape))
            self._check_layout(name, lp, site)
            # Sum every layout dimension but the problems' one.
            keep = [0] + ([1 + L + d for d in self.problem_dims()] if self.batched else [])
            red = [i for i in range(1, 1 + L) if i not in keep]
            if red:
                lp = lp.sum(red, keepdim=True)
            total = lp if total is None else total + lp
        assert total is not None  # model_to_problem requires an observed site
        N = lead[1] if self.batched else math.prod(lead)
        shape = [N, *self.with_problems((1,) * L)] if self.batched else [N] + [1] * L
        total = total.expand(shape)
        if self.batched:
            return total.reshape(N, self.B).transpose(0, 1)
        return total.reshape(tuple(lead))

"""Bad-input cases for the reliability tests and ``validation/reliability_table.py``.

Each category is a hypothesis strategy of :class:`Case` objects: a case builds inputs
that are wrong in one way (or sit on the edge of what is valid) and :func:`evaluate`
runs it, either through its own call (constructors, ``prior.denoise``,
``gmm.posterior``) or through ``sample`` of every sampler class. An outcome is good when

- the input is refused with a ``ValueError`` / ``TypeError`` whose message names the
  argument (one of ``Case.names``, matched as a word, case-insensitively), before the
  prior's network runs on the particles (the network is wrapped in :class:`CountingNet`;
  a one-row probe is allowed), or
- the input is valid for that sampler (``Case.may_run``) and every returned number is
  finite (log-weights may be -inf), or the run ends in a clear numerical error
  (``DegenerateWeightsError``, ``NonFiniteSamplesError``), or
- the sampler refuses it with the very message it gives for the valid base problem
  (``n/a``: e.g. SMCDiff needs a Mask, whatever else is wrong).

Everything else (another exception type, a message that does not name the argument, a
refusal after network calls, no error at all, NaN / inf output) is a failure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from torch import nn

import bayesfilter_diff as bfd
from bayesfilter_diff import operators as ops

D = torch.float64
DIM, OBS = 3, 2
IMAGE = (3, 2, 2)  # small (C, H, W) event for the image operators
NUM_SAMPLES = 4

# --------------------------------------------------------------------------------------
# Samplers

#: Every sampler of the registry, by class name, with its small settings (a run of any
#: sampler on a toy problem takes milliseconds).
_ENTRIES = {e.cls.__name__: e for e in bfd.samplers.REGISTRY.values()}
SAMPLER_NAMES = tuple(_ENTRIES)
SMALL = {name: dict(e.small) for name, e in _ENTRIES.items()}


def sampler_classes() -> dict[str, type]:
    """Every sampler class of the registry, by class name."""
    return {name: e.cls for name, e in _ENTRIES.items()}


def small_samplers() -> dict[str, Any]:
    """One instance of every sampler with :data:`SMALL` settings."""
    return {name: cls(**SMALL[name]) for name, cls in sampler_classes().items()}


# --------------------------------------------------------------------------------------
# Priors, operators and problems


class CountingNet(nn.Module):
    """Wraps a denoiser and counts its calls; reshapes image events to vectors for it."""

    def __init__(self, inner: nn.Module, flatten: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.flatten = flatten
        self.calls = 0
        self.rows = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        if self.flatten:
            return self.inner(x.reshape(x.shape[0], -1), t).reshape(x.shape)
        return self.inner(x, t)


def mixture(dim: int = DIM, dtype: torch.dtype = D, kind: str = "full") -> bfd.GaussianMixture:
    """A fixed two-component mixture in ``R^dim``."""
    g = torch.Generator().manual_seed(11)
    means = 2.0 * torch.randn(2, dim, generator=g, dtype=dtype)
    w = torch.tensor([0.3, 0.7], dtype=dtype)
    if kind == "iso":
        cov = torch.tensor([0.5, 1.0], dtype=dtype)
    elif kind == "diag":
        cov = 0.5 + torch.rand(2, dim, generator=g, dtype=dtype)
    else:
        L = torch.randn(2, dim, dim, generator=g, dtype=dtype) / math.sqrt(dim)
        cov = L @ L.transpose(-1, -2) + 0.3 * torch.eye(dim, dtype=dtype)
    return bfd.GaussianMixture(w, means, cov)


def counting_prior(
    gmm: bfd.GaussianMixture | None = None,
    schedule: bfd.Schedule | None = None,
    event_shape: tuple[int, ...] | None = None,
    chunk_size: int | None = None,
) -> tuple[bfd.DiffusionModel, CountingNet]:
    """The exact diffusion prior of ``gmm`` with a call-counting network.

    ``event_shape`` (e.g. :data:`IMAGE`) reshapes the vector mixture to an image event.
    """
    schedule = schedule or bfd.VPSchedule.linear()
    if gmm is None:
        n = DIM if event_shape is None else math.prod(event_shape)
        gmm = mixture(n)
    inner = gmm.diffusion(schedule).net
    net = CountingNet(inner, flatten=event_shape is not None)
    shape = (gmm.dim,) if event_shape is None else tuple(event_shape)
    return bfd.DiffusionModel(net, schedule, shape, chunk_size=chunk_size), net


def dense(dim: int = DIM, obs: int = OBS, dtype: torch.dtype = D, seed: int = 5) -> ops.Dense:
    g = torch.Generator().manual_seed(seed)
    return ops.Dense(torch.randn(obs, dim, generator=g, dtype=dtype))


def observe(op, batch: int | None, noise_std: float, seed: int = 0, gmm=None) -> torch.Tensor:
    """``y = A x + noise_std n`` for ``x`` from ``gmm`` (or N(0, I)); ``batch=None``: unbatched."""
    g = torch.Generator().manual_seed(seed)
    ref = op._ref()
    dtype = D if ref is None else ref.dtype
    n = 1 if batch is None else batch
    if gmm is not None:
        x = gmm.sample(n, g).to(dtype).reshape((n,) + tuple(op.in_shape))
    else:
        x = torch.randn((n,) + tuple(op.in_shape), generator=g, dtype=dtype)
    y = op(x)
    if noise_std > 0:
        y = y + noise_std * torch.randn(y.shape, generator=g, dtype=dtype)
    if isinstance(op, ops.PhaseRetrieval):
        y = y.abs()
    return y[0] if batch is None else y


# --------------------------------------------------------------------------------------
# Cases and outcomes


@dataclass
class Inputs:
    """What a case hands to the samplers (or to its own call)."""

    prior: Any = None
    problem: Any = None
    num_samples: Any = NUM_SAMPLES
    net: CountingNet | None = None
    generator: Any = "fresh"  # "fresh": a new CPU generator seeded with 0 per run
    extra: dict = field(default_factory=dict)


@dataclass
class Case:
    """One bad (or edge) input.

    Attributes
    ----------
    category, label
        Table row and a short description.
    build
        ``() -> Inputs``; may itself raise (constructor validation).
    names
        Words of which one must appear in the error message (the argument's name).
    may_run
        ``True``/``False`` or ``name -> bool``: the input is valid for that sampler, so
        it may run (and must then return finite numbers) instead of raising.
    action
        ``Inputs -> Any``: run this instead of the samplers (e.g. ``prior.denoise``).
    """

    category: str
    label: str
    build: Callable[[], Inputs]
    names: tuple[str, ...]
    may_run: bool | Callable[[str], bool] = False
    action: Callable[[Inputs], Any] | None = None

    def __repr__(self) -> str:  # hypothesis prints this on failure
        return f"Case({self.category}: {self.label})"


# Outcome statuses: the first four are good.
RAISED = "clear error before any network call"
RAN = "valid here: ran, finite output"
NUMERIC = "valid here: clear numerical error (degenerate weights / diverged)"
NA = "n/a: sampler refuses the valid base problem the same way"
WRONG_TYPE = "FAIL wrong exception type"
UNCLEAR = "FAIL message does not name the argument"
LATE = "FAIL error after network calls"
SILENT = "FAIL no error"
NONFINITE = "FAIL non-finite output"
GOOD = (RAISED, RAN, NUMERIC, NA)
STATUSES = (RAISED, RAN, NUMERIC, NA, WRONG_TYPE, UNCLEAR, LATE, SILENT, NONFINITE)
_NUMERIC_ERRORS = (
    bfd.DegenerateWeightsError,
    bfd.NonFiniteSamplesError,
)


@dataclass
class Outcome:
    case: Case
    target: str  # "construction", "call" or a sampler name
    status: str
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in GOOD

    def __str__(self) -> str:
        c = self.case
        return f"[{c.category}] {c.label} / {self.target}: {self.status}: {self.message}"


def names_in(message: str, names: tuple[str, ...]) -> bool:
    """Whether one of ``names`` occurs in ``message`` as a word (case-insensitive)."""
    return any(
        re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message, re.IGNORECASE)
        for n in names
    )


def _judge_error(case: Case, target: str, err: BaseException, net: CountingNet | None) -> Outcome:
    msg = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    if not isinstance(err, ValueError | TypeError):
        return Outcome(case, target, WRONG_TYPE, msg)
    if not names_in(str(err), case.names):
        return Outcome(case, target, UNCLEAR, msg)
    # heavy work = the network on the particles; a one-row probe (check_inputs does one for
    # a 16-bit network with 32/64-bit y) is not
    if net is not None and net.rows > 1:
        return Outcome(case, target, LATE, f"after {net.calls} network calls: {msg}")
    return Outcome(case, target, RAISED, msg)


def _finite(res) -> bool:
    """Samples and log-evidence finite; log-weights not NaN / +inf (-inf: weight 0)."""
    parts = [res.samples, res.log_evidence]
    ok = all(p is None or bool(torch.isfinite(p).all()) for p in parts)
    lw = res.log_weights
    if lw is not None:
        ok = ok and not bool((torch.isnan(lw) | (lw == math.inf)).any())
        ok = ok and bool(torch.isfinite(lw).any(-1).all())
    return ok


def _generator(inputs: Inputs):
    if isinstance(inputs.generator, str) and inputs.generator == "fresh":
        return torch.Generator().manual_seed(0)
    return inputs.generator


_BASE_REFUSALS: dict[str, str | None] = {}


def base_refusal(name: str, sampler) -> str | None:
    """The message with which ``sampler`` refuses the valid base problem (VP, Dense), or None."""
    if name not in _BASE_REFUSALS:
        prior, _ = counting_prior()
        try:
            sampler.sample(prior, _problem(batch=2), 2, torch.Generator().manual_seed(0))
            _BASE_REFUSALS[name] = None
        except ValueError as err:
            _BASE_REFUSALS[name] = str(err)
    return _BASE_REFUSALS[name]


def evaluate(case: Case, samplers: dict[str, Any] | None = None) -> list[Outcome]:
    """Run ``case``: its constructor, then its own call or every sampler's ``sample``.

    A sampler that refuses the case with the very message it gives for the valid base
    problem (e.g. SMCDiff: "needs a Mask operator") is ``n/a`` for that case.
    """
    samplers = small_samplers() if samplers is None else samplers
    try:
        inputs = case.build()
    except Exception as err:  # noqa: BLE001 - judged below
        return [_judge_error(case, "construction", err, None)]
    net = inputs.net
    if case.action is not None:
        try:
            out = case.action(inputs)
        except Exception as err:  # noqa: BLE001
            return [_judge_error(case, "call", err, net)]
        return [Outcome(case, "call", SILENT, f"returned {type(out).__name__}")]
    outcomes = []
    for name, sampler in samplers.items():
        if net is not None:
            net.calls = net.rows = 0
        allowed = case.may_run(name) if callable(case.may_run) else case.may_run
        try:
            res = sampler.sample(
                inputs.prior, inputs.problem, inputs.num_samples, _generator(inputs)
            )
        except Exception as err:  # noqa: BLE001
            msg = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            if case.category != "capability" and isinstance(err, ValueError):
                if str(err) == base_refusal(name, sampler):
                    outcomes.append(Outcome(case, name, NA, msg))
                    continue
            if allowed and isinstance(err, _NUMERIC_ERRORS):
                outcomes.append(Outcome(case, name, NUMERIC, msg))
                continue
            outcomes.append(_judge_error(case, name, err, net))
            continue
        if not _finite(res):
            outcomes.append(Outcome(case, name, NONFINITE, "NaN or inf in the result"))
        elif allowed:
            outcomes.append(Outcome(case, name, RAN))
        else:
            outcomes.append(Outcome(case, name, SILENT, "ran to the end on a bad input"))
    return outcomes


# --------------------------------------------------------------------------------------
# Helpers for the strategies

_BATCH = st.one_of(st.none(), st.integers(1, 3))


def _problem(op=None, batch=None, noise_std=0.1, **kw) -> bfd.InverseProblem:
    op = dense() if op is None else op
    return bfd.InverseProblem(op, observe(op, batch, noise_std), noise_std, **kw)


def _standard(problem_fn: Callable[[], bfd.InverseProblem], **prior_kw) -> Callable[[], Inputs]:
    def build() -> Inputs:
        prior, net = counting_prior(**prior_kw)
        return Inputs(prior=prior, problem=problem_fn(), net=net)

    return build


def _gmm_args(dim: int = DIM, K: int = 2, dtype=D):
    g = torch.Generator().manual_seed(3)
    w = torch.full((K,), 1.0 / K, dtype=dtype)
    means = torch.randn(K, dim, generator=g, dtype=dtype)
    cov = torch.eye(dim, dtype=dtype).expand(K, dim, dim).clone()
    return w, means, cov


def _construct(category: str, label: str, fn: Callable[[], Any], names: tuple[str, ...]) -> Case:
    """A case whose constructor call ``fn`` must raise."""

    def build() -> Inputs:
        fn()
        return Inputs()

    return Case(category, label, build, names, action=lambda inputs: None)


def _call(category: str, label: str, build: Callable[[], Inputs], fn, names) -> Case:
    return Case(category, label, build, names, action=fn)


def _shape_not(valid: Callable[[tuple], bool], max_rank: int = 4, lo: int = 1):
    return st.lists(st.integers(lo, 4), max_size=max_rank).map(tuple).filter(lambda s: not valid(s))


# --------------------------------------------------------------------------------------
# Categories


@st.composite
def shape_cases(draw) -> Case:
    """Wrong shapes and ranks of ``y``, ``x_t``, the matrix and the mixture's arguments."""
    kind = draw(
        st.sampled_from(["y", "x_t", "matrix", "weights", "means", "covariances", "event_shape"])
    )
    C = "shape"
    if kind == "y":
        shape = draw(_shape_not(lambda s: s == (OBS,) or (len(s) == 2 and s[1] == OBS)))
        return _construct(
            C,
            f"y of shape {shape} for out_shape ({OBS},)",
            lambda: bfd.InverseProblem(dense(), torch.zeros(shape, dtype=D), 0.1),
            ("y",),
        )
    if kind == "x_t":
        lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple))
        last = draw(st.integers(1, 5).filter(lambda k: k != DIM))

        def build() -> Inputs:
            prior, net = counting_prior()
            return Inputs(prior=prior, net=net, extra={"x": torch.zeros(lead + (last,), dtype=D)})

        return _call(
            C,
            f"prior.denoise(x_t of shape {lead + (last,)})",
            build,
            lambda i: i.prior.denoise(i.extra["x"], 0.5),
            ("x_t",),
        )
    if kind == "matrix":
        shape = draw(_shape_not(lambda s: len(s) == 2, max_rank=4))
        return _construct(
            C,
            f"Dense(matrix of shape {shape})",
            lambda: ops.Dense(torch.ones(shape, dtype=D)),
            ("matrix",),
        )
    if kind == "event_shape":
        shape = draw(
            st.one_of(st.just(()), st.lists(st.integers(-2, 0), min_size=1, max_size=3).map(tuple))
        )
        return _construct(
            C,
            f"DiffusionModel(event_shape={shape})",
            lambda: bfd.DiffusionModel(lambda x, t: x, bfd.VPSchedule.linear(), shape),
            ("event_shape",),
        )
    w, means, cov = _gmm_args()
    if kind == "weights":
        shape = draw(_shape_not(lambda s: s == (2,)))
        args = (torch.full(shape, 0.5, dtype=D), means, cov)
        label = f"weights of shape {shape} for K=2"
    elif kind == "means":
        shape = draw(st.lists(st.integers(1, 4), max_size=1).map(tuple))
        args = (w, torch.zeros(shape, dtype=D), cov)
        label = f"means of shape {shape} (rank < 2)"
    else:
        K, d = 2, DIM
        ok = {(K,), (K, d), (K, d, d)}
        shape = draw(_shape_not(lambda s: s in ok or (len(s) > 3 and s[-3:] == (K, d, d))))
        args = (w, means, torch.ones(shape, dtype=D))
        label = f"covariances of shape {shape} for K=2, d={DIM}"
    return _construct(C, label, lambda: bfd.GaussianMixture(*args), (kind,))


def _ll_wrong_shape(kind: str):
    """A custom log-likelihood returning the wrong shape for x of shape (B, N, d)."""
    A = dense()

    def fn(x, y):
        ll = -0.5 * ((y - A(x)) ** 2).sum(-1)  # (B, N)
        if kind == "(N,)":
            return ll[0]
        if kind == "(B,)":
            return ll.sum(-1)
        if kind == "(B, N, 1)":
            return ll[..., None]
        if kind == "(B+1, N)":
            return torch.cat([ll, ll[:1]])
        return ll.sum()  # scalar

    return fn


@st.composite
def batch_cases(draw) -> Case:
    """Mismatched batch sizes between arguments."""
    kind = draw(st.sampled_from(["weights", "covariances", "t", "log_likelihood_fn", "posterior"]))
    C = "batch"
    b1 = draw(st.integers(1, 3))
    b2 = draw(st.integers(1, 4).filter(lambda b: b != b1))
    if kind in ("weights", "covariances"):
        w, means, cov = _gmm_args()
        means_b = means.expand(b1, 2, DIM).clone()
        if kind == "weights":
            args = (w.expand(b2, 2).clone(), means_b, cov)
        else:
            args = (w.expand(b1, 2).clone(), means_b, cov.expand(b2, 2, DIM, DIM).clone())
        return _construct(
            C,
            f"{kind} with batch {b2}, means with batch {b1}",
            lambda: bfd.GaussianMixture(*args),
            (kind,),
        )
    if kind == "t":
        # t of shape (b, 1) broadcasts to the leading shape (b1, 3) only for b in {1, b1}
        b = draw(st.integers(2, 4).filter(lambda k: k != b1))

        def build() -> Inputs:
            prior, net = counting_prior()
            x = torch.zeros(b1, 3, DIM, dtype=D)
            return Inputs(
                prior=prior, net=net, extra={"x": x, "t": torch.full((b, 1), 0.5, dtype=D)}
            )

        return _call(
            C,
            f"prior.denoise(x_t of shape ({b1}, 3, d), t of shape ({b}, 1))",
            build,
            lambda i: i.prior.denoise(i.extra["x"], i.extra["t"]),
            ("t",),
        )
    if kind == "posterior":

        def build() -> Inputs:
            w, means, cov = _gmm_args()
            gmm = bfd.GaussianMixture(
                w.expand(b1, 2).clone(), means.expand(b1, 2, DIM).clone(), cov
            )
            return Inputs(extra={"gmm": gmm, "problem": _problem(batch=b2)})

        return _call(
            C,
            f"gmm.posterior with a mixture of batch ({b1},), problem batch {b2}",
            build,
            lambda i: i.extra["gmm"].posterior(i.extra["problem"]),
            ("mixture", "unbatched"),
        )
    out = draw(st.sampled_from(["(N,)", "(B,)", "(B, N, 1)", "(B+1, N)", "()"]))
    batch = draw(st.integers(2, 3))

    def problem():
        A = dense()
        return bfd.InverseProblem(A, observe(A, batch, 0.1), log_likelihood_fn=_ll_wrong_shape(out))

    return Case(
        C,
        f"log_likelihood_fn returns shape {out} instead of (B, N), B={batch}",
        _standard(problem),
        ("log_likelihood_fn", "likelihood"),
    )


@st.composite
def dtype_cases(draw) -> Case:
    """``y`` of another dtype than the operator or the prior; mixed mixture dtypes."""
    kind = draw(
        st.sampled_from(
            ["y_vs_operator", "y_kind", "prior", "half_prior", "mixture", "mask", "no_buffer"]
        )
    )
    C = "dtype"
    batch = draw(_BATCH)
    if kind == "y_vs_operator":
        dt = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
        return _construct(
            C,
            f"y {dt} with a float64 Dense operator",
            lambda: bfd.InverseProblem(dense(), observe(dense(), batch, 0.1).to(dt), 0.1),
            ("dtype",),
        )
    if kind == "y_kind":
        dt = draw(st.sampled_from([torch.int64, torch.int32, torch.bool, torch.complex64]))
        return _construct(
            C,
            f"y of dtype {dt}",
            lambda: bfd.InverseProblem(dense(), torch.zeros(OBS, dtype=dt), 0.1),
            ("y",),
        )
    if kind == "prior":
        prior_dt, prob_dt = draw(
            st.sampled_from(
                [(torch.float32, D), (D, torch.float32), (torch.float32, torch.float16)]
            )
        )

        def build() -> Inputs:
            prior, net = counting_prior(mixture(dtype=prior_dt))
            A = dense(dtype=prob_dt)
            return Inputs(
                prior=prior, problem=bfd.InverseProblem(A, observe(A, batch, 0.1), 0.1), net=net
            )

        return Case(C, f"prior {prior_dt}, problem {prob_dt}", build, ("dtype",))
    if kind == "half_prior":
        half = draw(st.sampled_from([torch.float16, torch.bfloat16]))
        cov_kind = draw(st.sampled_from(["full", "diag", "iso"]))

        def build() -> Inputs:
            # a 16-bit prior that does not cast its float32 input: refused after a one-row probe
            prior, net = counting_prior(mixture(kind=cov_kind))
            prior = prior.to(half)
            A = dense(dtype=torch.float32)
            return Inputs(
                prior=prior, problem=bfd.InverseProblem(A, observe(A, batch, 0.1), 0.1), net=net
            )

        return Case(C, f"{half} prior ({cov_kind} mixture, no cast), float32 y", build, ("dtype",))
    if kind == "mixture":
        dts = draw(
            st.lists(st.sampled_from([torch.float32, D]), min_size=3, max_size=3).filter(
                lambda v: len(set(v)) > 1
            )
        )
        w, means, cov = _gmm_args()
        args = (w.to(dts[0]), means.to(dts[1]), cov.to(dts[2]))
        return _construct(
            C,
            f"mixture weights/means/covariances of dtypes {[str(d)[6:] for d in dts]}",
            lambda: bfd.GaussianMixture(*args),
            ("dtype",),
        )
    if kind == "mask":
        mask = torch.tensor([True, False, True])
        return _construct(
            C,
            "Mask of default dtype (float32) with float64 y",
            lambda: bfd.InverseProblem(ops.Mask(mask), torch.zeros(2, dtype=D), 0.1),
            ("dtype",),
        )

    def build() -> Inputs:  # PhaseRetrieval has no buffer: the prior must catch it
        prior, net = counting_prior(event_shape=IMAGE)
        op = ops.PhaseRetrieval(IMAGE)
        y = observe(op, batch, 0.0).float()
        return Inputs(prior=prior, problem=bfd.InverseProblem(op, y, 0.1), net=net)

    return Case(C, "PhaseRetrieval (no buffers), y float32, prior float64", build, ("dtype",))


_NONFINITE = st.sampled_from([math.nan, math.inf, -math.inf])


@st.composite
def nonfinite_cases(draw) -> Case:
    """NaN / inf in ``y``, the mixture, the operator, or the prior's network."""
    kind = draw(
        st.sampled_from(
            [
                "y",
                "weights",
                "means",
                "covariances",
                "matrix",
                "kernel",
                "y_later",
                "prior_later",
                "net",
            ]
        )
    )
    v = draw(_NONFINITE)
    C = "nonfinite"
    batch = draw(_BATCH)
    if kind == "y":
        y = observe(dense(), batch, 0.1)
        idx = draw(st.integers(0, y.numel() - 1))
        y.view(-1)[idx] = v
        return _construct(C, f"y with {v} at flat index {idx}", lambda: _problem_from(y), ("y",))
    if kind in ("weights", "means", "covariances"):
        w, means, cov = _gmm_args()
        arg = {"weights": w, "means": means, "covariances": cov}[kind]
        idx = draw(st.integers(0, arg.numel() - 1))
        arg.view(-1)[idx] = v
        return _construct(
            C,
            f"{kind} with {v} at flat index {idx}",
            lambda: bfd.GaussianMixture(w, means, cov),
            (kind,),
        )
    if kind == "matrix":
        M = torch.ones(OBS, DIM, dtype=D)
        M[draw(st.integers(0, OBS - 1)), draw(st.integers(0, DIM - 1))] = v
        return _construct(C, f"Dense matrix with {v}", lambda: ops.Dense(M), ("matrix",))
    if kind == "kernel":
        k = torch.ones(2, 2, dtype=D)
        k[0, draw(st.integers(0, 1))] = v
        return _construct(C, f"Blur kernel with {v}", lambda: ops.Blur(k, IMAGE), ("kernel",))
    if kind == "y_later":
        idx = draw(st.integers(0, 2 * OBS - 1))

        def build() -> Inputs:
            prior, net = counting_prior()
            problem = _problem(batch=batch)
            problem.y.view(-1)[idx % problem.y.numel()] = v  # corrupted after validation
            return Inputs(prior=prior, problem=problem, net=net)

        return Case(C, f"y set to {v} after InverseProblem was built", build, ("y",))
    if kind == "prior_later":
        which = draw(st.sampled_from(["means", "covariances", "eigvals", "weights"]))

        def build() -> Inputs:
            gmm = mixture()
            prior, net = counting_prior(gmm)
            getattr(gmm, which).view(-1)[0] = math.nan  # corrupted after validation
            return Inputs(prior=prior, problem=_problem(batch=batch), net=net)

        return Case(C, f"mixture buffer {which} set to NaN after construction", build, ("prior",))

    def build() -> Inputs:
        prior, net = counting_prior()
        net.register_parameter("scale", nn.Parameter(torch.tensor([1.0, math.nan], dtype=D)))
        return Inputs(prior=prior, problem=_problem(batch=batch), net=net)

    # (only NaN: an inf buffer can be legitimate, e.g. the log-weight of a zero weight)
    return Case(C, "network parameter with nan", build, ("prior",))


def _problem_from(y: torch.Tensor) -> bfd.InverseProblem:
    return bfd.InverseProblem(dense(), y, 0.1)


class _Strange:
    def __repr__(self) -> str:
        return "<object>"


_BAD_NOISE = st.one_of(
    st.floats(max_value=-1e-300, allow_infinity=True),
    st.just(math.nan),
    st.just(math.inf),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
    st.just([0.1]),
    st.just(complex(0.1, 0.0)),
    # a (B,) tensor is one scale per problem: 5 values fit no batch of 1-3 problems
    st.just(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=D)),
    st.just(torch.tensor([[0.1, 0.2]], dtype=D)),
    st.just(_Strange()),
)
_EDGE_NOISE = st.one_of(
    st.just(0.0),
    st.floats(min_value=5e-324, max_value=1e-150),
    st.floats(min_value=1e150, max_value=1.7e308),
    st.just(torch.tensor(0.0, dtype=D)),
)


@st.composite
def noise_std_cases(draw) -> Case:
    """Negative / NaN / non-numeric ``noise_std`` (must raise); 0 and extreme values (edge)."""
    batch = draw(_BATCH)
    if draw(st.booleans()):
        v = draw(_BAD_NOISE)
        A = dense()
        y = observe(A, batch, 0.1)
        return _construct(
            "noise_std",
            f"noise_std={v!r}",
            lambda: bfd.InverseProblem(A, y, v),
            ("noise_std",),
        )
    v = draw(_EDGE_NOISE)

    def problem():
        A = dense()
        return bfd.InverseProblem(A, observe(A, batch, 0.1), v)

    return Case(
        "noise_std",
        f"edge noise_std={float(v):.3g}",
        _standard(problem),
        ("noise_std", "tau", "noise"),
        may_run=True,
    )


@st.composite
def empty_cases(draw) -> Case:
    """Empty batches, zero-size events, no components, nothing observed."""
    kind = draw(
        st.sampled_from(
            ["y", "components", "dimension", "matrix", "identity", "mask", "event", "sample"]
        )
    )
    C = "empty"
    if kind == "y":
        shape = (0, OBS)
        return _construct(
            C,
            "y with an empty batch (0, m)",
            lambda: bfd.InverseProblem(dense(), torch.zeros(shape, dtype=D), 0.1),
            ("y", "batch"),
        )
    if kind == "components":
        return _construct(
            C,
            "mixture with K = 0 components",
            lambda: bfd.GaussianMixture(
                torch.ones(0, dtype=D), torch.zeros(0, DIM, dtype=D), torch.ones(0, dtype=D)
            ),
            ("weights", "means", "components"),
        )
    if kind == "dimension":
        return _construct(
            C,
            "mixture in dimension d = 0",
            lambda: bfd.GaussianMixture(
                torch.ones(1, dtype=D), torch.zeros(1, 0, dtype=D), torch.ones(1, dtype=D)
            ),
            ("means",),
        )
    if kind == "matrix":
        shape = draw(st.sampled_from([(0, DIM), (OBS, 0), (0, 0)]))
        return _construct(
            C,
            f"Dense matrix of shape {shape}",
            lambda: ops.Dense(torch.zeros(shape, dtype=D)),
            ("matrix", "in_shape", "out_shape"),
        )
    if kind == "identity":
        return _construct(C, "Identity(0)", lambda: ops.Identity(0), ("in_shape", "shape"))
    if kind == "mask":
        n = draw(st.integers(1, 5))
        return _construct(
            C,
            f"Mask observing none of {n} entries",
            lambda: ops.Mask(torch.zeros(n, dtype=torch.bool)),
            ("mask",),
        )
    if kind == "event":
        return _construct(
            C,
            "DiffusionModel with event_shape (0,)",
            lambda: bfd.DiffusionModel(lambda x, t: x, bfd.VPSchedule.linear(), (0,)),
            ("event_shape",),
        )
    n = draw(st.integers(-2, 0))
    return _construct(C, f"gmm.sample({n})", lambda: mixture().sample(n), ("n",))


_BAD_NUM_SAMPLES = st.one_of(
    st.integers(max_value=0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.integers(1, 8).map(np.int64),
    st.integers(1, 8).map(lambda n: torch.tensor(n)),
)


@st.composite
def num_samples_cases(draw) -> Case:
    """``num_samples`` < 1, non-int, bool, numpy / tensor integers."""
    v = draw(_BAD_NUM_SAMPLES)
    batch = draw(_BATCH)

    def build() -> Inputs:
        prior, net = counting_prior()
        return Inputs(prior=prior, problem=_problem(batch=batch), num_samples=v, net=net)

    return Case("num_samples", f"num_samples={v!r} ({type(v).__name__})", build, ("num_samples",))


_BAD_GENERATORS = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=3),
    st.just(np.random.default_rng(0)),
    st.just(_Strange()),
)


@st.composite
def generator_cases(draw) -> Case:
    """A ``generator`` that is not a ``torch.Generator`` (e.g. an int seed)."""
    v = draw(_BAD_GENERATORS)
    batch = draw(_BATCH)

    def build() -> Inputs:
        prior, net = counting_prior()
        return Inputs(prior=prior, problem=_problem(batch=batch), net=net, generator=v)

    return Case("generator", f"generator={v!r} ({type(v).__name__})", build, ("generator",))


@st.composite
def operator_fit_cases(draw) -> Case:
    """Operators whose input shape does not fit the prior's event shape."""
    kind = draw(st.sampled_from(["dense", "identity", "mask", "reshaped", "image", "posterior"]))
    d = draw(st.integers(1, 6).filter(lambda k: k != DIM))
    batch = draw(_BATCH)
    C = "operator_fit"
    if kind == "dense":
        make, label = (lambda: dense(dim=d)), f"Dense on R^{d}"
    elif kind == "identity":
        make, label = (lambda: ops.Identity(d, dtype=D)), f"Identity on R^{d}"
    elif kind == "mask":
        make, label = (
            lambda: ops.Mask(torch.arange(d) % 2 == 0, dtype=D),
            f"Mask on R^{d}",
        )
    elif kind == "reshaped":
        shape = draw(st.sampled_from([(1, DIM), (DIM, 1), (1, 1, DIM)]))
        make, label = (
            lambda: ops.Dense(dense().M, in_shape=shape),
            f"Dense with in_shape {shape} (prior event ({DIM},))",
        )
    elif kind == "image":
        which = draw(st.sampled_from(["Downsample", "Blur", "Colorize", "PhaseRetrieval"]))
        make = {
            "Downsample": lambda: ops.Downsample(IMAGE, 2, dtype=D),
            "Blur": lambda: ops.Blur(ops.gaussian_kernel(2, 1.0, dtype=D), IMAGE),
            "Colorize": lambda: ops.Colorize(IMAGE, dtype=D),
            "PhaseRetrieval": lambda: ops.PhaseRetrieval(IMAGE),
        }[which]
        label = f"{which} on {IMAGE} images, prior event ({DIM},)"
    else:

        def build() -> Inputs:
            return Inputs(extra={"gmm": mixture(), "problem": _problem(dense(dim=d), batch)})

        return _call(
            C,
            f"gmm.posterior with a Dense on R^{d} (mixture in R^{DIM})",
            build,
            lambda i: i.extra["gmm"].posterior(i.extra["problem"]),
            ("operator",),
        )

    def problem():
        op = make()
        return bfd.InverseProblem(op, observe(op, batch, 0.1), 0.1)

    return Case(C, label, _standard(problem), ("operator",))


@st.composite
def covariance_cases(draw) -> Case:
    """Covariances that are not symmetric positive definite."""
    kind = draw(st.sampled_from(["full", "nonsymmetric", "diag", "iso"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    w, means, _ = _gmm_args()
    bad = st.floats(min_value=-10.0, max_value=0.0)
    if kind == "full":
        lam = torch.tensor(draw(st.lists(st.floats(0.1, 5.0), min_size=DIM, max_size=DIM)), dtype=D)
        k = draw(st.integers(0, DIM - 1))
        lam[k] = draw(bad)
        Q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=D))
        S = Q @ torch.diag(lam) @ Q.T
        cov = torch.stack([torch.eye(DIM, dtype=D), 0.5 * (S + S.T)])
        label = f"full covariance with eigenvalue {float(lam[k]):.3g}"
    elif kind == "nonsymmetric":
        S = torch.eye(DIM, dtype=D)
        S[0, 1] = draw(st.floats(0.1, 2.0))
        cov = torch.stack([torch.eye(DIM, dtype=D), S])
        label = f"non-symmetric covariance (S[0, 1] = {float(S[0, 1]):.3g}, S[1, 0] = 0)"
    elif kind == "diag":
        cov = torch.ones(2, DIM, dtype=D)
        cov[draw(st.integers(0, 1)), draw(st.integers(0, DIM - 1))] = draw(bad)
        label = "diagonal covariance with an entry <= 0"
    else:
        cov = torch.tensor([1.0, draw(bad)], dtype=D)
        label = f"isotropic variance {float(cov[1]):.3g}"
    return _construct(
        "covariance", label, lambda: bfd.GaussianMixture(w, means, cov), ("covariances",)
    )


@st.composite
def weights_cases(draw) -> Case:
    """Mixture weights that do not sum to one, negative or all zero."""
    kind = draw(st.sampled_from(["sum", "negative", "zero"]))
    K = draw(st.integers(1, 4))
    w0 = torch.tensor(draw(st.lists(st.floats(0.05, 1.0), min_size=K, max_size=K)), dtype=D)
    w0 = w0 / w0.sum()
    if kind == "sum":
        c = draw(st.one_of(st.floats(0.0, 0.99), st.floats(1.01, 100.0)))
        w, label = w0 * c, f"weights summing to {c:.4g}"
    elif kind == "negative":
        K = max(K, 2)
        neg = draw(st.floats(0.01, 3.0))
        w = torch.full((K,), (1.0 + neg) / (K - 1), dtype=D)
        w[0] = -neg  # sums to one, one entry < 0
        label = f"weights with a negative entry, summing to one ({w.tolist()})"
    else:
        w, label = torch.zeros(K, dtype=D), f"all {K} weights zero"
    means = torch.zeros(K, DIM, dtype=D)
    cov = torch.ones(K, dtype=D)
    return _construct("weights", label, lambda: bfd.GaussianMixture(w, means, cov), ("weights",))


def _bad_values(annotation: str):
    """Bad values for a sampler field of the given annotation, or None."""
    ann = annotation.replace(" ", "")
    base = ann.replace("|None", "")
    if base == "int":
        return st.one_of(
            st.integers(-3, 0), st.just(True), st.just(2.5), st.just("3"), st.just(None)
        )
    if base == "float":
        return st.one_of(st.just(math.nan), st.just("0.5"), st.just(True), st.just([0.5]))
    if base == "str":
        return st.one_of(st.just("bogus"), st.just(1), st.just(None))
    return None


@st.composite
def hyperparameter_cases(draw) -> Case:
    """Bad hyper-parameters of every sampler (NaN, wrong type, out of range)."""
    classes = sampler_classes()
    name = draw(st.sampled_from(sorted(classes)))
    cls = classes[name]
    candidates = [f for f in fields(cls) if _bad_values(str(f.type)) is not None]
    f = draw(st.sampled_from(candidates))
    v = draw(_bad_values(str(f.type)))
    if v is None and "None" in str(f.type):
        v = math.nan
    kwargs = {**SMALL.get(name, {}), f.name: v}
    return _construct(
        "hyperparameters",
        f"{name}({f.name}={v!r})",
        lambda: cls(**kwargs),
        (f.name,),
    )


def hyperparameter_cases_all() -> list[Case]:
    """Every sampler x every int / float / str field x a fixed list of bad values."""
    bad = {
        "int": (-1, True, 2.5, "3", None),
        "float": (math.nan, "0.5", True, [0.5]),
        "str": ("bogus", 1, None),
    }
    out = []
    for name, cls in sampler_classes().items():
        for f in fields(cls):
            base = str(f.type).replace(" ", "").replace("|None", "")
            for v in bad.get(base, ()):
                if v is None and "None" in str(f.type):
                    continue
                kwargs = {**SMALL.get(name, {}), f.name: v}
                out.append(
                    _construct(
                        "hyperparameters",
                        f"{name}({f.name}={v!r})",
                        lambda cls=cls, kwargs=kwargs: cls(**kwargs),
                        (f.name,),
                    )
                )
    return out


# Capability: every sampler on every operator / noise model / schedule. A sampler either
# runs with finite output or says what it needs before any network call.

_SCHEDULES = {
    "VP": bfd.VPSchedule.linear,
    "VE": lambda: bfd.VESchedule(),
    "flow": bfd.FlowSchedule,
}
_OPERATORS = ("Dense", "Identity", "Mask", "Downsample", "Blur", "Colorize", "PhaseRetrieval")
_NOISES = ("gaussian", "noiseless", "poisson", "custom")
_ASPECT_WORDS = {
    "schedule": ("schedule", "flow", "alpha", "VP", "VE", "sigma", "ode_sigma_min"),
    "operator": ("operator", "mask", "SVD", "linear"),
    "noiseless": ("noise_std", "tau"),
    "poisson": ("poisson", "gaussian"),
    "custom": ("log_likelihood_fn", "likelihood"),
}


def _make_operator(name: str):
    shape = (DIM,) if name in ("Dense", "Identity", "Mask") else IMAGE
    if name == "Dense":
        return dense(), shape
    if name == "Identity":
        return ops.Identity(shape, dtype=D), shape
    if name == "Mask":
        return ops.Mask(torch.tensor([True, False, True]), dtype=D), shape
    if name == "Downsample":
        return ops.Downsample(IMAGE, 2, dtype=D), shape
    if name == "Blur":
        return ops.Blur(ops.gaussian_kernel(2, 1.0, dtype=D), IMAGE), shape
    if name == "Colorize":
        return ops.Colorize(IMAGE, dtype=D), shape
    return ops.PhaseRetrieval(IMAGE), shape


def capability_case(schedule: str, operator: str, noise: str, batch: int | None) -> Case:
    def build() -> Inputs:
        op, shape = _make_operator(operator)
        gmm = mixture(math.prod(shape))
        prior, net = counting_prior(
            gmm, _SCHEDULES[schedule](), event_shape=None if shape == (DIM,) else shape
        )
        if noise == "poisson":
            # a positive intensity: |A x| + 1 (PhaseRetrieval is already >= 0)
            rate = observe(op, batch, 0.0, gmm=gmm).abs() + 1.0
            y = torch.poisson(rate, generator=torch.Generator().manual_seed(1))
            problem = bfd.InverseProblem(op, y, noise="poisson")
        elif noise == "custom":
            y = observe(op, batch, 0.1, gmm=gmm)

            def ll(x, yy):
                r = (yy - op(x)).reshape(x.shape[:2] + (-1,))
                return -0.5 * (r**2).sum(-1) / 0.01

            problem = bfd.InverseProblem(op, y, log_likelihood_fn=ll)
        else:
            s = 0.1 if noise == "gaussian" else 0.0
            problem = bfd.InverseProblem(op, observe(op, batch, s, gmm=gmm), s)
        return Inputs(prior=prior, problem=problem, net=net)

    # A refusal must name what the sampler needs: the schedule or the operator (every
    # combination has one) or, for another noise model, that noise model / likelihood.
    names = _ASPECT_WORDS["schedule"] + _ASPECT_WORDS["operator"]
    if noise != "gaussian":
        names = names + _ASPECT_WORDS[noise]
    label = f"{schedule} / {operator} / {noise} / B={batch}"
    return Case("capability", label, build, names, may_run=True)


def capability_cases() -> list[Case]:
    """Every (schedule, operator, noise) combination, batched and unbatched alternately."""
    out = []
    for i, s in enumerate(_SCHEDULES):
        for j, o in enumerate(_OPERATORS):
            for k, n in enumerate(_NOISES):
                out.append(capability_case(s, o, n, None if (i + j + k) % 2 else 2))
    return out


def capability_strategy():
    return st.builds(
        capability_case,
        st.sampled_from(list(_SCHEDULES)),
        st.sampled_from(_OPERATORS),
        st.sampled_from(_NOISES),
        _BATCH,
    )


# --------------------------------------------------------------------------------------
# The first hour (issue #20): networks, bfd.infer's data and models, the command line

_BAD_OUTPUTS = st.sampled_from(
    ["wrong shape", "extra axis", "flattened", "list", "numpy", "int dtype", "bool dtype", "none"]
)


@st.composite
def network_cases(draw) -> Case:
    """A denoiser network whose output breaks the contract ``net(x, t) -> tensor of x's
    shape``: called once through ``prior.denoise`` (a wrong-dtype float is cast, not bad)."""
    kind = draw(_BAD_OUTPUTS)
    lead = draw(st.sampled_from([(1,), (4,), (2, 3)]))
    param = draw(st.sampled_from(["eps", "x0", "v", "score"]))

    def net(x, t):
        if kind == "wrong shape":
            return x[..., :-1]
        if kind == "extra axis":
            return x[..., None]
        if kind == "flattened":
            return x.reshape(-1)
        if kind == "list":
            return x.tolist()
        if kind == "numpy":
            return x.detach().numpy()
        if kind == "int dtype":
            return x.round().long()
        if kind == "bool dtype":
            return x > 0
        return None

    def build() -> Inputs:
        sched = bfd.VPSchedule.linear()
        if param == "x0":
            prior = bfd.DiffusionModel(net, sched, (DIM,))
        else:
            wrap = {"eps": "from_eps", "v": "from_v", "score": "from_score"}[param]
            prior = getattr(bfd.DiffusionModel, wrap)(net, sched, (DIM,))
        return Inputs(prior=prior)

    x = torch.randn(lead + (DIM,), dtype=D, generator=torch.Generator().manual_seed(1))
    return Case(
        "network",
        f"{param} network returns {kind}, x {lead + (DIM,)}",
        build,
        ("network", "net"),
        action=lambda inputs: inputs.prior.denoise(x, torch.tensor(0.5, dtype=D)),
    )


def _infer_model(prior, A, kind: str):
    import pyro
    import pyro.distributions as dist

    def model(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        if kind == "no_broadcast":  # A x written for one x: breaks the vectorisation contract
            pyro.sample("y", dist.Normal(A.matrix() @ x, 0.1).to_event(1), obs=y)
        elif kind == "stack":
            pyro.sample("y", dist.Normal(torch.stack([x[0], x[1]]), 0.1).to_event(1), obs=y)
        else:
            pyro.sample("y", bfd.LinearGaussian(A, x, 0.1), obs=y)

    return model


@st.composite
def infer_cases(draw) -> Case:
    """``bfd.infer`` on observed data of the wrong kind or shape, or a model whose
    likelihood does not broadcast over the particles."""
    kind = draw(
        st.sampled_from(
            ["list", "tuple", "numpy", "wrong event", "scalar", "meta", "no_broadcast", "stack"]
        )
    )
    size = draw(st.integers(1, 5).filter(lambda n: n != OBS))
    batch = draw(st.sampled_from([(), (2,)]))

    def build() -> Inputs:
        prior, net = counting_prior()
        return Inputs(prior=prior, net=net, extra={"A": dense()})

    def act(inputs: Inputs):
        A = inputs.extra["A"]
        good = torch.zeros(batch + (OBS,), dtype=D)
        model_kind = kind if kind in ("no_broadcast", "stack") else "linear"
        y: Any = {
            "list": good.tolist(),
            "tuple": tuple(good.reshape(-1).tolist()),
            "numpy": good.numpy(),
            "wrong event": torch.zeros(batch + (size,), dtype=D),
            "scalar": torch.tensor(0.5, dtype=D),
            "meta": torch.zeros(batch + (OBS,), dtype=D, device="meta"),
        }.get(kind, good)
        model = _infer_model(inputs.prior, A, model_kind)
        return bfd.infer(model, bfd.samplers.TDS(num_steps=3), y=y, num_samples=4)

    names = ("model", "broadcast", "broadcasting") if kind in ("no_broadcast", "stack") else ("y",)
    return Case("infer", f"infer with {kind} y {batch}", build, names, action=act)


class _CliRefusal(ValueError):
    """The command line's one-line error, raised so that the judge reads its message."""


def _cli(argv: list[str]) -> None:
    """Run the command line in this process: a refusal must be exit code 2 with one
    ``bayesfilter-diff: error: ...`` line on stderr (argparse's usage lines allowed)."""
    import contextlib
    import io

    from bayesfilter_diff import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse: usage + "error: ..." and exit 2
            code = e.code
    text = err.getvalue().strip()
    if code == 2 and text and "Traceback" not in text:
        raise _CliRefusal(text.splitlines()[-1])
    raise RuntimeError(f"exit {code}, stderr {text[-300:]!r}")


_CLI_BAD: list[tuple[list[str], tuple[str, ...]]] = [
    (["validate", "--threads", "0"], ("--threads",)),
    (["validate", "--threads", "-3"], ("--threads",)),
    (["validate", "--threads", "two"], ("--threads",)),
    (["validate", "--num-workers", "0"], ("--num-workers",)),
    (["validate", "--num-workers", "1.5"], ("--num-workers",)),
    (["validate", "--methods", ""], ("--methods",)),
    (["validate", "--methods", ","], ("--methods",)),
    (["validate", "--methods", "TDS,,MCGdiff"], ("--methods", "name")),
    (["validate", "--methods", "Nope"], ("methods",)),
    (["validate", "--methods", "DDIM"], ("DDIM", "prior")),
    (["validate", "--device", "banana"], ("--device",)),
    (["validate", "--device", "xla"], ("--device",)),
    (["validate", "--executor", "spark"], ("--executor",)),
    (["validate", "--address", "auto"], ("--address",)),
    (["validate", "--gpus-per-task", "1"], ("--gpus-per-task",)),
    (["validate", "--bogus"], ("--bogus", "unrecognized")),
    (["nosuchcommand"], ("command", "choice", "invalid")),
    ([], ("command", "required")),
    (["train"], ("--data", "required")),
    (["train", "--data", "cifar", "--kind", "flow", "--steps", "1", "--out", "X"], ("--data",)),
    (["train", "--data", "moons", "--kind", "gan", "--steps", "1", "--out", "X"], ("--kind",)),
    (["train", "--data", "moons", "--kind", "flow", "--steps", "x", "--out", "X"], ("--steps",)),
    (
        [
            "train",
            "--data",
            "moons",
            "--kind",
            "flow",
            "--steps",
            "1",
            "--out",
            "X",
            "--threads",
            "0",
        ],
        ("--threads",),
    ),
    (
        [
            "train",
            "--data",
            "moons",
            "--kind",
            "flow",
            "--steps",
            "1",
            "--out",
            "X",
            "--device",
            "tpu",
        ],
        ("--device",),
    ),
    (
        [
            "train",
            "--data",
            "moons",
            "--kind",
            "flow",
            "--steps",
            "1",
            "--out",
            "X",
            "--channels",
            "8",
        ],
        ("--channels",),
    ),
    (
        [
            "train",
            "--data",
            "moons",
            "--kind",
            "flow",
            "--steps",
            "1",
            "--out",
            "X",
            "--parameterization",
            "logits",
        ],
        ("--parameterization",),
    ),
]


@st.composite
def cli_cases(draw) -> Case:
    """Bad command lines (in this process): one-line errors naming the flag, exit code 2,
    no traceback; the output folder cases write under a temporary folder."""
    import tempfile

    which = draw(st.sampled_from(["table", "out_file", "out_under_file", "resume_empty"]))
    if which == "table":
        argv, names = draw(st.sampled_from(_CLI_BAD))
    else:
        argv, names = [], ("--out", "--resume")

    def act(inputs: Inputs):
        with tempfile.TemporaryDirectory() as tmp:
            f = f"{tmp}/afile"
            open(f, "w").close()
            if which == "table":
                args = [a if a != "X" else f"{tmp}/run" for a in argv]
            elif which == "out_file":
                args = ["validate", "--out", f]
            elif which == "out_under_file":
                args = ["validate", "--out", f"{f}/sub"]
            else:
                args = [
                    "train",
                    "--data",
                    "moons",
                    "--kind",
                    "flow",
                    "--steps",
                    "1",
                    "--out",
                    f"{tmp}/empty",
                    "--resume",
                ]
            _cli(args)

    label = " ".join(argv) if which == "table" else which
    return Case("cli", f"bayesfilter-diff {label}", lambda: Inputs(), names, action=act)


#: category -> (strategy, one-line description)
CATEGORIES: dict[str, tuple[Any, str]] = {
    "shape": (
        shape_cases(),
        "wrong shapes / ranks of y, x_t, matrix, mixture arguments, event_shape",
    ),
    "batch": (
        batch_cases(),
        "mismatched batch sizes (mixture args, t, log_likelihood_fn output, posterior)",
    ),
    "dtype": (dtype_cases(), "y of another dtype than operator / prior; mixed mixture dtypes"),
    "nonfinite": (
        nonfinite_cases(),
        "NaN / inf in y, mixture, operator, network (also set after validation)",
    ),
    "noise_std": (
        noise_std_cases(),
        "negative / NaN / non-numeric noise_std; edge values 0, tiny, huge",
    ),
    "empty": (empty_cases(), "empty batch, K = 0, d = 0, zero-size matrix, nothing observed"),
    "num_samples": (
        num_samples_cases(),
        "num_samples < 1, float, bool, None, str, numpy / tensor ints",
    ),
    "generator": (generator_cases(), "generator not a torch.Generator (int seed, numpy rng, ...)"),
    "operator_fit": (operator_fit_cases(), "operator input shape != prior event shape"),
    "covariance": (covariance_cases(), "non-PD, non-symmetric, non-positive variances"),
    "weights": (weights_cases(), "weights not summing to one, negative, all zero"),
    "hyperparameters": (
        hyperparameter_cases(),
        "bad sampler fields: NaN, wrong type, out of range",
    ),
    "network": (network_cases(), "denoiser outputs of the wrong shape, type or dtype"),
    "infer": (
        infer_cases(),
        "bfd.infer: observed data of the wrong type / shape / device, "
        "likelihoods that do not broadcast",
    ),
    "cli": (cli_cases(), "bad command lines: flags, values, output folders (exit 2, one line)"),
    "capability": (capability_strategy(), "every sampler x schedule x operator x noise model"),
}

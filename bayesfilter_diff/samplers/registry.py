"""The one list of samplers: display names, classes, settings, and what each one needs.

Every place that enumerates samplers reads this registry: the validation studies and the
CLI's ``--methods``, the imaging study, the benchmarks and the contract test over every
sampler. A sampler's requirements are declared once, on its class
(:attr:`~bayesfilter_diff.samplers.base.Sampler.requires`); the registry adds how to build
it for a study of ``n`` steps, a small setting for tests, and which prior path it runs on.

Adding a sampler: write its module (a frozen dataclass subclassing ``Sampler`` or
``SMCSampler``) and add one :class:`SamplerEntry` below.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..problem import InverseProblem
from .base import Requirements, Sampler
from .daps import DAPS
from .dcps import DCPS
from .ddim import DDIM
from .ddnm import DDNM, DDNMPlus
from .ddrm import DDRM
from .ddsmc import DDSMC
from .dflow import DFlow
from .diffpir import DiffPIR
from .dps import DPS
from .filtering import FilteringSMC
from .fps import FPS, FPSSMC
from .mcgdiff import MCGdiff
from .mgps import MGPS
from .pigdm import PiGDM
from .pigdm_flow import PiGDMFlow
from .pnpdm import PnPDM
from .reddiff import REDDiff
from .repaint import RePaint
from .smcdiff import SMCDiff
from .tds import JACOBIAN_MAX_OBSERVATIONS, TDS

__all__ = [
    "SamplerEntry",
    "REGISTRY",
    "entry",
    "names",
    "build",
    "parse_label",
    "default_sampler",
]


def _steps(n: int) -> dict[str, Any]:
    return {"num_steps": n}


@dataclass(frozen=True)
class SamplerEntry:
    """One sampler of the registry.

    Attributes
    ----------
    name
        Display name (tables, ``--methods``).
    cls
        The sampler class.
    study
        Settings for a study of ``n`` steps: ``study(n) -> kwargs``.
    small
        Settings for a run of milliseconds on a toy problem (tests).
    path
        ``"vp"`` for diffusion samplers, ``"flow"`` for the flow methods (the prior they run
        on; the Gaussian mixture has an exact model under either).
    posterior
        Whether it samples a posterior (``False`` for prior-only samplers such as DDIM).
    studies
        Whether the validation studies run it by default (DDNM, the noiseless method whose
        noisy version is DDNM+, is left out).
    """

    name: str
    cls: type[Sampler]
    study: Callable[[int], dict[str, Any]] = _steps
    small: dict[str, Any] = field(default_factory=lambda: {"num_steps": 4})
    path: str = "vp"
    posterior: bool = True
    studies: bool = True

    @property
    def requires(self) -> Requirements:
        return self.cls.requires

    @property
    def exact(self) -> bool:
        return bool(self.cls.exact)

    @property
    def weighted(self) -> bool:
        return bool(self.cls.weighted)

    def build(self, num_steps: int | None = None, /, **overrides: Any) -> Sampler:
        """An instance with the study settings for ``num_steps`` (or the small settings);
        ``overrides`` may set any field, ``num_steps`` included (PnP-DM's iterations)."""
        if num_steps is not None and (
            isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1
        ):  # checked here too: a study's settings may replace or ignore it (DCPS, PnP-DM)
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        kw = dict(self.small) if num_steps is None else self.study(num_steps)
        kw.update(overrides)
        return self.cls(**kw)

    def accepts(self, problem: InverseProblem, sampler: Sampler | None = None) -> bool:
        """Whether the declared requirements of ``sampler`` (default: the small settings'
        instance) admit ``problem`` (its operator and likelihood)."""
        sampler = self.build() if sampler is None else sampler
        return sampler.requirements().unmet(problem) is None


_ENTRIES = (
    SamplerEntry("MCGdiff", MCGdiff),
    SamplerEntry("TDS", TDS),
    SamplerEntry("DDSMC", DDSMC),
    SamplerEntry("Filtering-SMC", FilteringSMC),
    SamplerEntry("FPS-SMC", FPSSMC),
    SamplerEntry("FPS", FPS),
    SamplerEntry("DPS", DPS),
    SamplerEntry("PiGDM", PiGDM),
    SamplerEntry("DDRM", DDRM),
    SamplerEntry("DDNM", DDNM, studies=False),
    SamplerEntry("DDNM+", DDNMPlus),
    SamplerEntry("DiffPIR", DiffPIR, small={"num_steps": 4, "cg_iters": 5}),
    SamplerEntry("RED-diff", REDDiff),
    SamplerEntry("DAPS", DAPS, small={"num_steps": 3, "ode_steps": 2, "langevin_steps": 3}),
    # DCPS with the code's image settings (on the d = 8 mixture its trajectory step length
    # 5e-2 measured twice as far from the posterior: docs/methods/dcps.md)
    SamplerEntry(
        "DCPS",
        DCPS,
        study=lambda n: {"num_steps": max(3, n)},
        small={"num_steps": 3, "langevin_steps": 1, "grad_steps": 1},
    ),
    # MGPS with the code's Gaussian-mixture setting (lr 0.1, 20 Adam steps in the first ten
    # steps and every tenth)
    SamplerEntry(
        "MGPS",
        MGPS,
        study=lambda n: {
            "num_steps": n,
            "lr": 0.1,
            "first_grad_steps": 20,
            "every_tenth_grad_steps": 20,
        },
        small={"num_steps": 3, "grad_steps": 1, "first_grad_steps": 1},
    ),
    # PnP-DM's K = 100 Gibbs iterations do not follow a study's step count (2000 NFEs each)
    SamplerEntry("PnP-DM", PnPDM, study=lambda n: {}, small={"num_steps": 3, "prior_steps": 2}),
    SamplerEntry("PiGDM-flow", PiGDMFlow, path="flow"),
    # D-Flow's defaults (20 x 20 L-BFGS iterations through a 5-step midpoint solve) cost
    # ~30 000 NFEs per sample; studies bound it to 3 x 5 iterations (~1 000 NFEs).
    SamplerEntry(
        "D-Flow",
        DFlow,
        study=lambda n: {"max_iters": 3, "lbfgs_iters": 5},
        small={"max_iters": 2, "lbfgs_iters": 2, "ode_steps": 2, "history_size": 3, "max_ls": 3},
        path="flow",
    ),
    SamplerEntry("SMCDiff", SMCDiff),
    SamplerEntry("RePaint", RePaint, small={"num_steps": 4, "jump_length": 2, "jump_n_sample": 2}),
    SamplerEntry("DDIM", DDIM, posterior=False),
)

#: Display name -> entry, in the order of the tables.
REGISTRY: dict[str, SamplerEntry] = {e.name: e for e in _ENTRIES}
_BY_CLASS = {e.cls.__name__: e for e in _ENTRIES}


def entry(name: str) -> SamplerEntry:
    """The entry for a display name (``"FPS-SMC"``) or a class name (``"FPSSMC"``)."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name in _BY_CLASS:
        return _BY_CLASS[name]
    raise ValueError(f"unknown sampler {name!r}; choose from {sorted(REGISTRY)}")


def names(
    *,
    posterior: bool = True,
    studies: bool = False,
    mask: bool = True,
    exact: bool | None = None,
    path: str | None = None,
) -> list[str]:
    """Display names, filtered: posterior samplers only, those the studies run by default,
    with or without the mask-only ones, by exactness and by prior path."""
    out = []
    for e in _ENTRIES:
        if posterior and not e.posterior:
            continue
        if studies and not e.studies:
            continue
        if not mask and e.requires.mask:
            continue
        if exact is not None and e.exact != exact:
            continue
        if path is not None and e.path != path:
            continue
        out.append(e.name)
    return out


def build(name: str, num_steps: int | None = None, /, **overrides: Any) -> Sampler:
    """Instantiate sampler ``name`` with its study settings for ``num_steps`` steps (or its
    small settings when ``num_steps`` is None); ``overrides`` replace settings."""
    return entry(name).build(num_steps, **overrides)


def parse_label(label: str) -> tuple[str, dict[str, Any]]:
    """A study's method label, ``"Name"`` or ``"Name[key=value, ...]"`` (values as JSON,
    else strings), as ``(name, overrides)`` for :func:`build`: ``"TDS[proposal=gradient]"``
    is ``("TDS", {"proposal": "gradient"})``."""
    name, sep, rest = label.partition("[")
    if not sep:
        return label, {}
    if not rest.endswith("]"):
        raise ValueError(f"method label {label!r}: expected 'Name[key=value, ...]'")
    overrides: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest[:-1].split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"method label {label!r}: {item!r} is not key=value")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()
    return name.strip(), overrides


def default_sampler(
    problem: InverseProblem, num_steps: int = 100, evidence: bool = False
) -> Sampler:
    """An asymptotically exact sampler suited to ``problem``: TDS with adaptive steps
    (``adaptive_ess=0.1``: a move that would leave less than 10% of N is redone to an
    intermediate time), and

    - for Gaussian noise through a linear operator with an SVD or a small matrix, its
      conditioned proposal (``proposal="auto"``: exact Gaussian conditioning at the
      informative end of the path, which keeps the lineages) with the reference reverse
      variance (``reverse_variance="reference"``: the kernel carries ``b^2 Var[x0 | x_t]``
      with the prior's own average ``Var[x0 | x_t]`` where the model knows it (a Gaussian
      mixture), a unit Gaussian's elsewhere, which the DDPM kernel drops; since 2026-12-05:
      on the noise-level study 1.13-1.36x the exact floor and |d log Z| <= 0.05, against
      1.42-1.78x and 0.07 with the DDPM kernel, whose evidence was 3-7 of its sd off for
      data in the prior's tail; docs/methods/tds.md); with at most
      ``JACOBIAN_MAX_OBSERVATIONS`` (16) observed coordinates (since 2026-12-06) its
      Jacobian twist (``twist_variance="jacobian"``: the twist's covariance from the
      denoiser's Jacobian, one backward pass per observed coordinate on the moves where it
      is trusted), which kept 1.8x (the noise-level study) to 30x (a full-covariance
      mixture) the lineages of the operator's twist on mixtures, 1.5x on the moons network
      at 1.3x its CPU time and 6.4x on the digits network (10 projections) at 3.1x; and
      since session 37 (2026-12-07) the kernel's ``b^2 Cov[x0 | x_t]`` from that Jacobian
      at each particle, in the observed directions and across them
      (``reverse_variance="observed"``; m more backward passes per step), which cut the
      100-step chain's evidence bias on priors of several scales and anisotropic ones
      4x or more on 11 of 12 problems measured, 1.3x on one (docs/methods/tds.md); and
      since session 38 its fallback (``jacobian_fallback=True``): a run whose weights
      degenerated with fewer than 50 lineages left is replaced by a run with the
      operator's twist (data far in the prior's tail between its modes: 37-41 nats low
      before, within 1.6 over 15 runs at N = 256-1000 after, each warned for a thin
      genealogy);
    - for every other likelihood it accepts (nonlinear operators, Poisson, custom / Pyro
      sites), and with ``evidence=True`` (SMC^2's inner sampler, whose error is the
      evidence's), the analytic reverse variance (``reverse_variance="analytic"``: the
      chain's transitions carry the ``Var[x0 | x_t]`` that DDIM drops, so it targets the
      continuous model, not its discretisation; SMC^2's log Bayes factor error at d = 80
      -0.14 +- 0.39 against -0.58 +- 0.39 with the conditioned proposal); for the sites
      its Laplace twist smooths, and ``evidence=False``, with the conditioned proposal
      (since 2026-12-06: the kernel conditioned on the twist's quadratic model; on the
      quadrature study's seven 2-D problems sw/floor 0.79-1.68 against 0.88-1.64 and
      genealogy ESS up to 1.5x, on a d = 100 Poisson GLM 13-20 lineages of 256 against
      2-3, on the noise-level study with its noise as a custom site 1.22-1.53x the floor,
      unwarned, against 1.9-3.4x, warned; docs/methods/tds.md);

    MCGdiff where TDS does not apply."""
    tds = build("TDS", num_steps, adaptive_ess=0.1, reverse_variance="reference")
    assert isinstance(tds, TDS)
    if tds.requirements().unmet(problem) is None:
        if not evidence and tds.conditions(problem):
            if problem.operator.out_dim <= JACOBIAN_MAX_OBSERVATIONS:
                return replace(
                    tds,
                    twist_variance="jacobian",
                    reverse_variance="observed",
                    jacobian_fallback=True,
                )
            return tds
        analytic = build("TDS", num_steps, adaptive_ess=0.1, reverse_variance="analytic")
        assert isinstance(analytic, TDS)
        conditioned = replace(analytic, proposal="conditioned")
        if not evidence and conditioned.conditions(problem):  # (the Laplace twist here)
            return conditioned
        return analytic
    mcg = build("MCGdiff", num_steps)
    if mcg.requirements().unmet(problem) is None:
        return mcg
    raise ValueError(
        "no asymptotically exact sampler accepts this problem: "
        + "; ".join(
            f"{type(s).__name__} needs {s.requirements().unmet(problem)}" for s in (tds, mcg)
        )
    )

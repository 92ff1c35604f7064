"""The Gaussian-mixture benchmark of Cardoso et al. (MCGdiff, ICLR 2024, appendix).

Prior: 25 components with means ``(8i, 8j, 8i, 8j, ...)`` in ``R^d`` for
``i, j in {-2, ..., 2}``, identity covariances, weights the normalised squares of standard
normal draws. Observation: a ``(d_y, d)`` standard normal matrix whose singular values are
replaced by sorted ``U[0, 1]`` draws, ``sigma_y ~ U[0, max(s)]``, ``y = A x* + sigma_y n``
with ``x*`` drawn from the prior. Every quantity is drawn from a generator seeded by
``(d, d_y, seed)``, so a problem is reproducible from its cell alone.

Choices (the paper's code and text disagree in places; REFERENCES.md):
- schedule: the continuous limit of DDPM's linear betas (``VPSchedule.linear()``) on the
  respaced DDPM grid. The authors' GMM script runs its betas backwards (0.02 -> 1e-4);
  we use the standard DDPM profile the paper describes.
- the mixture weights are drawn per problem seed (the script draws them once per ``d``).
- metric: sliced Wasserstein-1 (as the authors' ``sliced_wasserstein``, mean over random
  directions of the 1-D W1), with 1000 directions instead of 100 to reduce its own noise,
  between the sampler's (weighted) particles and 10 000 exact posterior draws; the
  exact-vs-exact floor for the same sample sizes is reported beside it.
- 1000 particles / samples per run (the script: 2 runs x 1000 particles).
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import torch

from ..operators.dense import gmm_benchmark_operator
from ..priors.gmm import GaussianMixture
from ..problem import InverseProblem
from ..samplers.registry import entry, parse_label
from ..schedules import FlowSchedule, VPSchedule
from .grid import sample_or_diverged

__all__ = [
    "PRIOR_CHAIN",
    "benchmark_prior",
    "benchmark_problem",
    "run_cell",
    "prior_chain_cell",
    "grid",
]

#: the method name of the cells that run the prior's chain alone (no data)
PRIOR_CHAIN = "prior chain"


def _seed(*parts: Any) -> int:
    h = hashlib.sha256(repr(parts).encode()).hexdigest()
    return int(h[:15], 16)


def benchmark_prior(dim: int, generator: torch.Generator, dtype=torch.float64) -> GaussianMixture:
    """The 25-component mixture of the benchmark in ``R^dim`` (``dim`` even)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even integer >= 2, got {dim}")
    grid = torch.arange(-2, 3, dtype=dtype) * 8.0
    ij = torch.cartesian_prod(grid, grid)  # (25, 2): (8i, 8j)
    means = ij.repeat(1, dim // 2)
    w = torch.randn(25, generator=generator, dtype=dtype) ** 2
    return GaussianMixture(w / w.sum(), means, torch.ones(25, dtype=dtype))


def benchmark_problem(dim: int, obs_dim: int, seed: int, dtype=torch.float64):
    """``(mixture, problem, x_true)`` of one benchmark draw."""
    g = torch.Generator().manual_seed(_seed("gmm-benchmark", dim, obs_dim, seed))
    gmm = benchmark_prior(dim, g, dtype)
    A, sigma_y = gmm_benchmark_operator(dim, obs_dim, g, dtype=dtype)
    x = gmm.sample(1, g)[0]
    y = A(x) + sigma_y * torch.randn(obs_dim, generator=g, dtype=dtype)
    return gmm, InverseProblem(A, y, sigma_y), x


def prior_chain_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """The prior alone: the ancestral chain of ``steps`` steps (DDIM, ``eta = 1``) from the
    reference ``N(0, sigma_T^2 I)`` that every sampler starts from (from the exact ``p_T``
    with ``exact_start``), against the mixture
    itself: sliced W1 to exact prior draws over its floor, and the total variation of the
    mode weights the draws imply against the mixture's (with the same for ``N`` exact draws,
    ``weight_tv_floor``). An exact sampler targets this chain's posterior, so whatever the
    chain misses of the prior (its time discretisation, and the reference start, which
    ignores ``alpha_T x0``: at ``d = 800`` the components' means reach ``alpha_T |m_k| ~ 3``
    and the start misweights them) it inherits."""
    from .. import diagnostics as dg
    from ..operators import Dense
    from ..samplers.registry import build

    device = torch.device(cell.get("device", "cpu"))
    gmm, _, _ = benchmark_problem(cell["d"], cell["d_y"], cell["seed"])
    gmm = gmm.to(device)
    dt = gmm.means.dtype
    # (a noiseless dummy: the prior-only chain ignores it, and the residual check with it)
    dummy = InverseProblem(
        Dense(torch.zeros(1, cell["d"], dtype=dt, device=device)),
        torch.zeros(1, dtype=dt, device=device),
        0.0,
    )
    g = torch.Generator(device=device).manual_seed(
        _seed("run", PRIOR_CHAIN, cell["seed"], cell["d"], cell["d_y"])
    )
    start = time.perf_counter()
    prior = gmm.diffusion(VPSchedule.linear(), exact_start=bool(cell.get("exact_start", False)))
    res = build("DDIM", cell["steps"]).sample(prior, dummy, cell["N"], generator=g)
    wall = time.perf_counter() - start
    x = res.samples.reshape(cell["N"], cell["d"]).to(dt)
    ref = gmm.sample(cell.get("num_reference", 10_000), g)
    ref2 = gmm.sample(cell["N"], g)
    kw = {"num_projections": cell.get("num_projections", 1000), "p": 1, "generator": g}
    sw = dg.sliced_wasserstein(torch.stack([x, ref2]), ref, **kw)
    return {
        "finite": bool(torch.isfinite(x).all()),
        "wall_time": wall,
        "nfe": res.info.get("nfe"),
        "sw": float(sw[0]),
        "sw_floor": float(sw[1]),
        "weight_tv": float(dg.mixture_weight_error(x, gmm)),
        "weight_tv_floor": float(dg.mixture_weight_error(ref2, gmm)),
    }


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Run one benchmark cell and measure it against the exact posterior (a
    :data:`PRIOR_CHAIN` cell: :func:`prior_chain_cell`)."""
    from .. import diagnostics as dg

    if cell["method"] == PRIOR_CHAIN:
        return prior_chain_cell(cell)

    device = torch.device(cell.get("device", "cpu"))
    gmm, problem, _ = benchmark_problem(cell["d"], cell["d_y"], cell["seed"])
    gmm, problem = gmm.to(device), problem.to(device)
    name, label_overrides = parse_label(cell["method"])  # "TDS[reverse_variance=analytic]"
    spec = entry(name)
    sched = FlowSchedule() if spec.path == "flow" else VPSchedule.linear()
    # "exact_start" (set only when true, so the protocol's cell keys stay as they were):
    # the chain starts from the exact p_T, not the reference N(0, sigma_T^2 I)
    prior = gmm.diffusion(sched, exact_start=bool(cell.get("exact_start", False)))
    # overrides may set any field, num_steps included (PnP-DM's iterations)
    sampler = spec.build(cell["steps"], **{**label_overrides, **cell.get("overrides", {})})
    g = torch.Generator(device=device).manual_seed(
        _seed("run", cell["method"], cell["seed"], cell["d"], cell["d_y"])
    )
    start = time.perf_counter()
    res, diverged = sample_or_diverged(
        lambda: sampler.sample(prior, problem, cell["N"], generator=g)
    )
    wall = time.perf_counter() - start
    if res is None:  # the loop raised on non-finite draws: the cell's result, not a crash
        nan = math.nan
        return {"finite": False, "diverged": diverged, "wall_time": wall, "sw": nan,
                "sw_floor": nan, "weight_tv": nan}  # fmt: skip
    post = gmm.posterior(problem)
    ref = post.sample(cell.get("num_reference", 10_000), g)
    ref2 = post.sample(cell["N"], g)
    W = res.weights()
    x = res.samples
    finite = bool(torch.isfinite(x).all())
    out: dict[str, Any] = {
        "finite": finite,
        "wall_time": wall,
        "nfe": res.info.get("nfe"),
        "backprop": bool(res.info.get("backprop", False)),
    }
    if not finite:
        out.update(sw=math.nan, sw_floor=math.nan, weight_tv=math.nan)
        return out
    # the sampler's particles and N exact draws against the reference in one call: the
    # same directions for both, the reference projected and sorted once
    kw = {"num_projections": cell.get("num_projections", 1000), "p": 1, "generator": g}
    xs = torch.stack([x.reshape(ref2.shape).to(ref2.dtype), ref2])
    ws = torch.stack(
        [W.to(torch.float64), torch.full_like(W, 1.0 / W.numel(), dtype=torch.float64)]
    )
    sw = dg.sliced_wasserstein(xs, ref, weights_x=ws, **kw)
    out["sw"], out["sw_floor"] = float(sw[0]), float(sw[1])
    out["weight_tv"] = float(dg.mixture_weight_error(x, post, weights=W))
    out["ess"] = float(res.ess())
    if cell["seed"] == 0:  # a few equally weighted draws (two coordinates) for the figures
        out["scatter"] = res.draws(300, generator=g)[:, :2].double().cpu().tolist()
    if res.log_evidence is not None:
        exact = float(gmm.log_evidence(problem))
        out["log_evidence"] = float(res.log_evidence)
        out["log_evidence_exact"] = exact
        out["log_evidence_error"] = float(res.log_evidence) - exact
    return out


def grid(
    methods,
    dims,
    obs_dims,
    steps,
    seeds,
    N: int,
    device: str = "cpu",
    num_reference: int = 10_000,
    num_projections: int = 1000,
    exact_start: bool = False,
) -> list[dict[str, Any]]:
    """All cells of a benchmark run (``exact_start``: the samplers start from the mixture's
    exact ``p_T``, ``GaussianMixture.diffusion(..., exact_start=True)``); the method
    :data:`PRIOR_CHAIN` gives the cells of the prior's chain alone."""
    extra: dict[str, Any] = {
        "device": device,
        "num_reference": num_reference,
        "num_projections": num_projections,
    }
    if exact_start:
        extra["exact_start"] = True
    return [
        {"study": "gmm", "method": m, "d": d, "d_y": dy, "steps": n, "seed": s, "N": N, **extra}
        for d in dims
        for dy in obs_dims
        for n in steps
        for m in methods
        for s in seeds
    ]

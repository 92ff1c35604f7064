"""Exact samplers under informative likelihoods: noise levels 1e-1 .. 1e-4 (issue #15).

The README's Gaussian mixture in ``d`` dimensions (weights 0.3 / 0.7, means at ``-2`` and
``+2`` times the ones vector, identity covariances), a ``2 x d`` standard normal operator,
``x*`` drawn from the prior and ``y = A x* + sigma_y n``, for ``sigma_y`` from 1e-1 down to
1e-4 (``sigma_y / s_max`` down to ~3e-5). The posterior and the evidence are exact, so each
cell records the sliced Wasserstein distance to exact posterior draws over its exact floor,
the log-evidence error, the smallest ESS of the run, the genealogy ESS (how many
independent draws the returned cloud is worth, ``info.genealogy_ess``: ``sw / floor`` is
about ``sqrt(N / genealogy_ess)`` when the error is Monte Carlo variance) and whether the
quality check warned. Goal (issue #15): ``sw / floor <= 2`` and ``|d log Z| <= 0.15``; a run
that misses it must at least warn. The method ``default`` is what :func:`bayesfilter_diff.infer`
runs when no sampler is named (:func:`~bayesfilter_diff.samplers.registry.default_sampler`
of the problem: TDS with adaptive steps and, for this linear-Gaussian likelihood, its
conditioned proposal). With ``"likelihood": "custom"`` in the configuration the same
Gaussian noise is given as a ``log_likelihood_fn`` (the path of every non-Gaussian or Pyro
site: the general sampler's, with the Laplace-smoothed twist), against the same exact
answers.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..operators import Dense
from ..priors import GaussianMixture
from ..problem import InverseProblem
from ..samplers.registry import build, default_sampler, parse_label
from ..schedules import VPSchedule
from .grid import run_study, sample_or_diverged
from .report import (
    SW_SETTINGS,
    goal_label,
    markdown_table,
    study_command,
    summarize,
    write_study_report,
)
from .store import ResultStore

__all__ = ["run_noise_levels", "noise_problem", "run_cell"]

QUICK: dict[str, Any] = {
    "methods": ["MCGdiff", "TDS"],
    "dims": [8],
    "noise": [1e-1, 1e-2, 1e-3, 1e-4],
    "steps": 100,
    "N": 1024,
    "seeds": [0, 1],
}
FULL: dict[str, Any] = {
    "methods": ["MCGdiff", "TDS", "TDS[proposal=gradient]"],
    "dims": [8, 80],
    "noise": [1e-1, 1e-2, 1e-3, 1e-4],
    "steps": 100,
    "N": 4096,
    "seeds": [0, 1, 2],
}


def noise_problem(
    d: int,
    noise_std: float,
    seed: int,
    dtype: torch.dtype = torch.float32,
    likelihood: str = "gaussian",
) -> tuple[GaussianMixture, InverseProblem]:
    """The README mixture with a random ``2 x d`` operator, observed at ``noise_std``
    (``likelihood="custom"``: the same Gaussian density as a ``log_likelihood_fn``)."""
    g = torch.Generator().manual_seed(1000 + seed)
    one = torch.ones(d, dtype=dtype)
    gmm = GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=dtype),
        torch.stack([-2 * one, 2 * one]),
        torch.ones(2, dtype=dtype),
    )
    A = Dense(torch.randn(2, d, generator=g, dtype=dtype))
    y = A(gmm.sample(1, g)[0]) + noise_std * torch.randn(2, generator=g, dtype=dtype)
    if likelihood == "custom":
        const = math.log(2 * math.pi * noise_std**2)  # (2 observations: 2 x 1/2 log(...))

        def log_likelihood(x: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
            return -0.5 * ((yy - A(x)) ** 2).sum(-1) / noise_std**2 - const

        return gmm, InverseProblem(A, y, log_likelihood_fn=log_likelihood)
    if likelihood != "gaussian":
        raise ValueError(f"likelihood must be 'gaussian' or 'custom', got {likelihood!r}")
    return gmm, InverseProblem(A, y, noise_std=noise_std)


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """One sampler on one problem, against the exact posterior and evidence."""
    from .. import diagnostics as dg

    gmm, problem = noise_problem(
        cell["d"], cell["noise"], cell["seed"], likelihood=cell.get("likelihood", "gaussian")
    )
    exact_problem = noise_problem(cell["d"], cell["noise"], cell["seed"])[1]
    if cell["method"] == "default":  # what bfd.infer runs with no sampler named
        sampler = default_sampler(problem, cell["steps"])
    else:
        name, overrides = parse_label(cell["method"])  # e.g. "TDS[proposal=gradient]"
        sampler = build(name, cell["steps"], **overrides)
    g = torch.Generator().manual_seed(cell["seed"])
    start = time.perf_counter()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        prior = gmm.diffusion(VPSchedule.linear())
        res, diverged = sample_or_diverged(lambda: sampler.sample(prior, problem, cell["N"], g))
    wall = time.perf_counter() - start
    if res is None:  # raised on non-finite draws: loud, and the goal is missed
        inf = math.inf
        return {"finite": False, "diverged": diverged, "sw_ratio": inf, "warned": 1.0,
                "abs_log_evidence_error": inf, "wall_time": wall}  # fmt: skip
    post = gmm.posterior(exact_problem)
    ref, ref2 = post.sample(10_000, g), post.sample(cell["N"], g)
    xs = torch.stack([res.samples.reshape(ref2.shape).to(ref2.dtype), ref2])
    W = res.weights()
    ws = torch.stack([W, torch.full_like(W, 1.0 / W.numel())])
    sw = dg.sliced_wasserstein(xs, ref, weights_x=ws, num_projections=1000, p=1, generator=g)
    assert res.log_evidence is not None and res.info.min_ess is not None  # exact samplers
    assert res.info.genealogy_ess is not None
    dz = float(res.log_evidence - gmm.log_evidence(exact_problem))
    return {
        "finite": bool(torch.isfinite(res.samples).all()),
        "sw": float(sw[0]),
        "sw_floor": float(sw[1]),
        "sw_ratio": float(sw[0] / sw[1]),
        "log_evidence_error": dz,
        "abs_log_evidence_error": abs(dz),
        "min_ess_fraction": float(res.info.min_ess) / cell["N"],
        "genealogy_ess_fraction": float(res.info.genealogy_ess) / cell["N"],
        "warned": float(bool(res.info.quality)),
        "quality": [q.kind for q in res.info.quality],
        "sampler": type(sampler).__name__,
        "nfe": res.info.nfe,
        "wall_time": wall,
    }


def run_noise_levels(
    out: str | Path,
    full: bool = False,
    progress: bool = True,
    executor: Any = None,
    config: dict | None = None,
) -> dict[str, Any]:
    """Run the study into ``out`` (resumable), write ``report.md``; return the cell
    ``records``, the summary ``rows`` and the report ``text``."""
    cfg = dict(FULL if full else QUICK)
    cfg.update(config or {})
    out = Path(out)
    cells = [
        {
            "study": "noise_levels",
            "method": m,
            "d": d,
            "noise": s,
            "steps": cfg["steps"],
            "N": cfg["N"],
            "seed": seed,
        }
        for d in cfg["dims"]
        for s in cfg["noise"]
        for m in cfg["methods"]
        for seed in cfg["seeds"]
    ]
    if cfg.get("likelihood", "gaussian") != "gaussian":  # (absent: the cells stored before)
        cells = [{**c, "likelihood": cfg["likelihood"]} for c in cells]
    start = time.perf_counter()
    records = run_study(run_cell, cells, ResultStore(out), executor=executor, progress=progress)
    wall = time.perf_counter() - start
    metrics = [
        "sw_ratio",
        "abs_log_evidence_error",
        "min_ess_fraction",
        "genealogy_ess_fraction",
        "warned",
        "nfe",
        "wall_time",
    ]
    rows = summarize(records, ["method", "d", "noise"], metrics)
    for r in rows:
        good = r["sw_ratio"] <= 2 and r["abs_log_evidence_error"] <= 0.15
        good = good and not r["failed"]  # a diverged run (left out of the means) misses it
        r["goal met"] = goal_label(good, r["warned"])
    rows.sort(key=lambda r: (r["d"], cfg["methods"].index(r["method"]), -r["noise"]))
    if cfg.get("likelihood", "gaussian") != "gaussian":
        for r in rows:
            r["method"] = f"{r['method']} ({cfg['likelihood']} likelihood)"
    cmd = study_command("noise", full, config, out, "noise_levels")
    text = write_study_report(
        out,
        "Exact samplers under informative likelihoods",
        cmd,
        len(records),
        wall,
        __doc__,
        f"Settings: {cfg['steps']} steps, N = {cfg['N']}, seeds {cfg['seeds']}; {SW_SETTINGS}.",
        markdown_table(
            rows,
            ["method", "d", "noise", *metrics, "goal met", "n"],
            ci=["sw_ratio", "abs_log_evidence_error"],
        ),
    )
    return {"records": records, "rows": rows, "text": text}

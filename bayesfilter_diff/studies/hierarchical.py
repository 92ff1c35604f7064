"""Hierarchical models through ``bfd.infer``: unknown noise scale and operator gain (issue #16).

The README's mixture in ``d`` dimensions (weights 0.3 / 0.7, means at ``-2`` and ``+2``
times the ones vector, identity covariances), a ``(d/2) x d`` operator ``A`` with
``N(0, 1/d)`` entries, and the Pyro model::

    sigma ~ HalfNormal(1);  gain ~ LogNormal(0, 0.5);  x ~ DiffusionPrior(mixture)
    y ~ Normal(gain * (x @ A.T), sigma)

with ``y`` drawn at ``sigma* = 0.5``, ``gain* = 1.2``. ``bfd.infer(model, y=y)`` runs SMC^2
(``num_theta`` theta-particles, the default inner sampler: TDS with adaptive steps on the
per-theta problems, which ``infer`` reads as one ``PerProblemDense`` operator with
per-problem noise, with the analytic reverse variance). For an identity-covariance mixture ``p(y | sigma, gain)`` is closed
form through the SVD of ``A`` (covariance ``gain^2 A A^T + sigma^2 I``), so the exact
posterior of ``(sigma, gain)`` and the evidence follow by 2-D quadrature, and exact draws
of ``x`` by drawing ``(sigma, gain)`` from the grid and ``x`` from its Gaussian-mixture
posterior. Each cell records, against those exact answers:

- ``w1_sigma`` / ``w1_gain``: the W1 distance of the draws of each hyperparameter to its
  exact posterior in units of its posterior sd (goal <= 0.1), with the floor of as many
  exact draws;
- ``sw_ratio``: the sliced W1 of the ``x`` draws to exact ones over the same floor
  (goal <= 2);
- ``log_evidence_error`` of each model; the report pairs the two priors of a seed (the
  mixture above, ``prior = "true"``, and one with means at ``-1`` / ``+1`` and equal
  weights, ``"alt"``) into a log Bayes factor and its error (goal <= 0.1 nats);
- wall time, network evaluations per inner particle, acceptance of the moves, theta-ESS,
  ``distinct``: the fraction of the K joint draws that differ (not recorded before 2026-12-04: —).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..schedules import VPSchedule
from .grid import run_study
from .report import (
    SW_SETTINGS,
    markdown_table,
    mean_ci,
    study_command,
    summarize,
    write_study_report,
)
from .store import ResultStore

__all__ = ["run_hierarchical", "HierSetup", "hier_setup", "exact_grid", "run_cell"]

QUICK: dict[str, Any] = {
    "dims": [8],
    "priors": ["true", "alt"],
    "K": 128,
    "N": 128,
    "moves": 3,
    "steps": 100,
    "seeds": [0],
}
FULL: dict[str, Any] = {
    "dims": [8, 80],
    "priors": ["true", "alt"],
    "K": 256,
    "N": 128,
    "moves": 3,
    "steps": 100,
    "seeds": [0, 1, 2],
}
#: the inner sampler's settings besides TDS's defaults (``registry.default_sampler``'s); a
#: config ``"inner"`` replaces them (recorded in the cell)
INNER: dict[str, Any] = {"adaptive_ess": 0.1, "reverse_variance": "analytic"}
SIGMA_TRUE, GAIN_TRUE = 0.5, 1.2
D64 = torch.float64


class HierSetup:
    """The problem of one cell: mixture parameters, operator, data, hyper-priors."""

    def __init__(self, d: int, prior: str, seed: int, dtype: torch.dtype = torch.float32):
        g = torch.Generator().manual_seed(2000 + seed)
        self.d, self.m = d, max(d // 2, 1)
        one = torch.ones(d, dtype=D64)
        self.true_weights = torch.tensor([0.3, 0.7], dtype=D64)
        self.true_means = torch.stack([-2 * one, 2 * one])
        if prior == "true":
            self.weights, self.means = self.true_weights, self.true_means
        elif prior == "alt":
            self.weights = torch.tensor([0.5, 0.5], dtype=D64)
            self.means = torch.stack([-one, one])
        else:
            raise ValueError(f"prior must be 'true' or 'alt', got {prior!r}")
        self.A = torch.randn(self.m, d, generator=g, dtype=D64) / math.sqrt(d)
        # data from the true mixture, whichever prior the cell assumes
        k = int(torch.multinomial(self.true_weights, 1, generator=g))
        x = self.true_means[k] + torch.randn(d, generator=g, dtype=D64)
        self.y = GAIN_TRUE * (self.A @ x) + SIGMA_TRUE * torch.randn(self.m, generator=g, dtype=D64)
        self.dtype = dtype
        self.sigma_prior = torch.distributions.HalfNormal(torch.tensor(1.0, dtype=D64))
        self.gain_prior = torch.distributions.LogNormal(
            torch.tensor(0.0, dtype=D64), torch.tensor(0.5, dtype=D64)
        )
        U, s, Vh = torch.linalg.svd(self.A, full_matrices=False)
        self.U, self.s, self.Vh = U, s, Vh

    # -------------------------------------------------------------- exact pieces
    def log_likelihood(self, sigma: Tensor, gain: Tensor) -> Tensor:
        """``log p(y | sigma, gain)`` for tensors of any (common) shape, float64."""
        sig2 = sigma.double()[..., None] ** 2
        g = gain.double()[..., None]
        lam = g**2 * self.s**2 + sig2  # (..., m): covariance eigenvalues along U
        Am = self.means @ self.A.T  # (K, m)
        r = (self.y - g[..., None, :] * Am) @ self.U  # (..., K, m)
        quad = (r**2 / lam[..., None, :]).sum(-1)
        logdet = torch.log(lam).sum(-1)[..., None]
        ll = -0.5 * (quad + logdet + self.m * math.log(2 * math.pi))
        return torch.logsumexp(torch.log(self.weights) + ll, -1)

    def x_posterior_draws(self, sigma: Tensor, gain: Tensor, gen: torch.Generator) -> Tensor:
        """One exact draw of ``x | y, sigma_i, gain_i`` per pair, ``(n, d)``."""
        sig2 = sigma.double()[:, None] ** 2
        g = gain.double()[:, None]
        lam = g**2 * self.s**2 + sig2  # (n, m)
        Am = self.means @ self.A.T
        r = (self.y - g[:, None, :] * Am) @ self.U  # (n, K, m)
        ll = -0.5 * ((r**2 / lam[:, None]).sum(-1) + torch.log(lam).sum(-1, keepdim=True))
        k = torch.multinomial(torch.softmax(torch.log(self.weights) + ll, -1), 1, generator=gen)
        mu = self.means[k[:, 0]]  # (n, d)
        # x | k: mean mu + V diag(g s / lam) U^T (y - g A mu), covariance
        # V diag(sigma^2 / lam) V^T + (I - V V^T): stable as sigma -> 0
        rk = (self.y - g * (mu @ self.A.T)) @ self.U  # (n, m)
        mean = mu + (rk * g * self.s / lam) @ self.Vh
        c = sig2 / lam  # (n, m)
        z = torch.randn(mean.shape, generator=gen, dtype=D64)
        zv = z @ self.Vh.T
        return mean + z - zv @ self.Vh + (c.sqrt() * zv) @ self.Vh

    def model(self, device: str | torch.device = "cpu"):
        """The Pyro model (module docstring), with the cell's prior, its parameters on
        ``device``."""
        import pyro
        import pyro.distributions as dist

        from ..distributions import DiffusionPrior
        from ..priors import GaussianMixture

        dt = self.dtype
        gmm = GaussianMixture(
            self.weights.to(dt), self.means.to(dt), torch.ones(2, dtype=dt), validate=False
        ).to(device)
        diffusion = gmm.diffusion(VPSchedule.linear())
        A = self.A.to(dtype=dt, device=device)
        one = torch.tensor(1.0, dtype=dt, device=device)

        def model(y=None):
            sigma = pyro.sample("sigma", dist.HalfNormal(one))
            gain = pyro.sample("gain", dist.LogNormal(0.0 * one, 0.5 * one))
            x = pyro.sample("x", DiffusionPrior(diffusion))
            pyro.sample("y", dist.Normal(gain * (x @ A.T), sigma).to_event(1), obs=y)

        return model


def hier_setup(d: int, prior: str, seed: int) -> HierSetup:
    return HierSetup(d, prior, seed)


def exact_grid(setup: HierSetup, n: int = 400) -> dict[str, Tensor | float]:
    """The exact posterior of ``(sigma, gain)`` on a grid (two passes: a wide log grid to
    find the mass, then an ``n x n`` linear grid over it) and ``log p(y)``."""

    def log_post(s: Tensor, g: Tensor) -> Tensor:
        S, G = torch.meshgrid(s, g, indexing="ij")
        lp = setup.sigma_prior.log_prob(S) + setup.gain_prior.log_prob(G)
        return lp + setup.log_likelihood(S, G)

    wide_s = torch.logspace(-4, 1.5, 300, dtype=D64)
    wide_g = torch.logspace(-2, 1.5, 300, dtype=D64)
    lp = log_post(wide_s, wide_g)
    keep = lp > lp.max() - 30
    si, gi = keep.any(1).nonzero().flatten(), keep.any(0).nonzero().flatten()
    # sigma's posterior may reach 0 (m < d: y can be fit without noise): start there
    lo_s = 0.0 if int(si.min()) <= 1 else float(wide_s[int(si.min()) - 1])
    hi_s = float(wide_s[min(int(si.max()) + 1, 299)])
    lo_g, hi_g = (
        float(wide_g[max(int(gi.min()) - 1, 0)]),
        float(wide_g[min(int(gi.max()) + 1, 299)]),
    )
    # cell midpoints (draws jitter within the cells, which stay >= lo)
    ds, dg = (hi_s - lo_s) / n, (hi_g - lo_g) / n
    s = lo_s + (torch.arange(n, dtype=D64) + 0.5) * ds
    g = lo_g + (torch.arange(n, dtype=D64) + 0.5) * dg
    lp = log_post(s, g)
    log_z = float(torch.logsumexp(lp.flatten(), 0)) + math.log(ds * dg)
    return {"s": s, "g": g, "log_post": lp, "log_evidence": log_z, "ds": ds, "dg": dg}


def exact_draws(
    setup: HierSetup, grid: dict[str, Any], n: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` exact joint draws ``(sigma, gain, x)``: a grid cell by its mass, uniform
    within it, then ``x`` from its conditional posterior."""
    w = torch.softmax(grid["log_post"].flatten(), 0)
    idx = torch.multinomial(w, n, replacement=True, generator=gen)
    ng = grid["g"].numel()
    sig = grid["s"][idx // ng] + (torch.rand(n, generator=gen, dtype=D64) - 0.5) * grid["ds"]
    gain = grid["g"][idx % ng] + (torch.rand(n, generator=gen, dtype=D64) - 0.5) * grid["dg"]
    return sig, gain, setup.x_posterior_draws(sig, gain, gen)


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """SMC^2 through ``bfd.infer`` on one cell, against the exact answers."""
    from .. import diagnostics as dg
    from ..inference import HierarchicalPosterior
    from ..inference.posterior import infer
    from ..samplers.registry import build

    setup = HierSetup(cell["d"], cell["prior"], cell["seed"])
    device = torch.device(cell.get("device", "cpu"))
    gen = torch.Generator().manual_seed(cell["seed"])
    # on a device, SMC^2 takes a generator there; the exact answers stay on the CPU with
    # their own (on the CPU one generator serves both, as the stored cells were computed)
    run_gen = gen if device.type == "cpu" else torch.Generator(device).manual_seed(cell["seed"])
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        post = infer(
            setup.model(device),
            # the default inner sampler (registry.default_sampler) at the cell's steps, or
            # the cell's own inner settings
            build("TDS", cell["steps"], **cell.get("inner", INNER)),
            y=setup.y.to(dtype=setup.dtype, device=device),
            num_samples=cell["N"],
            num_theta=cell["K"],
            moves=cell["moves"],
            generator=run_gen,
        )
    wall = time.perf_counter() - start
    assert isinstance(post, HierarchicalPosterior)
    grid = exact_grid(setup)
    ref_s, ref_g, ref_x = exact_draws(setup, grid, 20_000, gen)
    K = cell["K"]
    floor_s, floor_g, floor_x = exact_draws(setup, grid, K, gen)
    sd_s, sd_g = float(ref_s.std()), float(ref_g.std())
    sig, gain = post.theta["sigma"].double().cpu(), post.theta["gain"].double().cpu()

    def w1(u: Tensor, v: Tensor) -> float:
        return float(dg.wasserstein_1d(u, v, p=1))

    xs = torch.stack([post.x.double().cpu(), floor_x])
    sw = dg.sliced_wasserstein(xs, ref_x, num_projections=1000, p=1, generator=gen)
    dz = float(post.log_evidence) - float(grid["log_evidence"])
    return {
        "finite": bool(torch.isfinite(post.x).all()),
        # the fraction of the K joint draws that differ (recorded since 2026-12-04)
        "distinct": post.distinct / K,
        "w1_sigma": w1(sig, ref_s) / sd_s,
        "w1_sigma_floor": w1(floor_s, ref_s) / sd_s,
        "w1_gain": w1(gain, ref_g) / sd_g,
        "w1_gain_floor": w1(floor_g, ref_g) / sd_g,
        "sigma_mean": float(sig.mean()),
        "sigma_exact": float(ref_s.mean()),
        "gain_mean": float(gain.mean()),
        "gain_exact": float(ref_g.mean()),
        "sw": float(sw[0]),
        "sw_floor": float(sw[1]),
        "sw_ratio": float(sw[0] / sw[1]),
        "log_evidence": float(post.log_evidence),
        "exact_log_evidence": float(grid["log_evidence"]),
        "log_evidence_error": dz,
        "abs_log_evidence_error": abs(dz),
        "theta_ess": post.theta_ess,
        "acceptance": float(sum(post.acceptance) / max(len(post.acceptance), 1)),
        "warned": float(any("PosteriorQuality" in type(w.message).__name__ for w in caught)),
        "sampler": type(post.sampler).__name__,
        "nfe": post.nfe,
        "wall_time": wall,
    }


def bayes_factor_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dimension: the log Bayes factor ``true`` vs ``alt`` of each seed, its error
    against the exact one, mean and 95% interval over seeds."""
    by: dict[tuple[int, int, int], dict[str, dict[str, Any]]] = {}
    for r in records:
        c = r["cell"]
        by.setdefault((c["d"], c["steps"], c["seed"]), {})[c["prior"]] = r
    rows = []
    for d, steps in sorted({k[:2] for k in by}):
        est, exact, err = [], [], []
        for (dd, ss, _), pair in sorted(by.items()):
            if (dd, ss) != (d, steps) or not {"true", "alt"} <= set(pair):
                continue
            e = pair["true"]["log_evidence"] - pair["alt"]["log_evidence"]
            x = pair["true"]["exact_log_evidence"] - pair["alt"]["exact_log_evidence"]
            est.append(e)
            exact.append(x)
            err.append(e - x)
        if not err:
            continue
        m, ci, n = mean_ci(err)
        rows.append(
            {
                "d": d,
                "steps": steps,
                "log BF (SMC^2)": mean_ci(est)[0],
                "log BF (exact)": mean_ci(exact)[0],
                "error": m,
                "error_ci": ci,
                "abs error": mean_ci([abs(v) for v in err])[0],
                "goal met": "yes" if mean_ci([abs(v) for v in err])[0] <= 0.1 else "no",
                "n": n,
            }
        )
    return rows


def run_hierarchical(
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
            "study": "hierarchical",
            "d": d,
            "prior": p,
            "K": cfg["K"],
            "N": cfg["N"],
            "moves": cfg["moves"],
            "steps": cfg["steps"],
            "seed": seed,
            **({"inner": cfg["inner"]} if "inner" in cfg else {}),
            # "device": "cuda" runs SMC^2 there (cells on the CPU keep their keys)
            **({"device": cfg["device"]} if cfg.get("device", "cpu") != "cpu" else {}),
        }
        for d in cfg["dims"]
        for seed in cfg["seeds"]
        for p in cfg["priors"]
    ]
    start = time.perf_counter()
    store = ResultStore(out)
    run_study(run_cell, cells, store, executor=executor, progress=progress)
    wall = time.perf_counter() - start
    # the report covers every stored cell (invocations with other steps / dims add rows)
    records = [r for r in store.records() if r["cell"].get("study") == "hierarchical"]
    metrics = [
        "w1_sigma",
        "w1_sigma_floor",
        "w1_gain",
        "w1_gain_floor",
        "sw_ratio",
        "abs_log_evidence_error",
        "theta_ess",
        "acceptance",
        "distinct",  # recorded since 2026-12-04 (earlier cells: —)
        "warned",
        "nfe",
        "wall_time",
    ]
    rows = summarize(records, ["d", "steps", "prior"], metrics)
    for r in rows:
        good = r["w1_sigma"] <= 0.1 and r["w1_gain"] <= 0.1 and r["sw_ratio"] <= 2
        r["goal met"] = "yes" if good else ("no, warned" if r["warned"] > 0 else "no")
    rows.sort(key=lambda r: (r["d"], r["steps"], r["prior"]))
    bf = bayes_factor_rows(records)
    cmd = study_command("hierarchical", full, config, out, "hierarchical")
    table = markdown_table(
        rows,
        ["d", "steps", "prior", *metrics, "goal met", "n"],
        ci=["w1_sigma", "w1_gain", "sw_ratio", "abs_log_evidence_error"],
    )
    bf_table = markdown_table(
        bf,
        ["d", "steps", "log BF (SMC^2)", "log BF (exact)", "error", "abs error", "goal met", "n"],
        ci=["error"],
    )
    text = write_study_report(
        out,
        "Hierarchical models: unknown noise scale and gain by SMC^2",
        cmd,
        len(records),
        wall,
        __doc__,
        f"Settings: K = {cfg['K']} theta-particles of N = {cfg['N']} inner particles, "
        f"{cfg['moves']} particle-marginal moves per tempering level, seeds {cfg['seeds']} "
        f"(fewer where n says so), inner TDS at the steps of each row with "
        f"{cfg.get('inner', INNER)} (TDS's own defaults otherwise); "
        f"floors: as many exact draws as theta-particles; {SW_SETTINGS}.",
        table
        + "\n\nLog Bayes factor, prior `true` vs `alt` (goal: mean |error| <= 0.1 nats):\n\n"
        + bf_table,
    )
    return {"records": records, "rows": rows, "bayes_factors": bf, "text": text}

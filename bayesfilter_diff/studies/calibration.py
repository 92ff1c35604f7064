"""Calibration study: simulation-based calibration (SBC) and coverage for every sampler.

For a prior mixture in ``d = 2`` and ``d = 8`` (3 components), a fixed random operator
(``d_y = 1``) and ``sigma_y = 0.5``, each cell simulates ``B`` replicates ``x* ~ p(x)``,
``y = A x* + sigma_y n`` (one batched problem of ``B`` observations), runs a sampler, takes
``N`` equally weighted draws per replicate and records the SBC ranks of ``x*`` (per
coordinate and along 4 random directions) and whether ``x*`` falls in the central credible
intervals at levels 0.5, 0.8, 0.9, 0.95. Ranks are uniform and coverage nominal for an
exact sampler (Talts et al. 2018); a U-shaped histogram / low coverage flags
over-confidence.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from ..priors.gmm import GaussianMixture
from ..problem import InverseProblem
from ..samplers.registry import build, entry, names, parse_label
from ..schedules import FlowSchedule, VPSchedule
from .grid import run_study, sample_or_diverged
from .report import markdown_table, study_command, write_text
from .store import ResultStore

__all__ = ["run_calibration", "calibration_problem"]

LEVELS = (0.5, 0.8, 0.9, 0.95)
#: ``draws``: ``"auto"`` (default) takes a weighted sampler's draws one from each of ``runs``
#: independent runs of ``particles`` particles and an unweighted sampler's ``N`` draws from
#: one run (its particles are independent); ``"runs"`` / ``"cloud"`` do one or the other for
#: every sampler (``"runs"``: ``N`` runs of ``particles``; ``"cloud"``: ``N`` draws resampled
#: from one run of ``4 N`` particles).
QUICK: dict[str, Any] = {
    "dims": [2],
    "replicates": 100,
    "chunk": 50,
    "N": 99,
    "steps": 50,
    "draws": "auto",
    "runs": 19,
    "particles": 100,
}
FULL: dict[str, Any] = {
    "dims": [2, 8],
    "replicates": 400,
    "chunk": 100,
    "N": 99,
    "steps": 100,
    "draws": "auto",
    "runs": 19,
    "particles": 396,
}
_DRAWS = ("auto", "runs", "cloud")


def _seed(*parts) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def calibration_prior(d: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(_seed("calibration-prior", d))
    means = 3.0 * torch.randn(3, d, generator=g, dtype=torch.float64)
    return GaussianMixture(
        torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        means,
        torch.tensor([1.0, 0.5, 0.8], dtype=torch.float64),
    )


def calibration_problem(d: int, chunk: int, B: int):
    """``(prior, problem, x_true)`` for replicate chunk ``chunk`` (``B`` replicates)."""
    from ..operators import Dense

    gmm = calibration_prior(d)
    g0 = torch.Generator().manual_seed(_seed("calibration-operator", d))
    A = Dense(torch.randn(1, d, generator=g0, dtype=torch.float64) / d**0.5)
    g = torch.Generator().manual_seed(_seed("calibration-replicates", d, chunk))
    x = gmm.sample(B, g)
    y = A(x) + 0.5 * torch.randn(B, 1, generator=g, dtype=torch.float64)
    return gmm, InverseProblem(A, y, 0.5), x


def _cell(cell: dict[str, Any]) -> dict[str, Any]:
    from ..diagnostics import coverage, sbc_ranks

    gmm, problem, x = calibration_problem(cell["d"], cell["chunk"], cell["B"])
    name, overrides = parse_label(cell["method"])  # e.g. "TDS[proposal=gradient]"
    spec = entry(name)
    prior = gmm.diffusion(FlowSchedule() if spec.path == "flow" else VPSchedule.linear())
    g = torch.Generator().manual_seed(
        _seed("calibration-run", cell["method"], cell["d"], cell["chunk"])
    )
    sampler = build(name, cell["steps"], **overrides)
    runs = cell.get("draws", "cloud") == "runs"
    if runs:
        # one draw from each of N independent runs per replicate (B * N batched problems):
        # SBC's ranks are uniform only for independent draws, and draws resampled from one
        # SMC cloud share ancestors (Talts et al. 2018, section 5: correlated draws give
        # spurious U-shapes)
        y = problem.y.repeat_interleave(cell["N"], 0)
        problem, particles = (
            InverseProblem(problem.operator, y, problem.noise_std),
            cell["particles"],
        )
    else:
        particles = cell["N"] * 4
    res, diverged = sample_or_diverged(lambda: sampler.sample(prior, problem, particles, g))
    if res is None:
        return {"finite": False, "diverged": diverged}
    if runs:
        draws = res.draws(1, generator=g).reshape(cell["B"], cell["N"], cell["d"])
    else:
        draws = res.draws(cell["N"], generator=g)
    if not torch.isfinite(draws).all():
        return {"finite": False}
    dirs = torch.nn.functional.normalize(
        torch.randn(
            4,
            cell["d"],
            generator=torch.Generator().manual_seed(_seed("dirs", cell["d"])),
            dtype=torch.float64,
        ),
        dim=-1,
    )
    ranks = sbc_ranks(x, draws, projections=dirs)
    cov = coverage(x, draws, levels=LEVELS, projections=dirs)  # (L, S) fractions over B
    return {"finite": True, "ranks": ranks.tolist(), "coverage": cov.tolist(), "B": cell["B"]}


def run_calibration(
    out: str | Path,
    full: bool = False,
    methods: list[str] | None = None,
    progress: bool = True,
    executor: Any = None,
    config: dict | None = None,
):
    """Run the study into ``out`` (resumable); write ``report.md`` and rank-histogram figures."""
    from ..diagnostics import rank_uniformity_test

    cfg = dict(FULL if full else QUICK)
    cfg.update(config or {})
    if cfg["draws"] == "runs" and "particles" not in (config or {}):
        cfg["particles"] = 4 * cfg["N"]  # (the explicit mode's own default)
    named = list(methods) if methods else None
    methods = methods or [m for m in names(studies=True, mask=False) if m != "D-Flow"]
    out = Path(out)
    store = ResultStore(out)
    nchunks = cfg["replicates"] // cfg["chunk"]
    cells = [
        {
            "study": "calibration",
            "method": m,
            "d": d,
            "chunk": c,
            "seed": c,
            "B": cfg["chunk"],
            "N": cfg["N"],
            "steps": cfg["steps"],
        }
        for d in cfg["dims"]
        for m in methods
        for c in range(nchunks)
    ]
    if cfg["draws"] not in _DRAWS:
        raise ValueError(f"config 'draws' must be one of {_DRAWS}, got {cfg['draws']!r}")
    # (only then in the cell: the cloud cells keep their keys, so their stored results)
    for cell in cells:
        mode = _mode(cfg, cell["method"])
        if mode == "runs":
            n = cfg["N"] if cfg["draws"] == "runs" else cfg["runs"]
            cell.update(draws="runs", N=n, particles=cfg["particles"])
    start = time.perf_counter()
    records = run_study(_cell, cells, store, executor=executor, progress=progress)
    wall = time.perf_counter() - start
    rows, hists = [], {}
    for d in cfg["dims"]:
        for m in methods:
            rs = [r for r in records if r["cell"]["method"] == m and r["cell"]["d"] == d]
            if not all(r.get("finite") for r in rs):
                rows.append(
                    {
                        "method": m,
                        "d": d,
                        "exact": "yes" if entry(parse_label(m)[0]).exact else "no",
                        "sbc_pvalue": float("nan"),
                        "note": "non-finite draws",
                    }
                )
                continue
            ranks = torch.tensor([row for r in rs for row in r["ranks"]])
            cov = torch.stack([torch.tensor(r["coverage"]) for r in rs]).mean(0)  # (L, S)
            n = rs[0]["cell"]["N"]  # the draws per replicate (the rank's range is 0..n)
            test = rank_uniformity_test(ranks, n, generator=torch.Generator().manual_seed(0))
            row = {
                "method": m,
                "d": d,
                "exact": "yes" if entry(parse_label(m)[0]).exact else "no",
                "draws": (
                    f"1 from each of {n} runs"
                    if rs[0]["cell"].get("draws") == "runs"
                    else f"{n} from one run"
                ),
                "sbc_pvalue": test.pvalue,
                "verdict": "uniformity not rejected" if test.pvalue > 0.01 else "miscalibrated",
            }
            for i, lv in enumerate(LEVELS):
                row[f"cov@{lv}"] = float(cov[i].mean())
            rows.append(row)
            hists[(m, d)] = (ranks, n)
    figs = _figures(hists, cfg, out)
    cmd = study_command("calibration", full, config, out, "calibration")
    if named:
        cmd += f" --methods '{','.join(named)}'"
    cols = ["method", "d", "exact", "draws", "sbc_pvalue", "verdict"]
    cols += [f"cov@{lv}" for lv in LEVELS]
    text = "\n".join(
        [
            "# Calibration: SBC ranks and coverage of every sampler",
            "",
            f"Command: `{cmd}`; {len(records)} cells ({wall:.0f} s computed in this invocation).",
            f"Setting: 3-component mixture priors in d in {cfg['dims']}, Dense operator d_y = 1, "
            f"sigma_y = 0.5, {cfg['replicates']} replicates per method, "
            f"{cfg['steps']} steps (D-Flow is left out: its cost per draw is thousands of NFEs).",
            "",
            "`sbc_pvalue`: Bonferroni-combined p-value of chi-square and KS uniformity tests over the "
            "statistics (coordinates and 4 random projections); below 0.01 the ranks are not "
            "uniform. `cov@a`: average over statistics of the fraction of x* inside the central "
            f"a-credible interval (nominal a; binomial sd at a = 0.9: "
            f"{(0.09 / cfg['replicates']) ** 0.5:.3f}).",
            _draws_note(cfg),
            "",
            markdown_table(rows, cols),
            "",
        ]
        + [f"![{f.stem}]({f.name})" for f in figs]
        + [""]
    )
    write_text(out / "report.md", text)
    return {"rows": rows, "text": text, "report": out / "report.md"}


def _mode(cfg: dict[str, Any], method: str) -> str:
    """``"runs"`` or ``"cloud"``: how ``method``'s draws are taken under ``cfg["draws"]``."""
    if cfg["draws"] == "auto":
        return "runs" if entry(parse_label(method)[0]).weighted else "cloud"
    return str(cfg["draws"])


def _draws_note(cfg: dict[str, Any]) -> str:
    """How the draws were taken, and the coverage an exact sampler has with that many."""
    n, draws = cfg["N"], cfg["draws"]
    runs = cfg["runs"] if draws == "auto" else n
    one_run = f"{n} draws resampled from one run of {4 * n} particles per replicate"  # (_cell)
    if draws == "cloud":
        text = (
            f"Draws: every sampler's {one_run}; a weighted sampler's draws then share "
            "ancestors, which widens the rank histogram of an exact sampler (`draws: runs` or "
            "`auto` in the config takes one draw per independent run)."
        )
    else:
        who = "a weighted (SMC) sampler's" if draws == "auto" else "every sampler's"
        text = (
            f"Draws: {who} draws are one from each of {runs} independent runs per replicate "
            f"({cfg['particles']} particles each), so they are independent (SBC assumes "
            "independent draws; draws resampled from one SMC cloud share ancestors, which "
            "U-shapes an exact sampler's ranks: Talts et al. 2018, section 5)."
        )
        if draws == "auto":
            # resampling independent, equally weighted particles keeps x*'s rank uniform
            text += f" An unweighted sampler's: {one_run} (its particles are independent)."
    for k in sorted({runs, n}):
        cap = (k - 1) / (k + 1)
        high = [lv for lv in LEVELS if lv > cap]
        if high:
            text += (
                f" With {k} draws the widest interval is [min, max], which an exact sampler's "
                f"x* falls in with probability {cap:.3f}: the expected coverage at "
                f"{', '.join(map(str, high))} is {cap:.3f}, not the level."
            )
    return text


def _figures(hists, cfg, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    for d in cfg["dims"]:
        items = [(m, r) for (m, dd), r in hists.items() if dd == d]
        if not items:
            continue
        cols = min(5, len(items))
        nrows = -(-len(items) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.6 * nrows), squeeze=False)
        for ax in axes.flat[len(items) :]:
            ax.axis("off")
        for ax, (m, (r, n)) in zip(axes.flat, items):
            u = ((r[:, 0].double() + 0.5) / (n + 1)).numpy()  # rank 0..n
            ax.hist(
                u,
                bins=min(10, n + 1),
                range=(0, 1),
                color="tab:green" if entry(parse_label(m)[0]).exact else "tab:gray",
            )
            ax.axhline(len(u) / 10, color="k", lw=1, ls="--")
            ax.set_title(m, fontsize=9)
            ax.set_yticks([])
        fig.suptitle(f"SBC rank histograms of coordinate 0, d={d} (flat = calibrated)")
        fig.tight_layout()
        p = out / f"sbc_ranks_d{d}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        figs.append(p)
    return figs

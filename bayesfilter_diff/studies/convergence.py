"""Convergence in the number of particles N of the SMC samplers (TDS, MCGdiff, FPS-SMC).

On benchmark problems (``gmm_benchmark``) each cell runs one sampler with ``N`` particles
and records the weighted sliced Wasserstein distance to exact posterior draws, the
exact-vs-exact floor for ``N`` draws, the mixture-weight error and the log-evidence error.
The report gives, per method and problem size, these metrics against ``N`` and the
least-squares slope of ``log(metric)`` on ``log N`` (``-1/2`` is the Monte Carlo rate;
a slope that flattens means a bias that more particles do not remove: time
discretisation, or a method whose target is not the posterior).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from . import gmm_benchmark as gb
from .grid import run_study
from .report import markdown_table, study_command, summarize, write_text
from .store import ResultStore

__all__ = ["run_convergence", "slope"]

QUICK: dict[str, Any] = {
    "methods": ["MCGdiff", "TDS", "FPS-SMC"],
    "dims": [8],
    "obs_dims": [1],
    "steps": 50,
    "Ns": [64, 256, 1024],
    "seeds": [0, 1],
}
FULL: dict[str, Any] = {
    "methods": ["MCGdiff", "TDS", "FPS-SMC"],
    "dims": [8, 80],
    "obs_dims": [1, 2, 4],
    "steps": 50,
    "Ns": [64, 256, 1024, 4096],
    "seeds": [0, 1, 2],
}


def slope(ns: list[float], values: list[float]) -> float:
    """Least-squares slope of ``log(values)`` on ``log(ns)`` (NaN if undefined)."""
    pts = [
        (math.log(n), math.log(v)) for n, v in zip(ns, values) if v and v > 0 and math.isfinite(v)
    ]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else math.nan


def run_convergence(
    out: str | Path,
    full: bool = False,
    progress: bool = True,
    executor: Any = None,
    config: dict | None = None,
) -> dict[str, Any]:
    """Run the study into ``out`` (resumable) and write ``report.md`` and a figure."""
    cfg = dict(FULL if full else QUICK)
    cfg.update(config or {})
    out = Path(out)
    store = ResultStore(out)
    cells = [
        {
            "study": "convergence",
            "method": m,
            "d": d,
            "d_y": dy,
            "steps": cfg["steps"],
            "seed": s,
            "N": n,
            "device": "cpu",
            "num_reference": 10_000,
            "num_projections": 1000,
        }
        for d in cfg["dims"]
        for dy in cfg["obs_dims"]
        for m in cfg["methods"]
        for n in cfg["Ns"]
        for s in cfg["seeds"]
    ]
    start = time.perf_counter()
    records = run_study(gb.run_cell, cells, store, executor=executor, progress=progress)
    wall = time.perf_counter() - start
    for r in records:
        if "log_evidence_error" in r:
            r["abs_log_evidence_error"] = abs(r["log_evidence_error"])
    metrics = ["sw", "sw_floor", "weight_tv", "abs_log_evidence_error", "ess", "wall_time"]
    rows = summarize(records, ["method", "d", "d_y", "N"], metrics)
    rows.sort(key=lambda r: (r["d"], r["d_y"], cfg["methods"].index(r["method"]), r["N"]))
    slopes = []
    for d in cfg["dims"]:
        for dy in cfg["obs_dims"]:
            for m in cfg["methods"]:
                rs = [r for r in rows if (r["method"], r["d"], r["d_y"]) == (m, d, dy)]
                ns = [r["N"] for r in rs]
                slopes.append(
                    {
                        "method": m,
                        "d": d,
                        "d_y": dy,
                        "sw_slope": slope(ns, [r["sw"] for r in rs]),
                        "floor_slope": slope(ns, [r["sw_floor"] for r in rs]),
                        "weight_tv_slope": slope(ns, [r["weight_tv"] for r in rs]),
                        "evidence_error_slope": slope(
                            ns, [r["abs_log_evidence_error"] for r in rs]
                        ),
                        "sw_at_max_N / floor": rs[-1]["sw"] / rs[-1]["sw_floor"]
                        if rs
                        else math.nan,
                    }
                )
    fig = _figure(rows, cfg, out)
    cmd = study_command("convergence", full, config, out, "smc_convergence")
    text = "\n".join(
        [
            "# Convergence of the SMC samplers in the number of particles",
            "",
            f"Command: `{cmd}`; {len(records)} cells ({wall:.0f} s computed in this invocation).",
            f"Problems: the Gaussian-mixture benchmark, d in {cfg['dims']}, d_y in {cfg['obs_dims']}, "
            f"{cfg['steps']} steps, seeds {cfg['seeds']}, N in {cfg['Ns']}. Metrics as in the "
            "benchmark report (sliced W1 with 1000 directions against 10 000 exact draws; "
            "`sw_floor` = the same for N exact draws; `abs_log_evidence_error` = |estimate - exact "
            "log p(y)|; FPS-SMC reports no estimate of log p(y)).",
            "",
            "## Fitted slopes of log(metric) on log(N)",
            "",
            "The floor falls at the Monte Carlo rate; a sampler whose distance keeps the floor's "
            "slope converges to the posterior, one whose slope flattens has a bias (at this number "
            "of steps) that particles do not remove.",
            "",
            markdown_table(
                slopes,
                [
                    "method",
                    "d",
                    "d_y",
                    "sw_slope",
                    "floor_slope",
                    "weight_tv_slope",
                    "evidence_error_slope",
                    "sw_at_max_N / floor",
                ],
            ),
            "",
            "## Metrics by N (mean ± 95% interval over seeds)",
            "",
            markdown_table(
                rows,
                [
                    "method",
                    "d",
                    "d_y",
                    "N",
                    "sw",
                    "sw_floor",
                    "weight_tv",
                    "abs_log_evidence_error",
                    "ess",
                    "wall_time",
                ],
                ci=["sw", "weight_tv", "abs_log_evidence_error"],
            ),
            "",
            f"![distance vs particles]({fig.name})",
            "",
        ]
    )
    write_text(out / "report.md", text)
    return {"rows": rows, "slopes": slopes, "text": text, "report": out / "report.md"}


def _figure(rows, cfg, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..diagnostics import plot_distance_vs_particles

    configs = [(d, dy) for d in cfg["dims"] for dy in cfg["obs_dims"]]
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.8), squeeze=False)
    for ax, (d, dy) in zip(axes[0], configs):
        curves = {}
        floor = None
        for m in cfg["methods"]:
            rs = [r for r in rows if (r["method"], r["d"], r["d_y"]) == (m, d, dy)]
            curves[m] = [r["sw"] for r in rs]
            floor = [r["sw_floor"] for r in rs]
        plot_distance_vs_particles(cfg["Ns"], curves, floor=floor, ax=ax, ylabel="sliced W1")
        ax.set_title(f"d={d}, d_y={dy}")
    fig.tight_layout()
    p = out / "distance_vs_particles.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p

"""Independent runs against each other (session 35): ``diagnostics.runs_check`` and
``bfd.infer(..., runs=R)`` where the runs are right, and on a rare prior mode that the
default sampler misses silently in some runs.

Cells (one JSON line each in ``validation/results/runs_check/cells.jsonl``, written as they
finish; a rerun skips the cells already there):

- ``healthy``: the README mixture (d = 8, a ``2 x 8`` operator, ``sigma_y = 0.1``), ``R = 4``
  copies of N = 1024 in one batch, the default TDS for the problem with evidence
  (``default_sampler(problem, evidence=True)``), 30 batches; ``healthy_mcgdiff``: MCGdiff
  (100 steps), 8 batches;
- ``smcdiff``: SMCDiff (100 steps) on its probe problem (d = 8, modes at +-5 with weights
  0.3 / 0.7, one coordinate observed at 0, noise 0.1), whose particles share one noised path
  of y per run (its ``shared_draw`` finding), ``R = 4`` copies of N = 2000, 6 batches;
  ``smcdiff_tds``: TDS (analytic kernel) on the same copies;
- ``rare_operator``: the rare-mode problem below, the same sampler, ``R = 4`` copies of
  N = 2048, 12 batches;
- ``rare_infer``: ``bfd.infer``'s default on it (one run, N = 2048), seeds 0-15;
- ``rare_infer_runs4``: ``bfd.infer(..., runs=4)``, seeds 0-5;
- ``rare_infer_split2``: ``bfd.infer(..., runs=2)`` with N = 1024 per run (the particles of
  one run of 2048, split), seeds 0-15.

The rare-mode problem: d = 8, prior ``0.999999 N(0, I) + 1e-6 N(m, I)`` with ``m = (8, 5, ...,
5)``, ``x_1`` observed at ``y = 5.46`` with ``sigma_y = 0.1``: the minor mode holds 0.0953 of
the posterior. Each cell records the runs' check (``disagree``, the largest ``Q`` of the
means / variances / evidences, the line, ``error_ratio``), the minor mode's mass (weight of
draws with ``x_2 > 2.5``) and ``x_2``'s mean per run, log-evidences with their reported sd,
and which quality findings were warned.

    OMP_NUM_THREADS=1 python validation/runs_check.py   # ~15 min on one core
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pyro
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.registry import default_sampler

OUT = Path(__file__).resolve().parent / "results" / "runs_check"
CELLS = OUT / "cells.jsonl"


def readme_problem():
    g = torch.Generator().manual_seed(0)
    d = 8
    gmm = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7]),
        torch.stack([-2 * torch.ones(d), 2 * torch.ones(d)]),
        torch.ones(2),
    )
    A = bfd.operators.Dense(torch.randn(2, d, generator=g))
    y = A(gmm.sample(1, g)[0]) + 0.1 * torch.randn(2, generator=g)
    return gmm, bfd.InverseProblem(A, y, noise_std=0.1)


def rare_problem():
    d = 8
    m2 = torch.full((d,), 5.0)
    m2[0] = 8.0
    gmm = bfd.GaussianMixture(
        torch.tensor([1 - 1e-6, 1e-6]), torch.stack([torch.zeros(d), m2]), torch.ones(2)
    )
    A = bfd.operators.Dense(torch.eye(d)[:1].clone())
    return gmm, bfd.InverseProblem(A, torch.tensor([5.46]), noise_std=0.1)


def shared_path_problem():
    """SMCDiff's probe (docs/methods/smcdiff.md): d = 8, modes at +-5 (0.3 / 0.7), one
    coordinate observed at 0 with noise 0.1."""
    d = 8
    gmm = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7]),
        torch.stack([-5 * torch.ones(d), 5 * torch.ones(d)]),
        torch.ones(2),
    )
    mask = torch.zeros(d, dtype=torch.bool)
    mask[0] = True
    return gmm, bfd.InverseProblem(bfd.operators.Mask(mask), torch.zeros(1), noise_std=0.1)


def copies(problem: bfd.InverseProblem, R: int) -> bfd.InverseProblem:
    return bfd.InverseProblem(
        problem.operator, problem.y.expand(R, -1).clone(), noise_std=problem.noise_std
    )


def summary(res: bfd.Result, check) -> dict:
    """Per run: minor-mode mass, x_2 mean, log-evidence and its sd; the check's numbers."""
    x = res.samples if res.batched else res.samples[None]
    W = res.weights().double()
    W = W if res.batched else W[None]
    lz, se = res.log_evidence, res.info.log_evidence_se
    out = {
        "minor": [round(float(v), 4) for v in (W * (x[..., 1] > 2.5)).sum(-1)],
        "x2_mean": [round(float(v), 3) for v in (W * x[..., 1]).sum(-1)],
        "log_z": [] if lz is None else [round(float(v), 3) for v in lz.reshape(-1)],
        "log_z_se": [] if se is None else [round(float(v), 4) for v in se.reshape(-1)],
    }
    if check is not None:
        out.update(
            disagree=bool(check.disagree),
            mean_q=round(check.mean_q, 2),
            var_q=round(check.var_q, 2),
            log_evidence_q=None if check.log_evidence_q is None else round(check.log_evidence_q, 2),
            line=round(check.line, 2),
            error_ratio=round(check.error_ratio, 3),
        )
    return out


def cells():
    gmm, pb = readme_problem()
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    for name, smp, reps in [
        ("healthy", default_sampler(pb, evidence=True), 30),
        ("healthy_mcgdiff", bfd.samplers.MCGdiff(num_steps=100), 8),
    ]:
        for rep in range(reps):
            yield {"cell": name, "seed": 100 + rep}, (prior, pb, smp, 4, 1024)
    gmm, pb = shared_path_problem()
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    for name, smp in [
        ("smcdiff", bfd.samplers.SMCDiff(num_steps=100)),
        ("smcdiff_tds", bfd.samplers.TDS(num_steps=100, reverse_variance="analytic")),
    ]:
        for rep in range(6):
            yield {"cell": name, "seed": 100 + rep}, (prior, pb, smp, 4, 2000)
    gmm, pb = rare_problem()
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    for rep in range(12):
        yield (
            {"cell": "rare_operator", "seed": 100 + rep},
            (prior, pb, default_sampler(pb, evidence=True), 4, 2048),
        )
    for seed in range(16):
        yield {"cell": "rare_infer", "seed": seed}, (prior, pb, None, 1, 2048)
    for seed in range(6):
        yield {"cell": "rare_infer_runs4", "seed": seed}, (prior, pb, None, 4, 2048)
    for seed in range(16):  # the same particles as one run, split into two
        yield {"cell": "rare_infer_split2", "seed": seed}, (prior, pb, None, 2, 1024)


def run(key: dict, prior, pb, smp, R: int, N: int) -> dict:
    g = torch.Generator().manual_seed(key["seed"])
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        if smp is not None:  # R copies in one batch, then the check
            res = smp.sample(prior, copies(pb, R), N, g)
            check = bfd.diagnostics.runs_check(res)
        else:  # through bfd.infer, its default sampler
            A = pb.operator

            def model(y=None):
                x = pyro.sample("x", bfd.DiffusionPrior(prior))
                pyro.sample("y", bfd.LinearGaussian(A, x, noise_std=0.1), obs=y)

            post = bfd.infer(model, y=pb.y, num_samples=N, generator=g, runs=R)
            assert isinstance(post, bfd.inference.Posterior)
            check = post.runs
            res = post.runs.results[0] if post.runs is not None else post.result
    out = dict(key, **summary(res, check))
    out["warned"] = sorted(
        {q.kind for q in res.info.quality}
        | ({"disagree"} if any("disagree" in str(w.message) for w in ws) else set())
    )
    if smp is None and check is not None:  # the pooled cloud's own numbers
        pooled = post.result
        out["pooled"] = summary(pooled, None)
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    done = set()
    if CELLS.exists():
        for line in CELLS.read_text().splitlines():
            c = json.loads(line)
            done.add((c["cell"], c["seed"]))
    torch.set_num_threads(1)
    for key, args in cells():
        if (key["cell"], key["seed"]) in done:
            continue
        out = run(key, *args)
        with CELLS.open("a") as f:
            f.write(json.dumps(out) + "\n")
        print(json.dumps(out)[:200], file=sys.stderr, flush=True)


def report() -> str:
    """``report.md`` from the cells: per group, how many batches the check flagged, the
    runs' spread over their errors, and for the rare mode the silent runs and masses."""
    import statistics

    rows = [json.loads(line) for line in CELLS.read_text().splitlines()]
    lines = [
        "# Independent runs against each other (`validation/runs_check.py`)",
        "",
        "Made by `OMP_NUM_THREADS=1 python validation/runs_check.py` (the module docstring",
        "describes the cells). `mode mass`: the weight of draws with `x_2 > 2.5`, exact 0.0953",
        "on the rare-mode problem (its `log Z` -15.582) and 0.7 on SMCDiff's. `silent`: runs",
        "with no quality finding warned.",
        "",
        "| cell | batches | flagged | error_ratio median (range) | mode mass per run | silent runs | log Z of silent runs (reported sd) |",
        "|---|---|---|---|---|---|---|",
    ]
    cells = ("healthy", "healthy_mcgdiff", "smcdiff", "smcdiff_tds", "rare_operator", "rare_infer")
    cells += ("rare_infer_runs4",)
    for cell in cells + ("rare_infer_split2",):
        rs = [r for r in rows if r["cell"] == cell]
        if not rs:
            continue
        flagged = sum(bool(r.get("disagree")) for r in rs)
        ratios = [r["error_ratio"] for r in rs if "error_ratio" in r]
        rr = (
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            if ratios
            else "-"
        )
        masses = [m for r in rs for m in r["minor"]]
        silent = [r for r in rs if not r["warned"]]
        sz = ", ".join(
            f"{z:.3f} ({s:.3f})"
            for r in silent
            for z, s in zip(r["log_z"], r["log_z_se"])
            if cell.startswith("rare")
        )
        lines.append(
            f"| {cell} | {len(rs)} | {flagged if ratios else '-'} | {rr} | "
            + (f"{min(masses):.4f}-{max(masses):.4f}" if cell[:4] in ("rare", "smcd") else "-")
            + f" | {len(silent)} of {len(rs)} | {sz or '-'} |"
        )
    for cell, what in (("rare_infer_runs4", "runs=4"), ("rare_infer_split2", "runs=2, N = 1024")):
        pooled = [r["pooled"]["minor"][0] for r in rows if r["cell"] == cell]
        if pooled:
            lines += [
                "",
                f"`infer(..., {what})` pooled minor-mode mass: "
                + ", ".join(f"{m:.4f}" for m in pooled)
                + ".",
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
    (OUT / "report.md").write_text(report())

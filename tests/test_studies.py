import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bayesfilter_diff.studies import LocalExecutor, ResultStore, cell_key, run_study
from bayesfilter_diff.studies.report import mean_ci, summarize

sys.path.insert(0, str(Path(__file__).parent))
import _study_toy  # noqa: E402
from _helpers import SMALL_BENCHMARK  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_store_round_trip_and_corruption(tmp_path):
    store = ResultStore(tmp_path)
    store.save("a-1", {"x": 1.5})
    assert store.load("a-1") == {"x": 1.5} and store.done("a-1")
    # truncated file -> detected, moved aside, treated as missing
    p = store.path("a-1")
    p.write_text(p.read_text()[:10])
    assert store.load("a-1") is None and not p.exists() and p.with_suffix(".corrupt").exists()
    # tampered payload -> checksum mismatch
    store.save("b", {"x": 2})
    body = json.loads(store.path("b").read_text())
    body["record"]["x"] = 3
    store.path("b").write_text(json.dumps(body))
    assert store.load("b") is None
    with pytest.raises(ValueError, match="invalid cell key"):
        store.path("../evil")


def test_cell_keys_are_stable_and_distinct():
    a = {"method": "TDS", "seed": 1, "d": 8}
    assert cell_key(a) == cell_key(dict(reversed(list(a.items()))))
    assert cell_key(a) != cell_key({**a, "seed": 2})


def test_resume_skips_completed_cells(tmp_path):
    store = ResultStore(tmp_path)
    cells = _study_toy.cells(6)
    computed = LocalExecutor().run(_study_toy.toy_cell, cells[:4], store, progress=False)
    assert len(computed) == 4
    computed = LocalExecutor().run(_study_toy.toy_cell, cells, store, progress=False)
    assert len(computed) == 2
    recs = run_study(_study_toy.toy_cell, cells, store, progress=False)
    assert [r["value"] for r in recs] == [i**2 + 0.5 for i in range(6)]


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path):
    """Kill a running study with SIGKILL, resume it: same records, nothing recomputed."""
    n = 16
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    store = ResultStore(tmp_path)
    import random

    # kill four times, after a random number of completed cells each time
    targets = sorted(random.Random(0).sample(range(1, n - 1), 4))
    for target in targets:
        proc = subprocess.Popen(
            [sys.executable, "-m", "_study_toy", str(tmp_path), str(n), "0.15"],
            env=env,
            cwd=ROOT / "tests",
        )
        deadline = time.time() + 120
        while len(store.keys()) < target and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = {k: store.path(k).stat().st_mtime_ns for k in store.keys()}
    assert 0 < len(done_before) < n  # killed part-way
    computed = LocalExecutor().run(
        _study_toy.toy_cell, _study_toy.cells(n, 0.15), store, progress=False
    )
    assert len(computed) == n - len(done_before)
    assert not set(computed) & set(done_before)
    for k, m in done_before.items():
        assert store.path(k).stat().st_mtime_ns == m  # completed cells untouched
    recs = run_study(_study_toy.toy_cell, _study_toy.cells(n, 0.15), store, progress=False)
    assert sorted(r["value"] for r in recs) == sorted(i**2 + 0.5 for i in range(n))
    assert len(store.keys()) == n


def test_summaries():
    m, ci, n = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and n == 3 and abs(ci - 1.96 * 1.0 / 3**0.5) < 1e-12
    recs = [{"cell": {"method": "a", "seed": s}, "sw": float(s)} for s in range(4)]
    rows = summarize(recs, ["method"], ["sw"])
    assert rows[0]["sw"] == 1.5 and rows[0]["n"] == 4


def test_report_only_summarises_the_stored_cells_of_a_partial_study(tmp_path):
    from bayesfilter_diff.studies.validate import validate

    small = {
        "dims": [4],
        "obs_dims": [1],
        "steps": [3],
        "N": 16,
        "num_reference": 200,
        "num_projections": 20,
    }
    kw = {"methods": ["DDRM", "MCGdiff"], "progress": False}
    with pytest.raises(ValueError, match="no cell"):
        validate(tmp_path, config={**small, "seeds": [0, 1]}, report_only=True, **kw)
    validate(tmp_path, config={**small, "seeds": [0]}, **kw)  # 2 cells and the prior chain's
    store = ResultStore(tmp_path)
    stamps = {k: store.path(k).stat().st_mtime_ns for k in store.keys()}
    res = validate(tmp_path, config={**small, "seeds": [0, 1]}, report_only=True, **kw)
    assert {k: store.path(k).stat().st_mtime_ns for k in store.keys()} == stamps  # nothing run
    assert "Partial report" in res["text"] and "3 cells of this grid" in res["text"]
    assert all(r["n"] == 1 for r in res["rows"])
    # the chain alone, against the prior: its own table
    (chain,) = res["chain"]
    assert chain["n"] == 1 and chain["sw"] > 0 and 0 <= chain["weight_tv"] <= 1
    assert "## The prior's chain alone" in res["text"]


def test_noise_level_study_measures_against_the_exact_posterior(tmp_path):
    from bayesfilter_diff.studies.noise_levels import noise_problem, run_noise_levels

    gmm, problem = noise_problem(8, 1e-3, seed=0)
    assert problem.noise_std == 1e-3 and problem.operator.out_shape == (2,)
    cfg = {
        "methods": ["MCGdiff", "default"],
        "dims": [4],
        "noise": [1e-2],
        "steps": 10,
        "N": 64,
        "seeds": [0],
    }
    records = run_noise_levels(tmp_path, config=cfg, progress=False)["records"]
    r, default = sorted(records, key=lambda q: q["sampler"] != "MCGdiff")
    assert r["sw_ratio"] > 0 and math.isfinite(r["log_evidence_error"]) and r["nfe"] >= 10
    assert 0 < r["min_ess_fraction"] <= 1 and r["warned"] in (0.0, 1.0)
    assert default["sampler"] == "TDS"  # what bfd.infer runs for a linear-Gaussian problem
    report = (tmp_path / "report.md").read_text()
    assert "goal met" in report and "| MCGdiff | 4 | 0.01 |" in report
    assert "| default | 4 | 0.01 |" in report
    # resumable: a second call computes nothing new and reads the same record
    again = run_noise_levels(tmp_path, config=cfg, progress=False)["records"]
    assert sorted(q["sw"] for q in again) == sorted(q["sw"] for q in records)


def test_process_executor_runs_cells_in_single_threaded_workers(tmp_path):
    """Two spawned workers of one torch thread each; every cell saved by the driver; a rerun
    computes nothing; a failing cell is reported after the others are saved."""
    from bayesfilter_diff.studies import ProcessExecutor
    from bayesfilter_diff.studies.grid import describe

    store = ResultStore(tmp_path)
    cells = _study_toy.cells(5)
    ex = ProcessExecutor(workers=2, threads=1)
    computed = ex.run(_study_toy.threads_cell, cells, store, progress=False)
    assert len(computed) == 5
    recs = [store.load(cell_key(c)) for c in cells]
    assert all(
        r["threads"] == 1 and r["value"] == c["seed"] ** 2 + 0.5 for r, c in zip(recs, cells)
    )
    assert ex.run(_study_toy.threads_cell, cells, store, progress=False) == []
    bad = [{"study": "toy", "method": "m", "seed": -1}, *_study_toy.cells(7)[5:]]
    with pytest.raises(RuntimeError, match="(?s)1 cell\\(s\\) failed.*this cell fails"):
        ex.run(_study_toy.threads_cell, bad, store, progress=False)
    assert store.done(cell_key(bad[1])) and store.done(cell_key(bad[2]))
    assert not store.done(cell_key(bad[0]))
    assert describe({"method": "TDS", "d": 8, "seed": 3, "x": 1}) == "TDS d=8 seed=3"
    with pytest.raises(ValueError, match="workers"):
        ProcessExecutor(workers=0)


def test_calibration_study_with_independent_runs_records_its_command(tmp_path):
    """``draws="runs"``: one draw from each of N independent runs per replicate (SBC needs
    independent draws; draws resampled from one cloud share ancestors); the report's command line
    carries the config and the methods, so it reproduces the report."""
    from bayesfilter_diff.studies.calibration import run_calibration

    cfg = {"dims": [2], "replicates": 4, "chunk": 4, "N": 5, "steps": 5, "draws": "runs"}
    cfg["particles"] = 8
    res = run_calibration(tmp_path, methods=["TDS"], config=cfg, progress=False)
    (cell,) = [json.loads(p.read_text())["record"] for p in (tmp_path / "cells").glob("*.json")]
    assert cell["cell"]["draws"] == "runs" and cell["cell"]["particles"] == 8
    ranks = cell["ranks"]
    assert len(ranks) == 4 and all(0 <= r <= 5 for row in ranks for r in row)
    assert "--config" in res["text"] and '"draws": "runs"' in res["text"]
    assert "--methods 'TDS'" in res["text"]
    with pytest.raises(ValueError, match="draws"):
        run_calibration(tmp_path / "b", methods=["TDS"], config={"draws": "one"}, progress=False)


def test_calibration_study_auto_draws_weighted_samplers_from_independent_runs(tmp_path):
    """The default ``draws="auto"``: a weighted sampler's draws are one from each of ``runs``
    independent runs, an unweighted one's ``N`` come from one run (independent particles); each
    row's rank test and histogram use its own number of draws, and the report says which."""
    from bayesfilter_diff.studies.calibration import run_calibration

    cfg = {"dims": [2], "replicates": 4, "chunk": 4, "N": 7, "steps": 5, "runs": 3}
    cfg["particles"] = 6
    res = run_calibration(tmp_path, methods=["TDS", "DPS"], config=cfg, progress=False)
    cells = {
        r["cell"]["method"]: r
        for r in (json.loads(p.read_text())["record"] for p in (tmp_path / "cells").glob("*.json"))
    }
    assert cells["TDS"]["cell"]["draws"] == "runs" and cells["TDS"]["cell"]["N"] == 3
    assert cells["TDS"]["cell"]["particles"] == 6
    assert "draws" not in cells["DPS"]["cell"] and cells["DPS"]["cell"]["N"] == 7
    assert max(r for row in cells["TDS"]["ranks"] for r in row) <= 3
    assert max(r for row in cells["DPS"]["ranks"] for r in row) <= 7
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["TDS"]["draws"] == "1 from each of 3 runs"
    assert rows["DPS"]["draws"] == "7 from one run"
    assert "With 3 draws" in res["text"] and "independent runs" in res["text"]


SMALL = {**SMALL_BENCHMARK, "prior_chain": False}


def test_benchmark_accepts_method_labels_with_settings(tmp_path):
    from bayesfilter_diff.studies.validate import validate

    small = SMALL
    label = "TDS[reverse_variance=analytic]"
    res = validate(tmp_path, config=small, methods=["TDS", label], progress=False)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"TDS", label} and rows[label]["n"] == 1
    # a different sampler: its own draws, not TDS's
    assert rows[label]["sw"] != rows["TDS"]["sw"]
    assert f"| {label} | yes |" in res["text"]  # exact, as its base sampler
    with pytest.raises(ValueError, match="unknown methods"):
        validate(tmp_path / "x", config=small, methods=["NoSuch[a=1]"], progress=False)


def test_a_diverged_sampler_is_a_failed_cell_not_a_crashed_study(tmp_path):
    """The loop raises on non-finite draws (NonFiniteSamplesError); a study records such a
    run as its cell's result (``finite: False`` with the message, counted in the report's
    ``failed`` column) and goes on with the other cells. Before, the first diverged cell
    (DAPS on a benchmark draw with sigma_y = 1.3e-4, seed 16) stopped the whole study."""
    from bayesfilter_diff.studies.validate import validate

    small = SMALL
    bad = "DAPS[lr=10.0]"  # far beyond its Langevin stability bound
    res = validate(tmp_path, config=small, methods=["TDS", bad], progress=False)
    rows = {r["method"]: r for r in res["rows"]}
    assert rows[bad]["failed"] == 1 and rows["TDS"]["failed"] == 0
    assert {r["method"]: r for r in res["overall"]}[bad]["failed"] == 1  # the summary's too
    store = ResultStore(tmp_path)
    recs = [store.load(k) for k in store.keys()]
    (rec,) = [r for r in recs if r["cell"]["method"] == bad]
    assert rec["finite"] is False and "stability bound" in rec["diverged"]
    assert math.isnan(rec["sw"])

"""Smoke tests of the benchmark harness (the numbers themselves live in benchmarks/)."""

import json

import pytest
import torch

from benchmarks.harness import run_one
from benchmarks.plot import main as plot_main


@pytest.mark.parametrize("prior,d", [("gmm", 8), ("unet28", 0)])
def test_run_one_reports_consistent_figures(prior, d):
    r = run_one("MCGdiff", prior, d, 2, 1, 8, 2, torch.float32, "cpu", chunk_size=3)
    assert r["nfe"] >= 2 and r["wall_s"] > 0 and r["call_s"] > 0
    assert r["particle_steps_per_s"] == pytest.approx(8 * 2 / r["wall_s"])
    assert r["overhead"] == pytest.approx(r["wall_s"] / (r["nfe"] * r["call_s"]))
    assert r["d"] == (d if prior == "gmm" else 784)


def test_throughput_figure(tmp_path):
    rows = [
        {"method": "M", "prior": "gmm", "d": 8, "B": 1, "N": n, "particle_steps_per_s": 10.0 * n}
        for n in (64, 256, 1024)
    ]
    src = tmp_path / "r.jsonl"
    src.write_text("\n".join(map(json.dumps, rows)) + "\n")
    out = tmp_path / "fig.png"
    assert plot_main([str(src), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000


def test_run_fresh_runs_in_a_new_process():
    from benchmarks.harness import run_fresh

    r = run_fresh("DDRM", "gmm", 8, 2, 1, 8, 2, torch.float32, "cpu")
    assert r["method"] == "DDRM" and r["wall_s"] > 0 and r["peak_mem_MB"] >= 0


def test_floor_benchmark_times_the_network_inside_the_run():
    """The stand-in network's forward and input-gradient passes are timed inside the run;
    the own time and the floor are positive and consistent with the reported figures."""
    from benchmarks.floor import run_one as floor_one

    for method in ("FPS-SMC", "DPS"):
        r = floor_one(method, 4, (3, 16, 16), 3)
        assert r["nfe"] >= 3 and r["net_fwd_s"] > 0
        # the network's calls: the sampler's, and the quality check's one of an unweighted
        # sampler (its time is the network's; the particle-steps are the sampler's)
        assert r["net_calls"] == r["nfe"] + (method == "DPS")
        assert (r["net_bwd_s"] > 0) == r["backprop"] == (method == "DPS")
        assert r["net_s"] == pytest.approx(r["net_fwd_s"] + r["net_bwd_s"])
        own = (r["cpu_s"] - r["net_s"]) / (4 * r["nfe"])
        assert r["own_ms"] == pytest.approx(1e3 * own)
        assert r["floor_ms"] > 0 and r["ratio"] == pytest.approx(r["own_ms"] / r["floor_ms"])


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(3, 16, 16), (50,)])
def test_floor_benchmark_on_the_device(shape):
    """The floor benchmark's device path: the problem moved to the device, wall time with
    the device synchronised, and the same consistency as on the CPU."""
    from benchmarks.floor import run_one as floor_one

    r = floor_one("TDS", 4, shape, 3, "cuda")
    assert r["device"] == "cuda" and r["net_calls"] >= 3 and r["net_bwd_s"] > 0
    own = (r["cpu_s"] - r["net_s"]) / (4 * r["nfe"])
    assert r["own_ms"] == pytest.approx(1e3 * own) and r["floor_ms"] > 0


def test_gpu_checks_script_returns_what_a_device_loan_can_bring_back():
    """A device loan brings back at most 8 files from $OUT: the script writes no more."""
    import re
    from pathlib import Path

    script = (Path(__file__).parents[1] / "benchmarks" / "gpu_checks.sh").read_text()
    outputs = set(re.findall(r'"\$OUT/([A-Za-z0-9_.-]+)"', script))
    outputs |= {"steps.log"}
    assert 1 <= len(outputs) <= 8, sorted(outputs)

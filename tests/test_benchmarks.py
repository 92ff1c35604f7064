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

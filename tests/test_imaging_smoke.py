"""Smoke test of the imaging study (bayesfilter_diff.studies.imaging, run by
validation/imaging.py): one task, two samplers, tiny settings, resumable."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff import samplers as S
from bayesfilter_diff.diagnostics import coverage90, psnr, ssim
from bayesfilter_diff.diagnostics.imaging import weighted_moments
from bayesfilter_diff.samplers.registry import REGISTRY, names
from bayesfilter_diff.studies import imaging

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = imaging.Settings(
    num_images=2,
    particles=4,
    steps=5,
    num_shown=2,
    sbc_task="inpaint_random",
    sbc_samplers=("MCGdiff@3", "prior@3"),
    sbc_problems=4,
    sbc_particles=4,
    sbc_draws=3,
)


def test_metrics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    s1, s2 = ssim(noisy, x), ssim(x + 0.5 * (noisy - x) * 4, x)
    assert ((s1 < 1) & (s2 < s1)).all()
    # PSNR of additive noise of std 0.1 on data range 2: about 10 log10(4 / 0.01) = 26 dB
    p = psnr(noisy, x)
    assert p.shape == (3,) and ((p > 24) & (p < 28)).all()
    # draws centred on the truth: a pixel falls outside the central 90% interval of its 50
    # draws only if at most 2 of them lie on one side of it (probability ~1e-12)
    draws = x.unsqueeze(1) + 0.1 * torch.randn((3, 50) + x.shape[1:], generator=g)
    assert torch.equal(coverage90(draws, x), torch.ones(3, dtype=torch.float64))
    assert torch.equal(coverage90(draws, x + 1), torch.zeros(3, dtype=torch.float64))
    # unweighted moments are the plain mean and (biased) standard deviation
    mean, std = weighted_moments(bfd.Result(samples=draws, batched=True))
    assert torch.allclose(mean, draws.mean(1)) and torch.allclose(std, draws.std(1, correction=0))


@pytest.mark.parametrize("shape, std", [((2, 1, 16, 16), 1.0), ((2, 3, 32, 32), 1.5)])
def test_metrics_match_torchmetrics(shape, std):
    """PSNR and SSIM equal torchmetrics' (its Gaussian SSIM picks the window
    2 int(3.5 std + 0.5) + 1 from std; ours takes it as an argument)."""
    tm = pytest.importorskip("torchmetrics.functional.image")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    r = (x + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    want_p = tm.peak_signal_noise_ratio(x, r, data_range=2.0, reduction="none", dim=(1, 2, 3))
    torch.testing.assert_close(psnr(x, r), want_p, rtol=1e-6, atol=0)  # log10 vs log / log 10
    want_s = tm.structural_similarity_index_measure(
        x, r, gaussian_kernel=True, sigma=std, data_range=2.0, reduction="none"
    )
    size = 2 * int(3.5 * std + 0.5) + 1
    torch.testing.assert_close(ssim(x, r, size=size, std=std), want_s, rtol=1e-10, atol=1e-10)


def test_samplers_come_from_the_registry():
    # the registry's study samplers (by class name, the names of the stored cells), but the
    # ones left out, plus the study's variants
    expected = {REGISTRY[n].cls.__name__ for n in names(studies=True) if n not in imaging.LEFT_OUT}
    assert set(imaging.SAMPLERS) == expected | set(imaging.VARIANTS)
    assert len(imaging.SAMPLERS) == len(set(imaging.SAMPLERS))
    stored = {
        p.stem.split("__", 1)[1]
        for p in (ROOT / "validation" / "results" / "imaging" / "cells").glob("*.json")
        if not p.stem.startswith("sbc__")
    } - {"pinv", "dps_tune"}
    assert stored and stored <= set(imaging.SAMPLERS)
    assert imaging.FLOW_SAMPLERS == ("PiGDMFlow", "DFlow")


def test_study_settings():
    st = imaging.Settings(steps=50)
    problem = imaging.make_problem("inpaint_box", torch.zeros(1, 1, 8, 8), 0)
    for name in imaging.SAMPLERS:
        sampler = imaging.make_sampler(name, st, problem)
        assert isinstance(sampler, imaging.sampler_entry(name).cls)
    # the study's departures from the registry settings, and the budget of ~50 NFEs
    assert imaging.make_sampler("FPSSMC", st, problem) == S.FPSSMC(num_steps=50)
    assert imaging.make_sampler("PiGDM", st, problem) == S.PiGDM(num_steps=50, weighting="official")
    assert imaging.make_sampler("RePaint", st, problem) == S.RePaint(
        num_steps=25, jump_length=5, jump_n_sample=2
    )
    assert imaging.make_sampler("DAPS", st, problem) == S.DAPS(
        num_steps=25, ode_steps=2, lr=imaging.daps_lr(problem)
    )
    assert imaging.make_sampler("DFlow", st, problem) == S.DFlow(max_iters=2, lbfgs_iters=5)
    assert imaging.make_sampler("DPS-tuned", st, problem, dps_scale=0.2) == S.DPS(
        num_steps=50, scale=0.2
    )
    assert imaging.make_sampler("MCGdiff", st, problem, steps=7) == S.MCGdiff(num_steps=7)
    with pytest.raises(ValueError, match="unknown sampler"):
        imaging.make_sampler("FPS", st, problem)


def test_script_help():
    out = subprocess.run(
        [sys.executable, str(ROOT / "validation" / "imaging.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert "--samplers" in out.stdout and "DPS-tuned" in out.stdout


def test_one_task_two_samplers_resumes(tmp_path):
    kw = dict(tasks=["inpaint_random"], samplers=["MCGdiff", "DDRM"], log=lambda s: None)
    out = imaging.run_study(tmp_path, TINY, **kw)
    keys = {
        "inpaint_random__pinv",
        "inpaint_random__MCGdiff",
        "inpaint_random__DDRM",
        "sbc__inpaint_random__MCGdiff_3",
        "sbc__inpaint_random__prior_3",
    }
    assert set(out["computed"]) == keys and out["reused"] == []
    for k in keys:
        body = json.loads((tmp_path / "cells" / f"{k}.json").read_text())
        rec = body["record"]
        assert rec["status"] == "ok", rec
        if not k.startswith("sbc"):
            assert len(rec["psnr"]) == 2 and all(math.isfinite(v) for v in rec["psnr"])
            assert 0 < rec["ssim_mean"] <= 1
    mc = out["cells"]["inpaint_random__MCGdiff"]
    assert torch.tensor(mc["mean"]).shape == (2, 1, 8, 8)
    assert torch.tensor(mc["samples"]).shape == (2, 2, 1, 8, 8)
    sbc = out["cells"]["sbc__inpaint_random__prior_3"]
    assert torch.tensor(sbc["ranks"]).shape == (4, 6) and 0 <= sbc["pvalue"] <= 1
    assert sbc["sampler"] == "prior" and sbc["steps"] == 3
    readme = (tmp_path / "README.md").read_text()
    assert "| MCGdiff |" in readme and "SBC" in readme
    assert (tmp_path / "fig_inpaint_random.png").stat().st_size > 1000
    assert (tmp_path / "sbc_ranks.png").is_file()
    # a second run reuses every cell; other settings redo only the cells they affect
    again = imaging.run_study(tmp_path, TINY, figures=False, **kw)
    assert again["computed"] == [] and set(again["reused"]) == keys
    other = imaging.Settings(**{**asdict(TINY), "particles": 3})
    redo = imaging.run_study(tmp_path, other, figures=False, **kw)
    sbc_keys = {k for k in keys if k.startswith("sbc")}
    assert set(redo["computed"]) == keys - sbc_keys and set(redo["reused"]) == sbc_keys

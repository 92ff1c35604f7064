"""Smoke test of validation/imaging.py: one task, two samplers, tiny settings, resumable."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "validation" / "imaging.py"
_spec = importlib.util.spec_from_file_location("bfd_validation_imaging", _PATH)
imaging = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = imaging  # dataclasses look the module up while the class is built
_spec.loader.exec_module(imaging)


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
    assert torch.allclose(imaging.ssim(x, x), torch.ones(3, dtype=torch.float64))
    s1, s2 = imaging.ssim(noisy, x), imaging.ssim(x + 0.5 * (noisy - x) * 4, x)
    assert ((s1 < 1) & (s2 < s1)).all()
    # PSNR of additive noise of std 0.1 on data range 2: about 10 log10(4 / 0.01) = 26 dB
    p = imaging.psnr(noisy, x)
    assert p.shape == (3,) and ((p > 24) & (p < 28)).all()


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
    other = imaging.Settings(**{**imaging.asdict(TINY), "particles": 3})
    redo = imaging.run_study(tmp_path, other, figures=False, **kw)
    sbc_keys = {k for k in keys if k.startswith("sbc")}
    assert set(redo["computed"]) == keys - sbc_keys and set(redo["reused"]) == sbc_keys

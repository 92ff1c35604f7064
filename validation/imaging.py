"""Imaging tasks on held-out digits with the shipped digits diffusion prior.

Five inverse problems (denoising, two inpaintings, 2x super-resolution, deblurring) on 8x8
held-out digits, solved by every sampler of the registry that accepts them, plus a
self-consistency calibration (SBC); the study, its settings and its report are
:mod:`bayesfilter_diff.studies.imaging`. Resumable: a rerun reuses the cells under
``<out>/cells`` computed with the same settings (``--fresh`` recomputes all).

Run from the repository root (366 s for a fresh run, loading and figures included, on one
CPU core shared with other jobs)::

    OMP_NUM_THREADS=1 .venv/bin/python validation/imaging.py

Smoke run (seconds): ``OMP_NUM_THREADS=1 .venv/bin/python validation/imaging.py --fast
--out /tmp/imaging_fast``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict

import torch

from bayesfilter_diff.studies.imaging import SAMPLERS, TASKS, Settings, run_study


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="validation/results/imaging")
    ap.add_argument("--fast", action="store_true", help="tiny settings for a smoke run")
    ap.add_argument(
        "--tasks", default=",".join(TASKS), help="comma-separated subset of %(default)s"
    )
    ap.add_argument(
        "--samplers", default=",".join(SAMPLERS), help="comma-separated subset of %(default)s"
    )
    ap.add_argument("--num-images", type=int, default=None)
    ap.add_argument("--particles", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-sbc", action="store_true")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="recompute every cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    st = Settings.fast() if args.fast else Settings()
    over = {
        k: v
        for k, v in (
            ("num_images", args.num_images),
            ("particles", args.particles),
            ("steps", args.steps),
            ("seed", args.seed),
        )
        if v is not None
    }
    st = Settings(**{**asdict(st), **over})
    command = "OMP_NUM_THREADS=1 .venv/bin/python " + shlex.join(
        ["validation/imaging.py", *(sys.argv[1:] if argv is None else argv)]
    )
    summary = run_study(
        args.out,
        st,
        tasks=[t for t in args.tasks.split(",") if t],
        samplers=[s for s in args.samplers.split(",") if s],
        sbc=not args.no_sbc,
        figures=not args.no_figures,
        fresh=args.fresh,
        command=command,
    )
    print(
        f"computed {len(summary['computed'])} cells, reused {len(summary['reused'])}; "
        f"report: {summary['report']}"
    )


if __name__ == "__main__":
    main()

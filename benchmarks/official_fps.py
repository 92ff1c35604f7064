"""FPS-SMC against the official code, side by side in one process (issue #18).

``python -m benchmarks.official_fps --src DIR [--particles 8,32] [--steps 20] [--repeats 3]
[--out F]``

``DIR`` holds a checkout of the official code, ``ZehaoDou-official/FPS-SMC-2023`` (its
``guided_diffusion/`` and ``util/`` folders; fetched, never vendored here). Without it the
script says so and exits: the comparison is optional.

Both samplers run the same problem of :mod:`benchmarks.floor` (3x256x256 box inpainting,
``sigma_y = 0.05``, the one-convolution eps network, one thread) with ``M`` particles and
the same number of steps (the official code respaces its 1000 DDPM steps to ``--steps``).
The network is timed inside each run (its forward passes), so ``own_ms`` is the CPU time
outside the network per particle-step for both, and ``speedup`` = official / ours, each the
best of ``--repeats`` interleaved runs (single runs move by +-30% on a shared machine).

The official code is driven as its ``sample_condition.py`` drives it: ``create_sampler``
with the ``ddim`` sampler of ``configs/diffusion_config.yaml`` (``c_rate`` 0.95, linear
betas, epsilon model), ``p_sample_loop(model, x_start, measurement, ...,
op="inpainting", mask=...)``; its import of ``motionblur`` (a blur-kernel package the
inpainting path never calls) is stubbed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bayesfilter_diff as bfd

from .floor import OneConv, problem
from .floor import run_one as ours


class _OfficialNet(nn.Module):
    """The official code calls ``model(x, t)`` with integer DDPM steps ``t`` in
    ``[0, 1000)``; the stand-in network takes continuous times in ``[0, 1]``."""

    def __init__(self, net: OneConv) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = (t.to(x.dtype) + 1) / 1000
        return self.net(x, tt.expand(x.shape[0]))


def _import_official(src: Path) -> Any:
    if "motionblur" not in sys.modules:  # imported by util.img_utils, unused by inpainting
        mb = types.ModuleType("motionblur")
        mbm = types.ModuleType("motionblur.motionblur")
        mbm.Kernel = object  # type: ignore[attr-defined]
        mb.motionblur = mbm  # type: ignore[attr-defined]
        sys.modules["motionblur"], sys.modules["motionblur.motionblur"] = mb, mbm
    sys.path.insert(0, str(src))
    import guided_diffusion.gaussian_diffusion as gd  # type: ignore[import-not-found]

    return gd


class _Mask:
    """The official ``InpaintingOperator``: ``forward(x, mask=m) = x * m``."""

    def forward(self, data: torch.Tensor, **kw: Any) -> torch.Tensor:
        return data * kw["mask"]


def official_run(gd: Any, M: int, steps: int, shape: tuple[int, ...]) -> dict[str, Any]:
    prior, prob = problem(shape)
    net = prior.timed  # type: ignore[attr-defined]
    op = prob.operator
    mask = op.mask.to(torch.float32)[None]  # (1, C, H, W), 1 = observed
    measurement = op.embed(prob.y)  # the official y lives on the image grid
    sampler = gd.create_sampler(
        sampler="ddim",
        steps=1000,
        noise_schedule="linear",
        model_mean_type="epsilon",
        model_var_type="learned_range",
        dynamic_threshold=False,
        clip_denoised=True,
        rescale_timesteps=False,
        c_rate=0.95,
        particle_size=M,
        timestep_respacing=str(steps),
    )
    model = _OfficialNet(net)
    x_start = torch.randn((1,) + shape)

    def go() -> None:
        sampler.p_sample_loop(
            model=model,
            x_start=x_start,
            measurement=measurement,
            measurement_cond_fn=None,
            operator=_Mask(),
            op="inpainting",
            mask=mask,
            record=False,
            save_root=None,
        )

    go()  # warm-up
    net.fwd_cpu, net.bwd_cpu, net.calls = 0.0, 0.0, 0
    start = time.process_time()
    go()
    cpu = time.process_time() - start
    net_s = net.fwd_cpu + net.bwd_cpu
    return {
        "impl": "official",
        "N": M,
        "net_calls": net.calls,
        "cpu_s": cpu,
        "net_s": net_s,
        "own_ms": 1e3 * (cpu - net_s) / (M * net.calls),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.official_fps")
    p.add_argument("--src", default=None, help="checkout of ZehaoDou-official/FPS-SMC-2023")
    p.add_argument("--particles", default="8,32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--shape", default="3,256,256")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="interleaved runs of each implementation; the best own_ms of each is compared "
        "(another process on the machine only ever adds time)",
    )
    a = p.parse_args(argv)
    if a.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {a.repeats}")
    src = Path(a.src) if a.src else None
    if src is None or not (src / "guided_diffusion" / "gaussian_diffusion.py").exists():
        print(
            "the official FPS-SMC source was not found (--src): fetch "
            "ZehaoDou-official/FPS-SMC-2023 and pass its folder; nothing compared"
        )
        return 0
    torch.set_num_threads(1)
    bfd.tune_allocator()
    shape = tuple(int(s) for s in a.shape.split(","))
    if shape != (3, 256, 256):
        raise ValueError("the official code hard-codes 3x256x256 images")
    gd = _import_official(src)
    print("| M | steps | official own_ms | ours own_ms | speedup | official cpu_s | ours cpu_s |")
    print("|---|---|---|---|---|---|---|")
    for M in map(int, a.particles.split(",")):
        offs, mines = [], []
        for _ in range(a.repeats):  # interleaved, so that both see the same load
            offs.append(official_run(gd, M, a.steps, shape))
            mines.append(ours("FPS-SMC", M, shape, a.steps))
        off = min(offs, key=lambda r: r["own_ms"])
        mine = min(mines, key=lambda r: r["own_ms"])
        row = {
            "M": M,
            "steps": a.steps,
            "repeats": a.repeats,
            "official": off,
            "ours": mine,
            "speedup": off["own_ms"] / mine["own_ms"],
            "official_own_ms_all": [r["own_ms"] for r in offs],
            "ours_own_ms_all": [r["own_ms"] for r in mines],
        }
        print(
            f"| {M} | {a.steps} | {off['own_ms']:.3g} | {mine['own_ms']:.3g} | "
            f"{row['speedup']:.3g} | {off['cpu_s']:.3g} | {mine['cpu_s']:.3g} |",
            flush=True,
        )
        if a.out:
            with Path(a.out).open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

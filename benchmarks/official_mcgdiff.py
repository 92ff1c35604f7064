"""MCGdiff against the official package, side by side in one process (issue #18).

``python -m benchmarks.official_mcgdiff --src DIR [--particles 4096,131072] [--d 80]
[--steps 20] [--out F]``

``DIR`` holds a checkout of ``gabrielvc/mcg_diff`` (its ``mcg_diff/`` package; fetched,
never vendored here); without it the script says so and exits (optional).

Setting: the mixture benchmark's shape in spectral coordinates, ``d`` coordinates of which
2 are observed (``s = 1``, ``sigma_y = 0.1``): for the official code the ``coordinates_mask``
with two ones, for ours a ``Mask`` operator observing the same two coordinates (its SVD is
the identity, so both run on the same coordinates without a basis change). The network is
the elementwise stand-in of :mod:`benchmarks.floor` (``eps = sigma_t (w * x)``), timed
inside each run. Both use DDPM's linear betas, ``eta = 1``, ``kappa = 1e-4``; the official
code runs ``steps`` DDPM indices, ours ``num_steps = steps`` (it inserts the observation
time and refines its grid, so it takes a few more network calls). ``own_us`` = CPU time
outside the network per particle-step (one network evaluation of one particle), in
microseconds; ``speedup`` = official / ours.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers import MCGdiff

from .floor import OneScale


def _import_official(src: Path) -> Any:
    sys.path.insert(0, str(src))
    import mcg_diff.particle_filter as pf  # type: ignore[import-not-found]
    from mcg_diff.sgm import ScoreModel  # type: ignore[import-not-found]

    return pf, ScoreModel


class _DDPMNet(torch.nn.Module):
    """The official code calls ``net(x, t)`` with an integer DDPM step ``t``."""

    def __init__(self, net: OneScale) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        tt = torch.full((x.shape[0],), (t + 1) / 1000, dtype=x.dtype)
        return self.net(x, tt)


def _problem(d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(d, dtype=torch.bool)
    mask[:2] = True
    op = bfd.operators.Mask(mask)
    y = torch.randn(2, generator=g)
    return op, y


def _timed(impl: str, go: Any, net: OneScale, N: int) -> dict[str, Any]:
    """A warm-up call of ``go``, then one timed: CPU time, the network's share (timed inside
    the run) and the own time per particle-step in microseconds."""
    go()
    net.fwd_cpu, net.calls = 0.0, 0
    start = time.process_time()
    go()
    cpu = time.process_time() - start
    own = (cpu - net.fwd_cpu) / (N * net.calls)
    return {
        "impl": impl,
        "N": N,
        "net_calls": net.calls,
        "cpu_s": cpu,
        "net_s": net.fwd_cpu,
        "own_us": 1e6 * own,
    }


def official_run(pf: Any, ScoreModel: Any, N: int, d: int, steps: int) -> dict[str, Any]:
    net = OneScale(d)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    acp = torch.cumprod(1 - betas, 0).float()
    model = ScoreModel(_DDPMNet(net), acp, torch.device("cpu"))
    op, y = _problem(d)
    mask = op.mask.float()
    timesteps = torch.linspace(0, 999, steps + 1).round().long()

    def go() -> None:
        with torch.no_grad():
            pf.mcg_diff(
                initial_particles=torch.randn(N, d),
                observation=y,
                score_model=model,
                coordinates_mask=mask,
                timesteps=timesteps,
                likelihood_diagonal=torch.ones(2),
                var_observation=0.1**2,
                eta=1.0,
                gaussian_var=1e-4,
            )

    return _timed("official", go, net, N)


def our_run(N: int, d: int, steps: int) -> dict[str, Any]:
    net = OneScale(d)
    prior = bfd.DiffusionModel.from_eps(net, bfd.VPSchedule.linear(), (d,))
    op, y = _problem(d)
    problem = bfd.InverseProblem(op, y, 0.1)
    sampler = MCGdiff(num_steps=steps)

    def go() -> None:
        sampler.sample(prior, problem, N, generator=torch.Generator().manual_seed(0))

    return _timed("ours", go, net, N)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.official_mcgdiff")
    p.add_argument("--src", default=None, help="checkout of gabrielvc/mcg_diff")
    p.add_argument("--particles", default="4096,131072")
    p.add_argument("--d", type=int, default=80)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None, help="append JSON lines here")
    a = p.parse_args(argv)
    src = Path(a.src) if a.src else None
    if src is None or not (src / "mcg_diff" / "particle_filter.py").exists():
        print("the official mcg_diff source was not found (--src): nothing compared")
        return 0
    torch.set_num_threads(1)
    bfd.tune_allocator()
    pf, ScoreModel = _import_official(src)
    print("| N | d | official own_us | ours own_us | speedup | official calls | ours calls |")
    print("|---|---|---|---|---|---|---|")
    for N in map(int, a.particles.split(",")):
        off = official_run(pf, ScoreModel, N, a.d, a.steps)
        mine = our_run(N, a.d, a.steps)
        row = {"N": N, "d": a.d, "steps": a.steps, "official": off, "ours": mine}
        row["speedup"] = off["own_us"] / mine["own_us"]
        print(
            f"| {N} | {a.d} | {off['own_us']:.3g} | {mine['own_us']:.3g} | "
            f"{row['speedup']:.3g} | {off['net_calls']} | {mine['net_calls']} |",
            flush=True,
        )
        if a.out:
            with Path(a.out).open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

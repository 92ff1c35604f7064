"""The sampler's own work per particle-step against the memory-traffic floor (issue #18).

``python -m benchmarks.floor [--methods FPS-SMC,MCGdiff,TDS,DPS] [--particles 8,32]
[--shape 3,256,256] [--steps 20] [--device cpu] [--out F.jsonl]``; ``--shape 800``: a vector of that
dimension under a ``(2, d)`` dense operator (the mixture benchmark's ``d_y = 2``) with an
elementwise stand-in network.

Setting: box inpainting (the central half-size box of every channel hidden),
``sigma_y = 0.05``, a one-convolution eps network (``sigma_t Conv2d(C, C, 3, padding=1)``)
so that the sampler's own cost shows; one thread, CPU time of this process. With
``--device cuda`` every time below is wall time with the device synchronised at each reading
(the network's calls included: the synchronisations cost the sampler a launch latency per
call, so its own time there is an upper bound).

Per method and ``N`` it records

- ``cpu_s``: CPU time of one ``sample`` call;
- ``net_s``: the network's share, timed inside the run (the whole network, its output
  scaling by ``sigma_t`` included since 2026-12-04): its forward passes and, for the
  samplers that differentiate it (TDS, DPS), its backward passes with respect to the input
  only (the weights need no gradient; TDS's analytic reverse variance adds one backward per
  step for its trace probe);
- ``own_ms``: ``(cpu_s - net_s) / (N x calls)``, the time outside the network per
  particle-step (one network evaluation of one particle), in milliseconds;
- ``floor_ms``: the memory-traffic floor of a particle-step, ``passes x 4 d bytes / copy
  bandwidth`` plus the time to draw the step's ``d`` standard normals. ``passes`` counts the
  full-state arrays a step must read or write at the least (listed in ``PASSES``); the copy
  bandwidth is measured here (``clone`` of an ``(N, d)`` array: read + write);
- ``ratio = own_ms / floor_ms`` (the issue's goal: <= 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.registry import build


class Clock:
    """Seconds: the process's CPU time, or on a CUDA device the wall time after a
    synchronisation (the device's work runs asynchronously of the process)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()


#: the clock of the timed networks and of :func:`run_one` (set by :func:`run_one`)
CLOCK = Clock()

#: Full-state arrays (``d`` floats per particle) a step must read or write at the least:
#: every step reads ``x_t`` and the network's output and writes ``x_s`` (3), and writes then
#: reads its Gaussian noise (2); an SMC step that resamples also copies ``x`` (read + write,
#: 2); a gradient step reads the gradient of the network (1).
PASSES = {"FPS-SMC": 7, "MCGdiff": 7, "TDS": 8, "DPS": 6, "FPS": 5, "DDRM": 5, "DDNM": 5}


class _TimedConv(torch.autograd.Function):
    """``scale * conv2d(x, w, b)`` (``scale`` per sample) whose forward and input-gradient
    CPU times are added to ``timer.fwd_cpu`` / ``timer.bwd_cpu``: the whole network, its
    output scaling included (the weights get no gradient: a sampler differentiates the
    network with respect to its input only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, timer):  # type: ignore[override]
        start = CLOCK()
        out = torch.nn.functional.conv2d(x, weight, bias, padding=1).mul_(scale)
        timer.fwd_cpu += CLOCK() - start
        ctx.save_for_backward(weight, scale)
        ctx.shape, ctx.timer = x.shape, timer
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        start = CLOCK()
        weight, scale = ctx.saved_tensors
        gx = torch.nn.grad.conv2d_input(ctx.shape, weight, g * scale, padding=1)
        ctx.timer.bwd_cpu += CLOCK() - start
        return gx, None, None, None, None


class OneConv(nn.Module):
    """``eps(x, t) = sigma_t conv(x)``, the kernel near the identity: a stand-in network whose
    cost is small and known, and close to the exact eps of a standard normal prior
    (``sigma_t x_t``), so that the runs stay finite. Its forward and backward passes are
    timed inside the run (``fwd_cpu``, ``bwd_cpu``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(0.01)
            self.conv.bias.zero_()
            for c in range(channels):
                self.conv.weight[c, c, 1, 1] += 1.0
        self.schedule = bfd.VPSchedule.linear()
        self.fwd_cpu = 0.0
        self.bwd_cpu = 0.0
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        scale = self.schedule.sigma(t).reshape(-1, 1, 1, 1).to(x.dtype)
        return _TimedConv.apply(x, self.conv.weight, self.conv.bias, scale, self)


class _TimedScale(torch.autograd.Function):
    """``scale * (x * w)`` with its forward and input-gradient CPU times recorded (as
    _TimedConv)."""

    @staticmethod
    def forward(ctx, x, w, scale, timer):  # type: ignore[override]
        start = CLOCK()
        out = x * (w * scale)
        timer.fwd_cpu += CLOCK() - start
        ctx.save_for_backward(w, scale)
        ctx.timer = timer
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        start = CLOCK()
        w, scale = ctx.saved_tensors
        gx = g * (w * scale)
        ctx.timer.bwd_cpu += CLOCK() - start
        return gx, None, None, None


class OneScale(nn.Module):
    """The vector analogue of :class:`OneConv`: ``eps(x, t) = sigma_t (w * x)``, ``w`` near 1."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(1 + 0.01 * torch.randn(d), requires_grad=False)
        self.schedule = bfd.VPSchedule.linear()
        self.fwd_cpu = 0.0
        self.bwd_cpu = 0.0
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        scale = self.schedule.sigma(t).reshape(-1, 1).to(x.dtype)
        return _TimedScale.apply(x, self.w, scale, self)


def problem(shape: tuple[int, ...], seed: int = 0):
    """``(prior, problem)``: the one-convolution prior and a box-inpainting problem for an
    image shape ``(C, H, W)``; for a vector shape ``(d,)`` the elementwise network and a
    ``(2, d)`` Gaussian ``Dense`` operator (the mixture benchmark's ``d_y = 2``)."""
    torch.manual_seed(seed)
    if len(shape) == 1:
        vnet = OneScale(shape[0])
        prior = bfd.DiffusionModel.from_eps(vnet, bfd.VPSchedule.linear(), shape)
        prior.timed = vnet  # type: ignore[attr-defined]
        g = torch.Generator().manual_seed(seed)
        A = bfd.operators.Dense(torch.randn(2, shape[0], generator=g) / shape[0] ** 0.5)
        y = A(torch.randn((1,) + shape, generator=g)) + 0.05 * torch.randn(1, 2, generator=g)
        return prior, bfd.InverseProblem(A, y, 0.05)
    net = OneConv(shape[0])
    for p in net.parameters():
        p.requires_grad_(False)
    prior = bfd.DiffusionModel.from_eps(net, bfd.VPSchedule.linear(), shape)
    prior.timed = net  # type: ignore[attr-defined]
    H, W = shape[-2:]
    op = bfd.operators.Mask.box(shape, H // 4, W // 4, H // 2, W // 2)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1,) + shape, generator=g) * 2 - 1
    y = op(x) + 0.05 * torch.randn((1, op.out_dim), generator=g)
    return prior, bfd.InverseProblem(op, y, 0.05)


def _best_time(fn, repeats: int = 3) -> float:
    """Best of ``repeats`` timings of ``fn`` on :data:`CLOCK`, after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


def copy_bandwidth(N: int, d: int, device: str = "cpu") -> float:
    """Bytes per second of ``clone`` (read + write) of an ``(N, d)`` float32 array."""
    x = torch.randn(N, d, device=device)
    return 2 * x.numel() * 4 / _best_time(lambda: x.clone(), 5)


def randn_time(N: int, d: int, device: str = "cpu") -> float:
    """Seconds to draw ``N x d`` standard normals with a generator."""
    g = torch.Generator(device=device).manual_seed(0)
    return _best_time(lambda: torch.randn(N, d, generator=g, device=device), 5)


def run_one(
    method: str, N: int, shape: tuple[int, ...], steps: int, device: str = "cpu"
) -> dict[str, Any]:
    global CLOCK
    CLOCK = Clock(device)
    prior, prob = problem(shape)
    prior, prob = prior.to(device), prob.to(device)
    d = prior.event_shape.numel()
    sampler = build(method, steps)
    # warm-up
    sampler.sample(prior, prob, N, generator=torch.Generator(device=device).manual_seed(1))
    net = prior.timed
    net.fwd_cpu, net.bwd_cpu, net.calls = 0.0, 0.0, 0
    start = CLOCK()
    res = sampler.sample(prior, prob, N, generator=torch.Generator(device=device).manual_seed(0))
    cpu = CLOCK() - start
    calls = net.calls
    backprop = bool(res.info.get("backprop", False))
    net_s = net.fwd_cpu + net.bwd_cpu
    bw = copy_bandwidth(N, d, device)
    rng = randn_time(N, d, device) / N
    passes = PASSES.get(method, 5)
    floor = passes * 4 * d / bw + rng
    # a particle-step is one network evaluation of one particle by the sampler (MCGdiff and
    # TDS refine the grid where the likelihood sharpens, so they take more steps than
    # ``steps``); ``calls`` also counts the quality check's one call of an unweighted
    # sampler (``info.support_ratio``), whose network time is the network's and whose own
    # work stays in ``own``
    own = (cpu - net_s) / (N * res.info.nfe)
    return {
        "method": method,
        "shape": list(shape),
        "d": d,
        "N": N,
        "steps": steps,
        "cpu_s": cpu,
        "net_calls": calls,
        "nfe": res.info.nfe,
        "backprop": backprop,
        "net_s": net_s,
        "net_fwd_s": net.fwd_cpu,
        "net_bwd_s": net.bwd_cpu,
        "own_ms": 1e3 * own,
        "passes": passes,
        "copy_GBps": bw / 1e9,
        "randn_ms": 1e3 * rng,
        "floor_ms": 1e3 * floor,
        "ratio": own / floor,
        "device": device,
        "torch": torch.__version__,
    }


COLS = [
    "method",
    "N",
    "net_calls",
    "cpu_s",
    "net_s",
    "own_ms",
    "passes",
    "copy_GBps",
    "floor_ms",
    "ratio",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.floor")
    p.add_argument("--methods", default="FPS-SMC,MCGdiff,TDS,DPS")
    p.add_argument("--particles", default="8,32")
    p.add_argument("--shape", default="3,256,256")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (wall time, synchronised)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's malloc as it is (default: bfd.tune_allocator(), as the CLI does)",
    )
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if not a.default_allocator:
        bfd.tune_allocator()
    shape = tuple(int(s) for s in a.shape.split(","))
    print("| " + " | ".join(COLS) + " |")
    print("|" + "|".join("---" for _ in COLS) + "|")
    for N in map(int, a.particles.split(",")):
        for m in a.methods.split(","):
            r = run_one(m, N, shape, a.steps, a.device)
            cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in COLS]
            print("| " + " | ".join(cells) + " |", flush=True)
            if a.out:
                with Path(a.out).open("a") as f:
                    f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

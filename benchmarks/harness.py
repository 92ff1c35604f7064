"""Throughput and overhead of the samplers.

For each sampler and setting it records wall time, particle-steps per second
(``B * N * num_steps / wall``), NFEs, the **overhead ratio** = sampler wall time over
``NFE x`` the time of one denoiser call on the same ``(B, N)`` batch (forward, or forward
plus the input-only backward for samplers that differentiate the network), and peak memory
(CUDA peak allocation on a GPU; on CPU the growth of the maximum resident set of a fresh
process per configuration, :func:`run_fresh`, during the run).

Priors: the exact Gaussian-mixture denoiser of the benchmark (25 isotropic components), an
MLP denoiser (random weights; its cost stands in for a trained network of that size), and
the shipped digits U-Net (``load_pretrained("digits_diffusion")``, 1x8x8 images, with a
random 50% pixel mask as the operator).
"""

from __future__ import annotations

import gc
import resource
import time
from typing import Any

import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.registry import build, names
from bayesfilter_diff.studies.gmm_benchmark import benchmark_problem


class MLPEps(torch.nn.Module):
    """A plain MLP eps-network ``(x, t) -> eps`` used as a stand-in for a trained network."""

    def __init__(self, d: int, width: int = 512, depth: int = 3) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Linear(d + 1, width), torch.nn.SiLU()]
        for _ in range(depth - 1):
            layers += [torch.nn.Linear(width, width), torch.nn.SiLU()]
        layers.append(torch.nn.Linear(width, d))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=-1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int = 3) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def make_prior(kind: str, d: int, dtype, device, gmm=None):
    sched = bfd.VPSchedule.linear()
    if kind == "gmm":
        return gmm.diffusion(sched)
    torch.manual_seed(0)
    net = MLPEps(d).to(device=device, dtype=dtype)
    return bfd.DiffusionModel.from_eps(net, sched, (d,))


#: image priors: the shipped 8x8 digits U-Net, and randomly initialised U-Nets of the
#: toolkit's architecture (channels 32, 64) for 1x28x28 and 3x32x32 images (their cost stands
#: in for a trained network of that size)
UNET_SHAPES = {"unet": (1, 8, 8), "unet28": (1, 28, 28), "unet32": (3, 32, 32)}


def unet_problem(B: int, dtype, device, kind: str = "unet"):
    """A U-Net prior and a 50% random-mask problem on ``B`` random images."""
    shape = UNET_SHAPES[kind]
    if kind == "unet":
        prior = bfd.priors.load_pretrained("digits_diffusion")
    else:
        torch.manual_seed(0)
        net = bfd.priors.UNet(in_channels=shape[0], channels=(32, 64))
        prior = bfd.DiffusionModel.from_eps(net, bfd.VPSchedule.linear(), shape)
    prior = prior.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    op = bfd.operators.Mask.random(shape, 0.5, g, dtype=dtype)
    x = torch.rand((B,) + shape, generator=g, dtype=dtype) * 2 - 1
    y = op(x) + 0.05 * torch.randn((B, op.out_dim), generator=g, dtype=dtype)
    return prior, bfd.InverseProblem(op, y, 0.05).to(device)


def make_problem(prior_kind: str, d: int, d_y: int, B: int, dtype, dev):
    """``(prior, problem)`` with ``B`` observations."""
    if prior_kind in UNET_SHAPES:
        return unet_problem(B, dtype, dev, prior_kind)
    gmm, problem, _ = benchmark_problem(d, d_y, 0, dtype=dtype)
    if B > 1:
        y = problem.y.expand(B, -1).contiguous()
        problem = bfd.InverseProblem(problem.operator, y, problem.noise_std)
    gmm, problem = gmm.to(dev), problem.to(dev)
    return make_prior(prior_kind, d, dtype, dev, gmm), problem


def batch_speedup(
    method: str,
    prior_kind: str,
    d: int,
    B: int,
    N: int,
    steps: int,
    dtype=torch.float32,
    device: str = "cpu",
) -> dict[str, Any]:
    """Wall time of one call with ``B`` problems vs ``B`` calls with one problem each."""
    dev = torch.device(device)
    prior, problem = make_problem(prior_kind, d, 2, B, dtype, dev)
    sampler = build(method, steps)
    singles = [
        bfd.InverseProblem(problem.operator, problem.y[b], problem.noise_std) for b in range(B)
    ]

    def batched():
        sampler.sample(prior, problem, N, generator=torch.Generator(device=dev).manual_seed(0))

    def separate():
        for p in singles:
            sampler.sample(prior, p, N, generator=torch.Generator(device=dev).manual_seed(0))

    tb, ts = _time(batched, dev, 2), _time(separate, dev, 2)
    return {
        "method": method,
        "prior": prior_kind,
        "B": B,
        "N": N,
        "steps": steps,
        "batched_s": tb,
        "separate_s": ts,
        "speedup": ts / tb,
    }


def denoiser_call_time(prior, B: int, N: int, d: int, dtype, device, backprop: bool) -> float:
    x = torch.randn((B, N) + tuple(prior.event_shape), dtype=dtype, device=device)
    t = torch.tensor(0.5, dtype=dtype, device=device)

    def fwd():
        with torch.no_grad():
            prior.denoise(x, t)

    def fwd_bwd():
        # the gradient with respect to the input only, as the samplers take it (a
        # .backward() would also compute the weights' gradients of a trainable network)
        xr = x.detach().requires_grad_(True)
        out = prior.denoise(xr, t)
        torch.autograd.grad(out, xr, grad_outputs=torch.ones_like(out))

    return _time(fwd_bwd if backprop else fwd, device)


def run_one(
    method: str,
    prior_kind: str,
    d: int,
    d_y: int,
    B: int,
    N: int,
    steps: int,
    dtype=torch.float32,
    device: str = "cpu",
    compile: bool = False,
    chunk_size: int | None = None,
    tune_allocator: bool = True,
) -> dict[str, Any]:
    """Time one sampler run (``compile``: ``torch.compile`` the network first, its compile
    time excluded by a warm-up run; ``chunk_size``: the network sees at most this many
    particles per call; ``tune_allocator``: :func:`bayesfilter_diff.tune_allocator` first,
    as the command line does)."""
    if tune_allocator:
        bfd.tune_allocator()
    dev = torch.device(device)
    prior, problem = make_problem(prior_kind, d, d_y, B, dtype, dev)
    d = prior.event_shape.numel()
    prior.chunk_size = chunk_size
    sampler = build(method, steps)
    compile_s = None
    if compile:
        prior.net = torch.compile(prior.net, dynamic=False)
        t0 = time.perf_counter()
        sampler.sample(prior, problem, N, generator=torch.Generator(device=dev).manual_seed(1))
        _sync(dev)
        compile_s = time.perf_counter() - t0
    if dev.type == "cuda" and not compile:
        # warm-up: CUDA's lazy initialisation (context, cuBLAS handles, kernel loading) is not
        # the sampler's time (the compiled run above already warmed up)
        sampler.sample(prior, problem, N, generator=torch.Generator(device=dev).manual_seed(1))
        _sync(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _sync(dev)
    start = time.perf_counter()
    res = sampler.sample(prior, problem, N, generator=g)
    _sync(dev)
    wall = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated(dev)
        if dev.type == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    )
    nfe = int(res.info["nfe"])
    backprop = bool(res.info.get("backprop", False))
    call = denoiser_call_time(prior, B, N, d, dtype, dev, backprop)
    return {
        "method": method,
        "prior": prior_kind,
        "d": d,
        "d_y": d_y,
        "B": B,
        "N": N,
        "steps": steps,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device,
        "wall_s": wall,
        "particle_steps_per_s": B * N * steps / wall,
        "nfe": nfe,
        "backprop": backprop,
        "call_s": call,
        "overhead": wall / (nfe * call) if nfe else float("nan"),
        "peak_mem_MB": peak / 2**20,
        "compile": compile,
        "compile_warmup_s": compile_s,
        "chunk_size": chunk_size,
    }


def run_fresh(*args: Any, **kw: Any) -> dict[str, Any]:
    """:func:`run_one` in a new (spawned) Python process: its peak memory is that of this
    configuration alone, not the high-water mark of earlier runs in the same process."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(run_one, *args, **kw).result()


def default_methods() -> list[str]:
    return names(studies=True, mask=False, path="vp")

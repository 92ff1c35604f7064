"""Memory and time of a differentiable ``DiffusionPrior.log_prob``: through the solver or adjoint.

    python -m benchmarks.ode_density [--steps 10,40,160] [--batch 8]

The shipped ``digits_diffusion`` prior (1x8x8 U-Net, d = 64, Hutchinson's estimator with
one probe), ``log_prob`` and its gradient in ``x`` for a batch of held-out digits, RK4 on
the default quadratic grid, one thread. Each configuration runs in a fresh (spawned)
process: the peak resident memory it reports (``ru_maxrss``) minus the resident memory
before the call is that configuration's alone. Backpropagation through the solver keeps
every step's graph (memory grows with the steps); the adjoint keeps none (constant), at
the price of a backward solve.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
import warnings
from concurrent.futures import ProcessPoolExecutor


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one(steps: int, adjoint: bool, batch: int) -> dict:
    import torch

    import bayesfilter_diff as bfd
    from bayesfilter_diff.priors.networks import load_pretrained
    from bayesfilter_diff.training import load_dataset

    torch.set_num_threads(1)
    warnings.simplefilter("ignore", bfd.PosteriorQualityWarning)  # Hutchinson: a cost study
    model = load_pretrained("digits_diffusion")
    prior = bfd.DiffusionPrior(model, ode_steps=steps, adjoint=adjoint)
    x = load_dataset("digits", "test")[:batch].clone()
    x0 = x.clone().requires_grad_(True)
    prior.log_prob(x0[:1]).sum().backward()  # warm-up (allocations, lazy imports)
    base = _rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    x = x.requires_grad_(True)
    lp = prior.log_prob(x)
    (g,) = torch.autograd.grad(lp.sum(), x)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "ode_steps": steps,
        "adjoint": adjoint,
        "batch": batch,
        "peak_minus_before_MB": round(peak - base, 1),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "grad_norm": float(g.norm()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="10,40,160")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    for steps in [int(s) for s in args.steps.split(",")]:
        for adjoint in (False, True):
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                print(json.dumps(pool.submit(one, steps, adjoint, args.batch).result()), flush=True)


if __name__ == "__main__":
    main()

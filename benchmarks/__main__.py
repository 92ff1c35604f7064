"""``python -m benchmarks``: sampler throughput / overhead tables (see harness.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .harness import batch_speedup, default_methods, run_fresh, run_one


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument("--methods", default=None, help="comma-separated (default: all VP methods)")
    p.add_argument("--prior", default="mlp", choices=["mlp", "gmm", "unet", "unet28", "unet32"])
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--chunk-size", type=int, default=None, help="particles per network call")
    p.add_argument("--dims", default="8,80,800")
    p.add_argument("--particles", default="1024")
    p.add_argument("--batch", default="1")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument(
        "--batch-speedup",
        type=int,
        default=0,
        metavar="B",
        help="instead: time B problems in one call vs B separate calls",
    )
    p.add_argument(
        "--same-process",
        action="store_true",
        help="run every configuration in this process (default: a fresh process each, so "
        "that peak memory is that configuration's own)",
    )
    p.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's malloc as it is (default: bfd.tune_allocator(), as the CLI does)",
    )
    a = p.parse_args(argv)
    methods = a.methods.split(",") if a.methods else default_methods()
    dtype = getattr(torch, a.dtype)
    if a.batch_speedup:
        print("| method | prior | B | N | steps | batched_s | separate_s | speedup |")
        print("|---|---|---|---|---|---|---|---|")
        for m in methods:
            for N in map(int, a.particles.split(",")):
                r = batch_speedup(
                    m,
                    a.prior,
                    int(a.dims.split(",")[0]),
                    a.batch_speedup,
                    N,
                    a.steps,
                    dtype,
                    a.device,
                )
                print(
                    f"| {m} | {a.prior} | {r['B']} | {N} | {a.steps} | {r['batched_s']:.3g} | "
                    f"{r['separate_s']:.3g} | {r['speedup']:.1f} |",
                    flush=True,
                )
        return 0
    cols = [
        "method",
        "prior",
        "d",
        "B",
        "N",
        "steps",
        "wall_s",
        "particle_steps_per_s",
        "nfe",
        "call_s",
        "overhead",
        "peak_mem_MB",
    ]
    if a.dtype != "float32" or a.compile or a.chunk_size:
        cols[2:2] = ["dtype", "compile", "chunk_size"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for d in map(int, a.dims.split(",")):
        for B in map(int, a.batch.split(",")):
            for N in map(int, a.particles.split(",")):
                for m in methods:
                    runner = run_one if a.same_process else run_fresh
                    r = runner(
                        m,
                        a.prior,
                        d,
                        2,
                        B,
                        N,
                        a.steps,
                        dtype,
                        a.device,
                        a.compile,
                        a.chunk_size,
                        tune_allocator=not a.default_allocator,
                    )
                    print(
                        "| "
                        + " | ".join(
                            f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols
                        )
                        + " |",
                        flush=True,
                    )
                    if a.out:
                        with Path(a.out).open("a") as f:
                            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The largest number of particles a sampler runs with under a memory cap.

``python -m benchmarks.max_particles --method MCGdiff --prior gmm --dim 800 --cap-gb 16``
doubles ``N`` from ``--start`` and runs the sampler (``--steps`` steps, float32) in a child
process whose address space is capped at ``--cap-gb`` GiB (``RLIMIT_AS``), so that running
out of memory is an allocation error in the child, not the machine's OOM killer. Prints one
line per ``N`` and the largest ``N`` that completed; ``--chunk-size`` bounds the particles
per network call.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _limit(cap_bytes: int):
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    return set_limit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.max_particles")
    p.add_argument("--method", default="MCGdiff")
    p.add_argument("--prior", default="gmm")
    p.add_argument("--dim", type=int, default=800)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--start", type=int, default=4096)
    p.add_argument("--stop", type=int, default=2**22)
    p.add_argument("--cap-gb", type=float, default=16.0)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--out", default=None, help="append a JSON line with the result")
    a = p.parse_args(argv)
    cap = int(a.cap_gb * 2**30)
    best, N = 0, a.start
    while N <= a.stop:
        cmd = [
            sys.executable, "-m", "benchmarks", "--prior", a.prior, "--dims", str(a.dim),
            "--particles", str(N), "--steps", str(a.steps), "--methods", a.method,
        ]  # fmt: skip
        if a.chunk_size:
            cmd += ["--chunk-size", str(a.chunk_size)]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit(cap))
        ok = r.returncode == 0
        tail = (r.stdout.strip().splitlines() or [""])[-1] if ok else r.stderr.strip()[-200:]
        print(
            f"N={N}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s  {tail}",
            flush=True,
        )
        if not ok:
            break
        best, N = N, 2 * N
    print(f"largest N that ran under {a.cap_gb:g} GiB: {best}")
    if a.out:
        with open(a.out, "a") as f:
            rec = {"method": a.method, "prior": a.prior, "d": a.dim, "cap_gb": a.cap_gb}
            rec.update(max_N=best, chunk_size=a.chunk_size, steps=a.steps)
            f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

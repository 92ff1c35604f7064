"""The normal generators at hand on the CPU, one thread: the time to draw the standard
normals of one 3x256x256 step of 8 particles (1.57 M float32 draws) into a reused buffer,
best of 7, against a copy of the same buffer (the memory floor's unit). A fresh array from
``torch.randn`` before and after :func:`bayesfilter_diff.tune_allocator` (which the samplers'
benchmarks call: freed blocks reused, not mapped afresh).

    OMP_NUM_THREADS=1 python -m benchmarks.normal_rng

torch's ``Tensor.normal_`` is what the samplers use (``Context.randn``); numpy's bit
generators are the other candidates a CPU run could take (issue #18: the floor's largest
term at small N is the normal generator).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

import bayesfilter_diff as bfd


def _best(fn: Callable[[], object], repeats: int = 7) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    torch.set_num_threads(1)
    n = 8 * 3 * 256 * 256
    buf = torch.empty(n)
    g = torch.Generator().manual_seed(0)
    rows = [
        ("torch Tensor.normal_ (into the buffer)", _best(lambda: buf.normal_(generator=g))),
        ("torch.randn (a fresh array)", _best(lambda: torch.randn(n, generator=g))),
    ]
    bfd.tune_allocator()
    rows.append(
        (
            "torch.randn (a fresh array), after bfd.tune_allocator()",
            _best(lambda: torch.randn(n, generator=g)),
        )
    )
    arr = buf.numpy()
    for bits in (np.random.PCG64, np.random.SFC64, np.random.Philox, np.random.MT19937):
        rng = np.random.Generator(bits(0))
        rows.append(
            (
                f"numpy {bits.__name__} standard_normal (float32, into the buffer)",
                _best(lambda rng=rng: rng.standard_normal(out=arr, dtype=np.float32)),
            )
        )
    copy = _best(lambda: buf.clone())
    print("| generator | ms per 1.57 M draws | / torch normal_ | / one copy |")
    print("|---|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {ms / rows[0][1]:.2f} | {ms / copy:.1f} |")
    print(f"| (a copy of the buffer) | {copy:.2f} | | 1 |")


if __name__ == "__main__":
    main()

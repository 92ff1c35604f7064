"""What fusing a move's arithmetic would give (issue #18): TDS's gradient move
``x_new = mean_u + c g + std z`` with its log-ratio ``-(z . delta / std + |delta|^2 /
(2 std^2))``, eager (the ops the sampler runs) against ``torch.compile`` of the same
arithmetic (one fused loop per output), on the floor benchmark's batch (8 particles of
3x256x256, float32, one thread, CPU time, best of 3 x 10 calls), next to the copy time of
one array (the floor's unit: this move reads three arrays and writes one, about two copies).

    OMP_NUM_THREADS=1 python -m benchmarks.fused_move
"""

from __future__ import annotations

import time

import torch


def _eager(mean_u, grad, z, std, c):
    delta = grad * c
    x_new = mean_u.add(delta).addcmul_(z, std)
    flat = delta.shape[:2] + (-1,)
    zd = torch.linalg.vecdot(z.reshape(flat), delta.reshape(flat))
    dd = torch.linalg.vector_norm(delta.reshape(flat), dim=-1) ** 2
    return x_new, -(zd / std + dd / (2 * std**2))


def _fusable(mean_u, grad, z, std, c):
    delta = grad * c
    x_new = mean_u + delta + std * z
    flat = delta.shape[:2] + (-1,)
    zd = (z * delta).reshape(flat).sum(-1)
    dd = (delta * delta).reshape(flat).sum(-1)
    return x_new, -(zd / std + dd / (2 * std**2))


def _best(f, args, reps: int = 10) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(reps):
            f(*args)
        best = min(best, (time.process_time() - t0) / reps)
    return best


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    shape = (1, 8, 3, 256, 256)
    arrays = [torch.randn(shape, generator=g) for _ in range(3)]
    args = (*arrays, torch.tensor(0.3), torch.tensor(0.05))
    compiled = torch.compile(_fusable, dynamic=False)
    t0 = time.perf_counter()
    compiled(*args)
    print(f"compile: {time.perf_counter() - t0:.1f} s")
    te, tc = _best(_eager, args), _best(compiled, args)
    copy = _best(lambda a: a.clone(), (arrays[0],))
    (xe, le), (xc, lc) = _eager(*args), compiled(*args)
    n = shape[1]
    print(f"eager {te * 1e3:.2f} ms ({te * 1e3 / n:.3f} per particle-step), compiled "
          f"{tc * 1e3:.2f} ms ({tc * 1e3 / n:.3f}), one array's copy {copy * 1e3:.2f} ms "
          f"(the move's floor ~{2 * copy * 1e3:.2f} ms)")  # fmt: skip
    print(f"max |dx| {float((xe - xc).abs().max()):.2e}, max |d log-ratio| "
          f"{float((le - lc).abs().max()):.2e} of {float(le.abs().max()):.3g}")  # fmt: skip


if __name__ == "__main__":
    main()

"""The Laplace twist's full Hessian (issue #15): its ``d`` rows (the Jacobian of the
gradient) from one backward pass per row against batched backward passes
(``kernels._gradient_jacobian``) with chunks of at most ``2^k`` entries of ``(rows, B, N,
d)``, on two kinds of likelihood: a Poisson GLM (small intermediates: ``m = d / 2`` rates per
particle) and a two-layer tanh network observed with Gaussian noise (intermediates of
``hidden`` entries per particle, several times ``d``). CPU time in ms per Hessian (written
into one contiguous array either way), one thread, float32, best of 3.

    OMP_NUM_THREADS=1 python -m benchmarks.hessian_rows
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pyro.distributions as dist
import torch
from torch import Tensor

from bayesfilter_diff.samplers import kernels

CHUNKS = (16, 18, 20, 22, 24)


def _per_row(g: Tensor, xr: Tensor) -> Tensor:
    rows = [
        torch.autograd.grad(g[..., j].sum(), xr, retain_graph=True)[0] for j in range(g.shape[-1])
    ]
    return torch.stack(rows, -2)


def _sites(gen: torch.Generator) -> Iterator[tuple[str, int, int, Callable[[Tensor], Tensor]]]:
    for d, N, hidden in ((32, 256, 256), (64, 2048, 256), (16, 4096, 1024)):
        W1 = torch.randn(d, hidden, generator=gen) / d**0.5
        W2 = torch.randn(hidden, 8, generator=gen) / hidden**0.5
        y = torch.randn(8, generator=gen)

        def mlp(x: Tensor, W1: Tensor = W1, W2: Tensor = W2, y: Tensor = y) -> Tensor:
            return -((torch.tanh(x @ W1) @ W2 - y) ** 2).sum(-1) / 0.02

        yield f"tanh network, hidden {hidden}", d, N, mlp
    for d, N in ((8, 256), (32, 256), (32, 2048), (100, 256), (100, 2048)):
        m = max(2, d // 2)
        A = torch.randn(m, d, generator=gen) * 3 / d**0.5
        c = torch.poisson(torch.full((m,), 5.0), generator=gen)

        def glm(x: Tensor, A: Tensor = A, c: Tensor = c) -> Tensor:
            return dist.Poisson((x @ A.T + 1).exp()).log_prob(c).sum(-1)

        yield "Poisson GLM", d, N, glm


def _best(fn: Callable[[Tensor, Tensor], Tensor], g: Tensor, xr: Tensor) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.process_time()
        fn(g, xr)
        best = min(best, time.process_time() - t)
    return 1e3 * best


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    head = " | ".join(f"2^{k}" for k in CHUNKS)
    print(f"| site | d | N | per row | {head} |")
    print("|---|---|---|---|" + "---|" * len(CHUNKS))
    default = kernels._HESSIAN_CHUNK
    for name, d, N, ll in _sites(gen):
        xr = (0.3 * torch.randn(1, N, d, generator=gen)).requires_grad_(True)
        (g,) = torch.autograd.grad(ll(xr).sum(), xr, create_graph=True)
        row = [_best(_per_row, g, xr)]
        for k in CHUNKS:
            kernels._HESSIAN_CHUNK = 1 << k
            row.append(_best(kernels._gradient_jacobian, g, xr))
        kernels._HESSIAN_CHUNK = default
        print(f"| {name} | {d} | {N} | " + " | ".join(f"{t:.1f}" for t in row) + " |", flush=True)


if __name__ == "__main__":
    main()

"""A mixture given with identity covariance matrices against the same mixture given with
variances (issue #18): ``python -m benchmarks.mixture_paths [--d 80] [--N 1024]``.

``GaussianMixture`` stores covariances in their cheapest exact form: ``(K, d, d)`` identity
matrices become ``(K,)`` variances. This times the exact denoiser (one call on ``N``
particles, CPU time, one thread) three ways in one process: given as variances, given as
identity matrices (the compact path now), and the dense eigendecomposition path those
matrices took before (forced by hand).
"""

from __future__ import annotations

import argparse
import sys

import torch

import bayesfilter_diff as bfd

from .floor import _best_time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mixture_paths")
    p.add_argument("--d", type=int, default=80)
    p.add_argument("--K", type=int, default=25)
    p.add_argument("--N", type=int, default=1024)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    K, d = a.K, a.d
    w = torch.full((K,), 1.0 / K)
    mu = 2 * torch.randn(K, d, generator=g)
    given_var = bfd.GaussianMixture(w, mu, torch.ones(K))
    given_eye = bfd.GaussianMixture(w, mu, torch.eye(d).expand(K, d, d).clone())
    dense = bfd.GaussianMixture(w, mu, torch.eye(d).expand(K, d, d).clone())
    dense.kind, dense._cov_shared = "full", False  # the path identity matrices took before
    dense.eigvals = torch.ones(K, d)
    dense.eigvecs = torch.eye(d).expand(K, d, d).clone()
    x = torch.randn(a.N, d, generator=g)
    al, s = torch.full((a.N,), 0.7), torch.full((a.N,), 0.7)
    ref = given_var.noisy_denoise(x, al, s)
    for m in (given_eye, dense):
        torch.testing.assert_close(m.noisy_denoise(x, al, s), ref, rtol=1e-4, atol=1e-4)
    t_var = _best_time(lambda: given_var.noisy_denoise(x, al, s))
    t_eye = _best_time(lambda: given_eye.noisy_denoise(x, al, s))
    t_dense = _best_time(lambda: dense.noisy_denoise(x, al, s))
    print(f"K = {K}, d = {d}, N = {a.N}: stored kind of the identity matrices: {given_eye.kind}")
    print("| given as | path | denoiser CPU s | vs variances |")
    print("|---|---|---|---|")
    print(f"| variances (K,) | iso | {t_var:.4g} | 1 |")
    print(
        f"| identity matrices (K, d, d) | {given_eye.kind} (now) | {t_eye:.4g} | {t_eye / t_var:.2f} |"
    )
    print(
        f"| identity matrices (K, d, d) | full (before) | {t_dense:.4g} | {t_dense / t_var:.1f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

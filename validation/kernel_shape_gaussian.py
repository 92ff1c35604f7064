"""The reverse kernel's shape on anisotropic Gaussian priors, in closed form.

For a Gaussian prior ``N(mu, S)`` every kernel below is linear-Gaussian, so the chain's law
of ``x0`` on the default sampler's grid, and its evidence ``p(y)``, are exact recursions (no
sampling): the evidence error is the chain's discretisation alone. Priors: ``S = Q diag(e)
Q^T`` with a random rotation ``Q`` and eigenvalues ``e`` log-spaced from 1e-2 to 4 (the
``aniso`` benchmark's covariances), ``mu = 0.3``; ``m`` random projections (rows
``N(0, 1 / d)``) of a prior draw with noise 0.02. The kernels' added variance ``b^2 K(x_t)``
(``K`` replacing ``Cov[x0 | x_t] = C``, here constant in ``x_t``):

- ``ddim``: ``K = 0``;
- ``reference``: ``K = v(t) I``, ``v`` the prior's average ``Var[x0 | x_t]`` per coordinate
  (TDS's ``reverse_variance="reference"``);
- ``projected``: ``v (I - P) + P C P``, ``P`` the projector on the operator's rows
  (``"observed"`` as first built in session 37, without the cross covariances);
- ``observed``: ``v (I - P) + C P (P C P)^+ P C``, the Nystrom completion from the
  observed directions (TDS's ``reverse_variance="observed"``, the default's since
  session 37);
- ``full``: ``K = C`` (the true reverse transition: exact at any number of steps);
- ``top<k>`` (with ``--top k``): ``observed`` from the top ``k`` right singular vectors of
  the operator only (what a kernel measuring ``Cov`` in ``k < m`` directions could do).

Run: ``OMP_NUM_THREADS=1 python validation/kernel_shape_gaussian.py [--d 100] [--m 10]
[--trials 4] [--steps 100] [--top 16]`` (seconds); one line per prior: the log-evidence
error of each kernel's chain.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.kernels import ddim_coefficients, ddim_weights
from bayesfilter_diff.samplers.registry import default_sampler

D = torch.float64
KINDS = ("ddim", "reference", "projected", "observed", "full")


def chain_evidence(mu, S, prior, times, kind, proj, problem) -> float:
    """``log p(y)`` under the chain with kernel ``kind`` (module docstring)."""
    sch = prior.schedule
    d = mu.numel()
    eye = torch.eye(d, dtype=D)
    m, P = torch.zeros(d, dtype=D), sch.sigma(times[0]).double() ** 2 * eye
    for i in range(times.numel() - 1):
        t, s = times[i], times[i + 1]
        a, sg = sch.alpha(t).double(), sch.sigma(t).double()
        G = a * S @ torch.linalg.inv(a**2 * S + sg**2 * eye)  # x0_hat = G x + (mu - a G mu)
        coef = ddim_coefficients(sch, t, s, 1.0)
        cx, b = (float(c) for c in ddim_weights(coef, sg))
        K = b * G + cx * eye
        m = K @ m + b * (mu - a * G @ mu)
        C = S - a * G @ S
        v = float(prior.x0_variance(t))
        added = {
            "ddim": 0 * eye,
            "reference": v * eye,
            "projected": v * (eye - proj) + proj @ C @ proj,
            "observed": v * (eye - proj) + C @ proj @ torch.linalg.pinv(proj @ C @ proj) @ proj @ C,
            "full": C,
        }[kind]
        P = K @ P @ K.T + float(coef.std) ** 2 * eye + b**2 * added
    chain = bfd.GaussianMixture(torch.ones(1, dtype=D), m[None], P[None])
    return float(chain.log_evidence(problem))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=100)
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--top", type=int, default=0)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(1234)
    d, m = args.d, args.m
    print(f"d = {d}, m = {m}, {args.steps} steps; log-evidence error of each kernel's chain")
    for trial in range(args.trials):
        rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D))
        ev = torch.logspace(-2, 0.6, d, dtype=D)[torch.randperm(d, generator=g)]
        S = (rot * ev) @ rot.T
        S = 0.5 * (S + S.T)
        mu = torch.full((d,), 0.3, dtype=D)
        gmm = bfd.GaussianMixture(torch.ones(1, dtype=D), mu[None], S[None])
        prior = gmm.diffusion(bfd.VPSchedule.linear())
        M = torch.randn(m, d, generator=g, dtype=D) / math.sqrt(d)
        y = M @ gmm.sample(1, g)[0] + 0.02 * torch.randn(m, generator=g, dtype=D)
        problem = bfd.InverseProblem(bfd.operators.Dense(M), y, 0.02)
        exact = float(gmm.log_evidence(problem))
        sampler = dataclasses.replace(default_sampler(problem), num_steps=args.steps)
        times = sampler.time_grid(prior, problem).to(D)
        proj = torch.linalg.pinv(M) @ M
        errs = [
            f"{k} {chain_evidence(mu, S, prior, times, k, proj, problem) - exact:+.4f}"
            for k in KINDS
        ]
        if args.top:
            vk = torch.linalg.svd(M, full_matrices=False)[2][: args.top].T
            top = chain_evidence(mu, S, prior, times, "observed", vk @ vk.T, problem)
            errs.append(f"top{args.top} {top - exact:+.4f}")
        print(f"prior {trial}: " + ", ".join(errs), flush=True)


if __name__ == "__main__":
    main()

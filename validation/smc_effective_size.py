"""Bias or Monte Carlo variance? The effective size of an SMC run's final cloud.

    python validation/smc_effective_size.py TDS       # or MCGdiff

The noise-level study's d = 8, sigma_y = 1e-3 problem (``noise_problem(8, 1e-3, 0)``),
R = 12 independent copies in one batch, N = 4096, 100 steps. The copies' weighted
posterior means are compared with the exact mean in the eigenbasis of the exact posterior
covariance (units: posterior standard deviations): the mean error over copies with its
standard error (bias), and the spread between copies, which is the Monte Carlo error of
one run; ``N_eff = 1 / spread^2`` is the number of independent exact draws with the same
error. Recorded in docs/methods/tds.md.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.registry import build
from bayesfilter_diff.studies.noise_levels import noise_problem


def main(method: str, R: int = 12, N: int = 4096) -> None:
    warnings.simplefilter("ignore")
    gmm, problem = noise_problem(8, 1e-3, 0)
    post = gmm.posterior(problem)
    C, mu = post.covariance().double(), post.mean().double()
    ev, Q = torch.linalg.eigh(C)
    y = problem.y.expand(R, -1).contiguous()  # R independent copies of the problem
    copies = bfd.InverseProblem(problem.operator, y, noise_std=1e-3)
    res = build(method, 100).sample(
        gmm.diffusion(bfd.VPSchedule.linear()),
        copies,
        N,
        generator=torch.Generator().manual_seed(5),
    )
    W, x = res.weights().double(), res.samples.double()
    mean = (W[..., None] * x).sum(1)  # (R, d)
    z = ((mean - mu) @ Q) / ev.sqrt()  # (R, d), posterior standard deviations
    bias, se, spread = z.mean(0), z.std(0) / math.sqrt(R), z.std(0)

    def fmt(v: torch.Tensor) -> list[float]:
        return [round(float(a), 3) for a in v]

    print(method, "bias (sd units):", fmt(bias))
    print(method, "  se          :", fmt(se))
    print(
        method,
        "between-run sd of the mean (sd units):",
        fmt(spread),
        f" iid N={N} would give",
        round(1 / math.sqrt(N), 3),
        "-> N_eff ~",
        [int(1 / float(v) ** 2) for v in spread],
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "TDS")

"""TDS's Jacobian twist against the operator twist: CPU time, lineages and evidence.

    OMP_NUM_THREADS=1 python -m benchmarks.jacobian_twist [--problems aniso moons digits]
        [--samplers operator jacobian observed]

Each problem runs ``bfd.infer``'s default for linear-Gaussian problems (TDS, 100 steps,
``adaptive_ess=0.1``) as it was with the reference kernel and ``twist_variance="operator"``
(``operator``: the default until 2026-12-06) and ``"jacobian"`` (``jacobian``: the default
with at most 16 observations from then to session 37), and with the Jacobian twist and
``reverse_variance="observed"`` (``observed``: the kernel's ``b^2 Cov[x0 | x_t]`` in the
observed directions, m more backward passes per trusted step; the default since session
37), in one process, on the same seeds: CPU time, network calls (the Jacobian's backward passes,
one per observed coordinate, are not counted there), genealogy ESS (how many independent
draws the cloud is worth), the log-evidence and, where it is known in closed form, its
error. Problems: ``aniso``, a two-component mixture in d = 100 with full covariances
(eigenvalues 1e-2 .. 4, random rotations) seen through 10 random projections at
``sigma_y = 0.02``, N = 512 (the closed form is the reference); ``moons``, the shipped
``moons_diffusion`` network, ``A = [1, 0.5]``, ``sigma_y = 0.05``, ``y = 0.6``, N = 2048;
``digits``, the shipped ``digits_diffusion`` U-Net (8 x 8), 10 random projections of a prior
draw at ``sigma_y = 0.05``, N = 256.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.priors.networks import load_pretrained
from bayesfilter_diff.samplers import DDIM, TDS


def aniso_problem():
    """The mixture prior (closed form), the problem and its exact log-evidence."""
    g = torch.Generator().manual_seed(1234)
    d, m = 100, 10

    def cov():
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        ev = torch.logspace(-2, 0.6, d, dtype=torch.float64)[torch.randperm(d, generator=g)]
        c = (Q * ev) @ Q.T
        return 0.5 * (c + c.T)

    covs = torch.stack([cov(), cov()])
    means = torch.stack([-torch.ones(d), torch.ones(d)]).double() * 0.3
    gmm = bfd.GaussianMixture(torch.tensor([0.3, 0.7], dtype=torch.float64), means, covs)
    x = gmm.sample(1, g)[0]
    A = bfd.operators.Dense(torch.randn(m, d, generator=g, dtype=torch.float64) / math.sqrt(d))
    y = A(x) + 0.02 * torch.randn(m, generator=g, dtype=torch.float64)
    problem = bfd.InverseProblem(A, y, noise_std=0.02)
    return gmm.diffusion(bfd.VPSchedule.linear()), problem, float(gmm.log_evidence(problem))


def moons_problem():
    prior = load_pretrained("moons_diffusion")
    A = bfd.operators.Dense(torch.tensor([[1.0, 0.5]]))
    return prior, bfd.InverseProblem(A, torch.tensor([0.6]), noise_std=0.05), None


def digits_problem():
    prior = load_pretrained("digits_diffusion")
    g = torch.Generator().manual_seed(123)
    shape = tuple(prior.event_shape)
    d, m = math.prod(shape), 10
    M = torch.randn(m, d, generator=g) / math.sqrt(d)
    free = bfd.InverseProblem(bfd.operators.Identity(shape), torch.zeros(shape), noise_std=1.0)
    x = DDIM(num_steps=50).sample(prior, free, 1, generator=g).samples.reshape(-1)
    y = M @ x + 0.05 * torch.randn(m, generator=g)
    problem = bfd.InverseProblem(bfd.operators.Dense(M, in_shape=shape), y, noise_std=0.05)
    return prior, problem, None


PROBLEMS = {"aniso": (aniso_problem, 512), "moons": (moons_problem, 2048)}
PROBLEMS["digits"] = (digits_problem, 256)
SAMPLERS = {
    "operator": ("operator", "reference"),
    "jacobian": ("jacobian", "reference"),
    "observed": ("jacobian", "observed"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.jacobian_twist")
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    a = p.parse_args(argv)
    print(
        "| problem | sampler | seed | CPU s | network calls | genealogy ESS / N | log-evidence | error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in a.problems:
        build, N = PROBLEMS[name]
        prior, problem, exact = build()
        for label in a.samplers:
            twist, kernel = SAMPLERS[label]
            sampler = TDS(
                num_steps=100,
                adaptive_ess=0.1,
                reverse_variance=kernel,
                twist_variance=twist,
            )
            for seed in a.seeds:
                c0 = time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = sampler.sample(prior, problem, N, torch.Generator().manual_seed(seed))
                cpu = time.process_time() - c0
                assert res.log_evidence is not None and res.info.genealogy_ess is not None
                lz = float(res.log_evidence)
                err = f"{lz - exact:+.3f}" if exact is not None else "-"
                ge = float(res.info.genealogy_ess) / N
                print(
                    f"| {name} (N = {N}) | {label} | {seed} | {cpu:.1f} | {res.info.nfe} | "
                    f"{ge:.3f} | {lz:.3f} | {err} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

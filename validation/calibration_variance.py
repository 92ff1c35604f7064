"""Posterior moments of the exact samplers on the calibration study's problems, against the
closed form: where does a calibration miss come from?

    OMP_NUM_THREADS=1 python validation/calibration_variance.py [--steps 100 400] [--dims 2 8]

For the calibration study's first 100 replicates (``calibration_problem(d, 0, 100)``: a
3-component mixture prior, a ``1 x d`` operator, ``sigma_y = 0.5``), each sampler runs on
the 100 problems at once with ``N`` particles, ``R`` times with independent generators.
Per problem and coordinate it records the weighted posterior mean and variance against the
exact posterior's (closed form: ``GaussianMixture.posterior``), and reports

- ``var ratio``: the mean over problems and coordinates of the sampler's posterior variance
  over the exact one, with its Monte Carlo error (sd over the ``R`` runs / sqrt(R));
- ``mean z``: the mean error of the posterior mean in units of the exact posterior sd;
- ``genealogy ESS``: ``info.genealogy_ess / N``, averaged.

A variance ratio below 1 beyond its error is a too narrow posterior (SBC's U-shape); it
is the discretisation of the sampler's chain when it shrinks with the number of steps.
Output: a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch

from bayesfilter_diff.samplers.registry import build, parse_label
from bayesfilter_diff.schedules import VPSchedule
from bayesfilter_diff.studies.calibration import calibration_problem


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8])
    p.add_argument("--steps", type=int, nargs="+", default=[100, 400])
    p.add_argument("--methods", default="MCGdiff;TDS;TDS[reverse_variance=analytic]")
    p.add_argument("--particles", type=int, default=4096)
    p.add_argument("--runs", type=int, default=4)
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    print("| d | steps | sampler | var ratio | mean z | genealogy ESS / N |")
    print("|---|---|---|---|---|---|")
    for d in a.dims:
        gmm, problem, _ = calibration_problem(d, 0, 100)
        post = gmm.posterior(problem)
        m_ex = post.mean()
        v_ex = torch.diagonal(post.covariance(), dim1=-2, dim2=-1)
        prior = gmm.diffusion(VPSchedule.linear())
        for steps in a.steps:
            for label in a.methods.split(";"):
                name, overrides = parse_label(label)
                ratios, zs, gen = [], [], []
                for r in range(a.runs):
                    g = torch.Generator().manual_seed(1000 * r + steps + d)
                    res = build(name, steps, **overrides).sample(prior, problem, a.particles, g)
                    m = res.mean()
                    W = res.weights().unsqueeze(-1)
                    v = (W * (res.samples - m.unsqueeze(1)) ** 2).sum(1)
                    ratios.append(float((v / v_ex).mean()))
                    zs.append(float(((m - m_ex) / v_ex.sqrt()).mean()))
                    gen.append(float((res.info.genealogy_ess / a.particles).mean()))
                rt = torch.tensor(ratios, dtype=torch.float64)
                se = float(rt.std()) / math.sqrt(a.runs)
                print(
                    f"| {d} | {steps} | {label} | {float(rt.mean()):.4f} ± {se:.4f} | "
                    f"{sum(zs) / a.runs:+.4f} | {sum(gen) / a.runs:.2f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

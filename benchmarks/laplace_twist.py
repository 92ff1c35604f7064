"""The Laplace-smoothed twist's cost (TDS on a Poisson site, the full-Hessian path), this
tree's ``samplers/kernels.py`` against the one of an earlier commit, in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.laplace_twist --old-rev <commit>
    OMP_NUM_THREADS=1 python -m benchmarks.laplace_twist --old-rev <commit> --dtype float32
    OMP_NUM_THREADS=1 python -m benchmarks.laplace_twist --old-rev <commit> --site student_t

Poisson: CPU time of one TDS run (50 steps, the full Hessian up to d = 100) per
configuration, the best of two, each version on the same seeds (so the log-evidences agree
to rounding when the twist's value is the same); the last configuration is a GLM of 50
counts in d = 100 (the Hessian of rank 50), in the dtype asked for. Student-t: a 2-D two-component mixture, five linear observations with Student-t
noise (3 degrees of freedom, scale 0.3) of which the first is an outlier, through an
operator gain (the larger, the more informative); the default sampler (TDS, 100 steps,
adaptive levels), N = 256, three seeds per version: CPU time, inserted levels, the smallest
per-step ESS and the log-evidence error against quadrature. Laplace: the same with Laplace
noise (scale 0.3), a likelihood with kinks.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import warnings

import pyro.distributions as dist
import torch

import bayesfilter_diff as bfd
import bayesfilter_diff.samplers.tds as tds
from bayesfilter_diff.samplers.tds import TDS

DT = torch.float64


def _old_kernels(rev: str):
    src = subprocess.run(
        ["git", "show", f"{rev}:bayesfilter_diff/samplers/kernels.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    src = re.sub(r"^from \.\.(\w+) import", r"from bayesfilter_diff.\1 import", src, flags=re.M)
    src = re.sub(
        r"^from \.(\w+) import", r"from bayesfilter_diff.samplers.\1 import", src, flags=re.M
    )
    path = pathlib.Path(tempfile.mkdtemp()) / "kernels_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("kernels_old", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _setup(d: int, m: int, B: int, dt: torch.dtype = DT):
    g = torch.Generator().manual_seed(0)
    mu = torch.stack([-torch.ones(d), torch.ones(d)]).to(dt)
    w = torch.tensor([0.3, 0.7], dtype=dt)
    gmm = bfd.GaussianMixture(w, mu, torch.full((2,), 0.25, dtype=dt))
    A = torch.randn(m, d, generator=g, dtype=dt) / math.sqrt(d)
    y = torch.poisson(torch.exp(A @ gmm.sample(1, g)[0]), generator=g).expand(B, m).contiguous()

    def ll(x, y):
        return dist.Poisson(torch.exp(x @ A.T)).to_event(1).log_prob(y)

    problem = bfd.InverseProblem(bfd.operators.Dense(A), y, log_likelihood_fn=ll)
    return gmm.diffusion(bfd.VPSchedule.linear()), problem


def _outlier_site(old, new, site: str) -> None:
    from bayesfilter_diff.studies.quadrature import QuadratureProblem, grid_posterior

    means = torch.tensor([[1.5, 0.5], [-1.0, -1.0]], dtype=DT)
    gmm = bfd.GaussianMixture(
        torch.full((2,), 0.5, dtype=DT), means, torch.full((2,), 0.3, dtype=DT)
    )
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    a = torch.tensor([[1.0, 0.2], [-0.3, 1.0], [0.7, 0.7], [0.9, -0.5], [0.1, -1.0]], dtype=DT)
    y = torch.tensor([3.5, -0.2, 0.4, 0.5, 0.1], dtype=DT)  # the first is an outlier
    print("| gain | version | CPU s per run | inserted levels | min ESS / N | dlogZ (3 seeds) |")
    print("|---|---|---|---|---|---|")
    for gain in (1.0, 4.0, 8.0, 16.0):

        def obs(x: torch.Tensor, gain: float = gain) -> dist.TorchDistribution:
            if site == "laplace":
                return dist.Laplace(gain * x @ a.T, 0.3).to_event(1)
            return dist.StudentT(3.0, gain * x @ a.T, 0.3).to_event(1)

        exact = grid_posterior(
            QuadratureProblem(site, obs, y), n=1201, half_width=3.0, prior=gmm
        ).log_evidence
        problem = bfd.InverseProblem(
            bfd.operators.Dense(gain * a),
            y[None],
            log_likelihood_fn=lambda x, y: obs(x).log_prob(y),
        )
        sampler = bfd.samplers.registry.default_sampler(problem, 100)
        for name, fn in (("old", old), ("new", new)):
            tds.smoothed_log_likelihood = fn
            cpu, ins, ess, dz = [], [], [], []
            for seed in range(3):
                t = time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = sampler.sample(prior, problem, 256, torch.Generator().manual_seed(seed))
                cpu.append(time.process_time() - t)
                ins.append(res.info.inserted_steps)
                ess.append(float(res.info.min_ess.min()) / 256)
                dz.append(float(res.log_evidence.squeeze() - exact))
            print(
                f"| {gain:g} | {name} | {sum(cpu) / 3:.1f} | {', '.join(map(str, ins))} | "
                f"{min(ess):.2f} - {max(ess):.2f} | {', '.join(f'{z:+.2f}' for z in dz)} |"
            )
            sys.stdout.flush()
        tds.smoothed_log_likelihood = new


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old-rev", required=True, help="the commit to compare against")
    p.add_argument("--site", choices=("poisson", "student_t", "laplace"), default="poisson")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    old = _old_kernels(args.old_rev).smoothed_log_likelihood
    new = tds.smoothed_log_likelihood
    if args.site != "poisson":
        _outlier_site(old, new, args.site)
        return
    print("| d | m | B | N | old CPU s | new CPU s | old / new | max abs dlogZ (same seed) |")
    print("|---|---|---|---|---|---|---|---|")
    dt = getattr(torch, args.dtype)
    for d, m, B, N in ((2, 3, 16, 256), (8, 6, 8, 256), (32, 16, 4, 128), (100, 50, 1, 64)):
        prior, problem = _setup(d, m, B, dt)
        times: dict[str, list[float]] = {"old": [], "new": []}
        logz: dict[str, torch.Tensor] = {}
        for _ in range(2):
            for name, fn in (("old", old), ("new", new)):
                tds.smoothed_log_likelihood = fn
                t = time.process_time()
                sampler = TDS(num_steps=50, laplace_max_dim=100)
                res = sampler.sample(prior, problem, N, torch.Generator().manual_seed(0))
                times[name].append(time.process_time() - t)
                logz[name] = res.log_evidence
        tds.smoothed_log_likelihood = new
        to, tn = min(times["old"]), min(times["new"])
        dz = float((logz["old"] - logz["new"]).abs().max())
        print(f"| {d} | {m} | {B} | {N} | {to:.2f} | {tn:.2f} | {to / tn:.2f} | {dz:.1e} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

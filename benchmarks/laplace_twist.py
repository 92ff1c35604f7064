"""The Laplace-smoothed twist's cost (TDS on a Poisson site, the full-Hessian path), this
tree's ``samplers/kernels.py`` against the one of an earlier commit, in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.laplace_twist --old-rev <commit>
    OMP_NUM_THREADS=1 python -m benchmarks.laplace_twist --old-rev <commit> --dtype float32
    OMP_NUM_THREADS=1 python -m benchmarks.laplace_twist --old-rev <commit> --site student_t
    OMP_NUM_THREADS=1 python -m benchmarks.laplace_twist --old-rev <commit> --site glm
    OMP_NUM_THREADS=1 python -m benchmarks.laplace_twist --proposals --site student_t

``--proposals``: instead of two kernels, this tree's default sampler with the gradient
proposal against its conditioned one (the default since 2026-12-06) on the same site; with
``--old-rev`` the sites of ``bfd.infer``'s default run both versions on the gradient
proposal where the old kernel has no quadratic model.

Poisson: CPU time of one TDS run (50 steps, the full Hessian up to d = 100) per
configuration, the best of two, each version on the same seeds (so the log-evidences agree
to rounding when the twist's value is the same); the last configuration is a GLM of 50
counts in d = 100 (the Hessian of rank 50), in the dtype asked for. Student-t: a 2-D two-component mixture, five linear observations with Student-t
noise (3 degrees of freedom, scale 0.3) of which the first is an outlier, through an
operator gain (the larger, the more informative); the default sampler (TDS, 100 steps,
adaptive levels), N = 256, three seeds per version: CPU time, inserted levels, the smallest
per-step ESS and the log-evidence error against quadrature. Laplace: the same with Laplace
noise (scale 0.3), a likelihood with kinks. GLM: 50 Poisson counts of `exp(M x + 1)`
(`M` 50 x d of scale 3 / sqrt(d)) on a two-mode mixture in d = 100 and 400 (above
`laplace_max_dim = 64`, a Hessian of rank 50), a float32 Pyro model through `bfd.infer`'s
default sampler, N = 256, seeds 0 and 1: CPU time, log-evidence against importance sampling
(`glm_reference`), network calls, genealogy ESS and the twist's curvature kind.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
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
import bayesfilter_diff.samplers.kernels as kernels
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


def _accepting(fn):
    """``fn`` called with only the keyword arguments its signature has (an older
    ``smoothed_log_likelihood`` has no ``memo``, nor ``start``: it runs Newton from
    ``x0_hat``), its output given the ``mode`` field TDS reads where it has none (``x0 + v
    direction``, the mode it found)."""
    names = set(inspect.signature(fn).parameters)

    def call(*args, **kwargs):
        out = fn(*args, **{k: v for k, v in kwargs.items() if k in names})
        if not hasattr(out, "mode"):
            x0, v = args[1], args[2]
            out = kernels.SmoothedLogLikelihood(*out, x0 + v * out.direction)
        return out

    call.accepts = names  # type: ignore[attr-defined]
    return call


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


def _versions(old, new, proposals: bool) -> list[tuple[str, object, str]]:
    """``(name, smoothed_log_likelihood, proposal)`` per version compared: this tree's
    gradient and conditioned proposals, or the old and the new kernel (on the gradient
    proposal where the old kernel cannot give the conditioned one its quadratic model)."""
    if proposals:
        return [("gradient", new, "gradient"), ("conditioned", new, "conditioned")]
    has = "quadratic" in getattr(old, "accepts", inspect.signature(old).parameters)
    prop = "conditioned" if has else "gradient"
    return [("old", old, prop), ("new", new, prop)]


def _outlier_site(versions, site: str) -> None:
    from bayesfilter_diff.studies.quadrature import QuadratureProblem, grid_posterior

    means = torch.tensor([[1.5, 0.5], [-1.0, -1.0]], dtype=DT)
    gmm = bfd.GaussianMixture(
        torch.full((2,), 0.5, dtype=DT), means, torch.full((2,), 0.3, dtype=DT)
    )
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    a = torch.tensor([[1.0, 0.2], [-0.3, 1.0], [0.7, 0.7], [0.9, -0.5], [0.1, -1.0]], dtype=DT)
    y = torch.tensor([3.5, -0.2, 0.4, 0.5, 0.1], dtype=DT)  # the first is an outlier
    print(
        "| gain | version | CPU s per run | inserted levels | min ESS / N | dlogZ (3 seeds) | "
        "genealogy ESS (of 256) |"
    )
    print("|---|---|---|---|---|---|---|")
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
        default = bfd.samplers.registry.default_sampler(problem, 100)
        for name, fn, proposal in versions:
            sampler = dataclasses.replace(default, proposal=proposal)
            tds.smoothed_log_likelihood = fn
            cpu, ins, ess, dz, gen = [], [], [], [], []
            for seed in range(3):
                t = time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = sampler.sample(prior, problem, 256, torch.Generator().manual_seed(seed))
                cpu.append(time.process_time() - t)
                ins.append(res.info.inserted_steps)
                ess.append(float(res.info.min_ess.min()) / 256)
                dz.append(float(res.log_evidence.squeeze() - exact))
                gen.append(float(res.info.genealogy_ess.min()))
            print(
                f"| {gain:g} | {name} | {sum(cpu) / 3:.1f} | {', '.join(map(str, ins))} | "
                f"{min(ess):.2f} - {max(ess):.2f} | {', '.join(f'{z:+.2f}' for z in dz)} | "
                f"{', '.join(f'{g:.0f}' for g in gen)} |"
            )
            sys.stdout.flush()
        tds.smoothed_log_likelihood = versions[-1][1]


def _glm_setup(d: int):
    """The GLM: a two-mode mixture prior (means -+0.7, variance 0.5, weights 0.4 / 0.6), 50
    Poisson counts of ``exp(M x + 1)``; returns (mixture, M, counts), float32."""
    g = torch.Generator().manual_seed(1234)
    mu = torch.stack([-torch.ones(d), torch.ones(d)]) * 0.7
    gmm = bfd.GaussianMixture(torch.tensor([0.4, 0.6]), mu, 0.5 * torch.ones(2))
    M = torch.randn(50, d, generator=g) * 3 / d**0.5
    y = torch.poisson(torch.exp(M @ gmm.sample(1, g)[0] + 1), generator=g)
    return gmm, M, y


def glm_reference(d: int, draws: int = 400_000, nu: float = 60.0) -> tuple[float, float]:
    """The GLM's log-evidence by importance sampling (float64): a proposal mixing, equally,
    multivariate t (``nu`` degrees of freedom) at the Laplace approximations of each
    component's posterior. Returns the estimate and its standard error."""
    gmm, M, y = _glm_setup(d)
    M, y = M.double(), y.double()
    mu = gmm.means.double()
    logw = gmm.weights.double().log()

    def log_term(x: torch.Tensor, k: int) -> torch.Tensor:
        eta = x @ M.T + 1
        ll = (y * eta - eta.exp() - torch.lgamma(y + 1)).sum(-1)
        return ll - ((x - mu[k]) ** 2).sum(-1) - 0.5 * d * math.log(math.pi) + logw[k]

    props = []
    for k in range(2):
        x = mu[k].clone()
        for _ in range(100):
            lam = (x @ M.T + 1).exp()
            grad = M.T @ (y - lam) - 2 * (x - mu[k])
            H = M.T @ (lam[:, None] * M) + 2 * torch.eye(d, dtype=torch.float64)
            step, a, f0 = torch.linalg.solve(H, grad), 1.0, float(log_term(x, k))
            while not float(log_term(x + a * step, k)) >= f0 and a > 1e-10:
                a /= 2
            x = x + a * step
        props.append((x, torch.linalg.cholesky(torch.linalg.inv(H))))
    gen = torch.Generator().manual_seed(7)
    lws = []
    for _ in range(draws // 20_000):
        S = 20_000
        comp = torch.randint(0, 2, (S,), generator=gen)
        z = torch.randn(S, d, generator=gen, dtype=torch.float64)
        chi = 2 * torch._standard_gamma(
            torch.full((S,), nu / 2, dtype=torch.float64), generator=gen
        )
        scale = torch.sqrt(chi / nu).unsqueeze(-1)
        xs = torch.empty(S, d, dtype=torch.float64)
        for k, (mode, L) in enumerate(props):
            xs[comp == k] = (mode + (z @ L.T) / scale)[comp == k]
        lq = []
        for mode, L in props:
            r = torch.linalg.solve_triangular(L, (xs - mode).T, upper=False).T
            lq.append(
                math.lgamma((nu + d) / 2)
                - math.lgamma(nu / 2)
                - 0.5 * d * math.log(nu * math.pi)
                - L.diagonal().log().sum()
                - (nu + d) / 2 * torch.log1p((r**2).sum(-1) / nu)
            )
        target = torch.logsumexp(torch.stack([log_term(xs, 0), log_term(xs, 1)]), 0)
        lws.append(target - (torch.logsumexp(torch.stack(lq), 0) - math.log(2)))
    lw = torch.cat(lws)
    w = torch.exp(lw - lw.max())
    return float(torch.logsumexp(lw, 0) - math.log(lw.numel())), float(
        w.std() / w.mean() / math.sqrt(lw.numel())
    )


def _glm(versions) -> None:
    import pyro

    print(
        "| d | version | seed | CPU s | log-evidence | reference | network calls | genealogy ESS | curvature |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for d in (100, 400):
        gmm, M, y = _glm_setup(d)
        prior = gmm.diffusion(bfd.VPSchedule.linear())
        ref, se = glm_reference(d)

        def model(y=None, prior=prior, M=M):
            x = pyro.sample("x", bfd.DiffusionPrior(prior))
            pyro.sample("y", dist.Poisson(torch.exp(x @ M.T + 1)).to_event(1), obs=y)

        problem = bfd.inference.model_to_problem(model, y)[1]
        default = bfd.samplers.registry.default_sampler(problem, 100)
        for seed in (0, 1):
            for name, fn, proposal in versions:
                tds.smoothed_log_likelihood = fn
                t = time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    post = bfd.infer(
                        model,
                        dataclasses.replace(default, proposal=proposal),
                        y=y,
                        num_samples=256,
                        generator=torch.Generator().manual_seed(seed),
                    )
                cpu = time.process_time() - t
                info = post.info
                print(
                    f"| {d} | {name} | {seed} | {cpu:.1f} | {float(post.log_evidence):.2f} | "
                    f"{ref:.2f} (se {se:.2f}) | {info.nfe} | {float(info.genealogy_ess):.1f} | "
                    f"{info.extra.twist} |"
                )
                sys.stdout.flush()
        tds.smoothed_log_likelihood = versions[-1][1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old-rev", help="the commit to compare against")
    p.add_argument(
        "--proposals",
        action="store_true",
        help="the gradient against the conditioned proposal (this tree; no --old-rev)",
    )
    p.add_argument("--site", choices=("poisson", "student_t", "laplace", "glm"), default="poisson")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    new = tds.smoothed_log_likelihood
    if args.proposals:
        versions = _versions(new, new, True)
        old = new
    elif args.old_rev is None:
        p.error("give --old-rev or --proposals")
    else:
        old = _accepting(_old_kernels(args.old_rev).smoothed_log_likelihood)
        versions = _versions(old, new, False)
    if args.site == "glm":
        _glm(versions)
        return
    if args.site != "poisson":
        _outlier_site(versions, args.site)
        return
    if args.proposals:
        p.error("--proposals takes --site student_t, laplace or glm")
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

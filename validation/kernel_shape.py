"""Where the default's evidence bias on a prior of several scales comes from: the kernel.

A 2-D prior of three narrow modes (weights 0.5 / 0.3 / 0.2 at (-2, 0), (2, 1), (0, -2.5),
sd 0.8 / 0.6 / 0.7), ``y = A x + 0.3 n`` with ``A = [[1, 0.5], [-0.3, 1]]`` and ``y = (0.8,
0.4)`` between the modes. An exact SMC sampler targets its discretised chain, so its
evidence error is the chain's own: here the unconditional chain on the default sampler's
time grid is run with ``N`` particles and ``p(y)`` estimated by importance sampling of its
``x0`` draws, for five reverse kernels ``p(x_s | x_t)``, all with the exact mean
``E[x_s | x_t] = c_x x_t + b x0_hat(x_t)``:

- ``exact``: the true transition, a Gaussian mixture for this prior;
- ``ddim``: ``N(mean, std^2 I)`` (TDS's ``reverse_variance="ddim"``);
- ``reference``: ``std^2 + b^2 v(t)``, ``v`` the prior's average ``Var[x0 | x_t]`` per
  coordinate (``"reference"``, the default's);
- ``isotropic``: ``std^2 + b^2 tr Cov[x0 | x_t] / d`` per particle;
- ``full``: ``std^2 I + b^2 Cov[x0 | x_t]`` per particle (the moment-matched Gaussian);
- ``observed``: ``std^2 I + b^2 [v(t) (I - P) + P Cov[x0 | x_t] P]``, ``P`` the projector on
  the operator's rows (TDS's ``reverse_variance="observed"``, the default's since session 37;
  with both rows of ``A`` it is ``full``).

Run: ``OMP_NUM_THREADS=1 python validation/kernel_shape.py [--steps 100] [--n 1000000]
[--rows 2] [--kinds exact ddim reference isotropic full observed]`` (~5 min at the defaults);
prints one line per kernel: the log-evidence error and the importance sampling estimate's
sd. ``--rows 1`` observes ``A``'s first row only (``y = 0.8``).
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
W = torch.tensor([0.5, 0.3, 0.2], dtype=D)
MU = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=D)
S2 = torch.tensor([0.8, 0.6, 0.7], dtype=D) ** 2
A = torch.tensor([[1.0, 0.5], [-0.3, 1.0]], dtype=D)
Y = torch.tensor([0.8, 0.4], dtype=D)
KINDS = ("exact", "ddim", "reference", "isotropic", "full", "observed")


def posterior_of_x0(sch, x: torch.Tensor, t: torch.Tensor):
    """Per component ``k``: responsibilities ``(N, K)``, means ``(N, K, 2)`` and the
    isotropic variances ``(K,)`` of ``x0 | x_t, k``."""
    a, s = sch.alpha(t).double(), sch.sigma(t).double()
    var = 1 / (1 / S2 + a**2 / s**2)
    mean = var[None, :, None] * (MU[None] / S2[None, :, None] + a * x[:, None] / s**2)
    v = a**2 * S2 + s**2
    logr = W.log() - 0.5 * ((x[:, None] - a * MU[None]) ** 2).sum(-1) / v - torch.log(v)
    return torch.softmax(logr, 1), mean, var


def run(
    kind: str, times: torch.Tensor, prior, n: int, seed: int, rows: int = 2
) -> tuple[float, float]:
    """The log-evidence of the chain with kernel ``kind`` and the estimate's sd, observing
    the first ``rows`` rows of ``A``."""
    sch = prior.schedule
    a_obs, y_obs = A[:rows], Y[:rows]
    proj = torch.linalg.pinv(a_obs) @ a_obs
    g = torch.Generator().manual_seed(seed)
    x = sch.sigma(times[0]).double() * torch.randn(n, 2, generator=g, dtype=D)
    eye = torch.eye(2, dtype=D)
    for k in range(len(times) - 1):
        t, tn = times[k], times[k + 1]
        r, m, c = posterior_of_x0(sch, x, t)
        x0hat = (r[..., None] * m).sum(1)
        coef = ddim_coefficients(sch, t, tn, 1.0)
        cx, b = (float(v) for v in ddim_weights(coef, sch.sigma(t)))
        std2 = float(coef.std) ** 2
        z = torch.randn(n, 2, generator=g, dtype=D)
        if kind == "exact":
            comp = torch.multinomial(r, 1, generator=g)[:, 0]
            mk = m[torch.arange(n), comp]
            x = cx * x + b * mk + torch.sqrt(std2 + b**2 * c[comp])[:, None] * z
            continue
        mean = cx * x + b * x0hat
        second = c[None, :, None, None] * eye + m[..., :, None] * m[..., None, :]
        cov = (r[..., None, None] * second).sum(1) - x0hat[:, :, None] * x0hat[:, None, :]
        if kind == "ddim":
            x = mean + math.sqrt(std2) * z
        elif kind == "reference":
            v = float(prior.x0_variance(t))
            x = mean + math.sqrt(std2 + b**2 * v) * z
        elif kind == "isotropic":
            v = cov.diagonal(dim1=-2, dim2=-1).mean(-1)
            x = mean + torch.sqrt(std2 + b**2 * v)[:, None] * z
        else:
            if kind == "observed":
                v = float(prior.x0_variance(t))
                cov = v * (eye - proj) + proj @ cov @ proj
            root = torch.linalg.cholesky(std2 * eye + b**2 * cov + 1e-15 * eye)
            x = mean + (root @ z[..., None])[..., 0]
    noise = 0.09 * torch.eye(rows, dtype=D)
    ll = torch.distributions.MultivariateNormal(x @ a_obs.T, noise).log_prob(y_obs)
    w = torch.softmax(ll, 0)
    est = float(torch.logsumexp(ll, 0)) - math.log(n)
    return est, math.sqrt(max(float((w**2).sum()) - 1 / n, 0.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=2, choices=[1, 2])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    args = ap.parse_args()
    gmm = bfd.GaussianMixture(W, MU, S2)
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    problem = bfd.InverseProblem(bfd.operators.Dense(A[: args.rows]), Y[: args.rows], 0.3)
    exact = float(gmm.log_evidence(problem))
    sampler = dataclasses.replace(default_sampler(problem), num_steps=args.steps)
    times = sampler.time_grid(prior, problem).to(D)
    print(f"exact log p(y) {exact:.4f}; {len(times) - 1} steps (the default's grid), N = {args.n}")
    for kind in args.kinds:
        est, sd = run(kind, times, prior, args.n, args.seed, args.rows)
        print(f"{kind:10s} log-evidence error {est - exact:+.4f} (sd {sd:.4f})", flush=True)


if __name__ == "__main__":
    main()

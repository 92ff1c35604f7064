"""Unknown noise scale through ``bfd.infer``: SMC^2 against the exact posterior of sigma.

    python validation/unknown_noise.py

The two-component mixture of ``tests/test_inference.py`` in d = 2, ``y = M x + 0.4 n``,
``sigma ~ HalfNormal(1)`` unknown. For a Gaussian-mixture prior ``p(y | sigma)`` is closed
form (``gmm.log_evidence``), so ``p(sigma | y)`` and ``p(y)`` follow by quadrature over
sigma. The default inner sampler (TDS with adaptive steps, 100 steps), 128 theta-particles
of 256 inner particles, 3 particle-marginal moves. Prints the exact and estimated posterior
mean / sd of sigma, the W1 distance of the sigma draws to the exact posterior in units of
its sd, and the log-evidence. Recorded in docs/methods/hierarchical.md.
"""

from __future__ import annotations

import math
import time
import warnings

import pyro
import pyro.distributions as dist
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.inference import HierarchicalPosterior

D = torch.float64


def main(seed: int = 1) -> None:
    warnings.simplefilter("ignore")
    g = torch.Generator().manual_seed(0)
    gmm = bfd.GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=D),
        torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=D),
        torch.tensor([0.5, 0.3], dtype=D),
    )
    prior = gmm.diffusion(bfd.VPSchedule.linear())
    M = torch.tensor([[1.0, 0.3], [-0.4, 1.0]], dtype=D)
    A = bfd.operators.Dense(M)
    y = A(gmm.sample(1, g)[0]) + 0.4 * torch.randn(2, generator=g, dtype=D)
    half = dist.HalfNormal(torch.tensor(1.0, dtype=D))

    def model(y=None):
        sigma = pyro.sample("sigma", half)
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", dist.Normal(x @ M.T, sigma).to_event(1), obs=y)

    s = torch.linspace(1e-3, 6.0, 6000, dtype=D)
    lz = torch.stack([gmm.log_evidence(bfd.InverseProblem(A, y, float(v))) for v in s])
    lp = half.log_prob(s) + lz
    w = torch.softmax(lp, 0)
    mean = float((w * s).sum())
    sd = float((w * (s - mean) ** 2).sum().sqrt())
    log_z = float(torch.logsumexp(lp, 0)) + math.log(float(s[1] - s[0]))
    start = time.perf_counter()
    post = bfd.infer(
        model,
        y=y,
        num_samples=256,
        num_theta=128,
        moves=3,
        generator=torch.Generator().manual_seed(seed),
    )
    wall = time.perf_counter() - start
    assert isinstance(post, HierarchicalPosterior)
    sig = post.theta["sigma"].double()
    # W1 between the draws and the exact posterior: 1-D, through the quantile functions
    u = (torch.arange(sig.numel(), dtype=D) + 0.5) / sig.numel()
    cdf = torch.cumsum(w, 0)
    exact_q = s[torch.searchsorted(cdf, u).clamp(max=s.numel() - 1)]
    w1 = float((sig.sort().values - exact_q).abs().mean())
    print(f"exact: E[sigma|y] = {mean:.4f}, sd {sd:.4f}, log p(y) = {log_z:.4f}")
    print(
        f"SMC^2: E[sigma|y] = {float(sig.mean()):.4f}, sd {float(sig.std()):.4f}, "
        f"log p(y) = {float(post.log_evidence):.4f}, W1 / sd = {w1 / sd:.3f}, "
        f"theta ESS {post.theta_ess:.1f} of 128, acceptance {post.acceptance}, "
        f"NFE {post.nfe}, inner sampler {type(post.sampler).__name__}, {wall:.0f} s"
    )


if __name__ == "__main__":
    main()

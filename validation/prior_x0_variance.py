"""The reference kernel's ``Var[x0 | x_t]``: the prior's own against a Gaussian stand-in (session 24).

``TDS(reverse_variance="reference")`` adds ``b^2 v_t`` to the DDPM kernel's variance. With
``prior_variance=None`` (the default) ``v_t`` is the prior's own average ``Var[x0 | x_t]``
(``DiffusionModel.x0_variance``; for a Gaussian mixture tabulated from its draws); with a
number ``tau2`` it is that of a ``N(m, tau2 I)`` stand-in. Problems: two-mode mixtures at
``d = 4`` (weights 0.4 / 0.6, means at -+0.5 times the ones vector) with component variance
``c`` = 0.05 or 0.3, far narrower than the unit stand-in; a random ``2 x 4`` operator,
``sigma_y = 0.1``, ``x*`` from the prior; 20 and 100 steps, N = 4096, 4 seeds, float64.
Kernels: ``own`` (the default), ``unit`` (``prior_variance=1``, the default before) and
``total`` (``prior_variance`` = the mixture's variance per coordinate). Each line: the
log-evidence error and its genealogy sd, the posterior variance over the exact one
(averaged over coordinates), the largest posterior-mean error in posterior sd, and the
genealogy ESS / N.

    OMP_NUM_THREADS=1 python validation/prior_x0_variance.py > validation/results/prior_x0_variance/runs.jsonl

(~3 min on one core.)
"""

import json
import warnings

import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.tds import TDS

warnings.simplefilter("ignore")
D = torch.float64
for c in (0.05, 0.3):
    g = torch.Generator().manual_seed(7)
    one = torch.ones(4, dtype=D)
    gmm = bfd.GaussianMixture(
        torch.tensor([0.4, 0.6], dtype=D), torch.stack([-0.5 * one, 0.5 * one]),
        torch.full((2,), c, dtype=D),
    )  # fmt: skip
    A = bfd.operators.Dense(torch.randn(2, 4, generator=g, dtype=D))
    y = A(gmm.sample(1, g)[0]) + 0.1 * torch.randn(2, generator=g, dtype=D)
    problem = bfd.InverseProblem(A, y, noise_std=0.1)
    post, log_z = gmm.posterior(problem), float(gmm.log_evidence(problem))
    pm, pv = post.mean(), post.covariance().diagonal()
    total = float(gmm.average_variance())
    for steps in (20, 100):
        for label, tau2 in (("own", None), ("unit", 1.0), ("total", total)):
            sampler = TDS(
                num_steps=steps, adaptive_ess=0.1, reverse_variance="reference",
                prior_variance=tau2,
            )  # fmt: skip
            runs = []
            for seed in range(4):
                prior = gmm.diffusion(bfd.VPSchedule.linear())
                res = sampler.sample(prior, problem, 4096, torch.Generator().manual_seed(seed))
                W = res.weights()
                m = (W[:, None] * res.samples).sum(0)
                v = (W[:, None] * (res.samples - m) ** 2).sum(0)
                assert res.info.log_evidence_se is not None
                assert res.info.genealogy_ess is not None
                runs.append(
                    [
                        round(float(res.log_evidence) - log_z, 3),
                        round(float(res.info.log_evidence_se), 3),
                        round(float((v / pv).mean()), 4),
                        round(float(((m - pm).abs() / pv.sqrt()).max()), 3),
                        round(float(res.info.genealogy_ess) / 4096, 3),
                    ]
                )
            print(json.dumps({"c": c, "steps": steps, "kernel": label, "runs": runs}), flush=True)

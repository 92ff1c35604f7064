"""The default sampler's evidence when the observation sits in the prior's tail (session 23).

The noise-level study's problem (README mixture, ``2 x d`` operator, float64), with the first
observed entry pushed ``k`` times ``|A_0|`` (about ``k`` prior sd) further out, for the default
sampler of a linear-Gaussian problem (TDS, conditioned proposal, since 2026-12-05 with the
reference reverse variance; since session 24 with the prior's own ``Var[x0 | x_t]``, here
within noise of the unit stand-in's), the default before (the same with the DDPM kernel,
``ddpm``) and
the analytic reverse variance with the gradient proposal (``default_sampler(...,
evidence=True)``); 100 steps, N = 4096, seeds 0-2. Each line: ``runs`` = (log-evidence error, its genealogy sd, largest posterior-mean
error in posterior sd, genealogy ESS / N) per seed.

    OMP_NUM_THREADS=1 python validation/tail_data.py > validation/results/tail_data/runs.jsonl

(~6 min on one core. ``runs_ddpm_default.jsonl``: the first run, at commit cc3c007, when
``default`` was the DDPM kernel.) ``python validation/tail_data.py reference observed``
runs the named samplers only: ``reference``, the Jacobian twist with the reference kernel
(the default from session 32 to 37), and ``observed``, the same with ``b^2 Cov[x0 | x_t]``
completed from the observed directions (``reverse_variance="observed"``, session 37;
``runs_observed.jsonl``: its ``reference`` lines from ``tail_data.py reference observed``
with this session's first version of the kernel, its ``observed`` lines from
``tail_data.py observed`` with the kernel as shipped); ``default`` is whatever
``bfd.infer`` runs at the time.
"""

import dataclasses
import json
import sys
import warnings

import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers import registry
from bayesfilter_diff.studies.noise_levels import noise_problem

warnings.simplefilter("ignore")
for d in [8, 80]:
    for k in [0.0, 2.0, 4.0]:
        for sig in [1e-1, 1e-3]:
            gmm, pb = noise_problem(d, sig, 0, torch.float64)
            A = pb.operator.M
            y = pb.y.clone()
            y[0] = y[0] + k * float(A[0].norm())
            pb2 = bfd.InverseProblem(pb.operator, y, noise_std=sig)
            prior = gmm.diffusion(bfd.VPSchedule.linear())
            post = gmm.posterior(pb2)
            pm, ps = post.mean(), post.covariance().diagonal().sqrt()
            jacobian = registry.build("TDS", 100, adaptive_ess=0.1, twist_variance="jacobian")
            samplers = [
                ("default", registry.default_sampler(pb2, 100)),
                ("ddpm", registry.build("TDS", 100, adaptive_ess=0.1)),
                ("analytic", registry.default_sampler(pb2, 100, evidence=True)),
                ("reference", dataclasses.replace(jacobian, reverse_variance="reference")),
                ("observed", dataclasses.replace(jacobian, reverse_variance="observed")),
            ]
            only = sys.argv[1:] or ["default", "ddpm", "analytic"]
            for lab, s in [(lab, s) for lab, s in samplers if lab in only]:
                errs = []
                for seed in range(3):
                    res = s.sample(prior, pb2, 4096, torch.Generator().manual_seed(seed))
                    dz = float(res.log_evidence - gmm.log_evidence(pb2))
                    m = (res.weights()[:, None] * res.samples).sum(0)
                    gz = float(((m - pm).abs() / ps).max())
                    assert res.info.log_evidence_se is not None
                    assert res.info.genealogy_ess is not None
                    errs.append(
                        (
                            round(dz, 3),
                            round(float(res.info.log_evidence_se), 3),
                            round(gz, 3),
                            round(float(res.info.genealogy_ess) / 4096, 2),
                        )
                    )
                print(json.dumps({"d": d, "k": k, "sig": sig, "s": lab, "runs": errs}), flush=True)

"""The reference kernel's ``Var[x0 | x_t]``: the prior's own against a Gaussian stand-in (session 24).

``TDS(reverse_variance="reference")`` adds ``b^2 v_t`` to the DDPM kernel's variance. With
``prior_variance=None`` (the default) ``v_t`` is the prior's own average ``Var[x0 | x_t]``
(``DiffusionModel.x0_variance``; for a Gaussian mixture tabulated from its draws); with a
number ``tau2`` it is that of a ``N(m, tau2 I)`` stand-in. Problems: two-mode mixtures at
``d = 4`` (weights 0.4 / 0.6, means at -+0.5 times the ones vector) with component variance
``c`` = 0.05 or 0.3, far narrower than the unit stand-in, and ``c = "anisotropic"``: one
Gaussian with variances 25 / 0.01 / 0.01 / 0.01 (no isotropic kernel fits it); a random
``2 x 4`` operator,
``sigma_y = 0.1``, ``x*`` from the prior; 20 and 100 steps, N = 4096, 4 seeds, float64.
Kernels: ``own`` (the default), ``unit`` (``prior_variance=1``, the default before) and
``total`` (``prior_variance`` = the mixture's variance per coordinate). Each line: the
log-evidence error and its genealogy sd, the posterior variance over the exact one
(averaged over coordinates), the largest posterior-mean error in posterior sd, the
genealogy ESS / N and the largest relative error of a coordinate's posterior variance.

With ``--networks`` it measures instead, for the three shipped network priors, the chain's
marginal variance per coordinate against the training data's (a flat likelihood: an
identity operator with ``sigma_y = 1000``, N = 8192 for moons, 1024 for digits, 20 and 100
steps) for the DDPM kernel, the unit stand-in and the network's own average ``Var[x0 |
x_t]``: its denoiser's mean squared error on the training data (first 2048 rows) at 161
log-SNR levels, capped at the data's variance (an eps network's ``x0`` divides its error by
``alpha``). Not offered by the package: the unit stand-in measured closer on all three.

    OMP_NUM_THREADS=1 python validation/prior_x0_variance.py > validation/results/prior_x0_variance/runs.jsonl
    OMP_NUM_THREADS=1 python validation/prior_x0_variance.py --networks > validation/results/prior_x0_variance/networks.jsonl

(~3 and ~5 min on one core.)
"""

import json
import math
import sys
import warnings

import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.tds import TDS

warnings.simplefilter("ignore")
D = torch.float64


def network_table(prior, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_snr, log ratio to the unit Gaussian's)`` of the denoiser's capped MSE."""
    sch = prior.schedule
    fine = torch.linspace(0.0, 1.0, 16385, dtype=D)
    lam_f = 2 * (torch.log(sch.alpha(fine).double()) - torch.log(sch.sigma(fine).double()))
    ok = torch.isfinite(lam_f)
    levels = torch.linspace(max(float(lam_f[ok].min()), -16), min(float(lam_f[ok].max()), 16), 161)
    pick = (lam_f.where(ok, torch.inf)[None] - levels[:, None].double()).abs().argmin(1).unique()
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(data.shape, generator=g)
    total = float(data.var(0).mean())
    lams, ratios = [], []
    with torch.no_grad():
        for t in fine[pick].tolist():
            tt = torch.tensor(t)
            a, s = float(sch.alpha(tt)), float(sch.sigma(tt))
            mse = min(float(((prior.denoise(a * data + s * eps, tt) - data) ** 2).mean()), total)
            lams.append(2 * (math.log(a) - math.log(s)))
            ratios.append(math.log(max(mse, 1e-300) / (s**2 / (a**2 + s**2))))
    order = torch.tensor(lams, dtype=D).argsort()
    return torch.tensor(lams, dtype=D)[order], torch.tensor(ratios, dtype=D)[order]


if "--networks" in sys.argv:
    from bayesfilter_diff.priors.networks import load_pretrained
    from bayesfilter_diff.training import load_dataset

    for name, data_name, n in (
        ("moons_diffusion", "moons", 8192),
        ("digits_diffusion", "digits", 1024),
        ("digits_flow", "digits", 1024),
    ):
        train = load_dataset(data_name, "train")
        prior = load_pretrained(name)
        shape = tuple(prior.event_shape)
        flat = bfd.InverseProblem(
            bfd.operators.Identity(shape, dtype=torch.float32), torch.zeros(shape), 1e3
        )
        table = network_table(prior, train[:2048])
        for steps in (20, 100):
            out = {"prior": name, "steps": steps, "data_var": round(float(train.var(0).mean()), 4)}
            for label in ("ddpm", "unit", "own"):
                if label == "own":  # the network's own table, for this measurement only
                    prior._x0_variance_lookup = lambda table=table: table  # type: ignore[method-assign]
                kw = {"reverse_variance": "ddim" if label == "ddpm" else "reference"}
                sampler = TDS(num_steps=steps, proposal="conditioned", **kw)
                res = sampler.sample(prior, flat, n, torch.Generator().manual_seed(0))
                out[label] = round(float(res.samples.double().var(0).mean()), 4)
                if label == "own":
                    del prior._x0_variance_lookup  # the network's unit stand-in again
            print(json.dumps(out), flush=True)
    raise SystemExit(0)

for c in (0.05, 0.3, "anisotropic"):
    g = torch.Generator().manual_seed(7)
    one = torch.ones(4, dtype=D)
    if c == "anisotropic":  # one Gaussian, variances 25 / 0.01 / 0.01 / 0.01
        var = torch.tensor([[25.0, 0.01, 0.01, 0.01]], dtype=D)
        gmm = bfd.GaussianMixture(torch.ones(1, dtype=D), torch.zeros(1, 4, dtype=D), var)
    else:
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
                        round(float((v / pv - 1).abs().max()), 4),
                    ]
                )
            print(json.dumps({"c": c, "steps": steps, "kernel": label, "runs": runs}), flush=True)

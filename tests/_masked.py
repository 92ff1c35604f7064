"""A hard valid problem shared by tests: a 64-D two-mode Gaussian mixture (weights
0.4 / 0.6, means at -1 and +1 times the ones vector, variances 0.5), half of its
coordinates observed through a random ``Mask`` with noise ``noise_std`` (drawn in that
order from ``generator``)."""

from __future__ import annotations

import torch

import bayesfilter_diff as bfd


def masked_mixture_problem(
    noise_std: float, generator: torch.Generator, d: int = 64
) -> tuple[bfd.GaussianMixture, bfd.DiffusionModel, bfd.InverseProblem]:
    mix = bfd.GaussianMixture(
        torch.tensor([0.4, 0.6]), torch.stack([-torch.ones(d), torch.ones(d)]), 0.5 * torch.ones(2)
    )
    prior = mix.diffusion(bfd.VPSchedule.linear())
    op = bfd.operators.Mask.random((d,), 0.5, generator=generator)
    y = op(mix.sample(1, generator)[0]) + noise_std * torch.randn(op.out_dim, generator=generator)
    return mix, prior, bfd.InverseProblem(op, y, noise_std)

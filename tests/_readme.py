"""The README's example, shared by tests: the 0.3 / 0.7 mixture of two unit Gaussians at
``-2`` and ``+2`` times the ones vector, its exact diffusion on the linear VP path, a
``2 x d`` standard normal ``Dense`` operator and ``y = A x* + noise_std n`` with ``x*`` a
prior draw (drawn in that order from ``generator``)."""

from __future__ import annotations

import torch

import bayesfilter_diff as bfd


def readme_mixture(d: int = 8) -> bfd.GaussianMixture:
    return bfd.GaussianMixture(
        torch.tensor([0.3, 0.7]),
        torch.stack([-2 * torch.ones(d), 2 * torch.ones(d)]),
        torch.ones(2),
    )


def readme_problem(
    d: int, noise_std: float, generator: torch.Generator, copies: int | None = None
) -> tuple[bfd.GaussianMixture, bfd.DiffusionModel, bfd.InverseProblem]:
    """``(mixture, prior, problem)``; with ``copies``, a batch of that many copies of ``y``
    (independent runs of one problem in one call)."""
    mix = readme_mixture(d)
    prior = mix.diffusion(bfd.VPSchedule.linear())
    A = bfd.operators.Dense(torch.randn(2, d, generator=generator))
    y = A(mix.sample(1, generator)[0]) + noise_std * torch.randn(2, generator=generator)
    if copies is not None:
        y = y.expand(copies, 2).clone()
    return mix, prior, bfd.InverseProblem(A, y, noise_std)

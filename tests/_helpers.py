"""Problem builders shared by the approximate-sampler tests."""

import torch

import bayesfilter_diff as bfd

DT = torch.float64


def _gmm(d: int, seed: int = 0) -> bfd.GaussianMixture:
    """A 2-component mixture in R^d (float64)."""
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(2, d, generator=g, dtype=DT)
    return bfd.GaussianMixture(
        torch.tensor([0.4, 0.6], dtype=DT), means, torch.tensor([0.5, 0.8], dtype=DT)
    )


def _image_prior(gmm: bfd.GaussianMixture, sched, shape) -> bfd.DiffusionModel:
    """The mixture's exact diffusion acting on images of ``shape`` (flattened)."""
    vec = gmm.diffusion(sched)
    return bfd.DiffusionModel(
        lambda x, t: vec.net(x.reshape(x.shape[0], -1), t).reshape(x.shape), sched, shape
    )


class DenseNoSVD(bfd.operators.Dense):
    """A linear operator without an SVD (the samplers must use the adjoint / CG)."""

    has_svd = False

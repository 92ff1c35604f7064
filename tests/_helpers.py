"""Problem builders shared by the approximate-sampler tests."""

import math

import torch

import bayesfilter_diff as bfd

DT = torch.float64

#: a one-cell Gaussian-mixture benchmark grid (d = 4, d_y = 1, 3 steps, 16 particles) for
#: the study tests
SMALL_BENCHMARK = {
    "dims": [4],
    "obs_dims": [1],
    "steps": [3],
    "seeds": [0],
    "N": 16,
    "num_reference": 200,
    "num_projections": 20,
}


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


# ----------------------------------------------------------------- standard normal prior
ops = bfd.operators
IMG = (3, 4, 4)


def std_normal(d: int) -> bfd.GaussianMixture:
    return bfd.GaussianMixture(
        torch.ones(1, dtype=DT), torch.zeros(1, d, dtype=DT), torch.ones(1, dtype=DT)
    )


def std_normal_prior(schedule, shape) -> bfd.DiffusionModel:
    """Exact denoiser of N(0, I) on any event shape: x0_hat = alpha x / (alpha^2 + sigma^2)."""

    def den(x, t):
        a = schedule.alpha(t).reshape((-1,) + (1,) * (x.dim() - 1))
        s = schedule.sigma(t).reshape(a.shape)
        return a * x / (a**2 + s**2)

    return bfd.DiffusionModel(den, schedule, shape)


def _ops(kind, g):
    if kind == "image":
        return {
            "identity": ops.Identity(IMG, dtype=DT),
            "dense": ops.Dense(torch.randn(7, math.prod(IMG), generator=g, dtype=DT), in_shape=IMG),
            "mask": ops.Mask.random(IMG, 0.5, g, dtype=DT),
            "downsample": ops.Downsample(IMG, 2, dtype=DT),
            "blur": ops.Blur(ops.gaussian_kernel(3, 1.0, dtype=DT), IMG),
            "colorize": ops.Colorize(IMG, dtype=DT),
        }
    return {
        "identity": ops.Identity((6,), dtype=DT),
        "dense": ops.Dense(torch.randn(3, 6, generator=g, dtype=DT)),
        "mask": ops.Mask(torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool), dtype=DT),
    }


CASES = [("image", k) for k in ("identity", "dense", "mask", "downsample", "blur", "colorize")]
CASES += [("vector", k) for k in ("identity", "dense", "mask")]

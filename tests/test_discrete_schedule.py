"""DiscreteVPSchedule: exact at DDPM's training steps, consistent derivatives, grids, errors."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from bayesfilter_diff.schedules import DiscreteVPSchedule, VPSchedule

DT = torch.float64


def ddpm_alphas_cumprod(T: int = 1000, kind: str = "linear") -> torch.Tensor:
    if kind == "linear":
        betas = torch.linspace(1e-4, 0.02, T, dtype=DT)
    else:  # squaredcos_cap_v2 (Nichol & Dhariwal), as diffusers builds it

        def f(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=DT
        )
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_exact_at_training_steps(kind):
    ac = ddpm_alphas_cumprod(1000, kind)
    sch = DiscreteVPSchedule(ac)
    k = torch.arange(1000)
    t = sch.training_time(k)
    assert torch.allclose(t, (k.to(DT) + 1) / 1000)
    assert torch.allclose(sch.alpha(t) ** 2, ac, rtol=1e-12, atol=0)
    assert torch.allclose(sch.sigma(t) ** 2, 1 - ac, rtol=1e-10, atol=1e-15)
    assert torch.allclose(sch.alphas_cumprod, ac, rtol=1e-14)
    # clean end, VP identity and decreasing SNR everywhere
    assert float(sch.alpha(torch.tensor(0.0, dtype=DT))) == 1.0
    assert float(sch.sigma(torch.tensor(0.0, dtype=DT))) == 0.0
    u = torch.linspace(1e-3, 1, 777, dtype=DT)
    assert torch.allclose(sch.alpha(u) ** 2 + sch.sigma(u) ** 2, torch.ones_like(u))
    lam = sch.log_snr(u)
    assert torch.allclose(lam, 2 * torch.log(sch.alpha(u) / sch.sigma(u)), atol=1e-9)
    assert (lam[1:] < lam[:-1]).all()


def test_close_to_continuous_limit_and_float32():
    sch = DiscreteVPSchedule(ddpm_alphas_cumprod(1000))
    t = torch.linspace(0.0005, 1, 400, dtype=DT)
    assert torch.allclose(sch.alpha(t), VPSchedule.linear().alpha(t), rtol=2e-2, atol=1e-4)
    # float32 inputs give float32 outputs (knots cached per dtype / device)
    t32 = t.float()
    assert sch.alpha(t32).dtype == torch.float32
    assert torch.allclose(sch.alpha(t32).double(), sch.alpha(t), rtol=1e-5)
    assert float(sch.alpha(0.5)) == pytest.approx(float(sch.alpha(torch.tensor(0.5, dtype=DT))))


def test_derivatives_match_finite_differences_between_knots():
    T = 50
    sch = DiscreteVPSchedule(ddpm_alphas_cumprod(T, "cosine"))
    # midpoints of the knot intervals (the interpolant is smooth there)
    t = (torch.arange(T, dtype=DT) + 0.5) / T
    h = 1e-7
    for f, df in ((sch.alpha, sch.dalpha), (sch.sigma, sch.dsigma)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        assert torch.allclose(df(t), fd, rtol=1e-5, atol=1e-8)
    # beta(t) = -d log abar / dt is piecewise constant: -T log(1 - beta_k) on step k
    ac = sch.alphas_cumprod
    betas = 1 - ac / torch.cat([torch.ones(1, dtype=DT), ac[:-1]])
    beta_t = -2 * sch.dalpha(t) / sch.alpha(t)
    assert torch.allclose(beta_t, -T * torch.log1p(-betas), rtol=1e-10)


def test_time_grid_uses_num_train_steps():
    sch = DiscreteVPSchedule(ddpm_alphas_cumprod(100))
    g = sch.time_grid(10, "ddpm", dtype=DT)
    # training steps 90, 80, ..., 0 at times (k + 1) / 100, then 0
    expect = torch.cat(
        [(torch.arange(9, -1, -1, dtype=DT) * 10 + 1) / 100, torch.zeros(1, dtype=DT)]
    )
    assert torch.allclose(g, expect)
    assert torch.allclose(sch.time_grid(4, dtype=DT), torch.linspace(1, 0, 5, dtype=DT))
    with pytest.raises(ValueError, match="must not exceed"):
        sch.time_grid(101, "ddpm")


def test_zero_terminal_snr_is_clamped_and_pickles():
    ac = ddpm_alphas_cumprod(20)
    ac[-1] = 0.0
    sch = DiscreteVPSchedule(ac)
    assert float(sch.alpha(torch.tensor(1.0, dtype=DT))) == pytest.approx(1e-6)
    sch.alpha(torch.tensor(0.3))  # fill the cache
    sch2 = pickle.loads(pickle.dumps(sch))
    t = torch.linspace(0, 1, 11, dtype=DT)
    assert torch.equal(sch2.alpha(t), sch.alpha(t))
    assert "num_train_steps=20" in repr(sch)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="1-D"):
        DiscreteVPSchedule(torch.ones(2, 2))
    with pytest.raises(ValueError, match="1-D"):
        DiscreteVPSchedule(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="non-increasing"):
        DiscreteVPSchedule(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DiscreteVPSchedule(torch.tensor([1.5, 0.9]))
    with pytest.raises(ValueError, match="min_alphas_cumprod"):
        DiscreteVPSchedule(torch.tensor([0.9, 0.5]), min_alphas_cumprod=0.0)

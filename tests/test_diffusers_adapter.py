"""from_diffusers: a tiny random UNet2DModel + scheduler saved locally, loaded as a prior.

The denoiser must equal DDPM's hand-computed ``x0 = (x_t - sqrt(1-abar_k) eps(x_t, k)) /
sqrt(abar_k)`` (or ``sqrt(abar) x_t - sqrt(1-abar) v`` for v-prediction) at the integer
training steps ``k``, with ``abar`` the scheduler's own ``alphas_cumprod``; samplers must run
on it. Skipped when ``diffusers`` is not installed.
"""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import bayesfilter_diff as bfd  # noqa: E402
from bayesfilter_diff.priors.diffusers_adapter import (  # noqa: E402
    from_diffusers,
    schedule_from_diffusers,
)
from bayesfilter_diff.schedules import DiscreteVPSchedule  # noqa: E402

T = 1000


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(seed: int = 0, out_channels: int = 1):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=out_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def save_pipeline(folder, prediction_type="epsilon", beta_schedule="linear", cls="DDPM", **kw):
    unet = tiny_unet(**kw)
    sched_cls = diffusers.DDPMScheduler if cls == "DDPM" else diffusers.DDIMScheduler
    sched = sched_cls(
        num_train_timesteps=T, beta_schedule=beta_schedule, prediction_type=prediction_type
    )
    unet.save_pretrained(folder / "unet")
    sched.save_pretrained(folder / "scheduler")
    return unet, sched


@pytest.mark.parametrize(
    "prediction_type,beta_schedule,cls",
    [
        ("epsilon", "linear", "DDPM"),
        ("v_prediction", "squaredcos_cap_v2", "DDIM"),
        ("sample", "linear", "DDPM"),
    ],
)
def test_denoiser_matches_hand_computed(tmp_path, prediction_type, beta_schedule, cls):
    unet, sched = save_pipeline(tmp_path, prediction_type, beta_schedule, cls)
    prior = from_diffusers(tmp_path)
    assert isinstance(prior, bfd.DiffusionModel)
    assert tuple(prior.event_shape) == (1, 8, 8)
    assert isinstance(prior.schedule, DiscreteVPSchedule)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g)
    steps = [0, 7, 250, 999]
    for k in steps:
        abar = sched.alphas_cumprod[k].double()
        t = torch.tensor((k + 1) / T, dtype=torch.float64)
        # the schedule is the scheduler's, exactly, at the training steps
        assert float(prior.schedule.alpha(t) ** 2) == pytest.approx(float(abar), rel=1e-9)
        with torch.no_grad():
            out = unet(x, torch.full((3,), k, dtype=torch.long)).sample.double()
            got = prior.denoise(x.double(), t)
        xd = x.double()
        if prediction_type == "epsilon":
            want = (xd - (1 - abar).sqrt() * out) / abar.sqrt()
        elif prediction_type == "v_prediction":
            want = abar.sqrt() * xd - (1 - abar).sqrt() * out
        else:
            want = out
        assert got.dtype == torch.float64 and got.shape == x.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # float32 in, float32 out; batched leading dims and a time per row
    x5 = x.expand(2, 3, 1, 8, 8)
    assert prior.denoise(x5, torch.full((2, 3), 0.5)).shape == (2, 3, 1, 8, 8)


def test_fractional_timesteps_and_learned_variance(tmp_path):
    unet = tiny_unet(out_channels=2)
    unet.save_pretrained(tmp_path)  # model folder: config.json at the top
    diffusers.DDPMScheduler(num_train_timesteps=T, variance_type="learned_range").save_pretrained(
        tmp_path
    )
    prior = from_diffusers(tmp_path)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(0.4567)  # between training steps: timestep 455.7
    with torch.no_grad():
        eps = unet(x, torch.full((2,), 0.4567 * T - 1)).sample[:, :1]
    a, s = prior.schedule.alpha(t), prior.schedule.sigma(t)
    torch.testing.assert_close(prior.denoise(x, t), (x - s * eps) / a, rtol=1e-5, atol=1e-5)


def test_continuous_schedule_option(tmp_path):
    save_pipeline(tmp_path)
    prior = from_diffusers(tmp_path, schedule="continuous")
    assert prior.schedule == bfd.VPSchedule.linear(0.1, 20.0)
    cos = schedule_from_diffusers({"beta_schedule": "squaredcos_cap_v2"}, "continuous")
    assert cos == bfd.VPSchedule.cosine()
    disc = schedule_from_diffusers({"beta_schedule": "squaredcos_cap_v2"})
    t = torch.linspace(0.01, 0.95, 50, dtype=torch.float64)
    assert torch.allclose(disc.alpha(t), cos.alpha(t), atol=2e-3)
    with pytest.raises(ValueError, match="continuous"):
        schedule_from_diffusers({"beta_schedule": "scaled_linear"}, "continuous")


def test_samplers_run_on_it(tmp_path):
    save_pipeline(tmp_path)
    prior = from_diffusers(tmp_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    mask = bfd.operators.Mask.random((1, 8, 8), 0.5, generator=g)
    x = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    y = mask(x) + 0.1 * torch.randn(2, mask.out_dim, generator=g)
    problem = bfd.InverseProblem(mask, y, noise_std=0.1)
    for sampler in (
        bfd.samplers.DDRM(num_steps=5),
        bfd.samplers.MCGdiff(num_steps=5),
        bfd.samplers.DPS(num_steps=5),  # differentiates through the UNet
    ):
        res = sampler.sample(prior, problem, num_samples=4, generator=g)
        assert res.samples.shape == (2, 4, 1, 8, 8)
        assert torch.isfinite(res.samples).all()


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        from_diffusers(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="UNet config"):
        from_diffusers(tmp_path)
    tiny_unet().save_pretrained(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match="scheduler config"):
        from_diffusers(tmp_path)
    (tmp_path / "scheduler").mkdir()
    cfg = {"_class_name": "DDPMScheduler", "prediction_type": "score"}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="prediction_type"):
        from_diffusers(tmp_path)
    cfg = {"_class_name": "EulerDiscreteScheduler"}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported scheduler"):
        from_diffusers(tmp_path)
    with pytest.raises(ValueError, match="schedule must be"):
        schedule_from_diffusers({}, "nope")

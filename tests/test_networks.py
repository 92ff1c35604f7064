"""Networks of the learned priors: shapes, parameterisations, configs and adapters."""

import math

import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff.priors.checkpoint_io import (
    CheckpointError,
    schedule_from_config,
    schedule_to_config,
)
from bayesfilter_diff.priors.networks import (
    MLP,
    UNet,
    network_from_config,
    prior_from_network,
    timestep_embedding,
)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 7, 9), (1, 28, 28)])
def test_unet_shapes_and_dtype(shape):
    torch.manual_seed(0)
    net = UNet(shape[0], channels=(8, 16), groups=4)
    # a non-zero output layer so the output depends on the input
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    x = torch.randn((5,) + shape)
    t = torch.rand(5)
    out = net(x, t)
    assert out.shape == x.shape and out.dtype == torch.float32
    out64 = net(x.double(), t.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out, rtol=1e-5, atol=1e-6)
    # rows are independent: the network is applied per sample
    torch.testing.assert_close(net(x[:2], t[:2]), out[:2], rtol=1e-5, atol=1e-6)


def test_zero_init_output_and_time_dependence():
    net = UNet(1, channels=(8, 16), groups=4)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    assert torch.count_nonzero(net(x, t)) == 0  # zero-initialised output layer
    for name, p in net.named_parameters():  # the zero-initialised convolutions
        if "conv2" in name or "conv_out" in name:
            torch.nn.init.normal_(p, std=0.1)
    a = net(x, torch.full((4,), 0.1))
    b = net(x, torch.full((4,), 0.9))
    assert (a - b).abs().max() > 1e-4


def test_default_digits_unet_size():
    n = sum(p.numel() for p in UNet(1, channels=(32, 32)).parameters())
    assert 100_000 <= n <= 300_000


def test_mlp_shapes():
    net = MLP(3, hidden=16, depth=2)
    torch.nn.init.normal_(net.out.weight, std=0.1)
    x, t = torch.randn(6, 3), torch.rand(6)
    assert net(x, t).shape == (6, 3)
    assert net(x.double(), t.double()).dtype == torch.float64


def test_bad_calls_raise():
    net = UNet(1, channels=(8, 16), groups=4)
    with pytest.raises(ValueError, match="t must have shape"):
        net(torch.randn(2, 1, 8, 8), torch.rand(3))
    with pytest.raises(ValueError, match="channels"):
        net(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match="x must have shape"):
        MLP(2)(torch.randn(2, 2, 1), torch.rand(2))
    with pytest.raises(ValueError, match="parameterization"):
        UNet(1, parameterization="score")


def test_timestep_embedding():
    t = torch.tensor([0.0, 0.5])
    e = timestep_embedding(t, 7)
    assert e.shape == (2, 7)
    torch.testing.assert_close(e[0, :3], torch.ones(3))  # cos(0)
    assert e[:, -1].abs().max() == 0  # odd dim: zero pad


def test_config_round_trip():
    for net in (
        UNet(1, channels=(8, 16), groups=4, parameterization="x0"),
        MLP(2, hidden=16, depth=1, parameterization="velocity"),
    ):
        cfg = net.config
        rebuilt = network_from_config(cfg)
        assert rebuilt.config == cfg and type(rebuilt) is type(net)
        assert network_from_config({"network": cfg}).config == cfg
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in net.state_dict().items()
        }
    with pytest.raises(CheckpointError, match="network type"):
        network_from_config({"type": "os.system"})
    with pytest.raises(CheckpointError, match="unknown unet arguments"):
        network_from_config({"type": "unet", "in_channels": 1, "evil": 1})
    with pytest.raises(CheckpointError, match="invalid mlp"):
        network_from_config({"type": "mlp", "dim": -1})


def test_schedule_config_round_trip():
    for s in (
        bfd.VPSchedule.linear(0.2, 10.0),
        bfd.VPSchedule.cosine(0.01),
        bfd.VESchedule(0.02, 30.0),
        bfd.FlowSchedule(),
    ):
        assert schedule_from_config(schedule_to_config(s)) == s
    with pytest.raises(CheckpointError):
        schedule_from_config({"kind": "weird"})


@pytest.mark.parametrize(
    "param,sched",
    [
        ("eps", bfd.VPSchedule.linear()),
        ("x0", bfd.VPSchedule.linear()),
        ("v", bfd.VPSchedule.cosine()),
        ("velocity", bfd.FlowSchedule()),
    ],
)
def test_adapter_recovers_x0_from_exact_prediction(param, sched):
    """A network that outputs the exact target for a known x0 makes denoise return x0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    xt = a * x0 + s * eps
    target = {
        "eps": eps,
        "x0": x0,
        "v": a * eps - s * x0,
        "velocity": sched.dalpha(t)[:, None] * x0 + sched.dsigma(t)[:, None] * eps,
    }[param]

    class Oracle(torch.nn.Module):
        parameterization = param

        def forward(self, x, tt):
            return target

    prior = prior_from_network(Oracle(), sched, (3,))
    assert isinstance(prior, bfd.DiffusionModel)
    torch.testing.assert_close(prior.denoise(xt, t), x0, rtol=1e-10, atol=1e-10)


def test_prior_from_network_on_particle_batches():
    net = UNet(1, channels=(8, 16), groups=4)
    prior = prior_from_network(net, bfd.VPSchedule.linear(), (1, 8, 8), chunk_size=5)
    x = torch.randn(2, 7, 1, 8, 8)
    out = prior.denoise(x, torch.tensor(0.5))
    assert out.shape == x.shape
    # zero eps-prediction: x0_hat = x_t / alpha
    a = bfd.VPSchedule.linear().alpha(torch.tensor(0.5))
    torch.testing.assert_close(out, x / a)
    assert math.isfinite(out.sum().item())

import pytest
import torch

import bayesfilter_diff as bfd

D64 = torch.float64


def _op(gen):
    return bfd.operators.Dense(torch.randn(3, 5, generator=gen, dtype=D64))


def test_gaussian_log_likelihood_and_gradient(gen):
    A = _op(gen)
    y = torch.randn(2, 3, generator=gen, dtype=D64)
    p = bfd.InverseProblem(A, y, 0.3)
    x = torch.randn(2, 4, 5, generator=gen, dtype=D64)
    ll, grad = p.grad_log_likelihood(x)
    ref = torch.distributions.Normal(A(x), 0.3).log_prob(y[:, None]).sum(-1)
    assert torch.allclose(ll, ref) and torch.allclose(p.log_likelihood(x), ref)
    xr = x.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(p.log_likelihood(xr).sum(), xr)
    assert torch.allclose(grad, g2)


def test_poisson_and_nonlinear_gradient(gen):
    A = bfd.operators.Identity((4,), dtype=D64)
    y = torch.tensor([1.0, 0.0, 3.0, 2.0], dtype=D64)
    p = bfd.InverseProblem(A, y, noise="poisson")
    x = torch.rand(1, 3, 4, generator=gen, dtype=D64) + 0.5
    ref = torch.distributions.Poisson(x).log_prob(y).sum(-1)
    assert torch.allclose(p.log_likelihood(x), ref)
    ll, g = p.grad_log_likelihood(x)
    assert torch.allclose(g, y / x - 1)
    pr = bfd.operators.PhaseRetrieval((1, 4, 4))
    yp = pr(torch.rand(1, 4, 4, generator=gen, dtype=D64))
    pp = bfd.InverseProblem(pr, yp, 0.1)
    ll, g = pp.grad_log_likelihood(torch.rand(1, 2, 1, 4, 4, generator=gen, dtype=D64))
    assert ll.shape == (1, 2) and g.shape == (1, 2, 1, 4, 4) and torch.isfinite(g).all()


def test_batching(gen):
    A = _op(gen)
    p = bfd.InverseProblem(A, torch.zeros(3, dtype=D64), 0.1)
    assert not p.batched and p.batch_size == 1 and p.y_flat.shape == (1, 3)
    p = bfd.InverseProblem(A, torch.zeros(7, 3, dtype=D64), 0.1)
    assert p.batched and p.batch_size == 7


@pytest.mark.parametrize(
    "y, std, match",
    [
        (torch.zeros(4, dtype=D64), 0.1, "output shape"),
        (torch.zeros(2, 2, 3, dtype=D64), 0.1, "output shape"),
        (torch.zeros(0, 3, dtype=D64), 0.1, "empty batch"),
        (torch.tensor([0.0, float("nan"), 1.0], dtype=D64), 0.1, "finite"),
        (torch.zeros(3, dtype=D64), -0.1, "noise_std"),
        (torch.zeros(3, dtype=D64), float("nan"), "noise_std"),
        (torch.zeros(3, dtype=torch.float32), 0.1, "dtype"),
    ],
)
def test_bad_problem_arguments(y, std, match, gen):
    with pytest.raises(ValueError, match=match):
        bfd.InverseProblem(_op(gen), y, std)


def test_bad_types(gen):
    with pytest.raises(TypeError, match="operator"):
        bfd.InverseProblem(torch.eye(3), torch.zeros(3), 0.1)
    with pytest.raises(TypeError, match="floating"):
        bfd.InverseProblem(_op(gen), torch.zeros(3, dtype=torch.long), 0.1)


def test_squared_scores_need_a_custom_likelihood(gen):
    with pytest.raises(ValueError, match="squared_scores_fn goes with a log_likelihood_fn"):
        bfd.InverseProblem(
            _op(gen), torch.zeros(3, dtype=D64), 0.1, squared_scores_fn=lambda x: None
        )


def test_to_returns_a_copy_and_leaves_the_problem_as_it_was(gen):
    # nn.Module.to moves a module in place: InverseProblem.to must not move the original's
    # operator with the copy's (a CUDA problem's exact posterior once read a moved operator)
    A = bfd.operators.Dense(torch.randn(2, 3, generator=gen))
    problem = bfd.InverseProblem(A, torch.randn(4, 2, generator=gen), 0.5)
    moved = problem.to(torch.float64)
    assert moved.operator.M.dtype == torch.float64 and moved.y.dtype == torch.float64
    assert problem.operator.M.dtype == torch.float32 and problem.y.dtype == torch.float32
    assert moved.operator is not problem.operator


def test_float16_data_keep_per_problem_noise_scales_in_float32():
    """SMC^2's theta-particles of an unknown noise scale reach scales whose square float16
    cannot hold (below 0.0078): such a problem was refused mid-run ("noise_std is too small
    for torch.float16") though the samplers run 16-bit problems in float32. The scales are
    now kept in float32 and the log-likelihood is computed there: equal to the float32
    problem's, finite."""
    A = bfd.operators.Identity((2,), dtype=torch.float16)
    y = torch.tensor([[0.5, -0.25], [1.0, 2.0]], dtype=torch.float16)
    noise = torch.tensor([1e-3, 0.5])
    p16 = bfd.InverseProblem(A, y, noise)
    p32 = bfd.InverseProblem(bfd.operators.Identity((2,)), y.float(), noise)
    assert p16.noise_stds.dtype == torch.float32 and float(p16.noise_stds[0]) == pytest.approx(1e-3)
    x = torch.tensor([[[0.5, -0.25]], [[0.0, 1.0]]], dtype=torch.float16)
    ll = p16.log_likelihood(x)
    assert bool(torch.isfinite(ll).all())
    torch.testing.assert_close(ll, p32.log_likelihood(x.float()))

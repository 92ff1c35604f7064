import pytest
import torch

import bayesfilter_diff as bfd
from bayesfilter_diff import operators as O
from bayesfilter_diff.operators import Dense


def _ops():
    g = torch.Generator().manual_seed(0)
    return {
        "identity": O.Identity((5,), dtype=torch.float64),
        "dense_wide": O.Dense(torch.randn(3, 6, generator=g, dtype=torch.float64)),
        "dense_tall": O.Dense(torch.randn(6, 3, generator=g, dtype=torch.float64)),
        "dense_rank_def": O.Dense(
            torch.randn(4, 2, generator=g, dtype=torch.float64)
            @ torch.randn(2, 5, generator=g, dtype=torch.float64)
        ),
        "dense_image": O.Dense(
            torch.randn(4, 12, generator=g, dtype=torch.float64), in_shape=(1, 3, 4)
        ),
        "mask_random": O.Mask.random((2, 4, 4), 0.5, g, dtype=torch.float64),
        "mask_box": O.Mask.box((1, 6, 6), 1, 1, 3, 2, dtype=torch.float64),
        "mask_vector": O.Mask(torch.tensor([True, False, True, True, False]), dtype=torch.float64),
        "downsample": O.Downsample((2, 4, 6), 2, dtype=torch.float64),
        "downsample3": O.Downsample((6, 9), 3, dtype=torch.float64),
        "colorize": O.Colorize((3, 4, 5), dtype=torch.float64),
        "blur_gauss": O.Blur(O.gaussian_kernel(3, 1.0, dtype=torch.float64), (2, 6, 8)),
        "blur_motion": O.Blur(O.motion_kernel(5, generator=g, dtype=torch.float64), (8, 8)),
        "blur_box_zero_freqs": O.Blur(torch.ones(2, 2, dtype=torch.float64), (4, 4)),
        "benchmark": O.gmm_benchmark_operator(8, 2, g, dtype=torch.float64)[0],
        # wide matrices: thin SVD, V completed by Householder reflections
        "dense_thin": O.Dense(torch.randn(3, 40, generator=g, dtype=torch.float64)),
        "dense_thin_rank_def": O.Dense(
            torch.randn(4, 2, generator=g, dtype=torch.float64)
            @ torch.randn(2, 40, generator=g, dtype=torch.float64)
        ),
        "dense_thin_image": O.Dense(
            torch.randn(2, 24, generator=g, dtype=torch.float64), in_shape=(2, 3, 4)
        ),
        "benchmark_800": O.gmm_benchmark_operator(800, 4, g, dtype=torch.float64)[0],
    }


OPS = _ops()


@pytest.mark.parametrize("name", list(OPS))
def test_adjointness(name):
    g = torch.Generator().manual_seed(1)
    assert O.adjointness_error(OPS[name], g) < 1e-12


@pytest.mark.parametrize("name", list(OPS))
def test_svd_identity_and_orthogonality(name):
    op = OPS[name]
    g = torch.Generator().manual_seed(2)
    assert O.svd_error(op, g) < 1e-12
    s = op.singular_values()
    assert (s > 0).all() and s.numel() <= min(op.in_dim, op.out_dim)
    z = torch.randn(4, op.in_dim, generator=g, dtype=torch.float64)
    assert torch.allclose(op.Vt(op.V(z)), z, atol=1e-12)
    w = torch.randn(4, op.out_dim, generator=g, dtype=torch.float64)
    assert torch.allclose(op.Ut(op.U(w)), w, atol=1e-12)
    # singular values agree with the dense matrix
    sv = torch.linalg.svdvals(op.matrix().double())
    sv = sv[sv > 1e-10 * sv.max()]
    assert torch.allclose(torch.sort(s, descending=True).values, sv, atol=1e-10)


@pytest.mark.parametrize("name", list(OPS))
def test_range_coordinates_are_the_first_r_of_the_svd(name):
    """``Vt_range`` / ``V_range`` (one product for Dense) agree with the full ``V^T`` / ``V``
    restricted to the range's first ``r`` coordinates."""
    op = OPS[name]
    g = torch.Generator().manual_seed(5)
    r = op.rank
    x = torch.randn((3,) + op.in_shape, generator=g, dtype=torch.float64)
    assert torch.allclose(op.Vt_range(x), op.Vt(x)[..., :r], atol=1e-12)
    w = torch.randn(3, r, generator=g, dtype=torch.float64)
    full = op.V(op.pad_in(w))
    assert op.V_range(w).shape == full.shape == (3,) + op.in_shape
    assert torch.allclose(op.V_range(w), full, atol=1e-12)


@pytest.mark.parametrize("name", list(OPS))
def test_pseudo_inverse(name):
    op = OPS[name]
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2,) + op.in_shape, generator=g, dtype=torch.float64)
    ax = op(x)
    assert torch.allclose(op(op.pinv(ax)), ax, atol=1e-10)  # A A^+ A = A
    M = op.matrix()
    assert torch.allclose(
        op.flat_in(op.pinv(op.U(torch.eye(op.out_dim, dtype=torch.float64)))).T,
        torch.linalg.pinv(M)
        @ op.U(torch.eye(op.out_dim, dtype=torch.float64)).reshape(op.out_dim, -1).T,
        atol=1e-9,
    )


@pytest.mark.parametrize("name", list(OPS))
def test_gram_solve_matches_dense(name):
    op = OPS[name]
    g = torch.Generator().manual_seed(4)
    y = torch.randn((3,) + op.out_shape, generator=g, dtype=torch.float64)
    M = op.matrix()
    G = 0.7 * M @ M.T + 0.2 * torch.eye(op.out_dim, dtype=torch.float64)
    ref = torch.linalg.solve(G, op.flat_out(y).T).T
    assert torch.allclose(op.flat_out(op.gram_solve(y, 0.7, 0.2)), ref, atol=1e-10)


@pytest.mark.parametrize("name", list(OPS))
def test_damped_pinv_and_prox_match_dense(name):
    op = OPS[name]
    g = torch.Generator().manual_seed(7)
    f64 = torch.float64
    M = op.matrix()
    m, d = M.shape
    y = torch.randn((3,) + op.out_shape, generator=g, dtype=f64)
    z = torch.randn((3,) + op.in_shape, generator=g, dtype=f64)
    yf, zf = op.flat_out(y), op.flat_in(z)
    # A^T (r2 A A^T + s2 I)^-1 y, and A^+ y for s2 = 0
    G = 0.7 * M @ M.T + 0.2 * torch.eye(m, dtype=f64)
    ref = torch.linalg.solve(G, yf.T).T @ M
    assert torch.allclose(op.flat_in(op.damped_pinv(y, 0.7, 0.2)), ref, atol=1e-10)
    ref0 = yf @ torch.linalg.pinv(M).T
    assert torch.allclose(op.flat_in(op.damped_pinv(y)), ref0, atol=1e-9)
    # argmin ||A x - y||^2 + rho ||x - z||^2, and the projection onto {A x = y} for rho = 0
    rho = 0.37
    H = M.T @ M + rho * torch.eye(d, dtype=f64)
    want = torch.linalg.solve(H, (yf @ M + rho * zf).T).T
    assert torch.allclose(op.flat_in(op.prox_l2(z, y, rho)), want, atol=1e-10)
    proj = zf - (zf @ M.T - yf) @ torch.linalg.pinv(M).T
    assert torch.allclose(op.flat_in(op.prox_l2(z, y, 0.0)), proj, atol=1e-9)


class _NoSVD(O.Dense):
    has_svd = False


@pytest.mark.parametrize("name", ["dense_wide", "dense_tall", "dense_rank_def", "dense_image"])
def test_solves_without_svd_cg_and_dense_match_svd(name):
    # The same solves by conjugate gradients (cg_iters) and densely (cg_iters=None).
    # s2 = 0 / rho = 0 are singular systems: consistent (y in the range of A) here, where
    # CG converges to the minimum-norm solution / the projection.
    svd = OPS[name]
    op = _NoSVD(svd.M, in_shape=svd.in_shape)
    g = torch.Generator().manual_seed(8)
    f64 = torch.float64
    y = torch.randn((2, 3) + op.out_shape, generator=g, dtype=f64)
    z = torch.randn((2, 3) + op.in_shape, generator=g, dtype=f64)
    y_in = op(torch.randn((2, 3) + op.in_shape, generator=g, dtype=f64))  # in range(A)
    rho = torch.tensor([[0.3], [1.7]], dtype=f64)  # per problem, broadcast over samples
    for cg in (50, None):
        kw = {"cg_iters": cg}
        close = dict(rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(op.gram_solve(y, 0.7, 0.2, **kw), svd.gram_solve(y, 0.7, 0.2))
        torch.testing.assert_close(
            op.damped_pinv(y, 0.7, 0.2, **kw), svd.damped_pinv(y, 0.7, 0.2), **close
        )
        torch.testing.assert_close(op.prox_l2(z, y, rho, **kw), svd.prox_l2(z, y, rho), **close)
        if cg is not None:  # the dense solve of a singular system is not defined
            torch.testing.assert_close(op.damped_pinv(y_in, **kw), svd.damped_pinv(y_in), **close)
            torch.testing.assert_close(
                op.prox_l2(z, y_in, 0.0, **kw), svd.prox_l2(z, y_in, 0.0), **close
            )


def test_conjugate_gradient_solves_each_system_independently():
    g = torch.Generator().manual_seed(9)
    f64 = torch.float64
    L = torch.randn(4, 6, 6, generator=g, dtype=f64)
    S = L @ L.transpose(-1, -2) + 0.1 * torch.eye(6, dtype=f64)  # 4 SPD systems
    b = torch.randn(4, 6, generator=g, dtype=f64)
    b[1] *= 1e6  # a large system must not change the others' stopping
    b[2] = 0.0

    def mv(S):
        return lambda v: (S @ v.unsqueeze(-1)).squeeze(-1)

    u = O.conjugate_gradient(mv(S), b, 1, iters=30)
    torch.testing.assert_close(u, torch.linalg.solve(S, b), rtol=1e-9, atol=1e-12)
    assert (u[2] == 0).all()
    for i in range(4):
        one = O.conjugate_gradient(mv(S[i : i + 1]), b[i : i + 1], 1, iters=30)
        torch.testing.assert_close(one[0], u[i], rtol=1e-13, atol=0.0)
    # one iteration is the steepest-descent step b^T b / (b^T S b) b; a start x0 is used
    u1 = O.conjugate_gradient(mv(S), b, 1, iters=1)
    Sb = (S @ b.unsqueeze(-1)).squeeze(-1)
    step = (b * b).sum(-1, keepdim=True) / (b * Sb).sum(-1, keepdim=True).clamp_min(1e-300)
    torch.testing.assert_close(u1, step * b, rtol=1e-12, atol=0.0)
    x0 = torch.randn(4, 6, generator=g, dtype=f64)
    torch.testing.assert_close(
        O.conjugate_gradient(mv(S), b, 1, iters=30, x0=x0), u, rtol=1e-9, atol=1e-12
    )


def test_operators_have_no_side_effects_and_batch():
    op = OPS["blur_gauss"]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 2, 6, 8, generator=g, dtype=torch.float64)
    x_copy = x.clone()
    before = {k: v.clone() for k, v in op.state_dict().items()}
    y1 = op(x)
    assert torch.equal(x, x_copy)
    assert all(torch.equal(before[k], v) for k, v in op.state_dict().items())
    assert torch.allclose(op(x[1, 2]), y1[1, 2])


@pytest.mark.parametrize("name", list(OPS) + ["per_problem", "phase_retrieval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_an_operator_follows_its_input_dtype(name, dtype):
    # a float64 operator applied to float32 / 16-bit signals (and the reverse below): the
    # result in the input's dtype, the value the operator's own dtype gives up to the
    # input's rounding (Dense and PerProblemDense raised torch's raw dtype error; Blur and
    # PhaseRetrieval torch's "Unsupported dtype Half" on the CPU)
    g = torch.Generator().manual_seed(7)
    op = {
        "per_problem": O.PerProblemDense(torch.randn(2, 3, 5, generator=g, dtype=torch.float64)),
        "phase_retrieval": O.PhaseRetrieval((1, 4, 4)).double(),
    }.get(name) or OPS[name]
    x = torch.randn((2, 3) + op.in_shape, generator=g, dtype=torch.float64).to(dtype)
    y = op(x)
    ref = op(x.double())
    eps = torch.finfo(dtype).eps
    assert y.dtype == dtype and y.shape == ref.shape
    scale = ref.abs().amax() + x.double().abs().amax()
    assert ((y.double() - ref).abs() <= 64 * eps * scale).all()
    if op.is_linear:
        a = op.adjoint(y)
        assert a.dtype == dtype
        assert ((a.double() - op.adjoint(y.double())).abs() <= 64 * eps * 4 * scale).all()
    # a float32 operator takes float64 signals (a float64 result)
    op32 = op.float32_copy() if name != "phase_retrieval" else op.float()
    assert op32(x.double()).dtype == torch.float64


def test_mask_embed_and_box():
    m = O.Mask.box((1, 4, 4), 1, 1, 2, 2)
    assert m.out_dim == 12
    x = torch.arange(16.0).reshape(1, 4, 4)
    e = m.embed(m(x), fill=-1.0)
    assert (e[0, 1:3, 1:3] == -1).all() and (e[0, 0] == x[0, 0]).all()


def test_phase_retrieval_forward():
    op = O.PhaseRetrieval((1, 4, 4), oversampling=2)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    y = op(x)
    assert y.shape == (2, 1, 8, 8) and not op.is_linear
    # Parseval with the orthonormal FFT: ||y|| = ||x||
    assert torch.allclose(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))


def test_benchmark_operator_spectrum():
    g = torch.Generator().manual_seed(6)
    A, sigma_y = O.gmm_benchmark_operator(20, 4, g, dtype=torch.float64)
    s = A.singular_values()
    assert s.shape == (4,) and (s <= 1).all() and (s[1:] <= s[:-1]).all()
    assert 0 <= sigma_y <= float(s.max())


def test_operator_errors():
    with pytest.raises(ValueError, match="divisible"):
        O.Downsample((1, 5, 4), 2)
    with pytest.raises(ValueError, match="at least one"):
        O.Mask(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="end with shape"):
        O.Identity((4,))(torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        O.Dense(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="larger"):
        O.Blur(torch.ones(5, 5), (4, 4))
    with pytest.raises(NotImplementedError, match="no SVD"):
        bfd.operators.LinearOperator((2,), (2,)).singular_values()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_thin_dense_svd_is_the_svd_without_a_d_by_d_factor(dtype, tol):
    g = torch.Generator().manual_seed(9)
    M = torch.randn(3, 200, generator=g, dtype=torch.float64)
    op = O.Dense(M.to(dtype))
    assert op.thin and op._Vh is None
    assert not any(b.numel() >= 200 * 200 for b in op.buffers())
    _, s, Vh = torch.linalg.svd(M, full_matrices=False)
    V = op.V(torch.eye(200, dtype=dtype)).double()  # rows = columns of V
    assert torch.allclose(V @ V.T, torch.eye(200, dtype=torch.float64), atol=tol)
    # the first k columns of V are the right singular vectors (same signs as U's)
    assert torch.allclose(V[:3], Vh, atol=tol)
    assert torch.allclose(op.singular_values().double(), s, atol=tol)
    x = torch.randn(5, 200, generator=g, dtype=torch.float64).to(dtype)
    assert torch.allclose(op.V(op.Vt(x)), x, atol=tol * 10)
    assert op.Vt(x).dtype == dtype


def test_matrix_is_a_tensor_and_still_callable():
    """``A.matrix @ x`` works (a tensor), ``A.matrix()`` too (the method form); results of
    operations on it are plain tensors."""
    M = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for op in (bfd.operators.Dense(M), bfd.operators.Mask(torch.tensor([True, False, True]))):
        x = torch.randn(3, dtype=op.matrix.dtype, generator=torch.Generator().manual_seed(1))
        got = op.matrix @ x
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, op(x))
        assert type(op.matrix()) is torch.Tensor and op.matrix().shape == (2, 3)
        assert type(op.matrix.T) is torch.Tensor and type(op.matrix.double()) is torch.Tensor
    torch.testing.assert_close(bfd.operators.Dense(M).matrix(), M)


def test_dense_rank_follows_the_matrix_precision_and_16_bit_runs_in_float32():
    # a 2 x 8 matrix in float16 keeps both singular values (3.93, 2.61): the old tolerance,
    # 1e3 eps(float16) = 0.98 of the largest, dropped the second one silently
    g = torch.Generator().manual_seed(0)
    M = torch.randn(2, 8, generator=g, dtype=torch.float64)
    op16 = Dense(M.half())
    s64 = torch.linalg.svdvals(M.half().double())
    assert op16.singular_values().numel() == 2 and op16.dropped_singular_value == 0.0
    # the float32 copy the loop runs a 16-bit problem with recomputes the factors from the
    # matrix: orthonormal to float32 precision, not float16's
    op32 = op16.float32_copy()
    assert op32.M.dtype == torch.float32 and op32.singular_values().dtype == torch.float32
    torch.testing.assert_close(op32.singular_values().double(), s64, rtol=1e-6, atol=0)
    V = op32.V(torch.eye(8))
    assert float((V.T @ V - torch.eye(8)).abs().max()) < 1e-5
    # float32: singular values down to max(m, d) eps of the largest are kept
    U, _, Vh = torch.linalg.svd(
        torch.randn(2, 8, generator=g, dtype=torch.float64), full_matrices=False
    )
    M2 = (U @ torch.diag(torch.tensor([1.0, 5e-5], dtype=torch.float64)) @ Vh).float()
    assert Dense(M2).singular_values().numel() == 2


def test_dense_refuses_a_noise_level_at_which_a_dropped_direction_is_informative():
    g = torch.Generator().manual_seed(1)
    U, _, Vh = torch.linalg.svd(
        torch.randn(2, 8, generator=g, dtype=torch.float64), full_matrices=False
    )
    M = (U @ torch.diag(torch.tensor([1.0, 1e-7], dtype=torch.float64)) @ Vh).float()
    op = Dense(M)  # 1e-7 is below max(2, 8) eps(float32) = 9.5e-7: counted as zero
    assert op.singular_values().numel() == 1 and 5e-8 < op.dropped_singular_value < 2e-7
    y = torch.zeros(2)
    bfd.InverseProblem(op, y, noise_std=1e-3)  # uninformative there (s / noise 1e-4)
    with pytest.raises(ValueError, match="rtol.*float64|float64.*rtol"):
        bfd.InverseProblem(op, y, noise_std=1e-7)
    # from float64 values it is kept, and the problem accepted
    op64 = Dense(M.double())
    assert op64.singular_values().numel() == 2
    bfd.InverseProblem(op64, y.double(), noise_std=1e-7)
    with pytest.raises(ValueError, match="rtol"):
        Dense(M, rtol=-1.0)


def test_dense_copies_its_matrix():
    M = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    op = Dense(M)
    before = op(torch.ones(8))
    M[0, 0] += 100.0  # the caller's tensor changes; the operator (and its SVD) does not
    torch.testing.assert_close(op(torch.ones(8)), before)


def test_blur_reports_dropped_directions_and_16_bit_kernels_keep_float32_rank():
    k = O.gaussian_kernel(9, 1.5, dtype=torch.float32)  # its spectrum falls to ~1e-6
    op32 = O.Blur(k, (16, 16))
    assert 0 < op32.dropped_singular_value < 1.3e-4 * float(op32.singular_values().max())
    y = torch.zeros(16, 16)
    bfd.InverseProblem(op32, y, noise_std=0.05)
    with pytest.raises(ValueError, match="rtol"):
        bfd.InverseProblem(op32, y, noise_std=1e-4)
    # float16: the rank of the float32 computation (it kept 1 of 256 before), and the
    # float32 copy the loop runs with recomputes the spectrum from the kernel
    op16 = O.Blur(k.half(), (16, 16))
    assert op16.singular_values().numel() == op32.singular_values().numel()
    c = op16.float32_copy()
    assert c.singular_values().dtype == torch.float32
    torch.testing.assert_close(
        c.singular_values(), O.Blur(k.half().float(), (16, 16)).singular_values()
    )


def test_a_rank_deficient_dense_serves_a_noiseless_problem():
    # the informative-dropped-direction check applies to noisy problems only: a noiseless
    # one with an exactly rank-deficient matrix (round-off singular value ~3e-16) raised a
    # raw ZeroDivisionError
    g = torch.Generator().manual_seed(0)
    B = torch.randn(3, 2, generator=g, dtype=torch.float64)
    C = torch.randn(2, 6, generator=g, dtype=torch.float64)
    op = Dense(B @ C)
    assert op.singular_values().numel() == 2 and 0 < op.dropped_singular_value < 1e-12
    bfd.InverseProblem(op, torch.zeros(3, dtype=torch.float64), noise_std=0.0)
    bfd.InverseProblem(op, torch.zeros(3, dtype=torch.float64), noise_std=1e-6)

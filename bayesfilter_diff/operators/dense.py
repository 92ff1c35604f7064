"""Dense operator: any ``(m, d)`` matrix, its SVD computed once (float64, then cast).

For a wide matrix (``m <= d / 4`` rows, ``k = m``; e.g. the ``(d_y, d)`` operators of the
Gaussian-mixture benchmark) the ``d x d`` right factor is never formed: only the ``k``
right singular vectors ``V_k`` are kept, completed to an orthogonal ``V`` by ``k``
Householder reflections (the QR factorisation ``V_k = Q D``, ``D = diag(+-1)``, of LAPACK's
``geqrf``) applied in compact WY form ``Q = I - Y T Y^T`` (Schreiber & Van Loan 1989). ``Vt``
and ``V`` then cost ``O(n d k)`` instead of ``O(n d^2)`` and ``O(d k)`` memory instead of
``O(d^2)``; the first ``k`` columns of ``V`` are exactly ``V_k``, the others an orthonormal
basis of its complement (any basis is a valid SVD there: those singular values are zero).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import LinearOperator


class Dense(LinearOperator):
    """``A x = M x`` for a matrix ``M`` of shape ``(m, d)``.

    Parameters
    ----------
    matrix
        ``(m, d)`` floating-point tensor.
    in_shape
        Event shape of ``x`` (default ``(d,)``); the matrix acts on ``x`` flattened.
    rtol
        Singular values below ``rtol * max(s)`` count as zero. Default ``max(m, d)`` times
        the matrix dtype's machine epsilon (the numerical rank of a matrix stored in that
        dtype, as ``numpy.linalg.matrix_rank``): the SVD is computed in float64 from the
        matrix's values, so the factors are as accurate as those values allow; a float16
        matrix keeps every singular value above ``max(m, d) x 9.8e-4`` of the largest.
        ``dropped_singular_value`` is the largest one counted as zero (0 if none):
        :class:`~bayesfilter_diff.InverseProblem` refuses a Gaussian noise level at which
        that direction would still be informative.

    The matrix is copied: changing the caller's tensor afterwards does not change the
    operator (whose SVD would then be stale).
    """

    has_svd = True

    M: Tensor
    _U: Tensor
    _s: Tensor
    _Vh: Tensor | None
    _Y: Tensor
    _T: Tensor
    _sign: Tensor
    _Ys: Tensor
    _Vr: Tensor

    def __init__(
        self, matrix: Tensor, in_shape: Sequence[int] | None = None, rtol: float | None = None
    ) -> None:
        if not isinstance(matrix, Tensor) or matrix.dim() != 2:
            raise ValueError(
                f"matrix must be a 2-D tensor (m, d), got {getattr(matrix, 'shape', matrix)}"
            )
        if not matrix.is_floating_point():
            raise TypeError(f"matrix must be floating point, got {matrix.dtype}")
        if not torch.isfinite(matrix).all():
            raise ValueError("matrix must be finite (no NaN or inf)")
        m, d = matrix.shape
        in_shape = (d,) if in_shape is None else tuple(in_shape)
        super().__init__(in_shape, (m,))
        if self.in_dim != d:
            raise ValueError(
                f"in_shape {in_shape} has {self.in_dim} entries, matrix has d={d} columns"
            )
        self.thin = 4 * m <= d  # then U is square (m, m) even in the thin SVD
        self.thin_range = self.thin
        U, s, Vh = torch.linalg.svd(matrix.double(), full_matrices=not self.thin)
        if rtol is None:
            rtol = max(m, d) * torch.finfo(matrix.dtype).eps
        elif not (isinstance(rtol, (int, float)) and not isinstance(rtol, bool) and rtol >= 0):
            raise ValueError(f"rtol must be a number >= 0, got {rtol!r}")
        self.rtol = float(rtol)
        keep = s > self.rtol * s.max().clamp_min(1e-300)
        r = int(keep.sum())
        #: the largest singular value counted as zero (0.0 if none), in the matrix's units
        self.dropped_singular_value = float(s[~keep].max()) if r < s.numel() else 0.0
        dt = matrix.dtype
        self.register_buffer("M", matrix.detach().clone())
        self.register_buffer("_U", U.to(dt))
        self.register_buffer("_s", s[:r].to(dt))
        # the first r right singular vectors (V's first r columns), for Vt_range / V_range
        self.register_buffer("_Vr", Vh[:r].T.contiguous().to(dt))
        if self.thin:
            Y, T, sign = _compact_wy(Vh.T)
            self.register_buffer("_Vh", None)
            self.register_buffer("_Y", Y.to(dt))
            self.register_buffer("_T", T.to(dt))
            # D = diag(sign) acts on the first k coordinates only: V's product with Y takes it
            # folded in (diag(D, 1) Y), and both fix the k columns in place, not a full pass
            self.register_buffer("_sign", sign.to(dt))
            self.register_buffer(
                "_Ys", (torch.cat([sign, sign.new_ones(d - sign.numel())])[:, None] * Y).to(dt)
            )
        else:
            self.register_buffer("_Vh", Vh.to(dt))

    def float32_copy(self) -> Dense:
        """The operator in float32 with its SVD recomputed from the matrix (a 16-bit matrix
        cast afterwards would keep 16-bit factors); the rank is kept as decided for the
        matrix's own dtype."""
        op = Dense(self.M.float(), self.in_shape, rtol=self.rtol)
        return op.to(self.M.device)

    def forward(self, x: Tensor) -> Tensor:
        return self.flat_in(x) @ self._as(self.M, x).T

    def adjoint(self, y: Tensor) -> Tensor:
        lead = self._lead(y, self.out_shape, "y")
        return (y @ self._as(self.M, y)).reshape(lead + self.in_shape)

    def _matrix(self) -> Tensor:
        return self.M

    def singular_values(self) -> Tensor:
        return self._s

    def Vt(self, x: Tensor) -> Tensor:
        x = self.flat_in(x)
        if not self.thin:
            assert self._Vh is not None
            return x @ self._Vh.T
        # x V = (x Q) diag(D, 1): x Q = x - ((x Y) T) Y^T
        x2 = x.reshape(-1, x.shape[-1])
        z = torch.addmm(x2, (x2 @ self._Y) @ self._T, self._Y.T, alpha=-1)
        k = self._sign.numel()
        z[:, :k].mul_(self._sign)
        return z.reshape(x.shape)

    def V(self, z: Tensor) -> Tensor:
        if not self.thin:
            assert self._Vh is not None
            return (z @ self._Vh).reshape(z.shape[:-1] + self.in_shape)
        # V z = Q diag(D, 1) z; as rows: w - ((w Y) T^T) Y^T with w = z diag(D, 1), i.e.
        # z - ((z Ys) T^T) Y^T (Ys = diag(D, 1) Y) plus (D - 1) z on the first k columns
        z2 = z.reshape(-1, z.shape[-1])
        x = torch.addmm(z2, (z2 @ self._Ys) @ self._T.T, self._Y.T, alpha=-1)
        k = self._sign.numel()
        x[:, :k].addcmul_(z2[:, :k], self._sign - 1)
        return x.reshape(z.shape[:-1] + self.in_shape)

    def Vt_range(self, x: Tensor) -> Tensor:
        return self.flat_in(x) @ self._Vr  # one product, no full V^T

    def V_range(self, w: Tensor) -> Tensor:
        return (w @ self._Vr.T).reshape(w.shape[:-1] + self.in_shape)

    def Ut(self, y: Tensor) -> Tensor:
        return self.flat_out(y) @ self._U

    def U(self, z: Tensor) -> Tensor:
        return z @ self._U.T


def _compact_wy(Vk: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Householder QR of ``Vk`` (``(d, k)``, orthonormal columns) in compact WY form.

    Returns ``Y`` (``(d, k)``, unit lower trapezoidal), ``T`` (``(k, k)`` upper triangular)
    and ``sign`` (``(k,)``) with ``Q = I - Y T Y^T`` orthogonal and
    ``Q[:, :k] diag(sign) = Vk``.
    """
    a, tau = torch.geqrf(Vk)
    d, k = Vk.shape
    Y = torch.tril(a, diagonal=-1)
    Y[:k].diagonal().fill_(1.0)
    # R = Q^T Vk is upper triangular and orthogonal: diag(+-1)
    sign = torch.sign(a.diagonal())
    sign[sign == 0] = 1.0
    T = torch.zeros(k, k, dtype=Vk.dtype, device=Vk.device)
    G = Y.T @ Y
    for j in range(k):  # LAPACK larft (forward, columnwise); k is small (<= d / 4)
        T[j, j] = tau[j]
        if j:
            T[:j, j] = -tau[j] * (T[:j, :j] @ G[:j, j])
    return Y, T, sign


def gmm_benchmark_operator(
    dim: int,
    obs_dim: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Dense, float]:
    """The random operator and noise level of the Gaussian-mixture benchmark.

    Following Cardoso et al. (MCGdiff, ICLR 2024, appendix): draw a ``(d_y, d)`` standard
    normal matrix, take its SVD, replace the singular values by sorted ``U[0, 1]`` draws,
    ``A = U diag(s) V^T``; then ``sigma_y ~ U[0, max(s)]``.

    Returns
    -------
    (operator, sigma_y)
    """
    if obs_dim < 1 or dim < obs_dim:
        raise ValueError(f"need 1 <= obs_dim <= dim, got obs_dim={obs_dim}, dim={dim}")
    G = torch.randn(obs_dim, dim, generator=generator, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    s = torch.sort(
        torch.rand(obs_dim, generator=generator, dtype=torch.float64), descending=True
    ).values
    A = U @ torch.diag(s) @ Vh
    sigma_y = float(torch.rand((), generator=generator, dtype=torch.float64) * s.max())
    return Dense(A.to(dtype)), sigma_y


class PerProblemDense(LinearOperator):
    """``A_b x = M_b x``: one ``(m, d)`` matrix per problem of a batch of ``B`` problems.

    For problems whose forward models differ (an operator parameter per theta-particle of
    SMC^2, a gain per problem). Signals carry the problems' axis first: ``x`` of shape
    ``(B, ..., *in_shape)``. No shared SVD (``has_svd = False``): :meth:`gram_solve` is a
    batched dense solve per problem; samplers accept it only where they declare
    ``Requirements.per_problem`` (TDS).

    Parameters
    ----------
    matrices
        ``(B, m, d)`` floating-point tensor.
    in_shape
        Event shape of ``x`` (default ``(d,)``).
    """

    per_problem = True
    M: Tensor

    def __init__(self, matrices: Tensor, in_shape: Sequence[int] | None = None) -> None:
        if not isinstance(matrices, Tensor) or matrices.dim() != 3:
            raise ValueError(
                "matrices must be a 3-D tensor (B, m, d), got "
                f"{getattr(matrices, 'shape', matrices)}"
            )
        if not matrices.is_floating_point():
            raise TypeError(f"matrices must be floating point, got {matrices.dtype}")
        if not torch.isfinite(matrices).all():
            raise ValueError("matrices must be finite (no NaN or inf)")
        _, m, d = matrices.shape
        in_shape = (d,) if in_shape is None else tuple(in_shape)
        super().__init__(in_shape, (m,))
        if self.in_dim != d:
            raise ValueError(
                f"in_shape {in_shape} has {self.in_dim} entries, matrices have d={d} columns"
            )
        self.register_buffer("M", matrices)

    @property
    def batch_size(self) -> int:
        return self.M.shape[0]

    def _per_problem(self, lead: torch.Size, what: str) -> None:
        if len(lead) < 1 or lead[0] != self.batch_size:
            raise ValueError(
                f"PerProblemDense: {what} must carry the problems' axis first, "
                f"(B={self.batch_size}, ...), got leading shape {tuple(lead)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        lead = self._lead(x, self.in_shape, "x")
        self._per_problem(lead, "x")
        xf = x.reshape(lead[0], -1, self.in_dim)
        return (xf @ self._as(self.M, x).transpose(-1, -2)).reshape(lead + self.out_shape)

    def adjoint(self, y: Tensor) -> Tensor:
        lead = self._lead(y, self.out_shape, "y")
        self._per_problem(lead, "y")
        yf = y.reshape(lead[0], -1, self.out_dim)
        return (yf @ self._as(self.M, y)).reshape(lead + self.in_shape)

    def _matrix(self) -> Tensor:
        """The ``(B, m, d)`` matrices."""
        return self.M

    def max_singular_value(self) -> float:
        """The largest singular value over the problems."""
        return float(torch.linalg.matrix_norm(self.M.double(), ord=2).max())

    def gram_solve(
        self,
        y: Tensor,
        r2: Tensor | float,
        s2: Tensor | float,
        *,
        cg_iters: int | None = None,
        cg_tol: float = 1e-10,
    ) -> Tensor:
        """``(r2 A_b A_b^T + s2 I)^-1 y`` per problem, through each matrix's thin SVD
        ``M_b = U_b S_b V_b^T`` (float64, computed once)::

            U (U^T y / (r2 S^2 + s2)) + (y - U U^T y) / s2,

        the second term only where ``m > d``. ``r2`` and ``s2`` are numbers or tensors
        broadcasting against ``y``'s leading dimensions ``(B, ...)``, a coefficient may vary
        along the particles (``cg_iters`` is ignored: the matrices are dense). A Cholesky
        solve of ``r2 M M^T + s2 I`` failed in float32 for ``m > d``: its ``m - d``
        eigenvalues ``s2`` sank under the rounding of ``r2 M M^T`` (``r2`` is TDS's twist
        variance, ~2e4 at the start of the linear VP path), a raw torch error from SMC^2
        with an unknown gain and more observations than coordinates."""
        lead = self._lead(y, self.out_shape, "y")
        self._per_problem(lead, "y")
        B, m = self.batch_size, self.out_dim
        r2t = torch.as_tensor(r2, dtype=y.dtype, device=y.device)
        s2t = torch.as_tensor(s2, dtype=y.dtype, device=y.device)
        # the coefficients' shape over the leading dims, padded to y's rank
        cshape = torch.broadcast_shapes(r2t.shape, s2t.shape)
        cshape = (1,) * (len(lead) - len(cshape)) + tuple(cshape)
        r2t = r2t.reshape((1,) * (len(lead) - r2t.dim()) + tuple(r2t.shape)).expand(cshape)
        s2t = s2t.reshape((1,) * (len(lead) - s2t.dim()) + tuple(s2t.shape)).expand(cshape)
        if cshape[0] not in (1, B):
            raise ValueError(f"coefficients of leading shape {cshape} do not match B={B}")
        U, S = self._thin_svd()  # (B, m, k), (B, k) float64
        wide = m > S.shape[-1]  # a complement of U's range, where only s2 acts
        if wide and not bool((s2t > 0).all()):
            raise ValueError(
                f"PerProblemDense.gram_solve: s2 must be > 0 with more rows (m={m}) than "
                f"columns (d={self.in_dim}): r2 A A^T + s2 I is singular otherwise"
            )
        pad = (1,) * (len(lead) - 1)
        Ub = U.reshape((B,) + pad + U.shape[1:])  # (B, 1.., m, k)
        y64 = y.reshape(lead + (m,)).double()
        r64, s64 = r2t.double()[..., None], s2t.double()[..., None]
        z = (y64.unsqueeze(-2) @ Ub).squeeze(-2)  # U^T y, (B, .., k)

        def along_u(c: Tensor) -> Tensor:
            return (Ub @ c.unsqueeze(-1)).squeeze(-1)

        sol = along_u(z / (r64 * S.reshape((B,) + pad + S.shape[1:]) ** 2 + s64))
        if wide:
            sol = sol + (y64 - along_u(z)) / s64
        return sol.to(y.dtype).reshape(lead + self.out_shape)

    def _thin_svd(self) -> tuple[Tensor, Tensor]:
        """``U`` ``(B, m, k)`` and ``S`` ``(B, k)``, ``k = min(m, d)``, of the matrices,
        in float64, computed once per matrix buffer (its storage, version and device)."""
        key = (self.M.data_ptr(), self.M._version, self.M.device)
        cached = getattr(self, "_svd_cache", None)
        if cached is None or cached[0] != key:
            U, S, _ = torch.linalg.svd(self.M.double(), full_matrices=False)
            cached = (key, U, S)
            self._svd_cache = cached
        return cached[1], cached[2]

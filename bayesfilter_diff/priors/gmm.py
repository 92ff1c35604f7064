"""Gaussian-mixture priors: exact density, noisy marginals, denoiser, posterior and evidence.

Prior ``p(x) = sum_k w_k N(x; mu_k, S_k)``. Under a Gaussian path
``x_t = alpha x0 + sigma eps`` every noisy marginal is again a mixture,
``p_t = sum_k w_k N(alpha mu_k, alpha^2 S_k + sigma^2 I)``, and with the eigendecomposition
``S_k = Q_k diag(l_k) Q_k^T`` (computed once) the denoiser is closed form at every ``t``:

    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + Q_k diag(alpha l_k / (alpha^2 l_k + sigma^2)) Q_k^T (x_t - alpha mu_k))

with responsibilities ``r_k`` from a log-sum-exp over components. Costs per particle and
step: isotropic ``(K,)`` covariances use ``||x - a mu_k||^2 = ||x||^2 - 2 a x.mu_k +
a^2 ||mu_k||^2`` (one ``(n, d) x (d, K)`` product, evaluated in float64 so that the
cancellation stays harmless for means at +-16 in d = 800 with float32 inputs) and never form
an ``(n, K, d)`` tensor; diagonal ``(K, d)`` covariances cost ``O(K d)``; full covariances
``O(K d^2)``, or ``O(d^2 + K d)`` when every component shares one covariance (the posterior
of an isotropic mixture), which is detected at construction and factored once.

Under ``y = A x + sigma_y n`` (REFERENCES.md, "Exact reference") the posterior is the
mixture with ``C_k = S_k - S_k A^T G_k^-1 A S_k``, ``m_k = mu_k + S_k A^T G_k^-1 (y - A mu_k)``,
``w~_k ∝ w_k N(y; A mu_k, G_k)``, ``G_k = A S_k A^T + sigma_y^2 I`` (the Woodbury form, so
only ``d_y x d_y`` systems are solved and ``sigma_y = 0`` is allowed), and
``p(y) = sum_k w_k N(y; A mu_k, G_k)``. These are computed in float64.

Reference code: gabrielvc/mcg_diff ``scripts/viz_gaussian.py`` (``ou_mixt``,
``get_posterior``) and Badr-MOUFAD/dcps ``src/utils/utils.py`` (``fwd_mixture``).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from ..schedules import Schedule
from .base import DiffusionModel, broadcast_time

if TYPE_CHECKING:
    from ..operators.base import LinearOperator

__all__ = ["GaussianMixture", "GaussianMixtureDiffusion"]

_LOG2PI = math.log(2 * math.pi)


def _check_finite(name: str, x: Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")


def _compact_covariances(cov: Tensor, K: int, d: int) -> Tensor:
    """The cheapest exact form of ``cov``: full ``(K, d, d)`` matrices with exactly zero
    off-diagonal entries become diagonal variances ``(K, d)``, and diagonal variances that
    are equal along ``d`` become isotropic variances ``(K,)`` (one check at construction;
    e.g. identity matrices from ``torch.eye`` take the ``O(K d)`` isotropic path instead of
    the ``O(K d^2)`` full one). Batched and other shapes are returned unchanged."""
    if cov.dim() == 3 and cov.shape == (K, d, d):
        diag = torch.diagonal(cov, dim1=-2, dim2=-1)
        if bool((cov == torch.diag_embed(diag)).all()):
            cov = diag.contiguous()
    if cov.dim() == 2 and cov.shape == (K, d):
        if bool((cov == cov[:, :1]).all()):
            cov = cov[:, 0].contiguous()
    return cov


class GaussianMixture(nn.Module):
    """A mixture of Gaussians in ``R^d``, optionally batched.

    Parameters
    ----------
    weights
        ``(*batch, K)`` non-negative, summing to one along the last axis.
    means
        ``(*batch, K, d)``.
    covariances
        ``(K,)`` isotropic variances, ``(K, d)`` diagonal variances or ``(K, d, d)`` full
        symmetric positive-definite matrices (a leading batch shape is allowed for full
        covariances). Stored in its cheapest exact form: full matrices with zero
        off-diagonal entries as diagonal variances, diagonal variances equal along ``d`` as
        isotropic ones (``kind`` says which; :meth:`covariance_matrices` is always dense).
    validate
        Check the arguments (default ``True``).

    Notes
    -----
    Samples and densities use the layout of the toolkit: for a mixture of batch shape
    ``(B,)``, ``sample(n)`` returns ``(B, n, d)`` and ``log_prob`` takes ``(B, *S, d)``.
    """

    weights: Tensor
    means: Tensor
    covariances: Tensor
    eigvals: Tensor
    eigvecs: Tensor | None
    log_weights: Tensor

    def __init__(
        self,
        weights: Tensor,
        means: Tensor,
        covariances: Tensor,
        *,
        validate: bool = True,
    ) -> None:
        super().__init__()
        for name, v in (("weights", weights), ("means", means), ("covariances", covariances)):
            if not isinstance(v, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
            if not v.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
        if validate and not weights.dtype == means.dtype == covariances.dtype:
            raise ValueError(
                "weights, means and covariances must share one dtype, got "
                f"{weights.dtype}, {means.dtype}, {covariances.dtype}"
            )
        if means.dim() < 2 or means.shape[-2] < 1 or means.shape[-1] < 1:
            raise ValueError(
                f"means must have shape (*batch, K, d) with K >= 1 components and dimension "
                f"d >= 1, got {tuple(means.shape)}"
            )
        K, d = means.shape[-2:]
        if weights.shape[-1:] != (K,) or weights.shape[:-1] != means.shape[:-2]:
            raise ValueError(
                f"weights must have shape {tuple(means.shape[:-1])} to match means "
                f"{tuple(means.shape)}, got {tuple(weights.shape)}"
            )
        if validate:
            _check_finite("weights", weights)
            _check_finite("means", means)
            _check_finite("covariances", covariances)
            if (weights < 0).any():
                raise ValueError("weights must be non-negative")
            # float64 weights are often float32 numbers cast up (torch.tensor([0.4,
            # 0.6]).double() sums to 1 + 3e-8): accept float32's rounding and renormalise
            tol = 1e-4 if weights.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-6
            tot = weights.sum(-1)
            if ((tot - 1).abs() > tol * K).any():
                raise ValueError(f"weights must sum to one along the last axis, got sums {tot}")
            weights = weights / tot.unsqueeze(-1)
        covariances = _compact_covariances(covariances, K, d)
        if covariances.shape == (K,):
            kind = "iso"
            lam = covariances[:, None]
            Q = None
            shared = False
        elif covariances.shape == (K, d) and not (K == d and covariances.dim() == 3):
            kind = "diag"
            lam = covariances
            Q = None
            shared = False
        elif covariances.dim() >= 3 and covariances.shape[-3:] == (K, d, d):
            kind = "full"
            if validate and not torch.allclose(
                covariances, covariances.transpose(-1, -2), rtol=1e-5, atol=1e-6
            ):
                raise ValueError("covariances must be symmetric")
            # one covariance shared by every component (e.g. the posterior of an isotropic
            # mixture): factor it once and keep K-free eigenpairs (1, d), (1, d, d)
            shared = (
                covariances.dim() == 3 and K > 1 and bool((covariances == covariances[:1]).all())
            )
            cov = covariances[:1] if shared else covariances
            lam, Q = torch.linalg.eigh(cov.double())
            # numerically singular: an eigenvalue within rounding of 0 (rank tolerance
            # d * eps * largest eigenvalue, as numpy's matrix_rank)
            tol = d * torch.finfo(covariances.dtype).eps * lam[..., -1:].abs()
            if validate and (lam <= tol).any():
                raise ValueError(
                    "covariances must be positive definite; smallest eigenvalue "
                    f"{float(lam[..., 0].min()):.3g} is not above d * eps * largest eigenvalue "
                    "(numerically singular or indefinite)"
                )
            lam, Q = lam.to(covariances.dtype), Q.to(covariances.dtype)
        else:
            raise ValueError(
                f"covariances must have shape (K,)={(K,)}, (K, d)={(K, d)} or "
                f"(K, d, d)={(K, d, d)}, got {tuple(covariances.shape)}"
            )
        if validate and (lam <= 0).any():
            raise ValueError("covariances must be positive definite (all eigenvalues > 0)")
        self.kind = kind
        self._cov_shared = shared
        self._cov_batched = kind == "full" and covariances.dim() > 3
        if self._cov_batched and covariances.shape[:-3] != means.shape[:-2]:
            raise ValueError(
                f"batched covariances {tuple(covariances.shape)} must share the batch shape "
                f"of means {tuple(means.shape)}"
            )
        self.register_buffer("weights", weights)
        self.register_buffer("means", means)
        self.register_buffer("covariances", covariances)
        # lam: (*, K, d) or (K, 1); Q: (*, K, d, d) or None.
        self.register_buffer("eigvals", lam.clamp_min(0))
        self.register_buffer("eigvecs", Q)
        self.register_buffer("log_weights", torch.log(weights))

    # ------------------------------------------------------------------ shapes
    @property
    def num_components(self) -> int:
        return self.means.shape[-2]

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.means.shape[:-2]

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size((self.dim,))

    def _align(self, x: Tensor, what: str = "x") -> tuple[Tensor, int]:
        """Reshape ``x`` of shape (*batch, *S, d) to (*batch, *S, 1, d); return extra dims."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"{what} must end with dimension d={self.dim}, got {tuple(x.shape)}")
        nb = len(self.batch_shape)
        if nb and tuple(x.shape[:nb]) != tuple(self.batch_shape):
            raise ValueError(
                f"{what} must start with the mixture's batch shape {tuple(self.batch_shape)}, "
                f"got {tuple(x.shape)}"
            )
        return x.unsqueeze(-2), x.dim() - 1 - nb

    def _expand_params(self, t: Tensor, extra: int, batched: bool = True) -> Tensor:
        """Insert ``extra`` sample dims after the batch dims of a (*batch, K, ...) tensor.

        ``batched=False`` marks a parameter without the batch dims (shared covariances).
        """
        nb = len(self.batch_shape)
        if nb == 0 or not batched:
            return t
        return t.reshape(t.shape[:nb] + (1,) * extra + t.shape[nb:])

    # ------------------------------------------------------------------ sampling / density
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples: shape ``(*batch, n, d)``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        w = self.weights.reshape(-1, self.num_components).double()
        comp = torch.multinomial(w, n, replacement=True, generator=generator)
        comp = comp.reshape(self.batch_shape + (n,))
        z = torch.randn(
            self.batch_shape + (n, self.dim),
            generator=generator,
            dtype=self.means.dtype,
            device=self.means.device,
        )
        mu = self._gather(self.means, comp)
        if self._cov_shared:
            assert self.eigvecs is not None
            return mu + (z * self.eigvals[0].sqrt()) @ self.eigvecs[0].T
        lam = self._gather(
            self.eigvals.expand(self.means.shape[:-2] + self.eigvals.shape[-2:]), comp
        )
        z = z * lam.sqrt()
        if self.eigvecs is not None:
            Q = self._gather(
                self.eigvecs.expand(self.means.shape[:-2] + self.eigvecs.shape[-3:]), comp
            )
            z = (Q @ z.unsqueeze(-1)).squeeze(-1)
        return mu + z

    def _gather(self, param: Tensor, comp: Tensor) -> Tensor:
        """param (*batch, K, ...) indexed by comp (*batch, n) -> (*batch, n, ...)."""
        nb = len(self.batch_shape)
        if nb == 0:
            return param[comp]
        flat = param.reshape((-1,) + param.shape[nb:])
        c = comp.reshape(flat.shape[0], -1)
        out = flat[torch.arange(flat.shape[0], device=comp.device)[:, None], c]
        return out.reshape(comp.shape + param.shape[nb + 1 :])

    def _component_log_prob(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple:
        """Per-component log N(x; alpha mu_k, alpha^2 S_k + sigma^2 I) and helpers.

        ``x``: (..., 1, d); ``alpha``, ``sigma``: (..., 1, 1). Returns log-densities
        (..., K), the rotated residual (..., K, d) and the per-direction variances
        (..., K, d); for isotropic components the residual is ``None`` (never formed) and
        the variances are (..., K).
        """
        extra = x.dim() - 2 - len(self.batch_shape)
        mu = self._expand_params(self.means, extra)
        lam = self._expand_params(self.eigvals, extra, self._cov_batched)
        d = self.dim
        if self.kind == "iso":
            # ||x - a mu_k||^2 = ||x||^2 - 2 a x.mu_k + a^2 ||mu_k||^2: one (n, d) x (d, K)
            # product instead of an (n, K, d) tensor; float64 against the cancellation
            var = (alpha**2 * lam + sigma**2).squeeze(-1)  # (..., K)
            a = (alpha.squeeze(-1) if alpha.dim() else alpha).double()
            xd, md = x.double(), mu.double()
            xm = (xd @ md.transpose(-1, -2)).squeeze(-2)  # (..., K)
            sq = (xd**2).sum(-1) - 2 * a * xm + a**2 * (md**2).sum(-1)
            maha = (sq.clamp_min(0) / var).to(x.dtype)
            lp = -0.5 * (maha + d * torch.log(var) + d * _LOG2PI)
            return lp, None, var
        diff = x - alpha * mu  # (..., K, d)
        if self._cov_shared:  # Q^T x once per point, Q^T mu_k once per call
            assert self.eigvecs is not None
            Q = self.eigvecs[0]
            diff = x @ Q - alpha * (mu @ Q)
        elif self.eigvecs is not None:
            Q = self._expand_params(self.eigvecs, extra, self._cov_batched)
            diff = (diff.unsqueeze(-2) @ Q).squeeze(-2)  # Q^T (x - alpha mu)
        var = alpha**2 * lam + sigma**2  # (..., K, d)
        logdet = torch.log(var).sum(-1)
        maha = (diff**2 / var).sum(-1)
        return -0.5 * (maha + logdet + d * _LOG2PI), diff, var

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` for ``x`` of shape ``(*batch, *S, d)``; returns ``(*batch, *S)``."""
        xa, extra = self._align(x)
        one = torch.ones((), dtype=x.dtype, device=x.device)
        lp, _, _ = self._component_log_prob(xa, one, 0 * one)
        lw = self._expand_params(self.log_weights, extra)
        return torch.logsumexp(lp + lw, dim=-1)

    def component_log_responsibilities(self, x: Tensor) -> Tensor:
        """``log p(k | x)`` for ``x`` of shape ``(*batch, *S, d)``; returns ``(*batch, *S, K)``."""
        xa, extra = self._align(x)
        one = torch.ones((), dtype=x.dtype, device=x.device)
        lp, _, _ = self._component_log_prob(xa, one, 0 * one)
        lj = lp + self._expand_params(self.log_weights, extra)
        return lj - torch.logsumexp(lj, dim=-1, keepdim=True)

    def mean(self) -> Tensor:
        """Mixture mean, ``(*batch, d)``."""
        return (self.weights.unsqueeze(-1) * self.means).sum(-2)

    def covariance_matrices(self) -> Tensor:
        """Component covariances as dense ``(*, K, d, d)`` matrices."""
        if self.eigvecs is None:
            lam = self.eigvals.expand(self.eigvals.shape[:-1] + (self.dim,))
            return torch.diag_embed(lam)
        Q = self.eigvecs
        S = Q @ (self.eigvals.unsqueeze(-1) * Q.transpose(-1, -2))
        return S.expand(self.num_components, self.dim, self.dim) if self._cov_shared else S

    def _same_covariance(self) -> bool:
        """Whether every component has the same covariance (unbatched mixtures)."""
        if self._cov_shared or self.num_components == 1:
            return True
        if self.kind == "full":
            return False
        return bool((self.eigvals == self.eigvals[:1]).all())

    def average_variance(self) -> Tensor:
        """``tr(Cov) / d``, the mixture's variance per coordinate, ``(*batch,)`` (no ``d x d``
        matrix is formed: the trace of a component's covariance is its eigenvalues' sum)."""
        m = self.mean()
        lam = self.eigvals.expand(self.eigvals.shape[:-1] + (self.dim,))
        spread = ((self.means - m.unsqueeze(-2)) ** 2).sum(-1)  # (*batch, K)
        return (self.weights * (lam.sum(-1) + spread)).sum(-1) / self.dim

    def covariance(self) -> Tensor:
        """Mixture covariance, ``(*batch, d, d)``."""
        m = self.mean()
        dm = self.means - m.unsqueeze(-2)
        within = (self.weights[..., None, None] * self.covariance_matrices()).sum(-3)
        between = (self.weights[..., None, None] * dm.unsqueeze(-1) * dm.unsqueeze(-2)).sum(-3)
        return within + between

    # ------------------------------------------------------------------ diffusion
    def diffusion(
        self, schedule: Schedule, chunk_size: int | None = None, exact_start: bool = False
    ) -> GaussianMixtureDiffusion:
        """The exact :class:`DiffusionModel` of this mixture under ``schedule``.

        ``exact_start=True``: samplers start from the exact noisy marginal ``p_{t_0}`` (this
        mixture convolved with the path), not the reference ``N(0, sigma_{t_0}^2 I)`` that
        a trained network's chain starts from. The reference ignores ``alpha_{t_0} x0``,
        which is not negligible when the components' means are large against
        ``1 / alpha_{t_0}`` (the benchmark's mixture at d = 800: ``alpha_T |m_k|`` up to 3,
        mode weights off by a total variation of 0.2): use it to measure a sampler apart
        from its chain's start (docs/methods/README.md, "The reference start")."""
        if len(self.batch_shape):
            raise ValueError("diffusion() needs an unbatched mixture (batch_shape == ())")
        if not isinstance(exact_start, bool):
            raise TypeError(f"exact_start must be a bool, got {type(exact_start).__name__}")
        return GaussianMixtureDiffusion(
            self, schedule, chunk_size=chunk_size, exact_start=exact_start
        )

    def _noisy(self, x_t: Tensor, alpha: Tensor, sigma: Tensor):
        """Shared pieces of the noisy marginal: joint log-densities (..., K), rotated residual."""
        lp, diff, var = self._component_log_prob(
            x_t.unsqueeze(-2), alpha[..., None, None], sigma[..., None, None]
        )
        return lp + self.log_weights, diff, var

    def noisy_log_prob(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """``log p_t(x_t)`` with ``alpha``, ``sigma`` of the leading shape of ``x_t``."""
        lj, _, _ = self._noisy(x_t, alpha, sigma)
        return torch.logsumexp(lj, dim=-1)

    def noisy_denoise(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Exact ``E[x0 | x_t]``; ``alpha``, ``sigma`` of the leading shape of ``x_t``."""
        lj, diff, var = self._noisy(x_t, alpha, sigma)
        r = torch.softmax(lj, dim=-1)  # (..., K)
        if diff is None:  # isotropic: sum_k r_k g_k (x - a mu_k), g_k = a l_k / var_k
            a = alpha[..., None]
            w = r * (a * self.eigvals[:, 0] / var)  # (..., K)
            return (r - a * w) @ self.means + w.sum(-1, keepdim=True) * x_t
        gain = alpha[..., None, None] * self.eigvals / var  # (..., K, d)
        corr = gain * diff  # rotated: diag(alpha l / var) Q^T (x - alpha mu)
        if self._cov_shared:  # Q sum_k r_k corr_k
            assert self.eigvecs is not None
            corr = (r.unsqueeze(-1) * corr).sum(-2) @ self.eigvecs[0].T
        elif self.eigvecs is not None:
            # sum_k r_k Q_k corr_k
            corr = torch.einsum("...k,kij,...kj->...i", r, self.eigvecs, corr)
        else:
            corr = (r.unsqueeze(-1) * corr).sum(-2)
        return r @ self.means + corr

    # ------------------------------------------------------------------ inverse problems
    def _observation_terms(self, problem) -> tuple[Tensor, ...]:
        """Float64 pieces shared by :meth:`posterior` and :meth:`log_evidence`."""
        from ..problem import InverseProblem

        if not isinstance(problem, InverseProblem):
            raise TypeError(f"problem must be an InverseProblem, got {type(problem).__name__}")
        if len(self.batch_shape):
            raise ValueError("posterior/log_evidence need an unbatched prior mixture")
        op = cast("LinearOperator", problem.operator)
        if not getattr(op, "is_linear", False):
            raise ValueError("the exact posterior needs a linear operator")
        if op.in_dim != self.dim:
            raise ValueError(
                f"operator input dimension {op.in_dim} does not match the mixture dimension {self.dim}"
            )
        if problem.noise != "gaussian":
            raise ValueError("the exact posterior needs Gaussian observation noise")
        A = op.matrix().double()  # (m, d), or (B, m, d) for per-problem operators
        y = problem.y_flat.double()  # (B, m)
        S = self.covariance_matrices().double().expand(self.num_components, self.dim, self.dim)
        mu = self.means.double()
        if A.dim() == 3:
            A = A[:, None]  # (B, 1, m, d): broadcast against the components
        At = A.transpose(-1, -2)
        SAt = S @ At  # (K, d, m) or (B, K, d, m)
        eye = torch.eye(A.shape[-2], dtype=torch.float64, device=A.device)
        if problem.per_problem_noise:  # (B, K, m, m): one noise scale per problem
            s2b = problem.noise_stds.double().reshape(-1, 1, 1, 1) ** 2
            G = A @ SAt + s2b * eye
        else:
            G = A @ SAt + float(problem.noise_std) ** 2 * eye
        L, info = torch.linalg.cholesky_ex(G)  # (K, m, m) or (B, K, m, m)
        if bool((info != 0).any()):
            raise ValueError(
                "GaussianMixture: the predictive covariance A S A^T + noise_std^2 I of y "
                "is singular to float64 precision (the operator has more rows than rank and "
                f"noise_std = {float(problem.noise_stds.min()):.3g} is below float64's "
                "resolution of A S A^T), so the exact posterior and evidence cannot be "
                "formed by this formula: use a larger noise_std, or observe only as many "
                "independent rows as the operator's rank"
            )
        resid = y[:, None, :] - (A @ mu[..., None]).squeeze(-1)  # (B, K, m)
        sol = torch.cholesky_solve(resid.unsqueeze(-1), L).squeeze(-1)  # G^-1 (y - A mu)
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # (K,) or (B, K)
        m = A.shape[-2]
        loglik = -0.5 * ((resid * sol).sum(-1) + logdet + m * _LOG2PI)  # (B, K)
        return A, S, SAt, L, mu, sol, loglik

    def posterior(self, problem) -> GaussianMixture:
        """Exact posterior mixture under a linear-Gaussian ``problem``.

        Batched over the problem's observations: weights ``(B, K)``, means ``(B, K, d)``
        and shared covariances ``(K, d, d)``; unbatched when ``problem.y`` is. Per-problem
        noise and operators are for :meth:`log_evidence` only (the
        covariances would differ per problem): build one problem per noise scale here.
        """
        if problem.per_problem_noise or problem.operator.per_problem:
            raise ValueError(
                "GaussianMixture.posterior needs one noise_std and one operator shared by the "
                "problems (the posterior covariances would differ per problem); log_evidence "
                "accepts per-problem noise and operators"
            )
        A, S, SAt, L, mu, sol, loglik = self._observation_terms(problem)
        lw = self.log_weights.double() + loglik
        w = torch.softmax(lw, dim=-1)
        means = mu + (SAt @ sol.unsqueeze(-1)).squeeze(-1)  # (B, K, d)
        # C_k = S_k - S_k A^T G^-1 A S_k
        X = torch.cholesky_solve(SAt.transpose(-1, -2), L)  # (K, m, d) = G^-1 A S
        if self._same_covariance():  # one posterior covariance for every component
            S, SAt, X = S[:1], SAt[:1], X[:1]
        C = S - SAt @ X
        C = 0.5 * (C + C.transpose(-1, -2))
        C = C.expand(self.num_components, self.dim, self.dim)
        dt = self.means.dtype
        if not problem.batched:
            w, means = w[0], means[0]
        post = GaussianMixture(w.to(dt), means.to(dt), C, validate=False)
        # keep float64 eigendecomposition precision, then cast
        return post.to(dt)

    def log_evidence(self, problem) -> Tensor:
        """Exact ``log p(y)``: shape ``(B,)``, or a scalar for an unbatched ``y`` (float64)."""
        *_, loglik = self._observation_terms(problem)
        le = torch.logsumexp(self.log_weights.double() + loglik, dim=-1)
        return le if problem.batched else le[0]


#: Tables of :func:`_mixture_x0_variance` by the mixture's parameters (the most recent 64).
_X0_VARIANCE_TABLES: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()


def _mixture_x0_variance(mixture: GaussianMixture) -> tuple[Tensor, Tensor]:
    """The table of :meth:`DiffusionModel.x0_variance` of a mixture's diffusion (a function
    of the log-SNR ``lambda`` alone, so of no schedule): at levels of ``lambda`` a third
    apart from -16 to ``max(16, 8 - log(smallest eigenvalue))`` (where the ratio has
    reached its limit 1), the exact denoiser's mean squared error per coordinate over the
    mixture's draws (``2**18 / (d d_cov)`` of them, 256 to 8192, ``d_cov = d`` for
    component-wise full covariances and 1 otherwise; one noise draw for every level; a
    private generator; in float64; the denoiser called on at most ``2**25 / (K d d_cov)``
    rows at a time), over the unit Gaussian's ``sigmoid(-lambda)``, as a log. Cached by
    the parameters' values and shapes."""
    parts = [mixture.weights, mixture.means, mixture.eigvals]
    if mixture.eigvecs is not None:
        parts.append(mixture.eigvecs)
    h = hashlib.sha256(f"{mixture.means.dtype} {mixture.kind} {mixture._cov_shared}".encode())
    for p in parts:  # shapes and float64 bytes (numpy has no bfloat16)
        h.update(repr(tuple(p.shape)).encode())
        h.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    key = h.hexdigest()
    table = _X0_VARIANCE_TABLES.get(key)
    if table is not None:
        _X0_VARIANCE_TABLES.move_to_end(key)
        return table
    # in float64 whatever the mixture's dtype (a 16-bit mixture cannot resolve the small
    # noise levels); its buffers carry the parameters
    mixture = copy.deepcopy(mixture).to(torch.float64)
    dev, d, K = mixture.means.device, mixture.dim, mixture.num_components
    d_cov = d if mixture.eigvecs is not None and not mixture._cov_shared else 1
    g = torch.Generator(device=dev).manual_seed(0)
    n = min(8192, max(256, 2**18 // (d * d_cov)))
    rows = max(1, 2**25 // (K * d * d_cov))
    top = max(16.0, 8.0 - math.log(max(float(mixture.eigvals.min()), 1e-300)))
    lam = torch.linspace(-16.0, top, int(round((top + 16.0) * 3)) + 1, dtype=torch.float64)
    with torch.no_grad():
        x0 = mixture.sample(n, g)
        eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype, device=dev)
        total = float(x0.var(0).mean())
        ratios = []
        for level in lam.tolist():
            a, s = math.sqrt(1 / (1 + math.exp(-level))), math.sqrt(1 / (1 + math.exp(level)))
            sq = 0.0
            for xc, ec in zip(x0.split(rows), eps.split(rows)):
                x0_hat = mixture.noisy_denoise(
                    a * xc + s * ec, xc.new_full((len(xc),), a), xc.new_full((len(xc),), s)
                )
                sq += float(((x0_hat - xc) ** 2).sum())
            mse = min(sq / x0.numel(), total)
            ratios.append(math.log(max(mse, 1e-300) / s**2))  # s^2 = sigmoid(-lambda)
    table = (lam, torch.tensor(ratios, dtype=torch.float64))
    _X0_VARIANCE_TABLES[key] = table
    while len(_X0_VARIANCE_TABLES) > 64:
        _X0_VARIANCE_TABLES.popitem(last=False)
    return table


class GaussianMixtureDiffusion(DiffusionModel):
    """The exact diffusion model of a :class:`GaussianMixture` (denoiser, score, density)."""

    exact_denoiser = True

    def __init__(
        self,
        mixture: GaussianMixture,
        schedule: Schedule,
        chunk_size: int | None = None,
        exact_start: bool = False,
    ):
        super().__init__(_GMMDenoiser(mixture, schedule), schedule, (mixture.dim,), chunk_size)
        self.mixture = mixture
        self.exact_start = exact_start

    def start_divergence(self, t: Tensor, n: int = 1000) -> float | None:
        """``KL(N(0, sigma_t^2 I) || p_t)`` by ``n`` reference draws (a private generator:
        the run's draws are unchanged), ``None`` with ``exact_start`` (no reference)."""
        if self.exact_start:
            return None
        dt = self.mixture.means.dtype
        dev = self.mixture.means.device
        tt = torch.as_tensor(t, dtype=dt, device=dev)
        s = self.schedule.sigma(tt)
        d = self.mixture.dim
        g = torch.Generator(device=dev).manual_seed(0)
        z = torch.randn(n, d, generator=g, dtype=dt, device=dev)
        x = s * z
        log_ref = -0.5 * (z * z).sum(-1) - d * torch.log(s) - 0.5 * d * math.log(2 * math.pi)
        log_p = self.mixture.noisy_log_prob(x, self.schedule.alpha(tt).expand(n), s.expand(n))
        return max(0.0, float((log_ref - log_p).mean()))

    def _x0_variance_lookup(self) -> tuple[Tensor, Tensor] | None:
        """The mixture knows its ``x0_variance``: tabulated once per mixture (shared by
        models of equal parameters, :func:`_mixture_x0_variance`), made again when the
        mixture's parameters change (in place too: their version counters)."""
        m = self.mixture
        stamp = tuple(
            (b.data_ptr(), b._version)
            for b in (m.weights, m.means, m.eigvals, m.eigvecs)
            if b is not None
        )
        cached = self.__dict__.get("_x0_table")
        if cached is None or cached[0] != stamp:
            cached = self.__dict__["_x0_table"] = (stamp, _mixture_x0_variance(m))
        return cached[1]

    def sample_noisy(
        self, t: Tensor | float, lead: tuple[int, ...], generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact draws of ``p_t``: ``alpha_t x0 + sigma_t eps`` with ``x0`` from the mixture."""
        n = math.prod(lead)
        x0 = self.mixture.sample(n, generator)
        tt = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x = self.schedule.alpha(tt) * x0 + self.schedule.sigma(tt) * eps
        return x.reshape(tuple(lead) + (self.mixture.dim,))

    def noisy_log_prob(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Exact ``log p_t(x_t)`` of the noisy marginal."""
        self._check(x_t)
        tt = broadcast_time(t, x_t, 1)
        return self.mixture.noisy_log_prob(x_t, self.schedule.alpha(tt), self.schedule.sigma(tt))


class _GMMDenoiser(nn.Module):
    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.mixture.noisy_denoise(x, self.schedule.alpha(t), self.schedule.sigma(t))

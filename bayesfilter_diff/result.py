"""The :class:`Result` every sampler returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Result"]


@dataclass
class Result:
    """Samples (weighted or not) from a posterior sampler.

    Attributes
    ----------
    samples
        ``(B, N, *event_shape)``, or ``(N, *event_shape)`` for an unbatched problem.
    log_weights
        Normalised log-weights of the same leading shape (float64), or ``None`` for
        unweighted samplers (then every sample has weight ``1/N``).
    log_evidence
        Estimate of ``log p(y)``: ``(B,)`` or a scalar (float64), or ``None``.
    info
        Per-step trace: ``ess`` and ``resampled`` (``(num_steps, B)``), ``log_evidence``
        (running estimate), ``times``, ``nfe`` (network calls per particle), ``backprop``
        (whether the network was differentiated), ``wall_time`` (seconds), and the
        sampler's own entries.
    batched
        Whether the problem had a leading batch of observations.
    """

    samples: Tensor
    log_weights: Tensor | None = None
    log_evidence: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    batched: bool = False

    @property
    def num_samples(self) -> int:
        return self.samples.shape[1 if self.batched else 0]

    def weights(self) -> Tensor:
        """Normalised weights (uniform for unweighted samplers), float64."""
        lead = self.samples.shape[: 2 if self.batched else 1]
        if self.log_weights is None:
            return torch.full(lead, 1.0 / lead[-1], dtype=torch.float64, device=self.samples.device)
        return torch.softmax(self.log_weights.double(), dim=-1)

    def ess(self) -> Tensor:
        """Effective sample size of the final weights: ``(B,)`` or a scalar."""
        W = self.weights()
        return 1.0 / (W**2).sum(-1)

    def draws(
        self, n: int, generator: torch.Generator | None = None, resampling: str = "multinomial"
    ) -> Tensor:
        """``n`` equally weighted draws, resampled from the weighted particles, in random order.

        For unweighted samplers with ``n == N`` the samples are returned as they are.
        """
        from .smc.resampling import get_resampler

        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if self.log_weights is None and n == self.num_samples:
            return self.samples
        x = self.samples if self.batched else self.samples.unsqueeze(0)
        W = self.weights()
        W = W if self.batched else W.unsqueeze(0)
        idx = get_resampler(resampling)(torch.log(W), n, generator)
        # resampling returns ancestors in sorted order: shuffle them, so that the draws are
        # exchangeable (ArviZ would read runs of duplicates as autocorrelation)
        u = torch.rand(idx.shape, generator=generator, dtype=torch.float64, device=idx.device)
        idx = idx.gather(-1, torch.argsort(u, dim=-1))
        out = x[torch.arange(x.shape[0], device=x.device)[:, None], idx]
        return out if self.batched else out[0]

    def mean(self) -> Tensor:
        """Weighted posterior mean, ``(B, *event)`` or ``(*event)``."""
        W = self.weights().to(self.samples.dtype)
        k = self.samples.dim() - W.dim()
        return (W.reshape(W.shape + (1,) * k) * self.samples).sum(W.dim() - 1)

"""The :class:`Result` every sampler returns, and its typed run record :class:`RunInfo`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .smc.resampling import get_resampler

__all__ = ["Result", "RunInfo"]


def _short(t: Any) -> str:
    """A tensor as its shape and dtype (a value when it has at most 4 entries)."""
    if not isinstance(t, Tensor):
        return repr(t)
    dt = str(t.dtype).replace("torch.", "")
    if t.numel() <= 4:
        vals = ", ".join(f"{float(v):.4g}" for v in t.detach().reshape(-1).cpu())
        return f"[{vals}] ({dt})" if t.dim() else f"{vals} ({dt})"
    return f"<{tuple(t.shape)} {dt}>"


@dataclass(repr=False)
class RunInfo:
    """What happened during a run (the loop's trace plus the sampler's own records).

    Attributes
    ----------
    times
        The time grid ``(num_steps + 1,)`` the run used.
    num_steps
        Moves made (``times.numel() - 1``).
    inserted_steps
        Times the run inserted into its grid adaptively (a move whose weights would leave
        too small an ESS redone to an intermediate time: TDS's ``adaptive_ess``); each
        discarded move's network calls count in ``nfe``.
    nfe
        Network evaluations per particle.
    backprop
        Whether the network was differentiated.
    wall_time
        Seconds.
    ess
        Weighted samplers: ``(num_steps + 1, B)``, the ESS after each reweighting and
        *before* any resampling: entry ``k < num_steps`` is the weight applied before move
        ``k`` (the initial weights, the previous move's weight, a look-ahead), the last entry
        the final weight. ``None`` for unweighted samplers.
    resampled
        ``(num_steps + 1, B)`` bool: whether each problem resampled after that reweighting.
    log_evidence
        ``(num_steps + 1, B)``: the running estimate of the log normalising constant.
    min_ess
        ``(B,)``: the smallest entry of ``ess`` (the sharpest weight degeneracy of the run).
    acceptance
        ``(num_steps + 1, B)``: the acceptance rate of the resample-move (rejuvenation)
        moves made after that reweighting's resampling (TDS's ``rejuvenation_steps``), NaN
        where none were made; ``None`` for a run without them.
    ancestors
        ``(B,)``: how many of the ``N`` initial particles still have descendants at the
        end (1 means the whole cloud descends from one particle).
    roots
        ``(B, N)``: each final particle's ancestor among the initial ``N`` (its "Eve"
        index), for the genealogy estimate of the Monte Carlo error
        (:func:`~bayesfilter_diff.diagnostics.genealogy_mcse`).
    genealogy_ess
        ``(B,)`` float64: how many independent draws the returned cloud is worth for
        posterior means, estimated from its genealogy (total posterior variance over the
        Chan & Lai variance of the mean, :func:`~bayesfilter_diff.smc.genealogy_ess`). The
        per-step ESS can stay high while resampling, step after step, leaves the cloud
        descending from a few lineages: then this is far below ``N`` and the Monte Carlo
        error of any average is about ``sqrt(N / genealogy_ess)`` times that of ``N``
        exact draws (on the noise-level study's problems that prediction was 0.78-1.59
        times the sliced-W ratio to the exact floor, median 1.19). An estimate: it needs
        ``N`` of a few hundred and many surviving lineages; below
        :data:`~bayesfilter_diff.smc.particles.MIN_LINEAGES` (50), where it is biased high
        (and with one lineage its variance vanishes), it is capped at the lineages' number.
    log_evidence_se
        ``(B,)`` float64, samplers that estimate the evidence: the Monte Carlo standard
        deviation of this run's ``log_evidence``, estimated from the same genealogy
        (:func:`~bayesfilter_diff.smc.log_evidence_se`): each initial particle's share of
        the final weight against its fair share ``1 / N``. Measured against the spread of 24
        independent runs on 56 configurations (TDS, MCGdiff, Filtering-SMC; d = 8 and 80;
        N = 256 and 1024): 0.62-1.42 times it, median 0.93 (docs/methods/README.md). The
        Monte Carlo error only: a time discretisation's bias of the evidence (TDS's DDIM
        kernel at few steps) is not in it.
    distinct
        ``(B,)``: how many of the final samples are distinct.
    start_kl
        For a prior that knows its noisy marginals (a Gaussian mixture) and was started from
        the reference: ``KL(N(0, sigma_{t_0}^2 I) || p_{t_0})`` in nats (a Monte Carlo
        estimate), how far the chain's start is from the prior's; the chain's prior, and
        with it every sampler's target, is off the model's by at most ``sqrt(KL / 2)`` in
        total variation. ``None`` otherwise (a network, or ``exact_start``).
    support_ratio
        ``(B,)`` float64, unweighted (approximate) samplers: how far the prior's denoiser
        moves the draws once renoised to ``sigma / alpha = 0.3``, over the bound (1) on that
        move for the prior's own draws
        (:func:`~bayesfilter_diff.samplers.quality.support_ratio`); far above 1, the draws
        lie where the prior has little mass (warned above 4). ``None`` for weighted samplers.
    path_ratio
        ``(B,)`` float64, approximate samplers that follow the model's noised path
        (``Sampler.on_path``): the largest over the draws of how far each draw is from where
        its own path leads (:func:`~bayesfilter_diff.samplers.quality.path_ratio`: its states
        at ``sigma / alpha`` = 1, 3, 10 against ``alpha_t x0``, in units of ``d sigma_t^2``;
        ``chi^2_d / d`` on an exact path). ``None`` otherwise.
    escaped
        ``(B,)`` int64, with ``path_ratio``: the draws off their paths (beyond the
        ``chi^2`` line, at least 16) and more than 10 times the cloud's median distance from
        its median: draws a step threw off the prior's support, warned as ``escaped``.
    residual_ratio
        ``(B,)`` float64: the (weighted) mean over the draws of ``||y - A(x)||^2 / (d_y
        sigma_y^2)`` for Gaussian noise of a known scale, and of the mean squared normal score
        of ``y`` under the draw's likelihood for Poisson noise and Pyro sites of the laws
        :mod:`~bayesfilter_diff.samplers.scores` lists
        (:func:`~bayesfilter_diff.samplers.quality.residual_ratio`), 1 on average for exact
        posterior draws of observations the model produced; warned as ``misfit`` above
        :func:`~bayesfilter_diff.samplers.quality.residual_line` (the draws do not fit ``y``)
        and as ``overfit`` below
        :func:`~bayesfilter_diff.samplers.quality.residual_low_line` (they follow its noise).
        ``None`` for the noiseless case and other likelihoods (a ``log_likelihood_fn``
        without ``squared_scores_fn``).
    steps
        The sampler's per-step record (a dataclass whose fields are stacked over steps), or
        ``None``.
    extra
        The sampler's per-run record (e.g. MCGdiff's observation times), or ``None``.
    quality
        The findings of the quality check (:mod:`bayesfilter_diff.samplers.quality`), each
        also warned as a :class:`~bayesfilter_diff.PosteriorQualityWarning`; empty for a
        healthy run.

    ``info["name"]`` looks a name up among the attributes that are set (not ``None``), then
    the fields of ``extra`` and ``steps`` (the mapping interface of earlier versions:
    ``"ess" in info`` is false for an unweighted sampler).
    """

    times: Tensor | None = None
    num_steps: int = 0
    inserted_steps: int = 0
    nfe: int = 0
    backprop: bool = False
    wall_time: float = 0.0
    ess: Tensor | None = None
    resampled: Tensor | None = None
    log_evidence: Tensor | None = None
    min_ess: Tensor | None = None
    acceptance: Tensor | None = None
    ancestors: Tensor | None = None
    roots: Tensor | None = None
    genealogy_ess: Tensor | None = None
    log_evidence_se: Tensor | None = None
    distinct: Tensor | None = None
    start_kl: float | None = None
    support_ratio: Tensor | None = None
    path_ratio: Tensor | None = None
    escaped: Tensor | None = None
    residual_ratio: Tensor | None = None
    steps: Any = None
    extra: Any = None
    quality: list[Any] = field(default_factory=list)

    def __repr__(self) -> str:
        """A summary; the fields (``info.ess``, ``info.times``, ...) hold the tensors."""
        parts = [f"num_steps={self.num_steps}"]
        if self.inserted_steps:
            parts.append(f"inserted_steps={self.inserted_steps}")
        parts += [f"nfe={self.nfe}", f"backprop={self.backprop}", f"wall_time={self.wall_time:.3g}"]
        for name in (
            "min_ess",
            "ancestors",
            "genealogy_ess",
            "log_evidence_se",
            "distinct",
            "support_ratio",
            "escaped",
            "residual_ratio",
        ):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name}={_short(v)}")
        parts.append(f"quality={[q.kind for q in self.quality]}")
        return f"RunInfo({', '.join(parts)})"

    def _records(self) -> list[Any]:
        return [r for r in (self.extra, self.steps) if r is not None]

    def __getitem__(self, key: str) -> Any:
        names = {f.name for f in dataclasses.fields(self)} - {"steps", "extra", "quality"}
        if key in names and getattr(self, key) is not None:
            return getattr(self, key)
        for rec in self._records():
            if isinstance(rec, dict) and key in rec:
                return rec[key]
            if dataclasses.is_dataclass(rec) and key in {f.name for f in dataclasses.fields(rec)}:
                return getattr(rec, key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except (KeyError, TypeError):
            return False
        return True

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


@dataclass(repr=False)
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
        A :class:`RunInfo`: ESS before resampling per step, resampling events, the running
        evidence, NFEs, wall time, and the sampler's own records.
    batched
        Whether the problem had a leading batch of observations.
    """

    samples: Tensor
    log_weights: Tensor | None = None
    log_evidence: Tensor | None = None
    info: RunInfo = field(default_factory=RunInfo)
    batched: bool = False

    def __repr__(self) -> str:
        """A summary (shapes, evidence, ESS), not the tensors: ``res.samples`` has them."""
        parts = [f"samples={_short(self.samples)}"]
        parts.append("weighted" if self.log_weights is not None else "unweighted")
        if self.log_evidence is not None:
            parts.append(f"log_evidence={_short(self.log_evidence)}")
        if self.info.min_ess is not None:
            parts.append(f"min_ess={_short(self.info.min_ess)}")
        parts.append(f"nfe={self.info.nfe}")
        if self.info.quality:
            parts.append(f"quality findings={len(self.info.quality)}")
        return f"Result({', '.join(parts)})"

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[1 if self.batched else 0])

    def weights(self) -> Tensor:
        """Normalised weights (uniform for unweighted samplers), float64."""
        lead = self.samples.shape[: 2 if self.batched else 1]
        if self.log_weights is None:
            return torch.full(lead, 1.0 / lead[-1], dtype=torch.float64, device=self.samples.device)
        return torch.softmax(self.log_weights.double(), dim=-1)

    def ess(self) -> Tensor:
        """Effective sample size of the returned cloud: ``(B,)`` or a scalar (float64).

        The ESS of the final weights, ``1 / sum W^2``, capped by the number of distinct
        samples: a run that collapsed and resampled ``N`` copies of one particle has uniform
        final weights but reports 1, not ``N``. The smallest ESS during the run is
        ``info.min_ess``; what the cloud is worth given that its particles share ancestors
        (often far less than this) is ``info.genealogy_ess``.
        """
        W = self.weights()
        e = 1.0 / (W**2).sum(-1)
        if self.info.distinct is not None:
            d = self.info.distinct.to(e.dtype)
            e = torch.minimum(e, d if self.batched else d[0])
        return e

    def draws(
        self, n: int, generator: torch.Generator | None = None, resampling: str = "multinomial"
    ) -> Tensor:
        """``n`` equally weighted draws, resampled from the weighted particles, in random order.

        For unweighted samplers with ``n == N`` the samples are returned as they are.
        """
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

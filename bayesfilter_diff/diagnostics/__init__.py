"""Diagnostics: how far a sampler is from the exact posterior, and whether it is calibrated.

- distances to a reference sample set: sliced and exact Wasserstein, MMD, Gaussian W2, and
  the exact-vs-exact floor that makes a reported number readable (:mod:`.distances`);
- against an exact Gaussian-mixture posterior: mode weights and moments (:mod:`.mixture`);
- SMC traces: ESS, resampling events, log-evidence error (:mod:`.smc`);
- calibration over many simulated problems: SBC ranks, uniformity tests, coverage, PIT
  (:mod:`.calibration`);
- image metrics against a ground truth: PSNR, SSIM, pixel-wise coverage (:mod:`.imaging`);
- export to ArviZ (:mod:`.arviz`) and figures (:mod:`.plots`).

ArviZ and matplotlib are imported only when :func:`to_arviz` or a plot function is called.
"""

from ._utils import random_directions
from .arviz import to_arviz
from .calibration import (
    RankTest,
    binomial_interval,
    coverage,
    pit_values,
    rank_uniformity_test,
    sbc_ranks,
)
from .distances import (
    Floor,
    exact_floor,
    gaussian_w2,
    median_bandwidth,
    mmd,
    sliced_wasserstein,
    wasserstein2_exact,
    wasserstein_1d,
)
from .imaging import coverage90, psnr, ssim
from .mixture import (
    implied_component_weights,
    marginal_mixture,
    mixture_weight_error,
    moment_errors,
)
from .plots import (
    log_axis_errors,
    plot_coverage,
    plot_distance_vs_particles,
    plot_ess,
    plot_rank_histogram,
    plot_samples_vs_posterior,
)
from .predictive import PriorPredictiveCheck, prior_predictive_check
from .smc import (
    EvidenceEstimate,
    MeanEstimate,
    ReferenceCheck,
    RunsCheck,
    StepCheck,
    ess_trace,
    genealogy_mcse,
    log_bayes_factor,
    log_evidence_error,
    pool_runs,
    pooled_log_evidence,
    reference_check,
    resampling_events,
    runs_check,
    runs_mcse,
    step_check,
)

__all__ = [
    "StepCheck",
    "step_check",
    "ReferenceCheck",
    "reference_check",
    "RunsCheck",
    "runs_check",
    "PriorPredictiveCheck",
    "prior_predictive_check",
    "pool_runs",
    "MeanEstimate",
    "runs_mcse",
    "genealogy_mcse",
    "random_directions",
    "wasserstein_1d",
    "sliced_wasserstein",
    "wasserstein2_exact",
    "median_bandwidth",
    "mmd",
    "gaussian_w2",
    "exact_floor",
    "Floor",
    "implied_component_weights",
    "mixture_weight_error",
    "moment_errors",
    "marginal_mixture",
    "ess_trace",
    "resampling_events",
    "log_evidence_error",
    "EvidenceEstimate",
    "pooled_log_evidence",
    "log_bayes_factor",
    "sbc_ranks",
    "rank_uniformity_test",
    "RankTest",
    "coverage",
    "pit_values",
    "binomial_interval",
    "psnr",
    "ssim",
    "coverage90",
    "to_arviz",
    "plot_samples_vs_posterior",
    "plot_ess",
    "plot_distance_vs_particles",
    "plot_rank_histogram",
    "plot_coverage",
    "log_axis_errors",
]

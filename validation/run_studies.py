"""Run the validation studies and write their reports under validation/results/.

    python validation/run_studies.py benchmark   [--full] [--executor ray]
    python validation/run_studies.py convergence [--full]
    python validation/run_studies.py calibration [--full]
    python validation/run_studies.py noise       [--full]
    python validation/run_studies.py quadrature  [--full]
    python validation/run_studies.py hierarchical [--full]

Each study is resumable: rerunning the same command skips the cells already in
``<out>/cells``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument(
        "study",
        choices=["benchmark", "convergence", "calibration", "noise", "quadrature", "hierarchical"],
    )
    p.add_argument("--full", action="store_true")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--out", default=None)
    p.add_argument("--config", default=None, help="JSON overriding the study configuration")
    p.add_argument("--methods", default=None, help="comma-separated method names")
    p.add_argument(
        "--report-only", action="store_true", help="benchmark: report the stored cells only"
    )
    a = p.parse_args(argv)
    import json
    import re

    executor = None
    if a.executor == "ray":
        from bayesfilter_diff.studies.ray_executor import RayExecutor

        executor = RayExecutor()
    config = json.loads(a.config) if a.config else None
    # commas inside a label's brackets ("TDS[reverse_variance=analytic,proposal=gradient]")
    # belong to the label
    methods = re.findall(r"[^,\[]+(?:\[[^\]]*\])?", a.methods) if a.methods else None
    if a.study == "benchmark":
        from bayesfilter_diff.studies.validate import validate

        res = validate(
            out=a.out or ROOT / "gmm_benchmark",
            full=a.full,
            methods=methods,
            executor=executor,
            config=config,
            command="python validation/run_studies.py " + " ".join(sys.argv[1:]),
            report_only=a.report_only,
        )
    elif a.study == "noise":
        from bayesfilter_diff.studies.noise_levels import run_noise_levels

        res = run_noise_levels(
            a.out or ROOT / "noise_levels", full=a.full, executor=executor, config=config
        )
    elif a.study == "quadrature":
        from bayesfilter_diff.studies.quadrature import run_quadrature

        res = run_quadrature(
            a.out or ROOT / "quadrature", full=a.full, executor=executor, config=config
        )
    elif a.study == "hierarchical":
        from bayesfilter_diff.studies.hierarchical import run_hierarchical

        res = run_hierarchical(
            a.out or ROOT / "hierarchical", full=a.full, executor=executor, config=config
        )
    elif a.study == "convergence":
        from bayesfilter_diff.studies.convergence import run_convergence

        res = run_convergence(
            a.out or ROOT / "smc_convergence", full=a.full, executor=executor, config=config
        )
    else:
        from bayesfilter_diff.studies.calibration import run_calibration

        res = run_calibration(
            a.out or ROOT / "calibration",
            full=a.full,
            methods=methods,
            executor=executor,
            config=config,
        )
    print(res["text"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

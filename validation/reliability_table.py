"""Bad-input reliability table: every case category, every sampler, outcome counts.

Runs the case generators of ``tests/_reliability_cases.py`` (the ones the property tests
in ``tests/test_bad_input.py`` use) with hypothesis, derandomised, ``--examples`` cases per
category (the capability category enumerates all its combinations), evaluates each case
on its constructor / call or on every sampler class, and writes a markdown table of the
outcomes with the failures listed below it.

Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python validation/reliability_table.py

Writes ``validation/results/reliability/bad_input.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from hypothesis import HealthCheck, Phase, given, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import _reliability_cases as rc  # noqa: E402

#: Failures per category of the same cases (default settings) with the library files as
#: of commit 4037fa6, before the reliability fixes: a snapshot (it cannot be regenerated
#: from the fixed code; it was run with those files restored in a copy of the package).
BEFORE = {
    "batch": 130,
    "dtype": 6,
    "nonfinite": 84,
    "noise_std": 95,
    "empty": 1,
    "hyperparameters": 100,
    "capability": 66,
}

#: failures listed per sampler / target in the report
LIMIT = 40

#: categories small enough to enumerate completely instead of sampling
EXHAUSTIVE = {"hyperparameters": rc.hyperparameter_cases_all, "capability": rc.capability_cases}


def collect(strategy, max_examples: int) -> list[rc.Case]:
    """The cases hypothesis generates (derandomised, no shrinking), without duplicates."""
    seen: dict[str, rc.Case] = {}

    @settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def draw(case):
        seen.setdefault(case.label, case)

    draw()
    return list(seen.values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=60, help="hypothesis examples per category")
    p.add_argument("--out", type=Path, default=ROOT / "validation/results/reliability/bad_input.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    samplers = rc.small_samplers()
    rows = []
    failures = []
    numeric = []
    examples = {}
    start = time.perf_counter()
    for cat, (strategy, doc) in rc.CATEGORIES.items():
        if cat in EXHAUSTIVE:
            cases = EXHAUSTIVE[cat]()
        else:
            cases = collect(strategy, args.examples)
        counts: Counter = Counter()
        for case in cases:
            for o in rc.evaluate(case, samplers):
                counts[o.status] += 1
                if not o.ok:
                    failures.append(o)
                elif o.status == rc.NUMERIC:
                    numeric.append(o)
                elif o.status == rc.RAISED and cat not in examples:
                    examples[cat] = o.message
        rows.append((cat, doc, len(cases), counts))
        print(f"{cat:16s} {len(cases):4d} cases  {dict(counts)}", flush=True)
    elapsed = time.perf_counter() - start

    cmd = "OMP_NUM_THREADS=1 .venv/bin/python validation/reliability_table.py"
    if argv or len(sys.argv) > 1:
        cmd += " " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    short = {
        rc.RAISED: "clear error",
        rc.RAN: "ran, finite",
        rc.NUMERIC: "numerical error",
        rc.NA: "n/a",
        rc.WRONG_TYPE: "wrong type",
        rc.UNCLEAR: "unclear msg",
        rc.LATE: "late",
        rc.SILENT: "no error",
        rc.NONFINITE: "NaN/inf",
    }
    lines = [
        "# Bad input: cases tried and outcomes",
        "",
        f"Regenerate: `{cmd}` ({elapsed:.0f} s on one core).",
        "",
        "Cases come from the hypothesis strategies in `tests/_reliability_cases.py` (the same",
        "generators as `tests/test_bad_input.py`), derandomised, "
        f"{args.examples} examples per category (duplicates dropped);",
        "two categories are enumerated completely: capability (3 schedules x 7 operators x 4",
        "noise models, every sampler) and hyperparameters (every sampler x every int / float /",
        "str field x a fixed list of bad values: NaN, wrong type, bool, -1 counts).",
        "A case is evaluated once on its constructor / call, or, when the inputs can be",
        "built, on `sample` of every sampler class with small settings: "
        f"{', '.join(samplers)} ({len(samplers)}).",
        "The network of the prior is wrapped in a call counter. Good outcomes: **clear error**",
        "(`ValueError`/`TypeError` naming the argument, raised before the network runs on the",
        "particles; the one-row probe `check_inputs` makes for a 16-bit network is allowed);",
        "where the input is valid for that sampler (edge noise levels, capability), **ran,",
        "finite** (samples and log-evidence finite, log-weights not NaN) or a **numerical",
        "error** (`DegenerateWeightsError` / `NonFiniteSamplesError`, listed below); **n/a**: the",
        "sampler refuses the valid base problem (VP, Dense) with the very same message (e.g.",
        "SMCDiff: needs a Mask). Everything else is a failure.",
        "",
        "| category | what | cases | runs | "
        + " | ".join(short[s] for s in rc.STATUSES)
        + " | failures before fixes |",
        "|---|---|---:|---:|" + "---:|" * (len(rc.STATUSES) + 1),
    ]
    for cat, doc, n, counts in rows:
        runs = sum(counts.values())
        cells = " | ".join(str(counts.get(s, 0)) for s in rc.STATUSES)
        before = BEFORE.get(cat, "n/m")  # categories added later were not measured then
        lines.append(f"| {cat} | {doc} | {n} | {runs} | {cells} | {before} |")
    tot = Counter()
    for *_, c in rows:
        tot.update(c)
    lines.append(
        f"| **total** | | {sum(r[2] for r in rows)} | {sum(tot.values())} | "
        + " | ".join(str(tot.get(s, 0)) for s in rc.STATUSES)
        + f" | {sum(BEFORE.values())} |"
    )
    lines += [
        "",
        "The last column is a snapshot: the failures of the same cases with the library as of",
        "commit 4037fa6, before the fixes (late / NaN / unclear handling of custom likelihoods",
        "of the wrong shape, NaN / inf set after validation, tiny / huge / bool noise_std,",
        "mixed mixture dtypes, d = 0, ill-typed sampler fields, refusals of a custom",
        "log_likelihood_fn that blamed 'gaussian' noise). `n/m`: a category added later (the",
        "network, infer and cli cases of issue #20), not measured against that commit.",
        "",
        "## A typical message per category",
        "",
    ]
    for cat, msg in examples.items():
        lines.append(f"- {cat}: `{msg}`")
    lines += [
        "",
        "## Valid (edge) inputs that ended in a clear numerical error",
        "",
        "Not failures: `DegenerateWeightsError` (all weights of a problem zero, naming the step",
        "and the problem) or `NonFiniteSamplesError` (the run diverged; raised instead of NaN",
        "samples) on inputs that are valid but numerically hopeless for that sampler.",
        "",
    ]
    if not numeric:
        lines.append("None.")
    for o in numeric:
        lines.append(f"- {o.target} [{o.case.category}] {o.case.label}: `{o.message}`")
    lines += ["", "## Failures", ""]
    if not failures:
        lines.append("None.")
    else:
        by_target = defaultdict(list)
        for o in failures:
            by_target[o.target].append(o)
        for target, outs in sorted(by_target.items()):
            lines.append(f"### {target} ({len(outs)})")
            lines.append("")
            for o in outs[:LIMIT]:
                lines.append(f"- [{o.case.category}] {o.case.label}: {o.status}: `{o.message}`")
            if len(outs) > LIMIT:
                lines.append(f"- ... and {len(outs) - LIMIT} more")
            lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} ({len(failures)} failures, {elapsed:.0f} s)")


if __name__ == "__main__":
    main()

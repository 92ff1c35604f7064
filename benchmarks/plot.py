"""Figure: particle-steps per second against the number of particles N.

``python -m benchmarks.plot benchmarks/results/n_sweep.jsonl --out benchmarks/throughput_vs_N.png``
draws one line per (method, prior, d, dtype) found in the JSON-lines files written by
``python -m benchmarks --out``, with the ideal linear growth from the smallest N dashed.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot")
    p.add_argument("files", nargs="+")
    p.add_argument("--out", default="benchmarks/throughput_vs_N.png")
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = defaultdict(dict)
    for path in a.files:
        with open(path) as f:
            for row in map(json.loads, filter(None, map(str.strip, f))):
                if row.get("B", 1) != 1 or row.get("compile") or "particle_steps_per_s" not in row:
                    continue
                key = (row["method"], row["prior"], row["d"], row.get("dtype", "float32"))
                lines[key][row["N"]] = row["particle_steps_per_s"]
    priors = sorted({k[1:] for k in lines})
    fig, axes = plt.subplots(1, len(priors), figsize=(5 * len(priors), 4.2), squeeze=False)
    for ax, (prior, d, dtype) in zip(axes[0], priors):
        for (m, pr, dd, dt), pts in sorted(lines.items()):
            if (pr, dd, dt) != (prior, d, dtype) or len(pts) < 2:
                continue
            ns = sorted(pts)
            (h,) = ax.plot(ns, [pts[n] for n in ns], "o-", label=m)
            ax.plot(ns, [pts[ns[0]] * n / ns[0] for n in ns], "--", color=h.get_color(), lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("particles N")
        ax.set_ylabel("particle-steps per second")
        ax.set_title(f"{prior}, d = {d}, {dtype} (dashed: linear in N)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

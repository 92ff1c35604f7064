"""Aggregate study records into tables (mean and 95% interval over seeds) and figures."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["summarize", "markdown_table", "mean_ci"]


def mean_ci(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and half-width of the normal 95% interval ``1.96 sd / sqrt(n)`` (as the paper)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(v) / n
    if n == 1:
        return m, math.nan, 1
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    return m, 1.96 * sd / math.sqrt(n), n


def summarize(
    records: Iterable[dict[str, Any]], by: Sequence[str], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per group of ``by`` cell fields with ``mean``/``ci`` of each metric."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[tuple(r["cell"][k] for k in by)].append(r)
    rows = []
    for key, rs in groups.items():
        row: dict[str, Any] = dict(zip(by, key))
        row["n"] = len(rs)
        row["failed"] = sum(1 for r in rs if not r.get("finite", True))
        for m in metrics:
            vals = [r.get(m) for r in rs]
            mean, ci, n = mean_ci([v for v in vals if v is not None])
            row[m] = mean
            row[m + "_ci"] = ci
        rows.append(row)
    return rows


def study_command(
    study: str, full: bool, config: dict[str, Any] | None, out: Path, default_name: str
) -> str:
    """The command line that reproduces a study's report, with its ``--config`` and ``--out``
    when they differ from the defaults (a report must say how it was made)."""
    cmd = f"python validation/run_studies.py {study}" + (" --full" if full else "")
    if config:
        cmd += f" --config '{json.dumps(config, sort_keys=True)}'"
    parts = Path(out).resolve().parts
    if Path(out).name != default_name or parts[-2:-1] != ("results",):
        # the path from the repository's validation/ folder when it is under one
        i = len(parts) - 1 - parts[::-1].index("validation") if "validation" in parts else None
        cmd += f" --out {Path(*parts[i:]) if i is not None else Path(out)}"
    return cmd


def goal_label(good: bool, warned: float) -> str:
    """A row's verdict against a study's goal: ``"yes"``, or a miss that every run warned
    of (``warned``: the fraction of runs with a quality warning), that some runs did, or
    that none did (bold: a wrong answer that looks right)."""
    if good:
        return "yes"
    if warned >= 1:
        return "no, warned"
    return "**no, silent**" if warned <= 0 else "**no, warned in some runs**"


def _fmt(x: Any, ci: Any = None) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        s = f"{x:.3g}"
        if ci is not None and isinstance(ci, float) and not math.isnan(ci):
            s += f" ± {ci:.2g}"
        return s
    return str(x)


def markdown_table(
    rows: list[dict[str, Any]], columns: Sequence[str], ci: Sequence[str] = ()
) -> str:
    """A markdown table of ``rows``; metrics in ``ci`` are printed as ``mean ± ci``."""
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = [_fmt(r.get(c), r.get(c + "_ci") if c in ci else None) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


#: The settings sentence the exact-posterior studies share.
SW_SETTINGS = (
    "`sw_ratio` = sliced W1 (1000 directions, 10 000 exact draws) over the same for N exact "
    "draws; `warned` = fraction of runs with a `PosteriorQualityWarning`; mean ± 95% "
    "interval over seeds"
)


def write_study_report(
    out: Path,
    title: str,
    command: str,
    num_cells: int,
    wall: float,
    doc: str | None,
    settings: str,
    table: str,
) -> str:
    """Write ``out/report.md``: title, command, the study module's docstring (after its
    first paragraph), the settings and the table; return the text."""
    text = "\n".join(
        [
            f"# {title}",
            "",
            f"Command: `{command}`; {num_cells} cells ({wall:.0f} s computed in this invocation).",
            "",
            (doc or "").split("\n\n", 1)[1].strip(),
            "",
            settings,
            "",
            table,
            "",
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.md", text)
    return text

"""Study grids: cells (method x problem x seed x setting) with stable keys, and executors.

A cell is a small JSON-able dict. Its key is a hash of its canonical JSON, so the same
cell always maps to the same file in the :class:`~bayesfilter_diff.studies.ResultStore`
and a resumed study skips exactly the cells already completed. The executor is pluggable:
:class:`LocalExecutor` runs cells in this process; a cluster executor only needs the same
``run(fn, cells, store, progress)`` method.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from .store import ResultStore

__all__ = ["cell_key", "LocalExecutor", "run_study"]


def cell_key(cell: dict[str, Any]) -> str:
    """Stable, filesystem-safe key of a cell: readable prefix + hash of its canonical JSON."""
    blob = json.dumps(cell, sort_keys=True, separators=(",", ":"))
    h = hashlib.sha256(blob.encode()).hexdigest()[:16]
    prefix = "-".join(str(cell.get(k, "")) for k in ("method", "seed") if k in cell)
    prefix = "".join(c if c.isalnum() or c in "-_" else "_" for c in prefix)[:40]
    return f"{prefix}-{h}" if prefix else h


class LocalExecutor:
    """Run cells one after another in this process, saving each as it completes."""

    name = "local"

    def run(
        self,
        fn: Callable[[dict[str, Any]], dict[str, Any]],
        cells: list[dict[str, Any]],
        store: ResultStore,
        progress: bool = True,
    ) -> list[str]:
        """Compute every cell not yet in ``store``; return the keys computed now."""
        todo = [c for c in cells if not store.done(cell_key(c))]
        computed = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="cells", unit="cell")
        try:
            for cell in todo:
                key = cell_key(cell)
                if store.done(key):  # computed meanwhile by another process on this store
                    if bar is not None:
                        bar.update(1)
                    continue
                start = time.perf_counter()
                record = fn(cell)
                record = {"cell": cell, **record, "cell_seconds": time.perf_counter() - start}
                store.save(key, record)
                computed.append(key)
                if bar is not None:
                    bar.set_postfix_str(str(cell.get("method", "")))
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return computed


def run_study(
    fn: Callable[[dict[str, Any]], dict[str, Any]],
    cells: Iterable[dict[str, Any]],
    store: ResultStore,
    executor: Any = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run ``cells`` with ``executor`` (local by default) and return all their records."""
    cells = list(cells)
    keys = [cell_key(c) for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError("the study grid has duplicate cells")
    (executor or LocalExecutor()).run(fn, cells, store, progress)
    records = []
    for k in keys:
        r = store.load(k)
        if r is None:
            raise RuntimeError(f"cell {k} has no result after the run")
        records.append(r)
    return records

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
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from ..errors import NonFiniteSamplesError
from .store import ResultStore

T = TypeVar("T")

__all__ = ["cell_key", "describe", "LocalExecutor", "ProcessExecutor", "run_study"]


def cell_key(cell: dict[str, Any]) -> str:
    """Stable, filesystem-safe key of a cell: readable prefix + hash of its canonical JSON."""
    blob = json.dumps(cell, sort_keys=True, separators=(",", ":"))
    h = hashlib.sha256(blob.encode()).hexdigest()[:16]
    prefix = "-".join(str(cell.get(k, "")) for k in ("method", "seed") if k in cell)
    prefix = "".join(c if c.isalnum() or c in "-_" else "_" for c in prefix)[:40]
    return f"{prefix}-{h}" if prefix else h


def describe(cell: dict[str, Any]) -> str:
    """A short name of a cell for progress bars: its method, sizes and seed."""
    keys = ("method", "prior", "d", "d_y", "steps", "N", "seed")
    return " ".join(f"{k}={cell[k]}" if k != "method" else str(cell[k]) for k in keys if k in cell)


def _bar(total: int, done: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    # the rate (and so the ETA) counts the cells computed now, not those resumed
    return tqdm(total=total, initial=done, desc="cells", unit="cell")


def sample_or_diverged(call: Callable[[], T]) -> tuple[T | None, str | None]:
    """``(call(), None)``, or ``(None, message)`` when the run diverged
    (:class:`~bayesfilter_diff.errors.NonFiniteSamplesError`): a diverged sampler is a
    result of its cell (recorded ``finite: False``, counted as failed in the reports), not
    a crash of the study."""
    try:
        return call(), None
    except NonFiniteSamplesError as e:
        return None, str(e)


def _timed(fn: Callable[[dict[str, Any]], dict[str, Any]], cell: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    record = fn(cell)
    return {"cell": cell, **record, "cell_seconds": time.perf_counter() - start}


class LocalExecutor:
    """Run cells one after another in this process, saving each as it completes.

    ``threads``: ``torch.set_num_threads`` for the run (default: leave torch's setting).
    """

    name = "local"

    def __init__(self, threads: int | None = None) -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.threads = threads

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
        bar = _bar(len(cells), len(cells) - len(todo), progress)
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            for cell in todo:
                key = cell_key(cell)
                if store.done(key):  # computed meanwhile by another process on this store
                    if bar is not None:
                        bar.update(1)
                    continue
                if bar is not None:  # the running cell, not the previous one
                    bar.set_postfix_str(describe(cell))
                store.save(key, _timed(fn, cell))
                computed.append(key)
                if bar is not None:
                    bar.update(1)
        finally:
            torch.set_num_threads(before)
            if bar is not None:
                bar.close()
        return computed


def _init_worker(threads: int) -> None:
    from .._alloc import tune_allocator

    torch.set_num_threads(threads)
    tune_allocator()


class ProcessExecutor:
    """Run cells in ``workers`` worker processes of ``threads`` torch threads each; the
    driver saves every cell as it completes (a killed study resumes like the local one).

    The default, one thread per process and as many processes as this machine has cores,
    is the fastest layout for many small cells: torch's own threads scale poorly on the
    small tensors of a cell and fight each other across processes. ``fn`` must be a
    module-level function (the workers are spawned and import it). A cell that raises is
    reported after every other cell has been computed and saved.
    """

    name = "processes"

    def __init__(self, workers: int | None = None, threads: int = 1) -> None:
        workers = available_cores() if workers is None else workers
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        self.workers, self.threads = workers, threads

    def run(
        self,
        fn: Callable[[dict[str, Any]], dict[str, Any]],
        cells: list[dict[str, Any]],
        store: ResultStore,
        progress: bool = True,
    ) -> list[str]:
        todo = [c for c in cells if not store.done(cell_key(c))]
        if self.workers == 1 or len(todo) <= 1:
            return LocalExecutor(self.threads).run(fn, cells, store, progress)
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

        bar = _bar(len(cells), len(cells) - len(todo), progress)
        computed: list[str] = []
        failed: dict[str, str] = {}
        pool = ProcessPoolExecutor(
            self.workers,
            mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.threads,),
        )
        try:
            queue = list(todo)
            running: dict[Future, dict[str, Any]] = {}
            while queue or running:
                while queue and len(running) < self.workers:
                    cell = queue.pop(0)
                    running[pool.submit(_timed, fn, cell)] = cell
                if bar is not None:
                    bar.set_postfix_str(" | ".join(describe(c) for c in running.values()))
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    cell = running.pop(fut)
                    key = cell_key(cell)
                    try:
                        record = fut.result()
                    except Exception as e:  # this cell only; the others go on
                        failed[key] = f"{describe(cell)}: {type(e).__name__}: {e}"
                        continue
                    store.save(key, record)
                    computed.append(key)
                    if bar is not None:
                        bar.update(1)
        finally:
            pool.shutdown(cancel_futures=True)
            if bar is not None:
                bar.close()
        if failed:
            lines = "\n".join(f"  {k} {v}" for k, v in sorted(failed.items()))
            raise RuntimeError(
                f"{len(failed)} cell(s) failed (the others are saved; rerun to retry them):\n"
                + lines
            )
        return computed


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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

"""Run study cells as Ray tasks, on a local Ray instance or on a cluster.

:class:`RayExecutor` has the same ``run(fn, cells, store, progress)`` method as
:class:`~bayesfilter_diff.studies.LocalExecutor`, so ``run_study(..., executor=RayExecutor())``
and ``bayesfilter-diff validate --executor ray`` distribute a study without other changes.

Design:

- one Ray task per cell, or per ``batch_size`` cells (fewer, longer tasks when cells are
  short), each with its resource request (``num_cpus_per_task``, ``num_gpus_per_task``);
- the driver streams results back with ``ray.wait`` as tasks complete and writes each cell
  to the :class:`~bayesfilter_diff.studies.ResultStore` itself (atomic writes; workers need
  no access to the output folder), so a killed driver resumes exactly like the local
  executor: completed cells are skipped, in-flight ones are recomputed;
- failures are never dropped silently. A task whose worker dies (SIGKILL, out of memory,
  lost node) is resubmitted by Ray itself up to ``max_retries`` times. An exception raised
  by ``fn`` is caught inside the task for that cell only (the other cells of the batch are
  kept) and the driver resubmits the cell, as it does for a task whose system retries are
  exhausted: each cell is attempted at most ``1 + max_retries`` times by the driver. Cells
  that still fail are listed in a :class:`StudyFailedError` raised after every other cell has
  been computed and saved.

``ray`` is an optional dependency (``pip install bayesfilter-diff[ray]``); it is imported
only when a :class:`RayExecutor` runs. The cell function and its module must be importable
on every node (install the package on the nodes, or pass a ``runtime_env`` through
``init_kwargs``).
"""

from __future__ import annotations

import os
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from .grid import _timed, cell_key
from .store import ResultStore

__all__ = ["RayExecutor", "StudyFailedError"]


class StudyFailedError(RuntimeError):
    """Some cells failed on every attempt; ``failed`` maps each cell key to its last error."""

    def __init__(self, failed: dict[str, tuple[dict[str, Any], str]], attempts: int) -> None:
        self.failed = failed
        lines = [f"{len(failed)} cell(s) failed after {attempts} attempt(s) (not saved):"]
        for key, (cell, err) in sorted(failed.items()):
            last = err.strip().splitlines()[-1] if err.strip() else "unknown error"
            lines.append(f"  {key} {cell}: {last}")
        lines.append("the other cells are saved; rerun the study to retry only the failed ones")
        super().__init__("\n".join(lines))


def _run_batch(fn: Callable, cells: list[dict[str, Any]]) -> list[tuple[bool, Any]]:
    """The body of a Ray task: ``(True, record)`` or ``(False, traceback)`` per cell."""
    out: list[tuple[bool, Any]] = []
    for cell in cells:
        try:
            out.append((True, _timed(fn, cell)))
        except Exception:  # an application error of this cell only
            out.append((False, traceback.format_exc()))
    return out


class RayExecutor:
    """Run each cell (or batch of cells) as a Ray task; the driver saves the results.

    Parameters
    ----------
    address : str, optional
        Address of a running Ray cluster (``"auto"``, ``"host:6379"`` or ``"ray://host:10001"``).
        ``None`` connects to the instance this process already started, or else starts a
        local instance with ``num_workers * num_cpus_per_task`` CPUs.
    num_cpus_per_task, num_gpus_per_task : float
        Resources requested by each task (Ray sets ``OMP_NUM_THREADS`` and
        ``CUDA_VISIBLE_DEVICES`` in the worker accordingly).
    max_retries : int
        Ray's retries of a task whose worker died, and the driver's resubmissions of a cell
        whose function raised (or whose task exhausted its system retries).
    batch_size : int
        Cells per task.
    num_workers : int, optional
        Tasks in flight at once (default: as many as the cluster's resources allow). For a
        local instance also its size (default: ``os.cpu_count()``).
    init_kwargs : dict, optional
        Extra keyword arguments of ``ray.init`` (e.g. ``runtime_env``).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus_per_task: float = 1,
        num_gpus_per_task: float = 0,
        max_retries: int = 2,
        batch_size: int = 1,
        num_workers: int | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if num_cpus_per_task < 0 or num_gpus_per_task < 0:
            raise ValueError("num_cpus_per_task and num_gpus_per_task must be >= 0")
        if num_cpus_per_task == 0 and num_gpus_per_task == 0:
            raise ValueError("a task must request some num_cpus_per_task or num_gpus_per_task")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.address = address
        self.num_cpus_per_task = num_cpus_per_task
        self.num_gpus_per_task = num_gpus_per_task
        self.max_retries = max_retries
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.init_kwargs = dict(init_kwargs or {})

    # -- connection ---------------------------------------------------------------------

    @staticmethod
    def _import_ray():
        try:
            import ray
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the Ray executor needs ray: pip install 'bayesfilter-diff[ray]'"
            ) from e
        return ray

    def _connect(self, ray) -> bool:
        """Connect to (or start) Ray; return whether this call started the connection."""
        if ray.is_initialized():
            return False
        kw = {"ignore_reinit_error": True, **self.init_kwargs}
        if self.address is not None:
            kw["address"] = self.address
        else:
            workers = self.num_workers or os.cpu_count() or 1
            kw.setdefault("num_cpus", max(1, int(round(workers * max(self.num_cpus_per_task, 1)))))
        ray.init(**kw)
        return True

    def _in_flight_limit(self, ray) -> int:
        if self.num_workers is not None:
            return self.num_workers
        res = ray.cluster_resources()
        slots = []
        if self.num_cpus_per_task > 0:
            slots.append(res.get("CPU", 1) / self.num_cpus_per_task)
        if self.num_gpus_per_task > 0:
            slots.append(res.get("GPU", 0) / self.num_gpus_per_task)
        # twice the slots: the next task is queued on a node as soon as one finishes
        return max(1, 2 * int(min(slots)))

    # -- the study ----------------------------------------------------------------------

    def run(
        self,
        fn: Callable[[dict[str, Any]], dict[str, Any]],
        cells: list[dict[str, Any]],
        store: ResultStore,
        progress: bool = True,
    ) -> list[str]:
        """Compute every cell not yet in ``store``; return the keys computed now.

        Raises :class:`StudyFailedError` (after saving every cell that succeeded) when some
        cells failed on all their attempts.
        """
        todo = [c for c in cells if not store.done(cell_key(c))]
        if not todo:
            return []
        ray = self._import_ray()
        started = self._connect(ray)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="cells", unit="cell")
        remote = ray.remote(_run_batch).options(
            num_cpus=self.num_cpus_per_task,
            num_gpus=self.num_gpus_per_task,
            max_retries=self.max_retries,  # system failures: worker or node died
            retry_exceptions=False,  # application errors are retried per cell below
        )
        pending: dict[Any, list[dict[str, Any]]] = {}
        try:
            fn_ref = ray.put(fn)
            limit = self._in_flight_limit(ray)
            queue = deque(
                todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)
            )
            attempts = {cell_key(c): 0 for c in todo}
            failed: dict[str, tuple[dict[str, Any], str]] = {}
            computed: list[str] = []
            retries = 0

            def submit(batch):
                for c in batch:
                    attempts[cell_key(c)] += 1
                pending[remote.remote(fn_ref, batch)] = batch

            def retry_or_fail(cell, err):
                nonlocal retries
                key = cell_key(cell)
                if attempts[key] <= self.max_retries:
                    retries += 1
                    queue.append([cell])
                else:
                    failed[key] = (cell, err)

            while queue or pending:
                while queue and len(pending) < limit:
                    submit(queue.popleft())
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    batch = pending.pop(ref)
                    try:
                        results = ray.get(ref)
                    except Exception as e:  # the task died after Ray's own retries
                        lines = str(e).strip().splitlines() or [""]
                        err = f"{e}\n{type(e).__name__}: {lines[-1].strip()}"
                        for cell in batch:
                            retry_or_fail(cell, err)
                        continue
                    for cell, (ok, value) in zip(batch, results):
                        if not ok:
                            retry_or_fail(cell, value)
                            continue
                        key = cell_key(cell)
                        store.save(key, value)
                        computed.append(key)
                        if bar is not None:
                            bar.update(1)
                    if bar is not None:
                        bar.set_postfix(
                            method=str(batch[-1].get("method", "")),
                            retried=retries,
                            failed=len(failed),
                        )
            if failed:
                raise StudyFailedError(failed, 1 + self.max_retries)
            return computed
        finally:
            for ref in pending:  # interrupted: do not leave tasks running on the cluster
                try:
                    ray.cancel(ref, force=True)
                except Exception:
                    pass
            if bar is not None:
                bar.close()
            if started:
                ray.shutdown()

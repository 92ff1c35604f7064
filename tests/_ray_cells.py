"""Cell functions for the Ray executor tests (importable by Ray workers via PYTHONPATH).

Deliberately light (no torch import), so that a Ray worker started to replace a killed one
is ready in a fraction of a second.
"""

import os
import signal
import sys
import time
from pathlib import Path


def toy_cell(cell):
    """As ``_study_toy.toy_cell``."""
    time.sleep(cell.get("sleep", 0.0))
    return {"value": cell["seed"] ** 2 + 0.5}


def cells(n=12, sleep=0.0):
    return [{"study": "toy", "method": "m", "seed": i, "sleep": sleep} for i in range(n)]


def kill_once_cell(cell, marker_dir, seeds):
    """Kill the worker process (SIGKILL) the first time a cell in ``seeds`` runs."""
    marker = Path(marker_dir) / f"killed-{cell['seed']}"
    if cell["seed"] in seeds and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return toy_cell(cell)


def raise_cell(cell, marker_dir, once, always):
    """Raise on the first attempt of cells in ``once`` and on every attempt of ``always``."""
    marker = Path(marker_dir) / f"raised-{cell['seed']}"
    if cell["seed"] in always:
        raise ValueError(f"bad cell {cell['seed']}")
    if cell["seed"] in once and not marker.exists():
        marker.touch()
        raise ValueError(f"transient error {cell['seed']}")
    return toy_cell(cell)


if __name__ == "__main__":  # a driver to be killed: root, address, n, sleep
    from bayesfilter_diff.studies import ResultStore, run_study
    from bayesfilter_diff.studies.ray_executor import RayExecutor

    root, address, n, sleep = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    ex = RayExecutor(address=address, num_workers=2)
    run_study(toy_cell, cells(n, sleep), ResultStore(root), executor=ex, progress=False)

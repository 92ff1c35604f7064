"""A toy study for the resume tests (importable by a subprocess)."""

import sys
import time

from bayesfilter_diff.studies import ResultStore, run_study


def toy_cell(cell):
    time.sleep(cell.get("sleep", 0.0))
    return {"value": cell["seed"] ** 2 + 0.5}


def cells(n=12, sleep=0.0):
    return [{"study": "toy", "method": "m", "seed": i, "sleep": sleep} for i in range(n)]


if __name__ == "__main__":
    root, n, sleep = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    run_study(toy_cell, cells(n, sleep), ResultStore(root), progress=False)


def threads_cell(cell):
    """The worker's torch thread count (and a failure for seed -1)."""
    import torch

    if cell["seed"] == -1:
        raise RuntimeError("this cell fails")
    return {"threads": torch.get_num_threads(), "value": cell["seed"] ** 2 + 0.5}

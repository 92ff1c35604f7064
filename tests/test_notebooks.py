"""The notebooks in ``notebooks/``: each runs top to bottom in fast mode, and the committed copies
carry the outputs of a full run.

Execution uses nbclient with the kernel name ``"python3"``, resolved to a kernelspec written at
test time in a temporary folder that runs *this* interpreter (``sys.executable``) and is put
first on ``JUPYTER_PATH``, so the kernel sees the same environment (torch, the package) as the
tests whatever kernelspecs the machine has. An extra cell appended to each in-memory copy checks
that the kernel's ``sys.prefix`` is ours and that the notebook picked up ``BFD_FAST=1`` (every
notebook starts with a parameters cell that defines ``FAST`` from it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.slow

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
#: Upper bound on the committed notebooks' total size (figures at dpi 80, no large tensors).
MAX_TOTAL_BYTES = 1_500_000
_CHECK_MARK = "__bfd_notebook_check__"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Environment for the kernel: our interpreter as "python3", BFD_FAST=1, few threads."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (bayesfilter_diff tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    mp = pytest.MonkeyPatch()
    mp.setenv(
        "JUPYTER_PATH", os.pathsep.join(filter(None, [str(root), os.environ.get("JUPYTER_PATH")]))
    )
    mp.setenv("BFD_FAST", "1")
    # The kernel's torch uses as many threads as the tests (2 by default, tests/conftest.py).
    mp.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads()))
    mp.delenv("MPLBACKEND", raising=False)  # ipykernel's inline backend, as for a user
    yield
    mp.undo()


def test_notebooks_present():
    names = [p.name for p in NOTEBOOKS]
    assert len(names) >= 4, f"expected the four notebooks in {NOTEBOOKS_DIR}, found {names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path, kernel_env):
    nb = nbformat.read(path, as_version=4)
    check = f"import sys\nprint({_CHECK_MARK!r}, repr(sys.prefix), FAST)"
    nb.cells.append(nbformat.v4.new_code_cell(check))
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the traceback) if a cell fails
    wall = time.perf_counter() - start
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    assert _CHECK_MARK in text, f"the check cell printed nothing: {nb.cells[-1].outputs}"
    prefix, fast = text.strip().split(" ", 1)[1].rsplit(" ", 1)
    assert prefix == repr(sys.prefix), f"kernel ran in {prefix}, tests in {sys.prefix!r}"
    assert fast == "True", "the notebook did not switch to fast mode under BFD_FAST=1"
    print(f"{path.name}: {wall:.1f} s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook(path):
    """Parameters cell first; every code cell executed without an error output."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    first = code[0]
    assert "parameters" in first.metadata.get("tags", []), "first code cell must be 'parameters'"
    assert "BFD_FAST" in first.source and "FAST" in first.source
    for i, cell in enumerate(code):
        assert cell.execution_count is not None, f"code cell {i} of {path.name} was not executed"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"code cell {i} of {path.name} has an error output: {errors[0]}"


def test_committed_notebooks_size():
    total = sum(p.stat().st_size for p in NOTEBOOKS)
    assert total < MAX_TOTAL_BYTES, f"notebooks take {total} bytes (limit {MAX_TOTAL_BYTES})"

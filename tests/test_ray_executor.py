"""The Ray executor: same results as the local one; killed workers and drivers; failures."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip(
    "ray", reason="ray is not installed (pip install 'bayesfilter-diff[ray]')"
)

from bayesfilter_diff.studies import LocalExecutor, ResultStore, cell_key, run_study  # noqa: E402
from bayesfilter_diff.studies import gmm_benchmark as gb  # noqa: E402
from bayesfilter_diff.studies.ray_executor import RayExecutor, StudyFailedError  # noqa: E402
from bayesfilter_diff.studies.report import summarize  # noqa: E402

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
import _ray_cells  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance (2 CPUs) shared by the tests of this module."""
    if ray.is_initialized():
        ray.shutdown()
    path = os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}},
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_same_table_as_local_executor(cluster, tmp_path):
    cells = [
        {**c, "num_reference": 300}
        for c in gb.grid(["MCGdiff", "FPS"], [8], [1], [10], range(4), N=64)
    ]
    local = run_study(gb.run_cell, cells, ResultStore(tmp_path / "local"), progress=False)
    ex = RayExecutor(num_workers=2, batch_size=2)
    remote = run_study(
        gb.run_cell, cells, ResultStore(tmp_path / "ray"), executor=ex, progress=False
    )
    metrics = ["sw", "sw_floor", "weight_tv", "log_evidence_error", "ess", "nfe"]

    def table(records):  # NaN-safe, bit-for-bit comparison of the numbers
        return json.dumps(summarize(records, ["method", "d", "d_y", "steps"], metrics))

    assert table(remote) == table(local)
    timing = {"wall_time", "cell_seconds"}
    for a, b in zip(local, remote):
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }
    assert ray.is_initialized()  # an instance the executor did not start is left running


def test_killed_worker_is_retried(cluster, tmp_path):
    store = ResultStore(tmp_path / "store")
    fn = functools.partial(_ray_cells.kill_once_cell, marker_dir=str(tmp_path), seeds=(3,))
    cells = _ray_cells.cells(10)
    computed = RayExecutor(num_workers=2, max_retries=2).run(fn, cells, store, progress=False)
    assert (tmp_path / "killed-3").exists()  # the worker did die
    assert sorted(computed) == sorted(cell_key(c) for c in cells)  # each exactly once
    assert store.keys() == sorted(computed)
    recs = run_study(fn, cells, store, progress=False)
    assert [r["value"] for r in recs] == [i**2 + 0.5 for i in range(10)]


def test_lost_task_without_retries_is_reported_then_resumed(cluster, tmp_path):
    store = ResultStore(tmp_path / "store")
    fn = functools.partial(_ray_cells.kill_once_cell, marker_dir=str(tmp_path), seeds=(3,))
    cells = _ray_cells.cells(6)
    with pytest.raises(StudyFailedError, match="1 cell\\(s\\) failed") as info:
        RayExecutor(num_workers=2, max_retries=0).run(fn, cells, store, progress=False)
    assert list(info.value.failed) == [cell_key(cells[3])]
    assert "WorkerCrashedError" in str(info.value)
    assert len(store.keys()) == 5 and not store.done(cell_key(cells[3]))
    computed = RayExecutor(num_workers=2, max_retries=0).run(fn, cells, store, progress=False)
    assert computed == [cell_key(cells[3])]


def test_application_errors_are_retried_then_listed(cluster, tmp_path):
    store = ResultStore(tmp_path / "store")
    fn = functools.partial(
        _ray_cells.raise_cell, marker_dir=str(tmp_path), once=(1, 4), always=(2,)
    )
    cells = _ray_cells.cells(7)
    ex = RayExecutor(num_workers=2, max_retries=1, batch_size=3)
    with pytest.raises(StudyFailedError, match="after 2 attempt") as info:
        ex.run(fn, cells, store, progress=False)
    assert list(info.value.failed) == [cell_key(cells[2])]
    assert "ValueError: bad cell 2" in str(info.value)
    # the batch-mates of the failing cell and the transient failures are all saved
    assert set(store.keys()) == {cell_key(c) for i, c in enumerate(cells) if i != 2}


def test_killed_driver_resumes(cluster, tmp_path):
    """SIGKILL a driver connected to the cluster mid-study; a new driver finishes the rest."""
    n, sleep = 12, 0.2
    store = ResultStore(tmp_path / "store")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "_ray_cells", str(store.root), cluster, str(n), str(sleep)],
        env=env,
        cwd=TESTS,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "driver.err").open("w"),
    )
    # generous deadline: on a loaded machine the driver's imports and connection are slow
    deadline = time.time() + 300
    while len(store.keys()) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    exited = proc.poll()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {k: store.path(k).stat().st_mtime_ns for k in store.keys()}
    err = (tmp_path / "driver.err").read_text()[-2000:]
    assert 3 <= len(before) < n, f"driver exited with {exited}; stderr:\n{err}"
    cells = _ray_cells.cells(n, sleep)
    computed = RayExecutor(num_workers=2).run(_ray_cells.toy_cell, cells, store, progress=False)
    assert sorted(computed + list(before)) == sorted(cell_key(c) for c in cells)
    assert all(store.path(k).stat().st_mtime_ns == m for k, m in before.items())
    recs = run_study(_ray_cells.toy_cell, cells, store, executor=LocalExecutor(), progress=False)
    assert [r["value"] for r in recs] == [i**2 + 0.5 for i in range(n)]


def test_cli_validate_executor_options(monkeypatch, tmp_path):
    from bayesfilter_diff import cli
    from bayesfilter_diff.studies import validate as validate_module

    seen = {}

    def fake_validate(**kw):
        seen.update(kw)
        return {"text": "", "report": tmp_path / "report.md"}

    monkeypatch.setattr(validate_module, "validate", fake_validate)
    assert cli.main(["validate", "--out", str(tmp_path)]) == 0
    from bayesfilter_diff.studies import ProcessExecutor

    ex = seen["executor"]  # local: one single-threaded worker process per core
    assert isinstance(ex, ProcessExecutor) and ex.threads == 1 and ex.workers >= 1
    assert (
        cli.main(["validate", "--num-workers", "3", "--threads", "2", "--out", str(tmp_path)]) == 0
    )
    assert (seen["executor"].workers, seen["executor"].threads) == (3, 2)
    argv = ["validate", "--executor", "ray", "--address", "auto", "--device", "cuda:0"]
    assert cli.main(argv + ["--out", str(tmp_path)]) == 0
    ex = seen["executor"]
    assert isinstance(ex, RayExecutor) and ex.address == "auto" and ex.num_gpus_per_task == 1
    assert cli.main(["validate", "--address", "auto"]) == 2  # needs --executor ray

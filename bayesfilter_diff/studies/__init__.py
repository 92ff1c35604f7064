"""Validation studies: resumable grids of cells measured against exact posteriors."""

from .grid import LocalExecutor, ProcessExecutor, cell_key, run_study
from .store import ResultStore

__all__ = ["ResultStore", "LocalExecutor", "ProcessExecutor", "cell_key", "run_study"]

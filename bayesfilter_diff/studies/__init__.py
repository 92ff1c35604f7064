"""Validation studies: resumable grids of cells measured against exact posteriors."""

from .grid import LocalExecutor, cell_key, run_study
from .store import ResultStore

__all__ = ["ResultStore", "LocalExecutor", "cell_key", "run_study"]

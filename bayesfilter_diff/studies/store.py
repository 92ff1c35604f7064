"""A resumable on-disk store of study cells: one JSON file per completed cell.

Each record is written atomically (a temporary file in the same folder, ``fsync``, then
``os.replace``), so a study killed at any point (even by SIGKILL) leaves either the
complete record or none. Each record carries a SHA-256 checksum of its payload; a file
that is truncated, unparsable or fails its checksum is reported as missing (and moved
aside as ``*.corrupt``) so that cell is recomputed, never silently trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["ResultStore"]


def _digest(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


class ResultStore:
    """Completed cells of a study, stored under ``root/cells/<key>.json``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.cells = self.root / "cells"
        self.cells.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if not key or any(c in key for c in "/\\") or key.startswith("."):
            raise ValueError(f"invalid cell key {key!r}")
        return self.cells / f"{key}.json"

    def save(self, key: str, record: dict[str, Any]) -> None:
        """Write ``record`` for ``key`` atomically."""
        body = {"key": key, "record": record, "sha256": _digest(record)}
        fd, tmp = tempfile.mkstemp(dir=self.cells, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(body, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(key))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load(self, key: str) -> dict[str, Any] | None:
        """The record of ``key``, or ``None`` if absent or corrupt (then moved aside)."""
        p = self.path(key)
        if not p.exists():
            return None
        try:
            body = json.loads(p.read_text())
            rec = body["record"]
            if body.get("key") != key or body.get("sha256") != _digest(rec):
                raise ValueError("checksum mismatch")
            return rec
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            os.replace(p, p.with_suffix(".corrupt"))
            return None

    def done(self, key: str) -> bool:
        return self.load(key) is not None

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.cells.glob("*.json") if not p.name.startswith("."))

    def records(self) -> list[dict[str, Any]]:
        out = []
        for k in self.keys():
            r = self.load(k)
            if r is not None:
                out.append(r)
        return out

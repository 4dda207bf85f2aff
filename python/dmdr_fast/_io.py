"""Atomic file writes shared by checkpoints, cached teachers and classifiers, and the progress
record that lets sharded builds (prompt cache, ODE pairs) continue after an interruption."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["PROGRESS_NAME", "atomic_save", "atomic_write_text", "read_progress", "write_progress"]


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to ``path`` through a temporary file in the same folder, fsync, ``os.replace``.

    A reader (or a process killed mid-write) sees either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> None:
    """Write a small text file atomically (same scheme as :func:`atomic_save`), UTF-8.

    Args:
        path: destination (its folder must exist).
        text: the content.
        mode: permission bits of the file (default: ``mkstemp``'s 0600).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


#: The progress record inside a ``<out>.tmp`` build folder (removed when the build completes).
PROGRESS_NAME = "progress.json"


def write_progress(
    folder: Path, identity: dict[str, Any], shards: list[dict[str, Any]], **extra: Any
) -> None:
    """Record the complete shards of a build in ``folder`` (call after each shard file is written:
    a crash in between costs only that shard again)."""
    state = {"identity": identity, "shards": shards, **extra}
    atomic_write_text(folder / PROGRESS_NAME, json.dumps(state) + "\n")


def read_progress(folder: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The progress record of an interrupted build in ``folder`` made with ``identity`` (every
    recorded shard file present), else None: nothing to continue, start afresh."""
    try:
        state = json.loads((folder / PROGRESS_NAME).read_text())
    except (OSError, ValueError):
        return None
    shards = state.get("shards") or []
    if state.get("identity") != identity or not all((folder / s["file"]).is_file() for s in shards):
        return None
    return state

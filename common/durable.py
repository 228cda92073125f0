"""Durable writes: fsync helpers and the one atomic file write of the codebase.

A reader of a file written with `atomic_write` sees the old content or the new, never a mix, and
after the call returns the new content survives a power cut (file and directory are fsynced).
The temporary file is dot-prefixed (`.tmp-<name>-<pid>`) beside the target, on the same
filesystem, so the rename is atomic and readers that skip dot-files never see it.
Used by the filesystem contract (common/contract.py), both daemons and the tools.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Callable

# Dot-prefixed temporaries: never read as a checkpoint, a run or a result by anyone.
TEMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (root included)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def temp_path(path: Path) -> Path:
    """The temporary name beside `path` that a write of this process uses."""
    return path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], binary: bool = False) -> None:
    """Call `write(handle)` on a temporary beside `path`, fsync it, rename it into place, fsync the
    directory. On any failure the temporary is removed and the old file (if any) is untouched."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, killed) must not leave a temporary behind
        raise
    fsync_dir(path.parent)


def create_exclusive(path: str | os.PathLike, write: Callable[[IO], Any]) -> bool:
    """Create `path` with the content `write(handle)` writes, only if no file of that name exists:
    True when this call created it, False when it already existed. Of several processes racing for
    one name (on one host or over NFS) exactly one wins. The content is written and fsynced under a
    temporary name first and then hard-linked to `path` (link(2) fails when the name exists, like an
    O_EXCL create), so nobody ever reads a created-but-empty file."""
    path = Path(path)
    # Unique per call, not per pid: racers on other hosts of a shared filesystem may share a pid.
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON with sorted keys and a trailing newline, written atomically."""
    atomic_write(path, lambda handle: handle.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"))

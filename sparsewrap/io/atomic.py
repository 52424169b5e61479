"""Atomic file writes: a reader never sees a half-written file, an interrupted write loses nothing.

The temporary file lies beside the destination as ``.<stem>.<random>.tmp<suffix>``; an interrupted write
(a killed process) can leave one behind, and :func:`remove_orphans` deletes those of a given destination. The
final file gets the permissions of the file it replaces, or those the umask gives a new file (not the
temporary file's 0600).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):  # Linux: read it without changing it (thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)  # elsewhere, reading the umask means setting it; restored at once
    os.umask(umask)
    return umask


def _new_file_mode() -> int:
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        try:
            mode = stat.S_IMODE(final.stat().st_mode)
        except FileNotFoundError:
            mode = _new_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def orphans(path: str | os.PathLike) -> list[Path]:
    """The temporary files that interrupted :func:`write_atomic` calls for ``path`` left beside it."""
    final = Path(path)
    if not final.parent.is_dir():
        return []
    name = re.compile(rf"\.{re.escape(final.stem)}\.[a-z0-9_]{{8}}\.tmp{re.escape(final.suffix)}")
    return sorted(p for p in final.parent.iterdir() if name.fullmatch(p.name) and p.is_file())


def remove_orphans(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files interrupted writes of ``path`` left (call it before a run writes ``path``).

    Returns:
        The paths removed.
    """
    removed = []
    for orphan in orphans(path):
        with contextlib.suppress(FileNotFoundError):
            orphan.unlink()
            removed.append(orphan)
    return removed

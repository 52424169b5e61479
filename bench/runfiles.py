"""Where a benchmark run writes its results: a new file per run, named by commit, never overwritten.

``bench/results/<benchmark>/<commit>[-dirty]-<UTC time>.<ext>``: figures quoted in the README and in
``docs/benchmarks.md`` name the file they come from, and a later run cannot change what that file says.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    """The checkout's short commit, with ``-dirty`` when tracked files differ from it (``unknown`` outside git)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    name = head.stdout.strip() or "unknown"
    return f"{name}-dirty" if dirty.stdout.strip() else name


def run_stem(benchmark: str) -> Path:
    """A fresh path stem (no extension) for this run of ``benchmark``; its folder is created."""
    folder = RESULTS / benchmark
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{commit()}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def write_new(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, refusing to replace an existing file (results are never overwritten)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)
    return path

"""``sw.compare(..., jobs=N)``: the cells in N worker processes (``spawn``), a CPU's threads split between them or
one CUDA device each.

The main process decides which cells a previous run finished (as with ``jobs=1``) and keeps at most ``jobs``
cells in the pool, so that ``on_cell_begin`` is called when a cell really starts. Each worker trains its cell
with the same :func:`~sparsewrap.train.compare_cell.run_cell` as the main process would. A Ctrl-C in the main
process (or a cell that comes back ``"interrupted"``) sets a shared event that every running cell polls: each
stops after a finished step, saves its checkpoint and returns ``"interrupted"``; no new cell starts.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch

from ..errors import ConfigError
from .compare_cell import CellTask, CompareCallback, CompareRow, one_line, read_decision, run_cell
from .history import Callback

POLL_SECONDS = 0.25  # how often a worker's cell looks at the stop event


def require_picklable(jobs: int, **objects: Any) -> None:
    """Check that each of ``objects`` can be sent to a worker process.

    Raises:
        ConfigError: naming the first one that cannot be pickled, and the fixes.
    """
    for name, obj in objects.items():
        try:
            ForkingPickler.dumps(obj)  # tensors go to shared memory, as they will when the cells are sent
        except Exception as exc:  # noqa: BLE001  (pickle raises PicklingError, AttributeError, TypeError, ...)
            raise ConfigError(
                f"jobs={jobs} runs the cells in worker processes, but {name} cannot be pickled ({one_line(exc)}); "
                "define it at module level (not a lambda or a local function; functools.partial of one is fine), "
                "or use jobs=1"
            ) from None


def cell_device(fit_kwargs: dict[str, Any], slot: int) -> dict[str, Any]:
    """``fit_kwargs`` for the cell in pool slot ``slot``: ``device="cuda"`` becomes ``cuda:<slot mod GPUs>``."""
    device = fit_kwargs.get("device")
    if device is None or str(device) != "cuda" or not torch.cuda.is_available():
        return fit_kwargs
    return {**fit_kwargs, "device": f"cuda:{slot % torch.cuda.device_count()}"}


class StopOnEvent(Callback):
    """A worker's ``fit`` callback: stop after the current step once the shared event is set."""

    def __init__(self, event: Any) -> None:
        self.event = event
        self._next = 0.0

    def on_step_end(self, state: Any) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + POLL_SECONDS
            if self.event.is_set():
                state.stop = True


def ignore_sigint() -> None:
    """Worker initializer: the terminal's Ctrl-C reaches the main process, which stops the cells through the
    shared event (``fit`` still handles the signal itself while it trains)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_in_worker(task: CellTask, threads: int, stop: Any) -> CompareRow:
    """Train ``task`` in a worker process with ``threads`` CPU threads (the pool's entry point)."""
    torch.set_num_threads(threads)
    return run_cell(task, StopOnEvent(stop))


def run_parallel(tasks: list[CellTask], jobs: int, callback: CompareCallback) -> list[CompareRow]:
    """Run ``tasks`` (all cells, in order) with at most ``jobs`` at a time; the rows in the cells' order, those
    that never started (after a stop) left out, ``relative_time`` filled in from the dense baseline."""
    rows: dict[int, CompareRow] = {}
    pending: deque[CellTask] = deque()
    for task in tasks:
        cached = read_decision(task)
        if cached is None:
            pending.append(task)
        else:
            callback.on_cell_begin(task.index, task.total, task.method, task.target)
            rows[task.index] = cached
            callback.on_cell_end(task.index, task.total, cached, True)
    if pending:
        _pool(pending, jobs, callback, rows)
    ordered = [rows[i] for i in sorted(rows)]
    dense = ordered[0] if ordered and ordered[0].target is None else None
    for row in ordered[1:]:
        if dense is not None and dense.step_seconds and row.step_seconds is not None:
            row.relative_time = row.step_seconds / dense.step_seconds
    return ordered


def _pool(pending: deque[CellTask], jobs: int, callback: CompareCallback, rows: dict[int, CompareRow]) -> None:
    context = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // jobs)
    with context.Manager() as manager, ProcessPoolExecutor(jobs, mp_context=context, initializer=ignore_sigint) as pool:
        stop = manager.Event()
        running: dict[Future, tuple[CellTask, int]] = {}
        free = list(range(jobs))
        stopping = False

        def finish(task: CellTask, row: CompareRow) -> None:
            nonlocal stopping
            rows[task.index] = row
            callback.on_cell_end(task.index, task.total, row, False)
            if row.status == "interrupted" and not stopping:  # a Ctrl-C or a callback in a worker: stop them all
                stopping = True
                stop.set()

        while running or (pending and not stopping):
            try:  # a Ctrl-C anywhere in here (mostly in wait) stops the cells in progress and starts no other
                while pending and free and not stopping:
                    task, slot = pending[0], free[0]
                    callback.on_cell_begin(task.index, task.total, task.method, task.target)
                    job = replace(task, fit_kwargs=cell_device(task.fit_kwargs, slot))
                    try:
                        running[pool.submit(run_in_worker, job, threads, stop)] = (task, slot)
                    except BrokenProcessPool as exc:  # a worker died: the cells left cannot run
                        finish(task, _failed(task, exc))
                    else:
                        free.remove(slot)
                    pending.popleft()
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task, slot = running[future]
                    try:
                        row = future.result()
                    except BaseException as exc:  # noqa: BLE001  (a dead worker or an abort: recorded as failed)
                        row = _failed(task, exc)
                    finish(task, row)
                    del running[future]
                    free.append(slot)
            except KeyboardInterrupt:
                if stopping:  # a second Ctrl-C: abandon the cells in progress
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                stopping = True
                stop.set()


def _failed(task: CellTask, exc: BaseException) -> CompareRow:
    return CompareRow(task.method, task.target, "failed", error=one_line(exc), directory=str(task.directory))

"""One cell of ``sw.compare``: what it needs (:class:`CellTask`), whether a previous run finished or left it
(:func:`read_decision`), and training it (:func:`run_cell`), which records its row in ``cell.json``.

A task holds the model builder and the loaders, so with ``jobs > 1`` it is sent whole to a worker process
(:mod:`sparsewrap.train.compare_jobs`); the same :func:`run_cell` trains it there as in the main process.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from ..io.atomic import write_atomic
from . import distributed, rng
from .compare import CELL_FILE, CompareRow, loader_generators, macs_or_none, one_line
from .history import Callback, History
from .state import CHECKPOINT_NAME


@dataclass
class CellTask:
    """Everything one cell needs to train (sent to a worker process when ``jobs > 1``).

    Attributes:
        index: the cell's position (0: the dense baseline).
        total: the number of cells.
        method: the method (``"dense"`` for the baseline).
        target: the requested sparsity (``None`` for the baseline).
        directory: the cell's directory.
        model_fn: builds the fresh model.
        train_loader: the training batches.
        val_loader: the validation batches.
        epochs: epochs of the cell.
        seed: the seed of every generator.
        options: the method's options.
        force: retrain a finished cell.
        input_shape: one input's shape (for the MACs).
        fit_kwargs: the other ``fit`` keywords.
        settings: what :func:`cell_settings` recorded.
        loader_state: the RNG state (the training loader's generators included) restored before the cell.
        write: write ``cell.json`` (false on the ranks other than 0 of a distributed run).
        resume: continue from the checkpoint (set by :func:`read_decision`).
    """

    index: int
    total: int
    method: str
    target: float | None
    directory: Path
    model_fn: Callable[[], nn.Module]
    train_loader: Iterable
    val_loader: Iterable
    epochs: int
    seed: int
    options: dict[str, Any]
    force: bool
    input_shape: tuple[int, ...]
    fit_kwargs: dict[str, Any]
    settings: dict[str, Any]
    loader_state: dict[str, Any] | None = None
    write: bool = True
    resume: bool = False


def read_decision(task: CellTask, ctx: distributed.DistContext | None = None) -> CompareRow | None:
    """The finished row of ``task`` from a previous run (None: train it), setting ``task.resume`` when an
    interrupted run of the same settings left a checkpoint. Under DDP rank 0 decides for every rank."""
    cached = None if task.force else _read_cell(task.directory, task.settings)
    if cached is None and not task.force:
        try:
            same = json.loads((task.directory / CELL_FILE).read_text()).get("settings") == task.settings
        except (OSError, ValueError, AttributeError):
            same = False
        task.resume = same and (task.directory / CHECKPOINT_NAME).exists()  # else retrain from the start
    if ctx is not None:
        sent = distributed.broadcast_json([None if cached is None else asdict(cached), task.resume])
        cached, task.resume = (None if sent[0] is None else CompareRow(**sent[0])), sent[1]
    return cached


def _read_cell(directory: Path, settings: dict[str, Any]) -> CompareRow | None:
    """The finished row recorded in ``directory/cell.json`` with these settings (else None: failed cells are
    retried, and a cell trained otherwise, e.g. for fewer epochs, is retrained from the start)."""
    path = directory / CELL_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        row = CompareRow(**{f.name: data[f.name] for f in fields(CompareRow) if f.name in data})
    except (ValueError, TypeError, KeyError):
        return None
    return row if row.status == "done" and data.get("settings") == settings else None


def run_cell(task: CellTask, callback: Callback) -> CompareRow:
    """Train one cell (after :func:`read_decision`) and record its row in ``cell.json``; never raises: a failing
    cell's row has status ``"failed"`` and the one-line error."""
    from ..controller import sparsify
    from .loop import fit

    method, target, directory = task.method, task.target, task.directory
    row = CompareRow(method, target, "failed", directory=str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CELL_FILE
    if task.write:
        running = json.dumps({**asdict(CompareRow(method, target, "running")), "settings": task.settings}, indent=1)
        write_atomic(path, lambda tmp: tmp.write_text(running))
    try:
        if task.loader_state is not None:
            rng.set_state(task.loader_state, loader_generators(task.train_loader))  # same data order
        rng.seed_all(task.seed)
        model = task.model_fn()
        common = dict(epochs=task.epochs, seed=task.seed, callback=callback, **task.fit_kwargs)
        if target is None:  # the baseline: a plain model, no checkpoint (rerun whole when interrupted)
            history = fit(model, task.train_loader, task.val_loader, **common)
            row.params = sum(p.numel() for p in model.parameters())
            row.macs = macs_or_none(model, task.input_shape)
        else:
            sp = sparsify(model, method, target=target, **task.options)
            history = fit(sp, task.train_loader, task.val_loader, out=directory, resume=task.resume,
                          overwrite=not task.resume, **common)  # fmt: skip
            if not history.stopped:
                row.params, row.macs = _purged_size(sp, task.input_shape)
        _row_from_history(row, history)
        row.status = "interrupted" if history.stopped else "done"
        if row.status == "done" and row.loss is not None and not math.isfinite(row.loss):
            row.status, row.error = "failed", f"TrainingError: the validation loss is {row.loss}"
    except Exception as exc:  # noqa: BLE001  (a failing cell is recorded; the others go on)
        row.status, row.error = "failed", one_line(exc)
    if row.status != "interrupted" and task.write:
        text = json.dumps({**asdict(row), "settings": task.settings}, indent=1)
        write_atomic(path, lambda tmp: tmp.write_text(text))
    return row


def _row_from_history(row: CompareRow, history: History) -> None:
    last = history.last
    if last is None:
        return
    row.accuracy, row.loss, row.steps = last.val_accuracy, last.val_loss, last.step
    row.sparsity, row.learned_sparsity = last.exported, last.achieved
    seconds = sum(r.seconds for r in history.records)
    row.step_seconds = seconds / last.step if last.step else None


def _purged_size(sp: Any, input_shape: tuple[int, ...]) -> tuple[int | None, int | None]:
    """Parameters and MACs of the exported model after purge (of the plain export when purge cannot run)."""
    from ..bake import export

    try:
        with warnings.catch_warnings():  # "nothing to purge" is an expected answer for per-weight sparsity
            warnings.simplefilter("ignore", UserWarning)
            model = export(sp, purge=True)
    except Exception:  # noqa: BLE001  (a model purge cannot trace: its zeros stay, the sizes are the plain ones)
        model = export(sp)
    return sum(p.numel() for p in model.parameters()), macs_or_none(model, input_shape)

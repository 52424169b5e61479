"""One cell of ``sw.compare``: its row (:class:`CompareRow`), its progress hooks (:class:`CompareCallback`), what
it needs (:class:`CellTask`), whether a previous run finished or left it (:func:`read_decision`), and training
it (:func:`run_cell`), which records its row in ``cell.json``.

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

import torch
from torch import nn

from ..analysis.macs import total_macs
from ..io.atomic import write_atomic
from . import distributed, rng
from .history import Callback, History
from .state import CHECKPOINT_NAME

CELL_FILE = "cell.json"


@dataclass
class CompareRow:
    """One cell of a comparison.

    Attributes:
        method: the method's name (``"dense"`` for the baseline).
        target: the requested sparsity (``None`` for the baseline).
        status: ``"done"``, ``"failed"`` or ``"interrupted"``.
        accuracy: validation accuracy after the last epoch (eval mode, i.e. the exported model's).
        loss: validation loss after the last epoch.
        sparsity: sparsity of the exported model's targeted weights.
        learned_sparsity: sparsity before the export projection: the method's own "learned sparsity" (its summary)
            where it reports one, else that of the deterministic form.
        params: parameters of the model after purge (of the dense model for the baseline).
        macs: multiply-accumulates per example after purge.
        step_seconds: mean wall time of one step (training and evaluation of each epoch included).
        relative_time: ``step_seconds`` over the dense baseline's.
        steps: optimizer steps taken.
        error: the one-line error of a failed cell.
        directory: the cell's directory (checkpoint ``last.safetensors``, ``cell.json``).
    """

    method: str
    target: float | None
    status: str
    accuracy: float | None = None
    loss: float | None = None
    sparsity: float | None = None
    learned_sparsity: float | None = None
    params: int | None = None
    macs: int | None = None
    step_seconds: float | None = None
    relative_time: float | None = None
    steps: int = 0
    error: str | None = None
    directory: str = ""


class CompareCallback(Callback):
    """Progress hooks of :func:`compare`: the fit hooks of the cell in progress, plus a cell's start and end."""

    def on_cell_begin(self, index: int, total: int, method: str, target: float | None) -> None:
        """Before cell ``index`` (0-based) of ``total`` starts or is read from its ``cell.json``."""

    def on_cell_end(self, index: int, total: int, row: CompareRow, cached: bool) -> None:
        """After a cell; ``cached`` when it was read from a previous run."""


def one_line(exc: BaseException) -> str:
    """``ClassName: message`` on one line (at most 300 characters)."""
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return text if len(text) <= 300 else text[:297] + "..."


def loader_generators(loader: Iterable) -> list[torch.Generator]:
    """The ``torch.Generator`` objects of a DataLoader and of its sampler (their state sets the data order)."""
    found = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    return [g for g in found if isinstance(g, torch.Generator)]


def macs_or_none(model: nn.Module, input_shape: tuple[int, ...]) -> int | None:
    """MACs per example, or None for a model the count cannot run (the cell's other figures still stand)."""
    try:
        return total_macs(model, input_shape)
    except Exception:  # noqa: BLE001
        return None


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
    row.sparsity = last.exported  # the method's own pre-projection figure where it has one (sp.method.summary())
    row.learned_sparsity = last.method.get("learned sparsity", last.achieved) if last.method else last.achieved
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

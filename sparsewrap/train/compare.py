"""``sw.compare``: every (method, target) cell and one dense baseline trained alike, one table.

Each cell calls ``model_fn`` after seeding (same initialisation), restores the training loader's generators
(same data order) and runs :func:`sparsewrap.fit` with the same optimizer settings into its own directory under
``out`` (``out/dense``, ``out/<method>-<target>``). A cell records its settings in ``cell.json`` there
(atomically) when it starts and its row when it ends; a rerun with the same settings reads the row instead of
training again and continues an interrupted cell from its checkpoint through fit's ``resume``; other settings
(more epochs, another lr or option) retrain the cell from the start. A cell that fails is recorded with its
one-line error and the others go on. The whole table is written to ``out/compare.json``, ``out/compare.md``
and (with matplotlib) ``out/compare.png``. Nothing is printed: progress goes to a :class:`CompareCallback`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..io.atomic import write_atomic
from . import distributed, rng
from .compare_cell import (
    CELL_FILE,
    CellTask,
    CompareCallback,
    CompareRow,
    loader_generators,
    macs_or_none,
    one_line,
    read_decision,
    run_cell,
)

__all__ = ["CELL_FILE", "DENSE", "CompareCallback", "CompareRow", "accepting_methods", "cell_name", "cell_settings",
           "compare", "loader_generators", "macs_or_none", "markdown", "one_line", "write_tables"]  # fmt: skip

DENSE = "dense"


def cell_name(method: str, target: float | None) -> str:
    """The directory name of a cell: ``dense`` or ``<method>-<target>`` (``magnitude-0.9``)."""
    return DENSE if target is None else f"{method}-{target:g}"


def _input_shape(loader: Iterable) -> tuple[int, ...]:
    x = next(iter(loader))[0]
    return tuple(x.shape[1:])


def accepting_methods(model_fn: Callable[[], nn.Module], methods: Sequence[str], target: float,
                      options: dict[str, dict[str, Any]] | None = None,
                      ) -> tuple[list[str], dict[str, str]]:  # fmt: skip
    """Split ``methods`` into those that accept a fresh ``model_fn()`` at ``target`` and those that do not.

    Each method sparsifies its own fresh model (no training); one that raises is left out with its one-line
    error. This is what ``--methods all`` uses, so that a method which cannot handle the model is not a failure.

    Returns:
        ``(accepted, {rejected method: its error})``, ``accepted`` in the order given.
    """
    from ..controller import sparsify

    accepted, rejected = [], {}
    for m in methods:
        try:
            sparsify(model_fn(), m, target=target, **(options or {}).get(m, {}))
        except Exception as exc:  # noqa: BLE001  (any refusal leaves the method out)
            rejected[m] = one_line(exc)
        else:
            accepted.append(m)
    return accepted, rejected


def _check(methods: Sequence[str], targets: Sequence[float], epochs: int) -> None:
    from ..methods import get_method

    if not methods:
        raise ConfigError("methods=[] names no method; give one or more of sparsewrap.list_methods()")
    for m in methods:
        get_method(m)  # UnknownNameError lists the registered ones
    if not targets:
        raise ConfigError("targets=[] names no sparsity; give one or more in (0, 1), e.g. targets=[0.5, 0.9]")
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1:
            raise ConfigError(f"target {t!r} is not a sparsity in (0, 1); give e.g. targets=[0.5, 0.9]")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r} must be a positive integer")


def compare(model_fn: Callable[[], nn.Module], train_loader: Iterable, val_loader: Iterable, *,
            methods: Sequence[str], targets: Sequence[float], epochs: int = 1, out: str | Path,
            options: dict[str, dict[str, Any]] | None = None, force: bool = False, seed: int = 0,
            callback: CompareCallback | None = None, plot: bool = True, jobs: int = 1,
            **fit_kwargs: Any) -> list[CompareRow]:  # fmt: skip
    """Train a dense baseline and every (method, target) cell alike and tabulate them.

    With ``jobs > 1`` the cells run in that many worker processes (``spawn``), so ``model_fn`` and both loaders
    must be picklable: a module-level function or class (a ``functools.partial`` of one), not a lambda or a
    local function, and a script that calls ``compare`` must guard it with ``if __name__ == "__main__":``.
    Under ``torchrun`` (a process group of several ranks) every cell is a DDP run over the ranks, the loaders
    being each rank's shard; rank 0 alone writes ``cell.json`` and the tables.

    Args:
        model_fn: builds a fresh model; called right after seeding, so every cell starts from the same weights.
        train_loader: the training batches; its own generators are restored before each cell (same order).
        val_loader: evaluated after every epoch; the last epoch's accuracy and loss fill the row.
        methods: registered method names.
        targets: sparsities in (0, 1).
        epochs: epochs per cell.
        out: directory of the cells and of ``compare.json`` / ``compare.md``.
        options: per-method options, ``{"rigl": {"every": 50}}``.
        force: retrain every cell, finished ones included.
        seed: seeds every generator before ``model_fn`` and in ``fit``.
        callback: progress hooks. With ``jobs > 1`` only ``on_cell_begin`` / ``on_cell_end`` are called (the
            ``fit`` hooks run in the workers), and a Ctrl-C or a cell ending ``"interrupted"`` stops every cell
            in progress after it has saved its checkpoint.
        plot: also draw ``compare.png`` (needs matplotlib: ``pip install 'sparsewrap[plot]'``; checked first).
        jobs: cells trained at once, each in its own process: on CPU each gets
            ``max(1, torch.get_num_threads() // jobs)`` threads; with ``device="cuda"`` the cells in progress
            take ``cuda:0``, ``cuda:1``, ... in turn. The rows equal those of ``jobs=1`` (except the timings).
        **fit_kwargs: passed to :func:`sparsewrap.fit` for every cell (``lr``, ``optimizer``, ``device``, ...).

    Returns:
        One :class:`CompareRow` per cell, the dense baseline first. A Ctrl-C (or a callback setting
        ``state.stop``) ends the comparison after the cell in progress has saved its checkpoint; that cell's
        status is ``"interrupted"`` and the cells after it are not run.

    Raises:
        ConfigError: for no methods, a target outside (0, 1), bad epochs or jobs, options for a method not
            compared, ``plot`` without matplotlib installed (before any training), ``jobs > 1`` with a model_fn
            or loader that cannot be pickled, or ``jobs > 1`` under ``torchrun``.
        UnknownNameError: for a method that is not registered (the message lists the registered ones).
    """
    _check(methods, targets, epochs)
    check_jobs(jobs)
    options = options or {}
    stray = sorted(set(options) - set(methods))
    if stray:
        raise ConfigError(f"options for {stray[0]!r}, which is not compared; valid: {', '.join(methods)}")
    ctx = distributed.current()
    if ctx is not None and jobs > 1:
        raise ConfigError(f"jobs={jobs} under torchrun ({ctx.world_size} ranks): each cell is already a DDP run "
                          "over the ranks; use jobs=1 there, or jobs without torchrun")  # fmt: skip
    if plot:
        from .compare_plot import require_matplotlib

        require_matplotlib()
    if jobs > 1:
        from .compare_jobs import require_picklable

        require_picklable(jobs, model_fn=model_fn, train_loader=train_loader, val_loader=val_loader)
    main = ctx is None or ctx.is_main
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    callback = callback or CompareCallback()
    loader_state = rng.get_state(loader_generators(train_loader))
    input_shape = _input_shape(train_loader)
    cells: list[tuple[str, float | None]] = [(DENSE, None)] + [(m, float(t)) for m in methods for t in targets]
    tasks = []
    for index, (method, target) in enumerate(cells):
        directory = root / cell_name(method, target)
        settings = cell_settings(epochs, seed, options.get(method, {}), fit_kwargs, train_loader)
        tasks.append(CellTask(index, len(cells), method, target, directory, model_fn, train_loader, val_loader,
                              epochs, seed, options.get(method, {}), force, input_shape, fit_kwargs, settings,
                              loader_state, write=main))  # fmt: skip
    if jobs > 1:
        from .compare_jobs import run_parallel

        rows = run_parallel(tasks, jobs, callback)
    else:
        rows = []
        for task in tasks:
            callback.on_cell_begin(task.index, task.total, task.method, task.target)
            cached = read_decision(task, ctx)
            row = run_cell(task, callback) if cached is None else cached
            if rows and rows[0].step_seconds and row.step_seconds is not None:
                row.relative_time = row.step_seconds / rows[0].step_seconds
            rows.append(row)
            callback.on_cell_end(task.index, task.total, row, cached is not None)
            if row.status == "interrupted":
                break
    if main:
        write_tables(rows, root)
    if plot and main:
        from .compare_plot import draw

        draw(rows, root / "compare.png")
    return rows


def check_jobs(jobs: int) -> None:
    """Validate ``jobs``.

    Raises:
        ConfigError: for anything but a positive integer.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r} must be a positive integer (1: one cell at a time)")


def cell_settings(epochs: int, seed: int, options: dict[str, Any], fit_kwargs: dict[str, Any],
                  train_loader: Iterable | None = None) -> dict[str, Any]:  # fmt: skip
    """What a finished cell must have been trained with to be reused: epochs, seed, the method's options, the
    ``fit`` keywords (objects by their class name; ``device`` left out, it does not change the result's meaning)
    and the training loader's batch size and number of batches."""
    plain = (str, int, float, bool, type(None), list, tuple, dict)
    fit = {k: v if isinstance(v, plain) else getattr(v, "__qualname__", type(v).__qualname__)
           for k, v in sorted(fit_kwargs.items()) if k != "device"}  # fmt: skip
    data = {"batch_size": getattr(train_loader, "batch_size", None),
            "batches": len(train_loader) if hasattr(train_loader, "__len__") else None}  # fmt: skip
    settings = {"epochs": epochs, "seed": seed, "options": options, "fit": fit, "data": data}
    return json.loads(json.dumps(settings, default=str))


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(rows: Sequence[CompareRow]) -> str:
    """The table as Markdown: one line per cell, failed cells with their error."""
    head = ["method", "target", "accuracy", "val loss", "sparsity", "learned", "params", "MACs", "time/step ×dense",
            "status"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        status = r.status if r.error is None else f"{r.status}: {r.error.replace('|', '/')}"
        target = "—" if r.target is None else f"{r.target:g}"
        cells = [r.method, target, _cell(r.accuracy), _cell(r.loss), _cell(r.sparsity), _cell(r.learned_sparsity),
                 _cell(r.params), _cell(r.macs), _cell(r.relative_time, 2), status]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[CompareRow], out: str | Path) -> tuple[Path, Path]:
    """Write ``compare.json`` (the rows) and ``compare.md`` (the table) into ``out``, atomically."""
    root = Path(out)
    data = json.dumps({"rows": [asdict(r) for r in rows], "written": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1)
    text = markdown(rows)
    return (write_atomic(root / "compare.json", lambda tmp: tmp.write_text(data)),
            write_atomic(root / "compare.md", lambda tmp: tmp.write_text(text)))  # fmt: skip

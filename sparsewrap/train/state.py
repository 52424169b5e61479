"""What :func:`sparsewrap.fit` saves to resume exactly, and how it stops cleanly on Ctrl-C / SIGTERM.

The training checkpoint is the ordinary :func:`sparsewrap.save` file (model, controller, recipe) with the loop's
state in its ``extra`` part: the optimizer's ``state_dict``, every rank's RNG states (now, and when the epoch's
data iterator was created, so that a resume mid-epoch replays the same batch order and skips the batches already
done), the position (epoch, batch, step), the running sums of the epoch and the history. No pickle.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, ConfigError
from ..io.checkpoint import CTRL, EXTRA, MODEL, load_controller, read, save
from ..io.recipe import recipe_for
from ..io.tensors import join_tensors
from . import collectives, rng
from .history import EpochRecord

if TYPE_CHECKING:
    from ..controller import Sparsifier
    from .loop import Run

CHECKPOINT_NAME = "last.safetensors"
LOOP_FORMAT = 1


class StopSignal:
    """Turn SIGINT/SIGTERM into a stop request the loop honours after the current step.

    A second signal aborts at once (``KeyboardInterrupt``), except within ``repeat_window`` seconds of the
    first: ``torchrun`` forwards the terminal's Ctrl-C to workers that already received it, and that copy is
    the same request. Handlers are only installed from the main thread, and restored on exit.
    """

    repeat_window = 2.0

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requested: str | None = None
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        now = time.monotonic()
        if self.requested is None:
            self.requested, self._first = signal.Signals(signum).name, now
            return
        if now - self._first < self.repeat_window:
            return
        self._restore()
        raise KeyboardInterrupt

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self._restore()


def _identity(sp: Sparsifier) -> dict[str, Any]:
    spec = sp.spec
    ident = {"method": spec.method, "target": spec.target, "options": spec.options, "layers": spec.layers}
    recipe = recipe_for(sp.model)
    if recipe is not None:
        ident["model"] = {"source": recipe.source, "name": recipe.name, "kwargs": recipe.kwargs}
    return json.loads(json.dumps(ident))  # tuples -> lists, as stored in the header


def check_same_run(header: dict[str, Any], sp: Sparsifier, path: Path) -> None:
    """Refuse to resume from a checkpoint written for another model, method, target or options.

    Raises:
        CheckpointError: naming the first field that differs.
    """
    mine = _identity(sp)
    saved = dict(header)
    if isinstance(saved.get("model"), dict):
        saved["model"] = {k: saved["model"].get(k) for k in ("source", "name", "kwargs")}
    for key, value in mine.items():
        if key == "model" and not saved.get("model"):
            continue
        if saved.get(key) != value:
            theirs, ours = (json.dumps(v)[:120] for v in (saved.get(key), value))
            raise CheckpointError(
                f"{path} belongs to another run: its {key} is {theirs}, this run's is {ours}; use another output "
                "directory, or start over with overwrite=True (CLI: --force)"
            )


def run_settings(train_loader: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a resumed run must share with the saved one: training-set size, batch size, learning rates.

    ``None`` for what the loader does not tell (an iterable without ``dataset`` or ``batch_size``).
    """
    try:
        examples = len(train_loader.dataset)
    except (AttributeError, TypeError):
        examples = None
    batch_size = getattr(train_loader, "batch_size", None)
    lrs = {str(g.get("name", i)): float(g.get("initial_lr", g["lr"])) for i, g in enumerate(optimizer.param_groups)}
    return {"examples": examples, "batch_size": batch_size if isinstance(batch_size, int) else None, "lr": lrs}


def check_same_settings(saved: dict[str, Any] | None, mine: dict[str, Any], path: Path) -> None:
    """Refuse to resume with another training-set size, batch size or learning rate than the saved run's.

    Files written before settings were recorded (``saved`` is ``None``) are not checked.

    Raises:
        ConfigError: naming every setting that changed, with the saved and the given value.
    """
    if not isinstance(saved, dict):
        return
    changed = []
    for key, what in (("examples", "training examples (--limit)"), ("batch_size", "batch size (--batch-size)")):
        theirs, ours = saved.get(key), mine.get(key)
        if theirs is not None and ours is not None and theirs != ours:
            changed.append(f"{what} {ours} (saved run: {theirs})")
    saved_lr = saved.get("lr") if isinstance(saved.get("lr"), dict) else {}
    for name, ours in (mine.get("lr") or {}).items():
        theirs = saved_lr.get(name)
        if isinstance(theirs, (int, float)) and not math.isclose(theirs, ours, rel_tol=1e-9, abs_tol=0.0):
            flag = "--lr" if name == "weights" else f"--group-lr {name}=..."
            changed.append(f"learning rate of {name} {ours:g} (saved run: {theirs:g}; {flag})")
    if changed:
        raise ConfigError(
            f"resuming {path} would not continue the saved run exactly: {'; '.join(changed)}; resume with the "
            "saved values, or start a new run with overwrite=True (CLI: --force) or another output directory"
        )


def refuse_overwrite(path: Path) -> None:
    """Raise because ``path`` exists and the caller asked neither to resume nor to overwrite.

    Raises:
        ConfigError: always, describing the checkpoint found.
    """
    try:
        header, _ = read(path)
        loop = (header.get("extra") or {}).get("loop") or {}
        what = f"method {header.get('method')!r}, target {header.get('target')}"
        if loop:
            what += f", epoch {loop.get('epoch')}/{loop.get('epochs')}"
    except CheckpointError:
        what = "an unreadable file"
    raise ConfigError(
        f"{path.parent} already holds a checkpoint ({path.name}: {what}); continue it with resume=True "
        "(CLI: --resume) or start over with overwrite=True (CLI: --force)"
    )


def save_state(run: Run) -> None:
    """Write the run's checkpoint (rank 0 writes; every rank contributes its RNG states)."""
    if run.checkpoint is None:
        return
    state = run.state
    now, at_epoch_start = [rng.get_state(run.generators)], [run.epoch_rng]
    if run.ctx is not None:
        now, at_epoch_start = collectives.gather_json(now[0]), collectives.gather_json(run.epoch_rng)
    if run.main:
        loop = {
            "format": LOOP_FORMAT, "epoch": state.epoch, "batch": state.batch, "step": state.step,
            "epochs": state.epochs, "sums": list(run.sums), "rng": now,
            "epoch_rng": at_epoch_start if state.batch else None,
            "records": [asdict(r) for r in state.history.records], "stopped": state.history.stopped,
            "settings": run.settings,
        }  # fmt: skip
        steps = torch.tensor([state.history.losses, state.history.penalties], dtype=torch.float64)
        extra = {"loop": loop, "optimizer": run.optimizer.state_dict(), "losses": steps}
        save(run.sp, run.checkpoint, extra=extra)
    if run.ctx is not None:
        torch.distributed.barrier()
    state.history.checkpoint = run.checkpoint


def _load_optimizer(run: Run, saved: dict[str, Any], path: Path) -> None:
    saved = dict(saved)
    saved["state"] = {int(k): v for k, v in (saved.get("state") or {}).items()}
    try:
        run.optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: the optimizer state does not fit this optimizer ({exc})") from exc


def restore(run: Run, path: Path) -> None:
    """Load model, controller, optimizer, RNG states and position from ``path`` into ``run``, in place.

    Raises:
        CheckpointError: for a checkpoint of another run, one without loop state, or a damaged file.
    """
    header, tensors = read(path)
    check_same_run(header, run.sp, path)
    loop = (header.get("extra") or {}).get("loop")
    if not loop:
        raise CheckpointError(f"{path} was not written by fit() (no loop state); it cannot be resumed")
    check_same_settings(loop.get("settings"), run.settings, path)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        run.model.load_state_dict(part(MODEL), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match the model: {exc}") from exc
    load_controller(run.sp, header, part(CTRL), path)
    extra = join_tensors(header["extra"], part(EXTRA))
    _load_optimizer(run, extra["optimizer"], path)
    state = run.state
    state.epoch, state.batch, state.step = int(loop["epoch"]), int(loop["batch"]), int(loop["step"])
    state.history.records = [EpochRecord(**r) for r in loop["records"]]
    state.history.losses, state.history.penalties = (list(map(float, row)) for row in extra["losses"].tolist())
    state.history.stopped = None
    run.sums = [float(v) for v in loop["sums"]]
    rank, world = (run.ctx.rank, run.ctx.world_size) if run.ctx else (0, 1)
    if len(loop["rng"]) != world:
        warnings.warn(f"{path} was written by {len(loop['rng'])} process(es) and is resumed by {world}: the "
                      "continuation is not bit-identical to an uninterrupted run", stacklevel=3)  # fmt: skip
    run.resume_rng = loop["rng"][rank % len(loop["rng"])]
    run.epoch_rng = loop["epoch_rng"][rank % len(loop["epoch_rng"])] if loop.get("epoch_rng") else None
    rng.set_state(run.resume_rng, run.generators)

"""The lightweight training loop: ``fit(sp, train_loader, val_loader, epochs=...)``.

One loop for every method: it only calls the controller's public hooks (``param_groups()``, ``penalty()``,
``step()``, ``report()``), so adding a method never touches it. Progress goes to a :class:`Callback` (the CLI
renders it with rich; the core never prints). With ``out=`` it writes ``out/last.safetensors`` after every epoch
and when stopped early (Ctrl-C, SIGTERM, or a callback setting ``state.stop``): model, controller, optimizer,
every RNG state and the position in the epoch, so ``resume=True`` continues exactly where the run stopped:
same batches, same random draws, same losses.

Under ``torchrun`` (an initialised process group) the model is wrapped in ``DistributedDataParallel``, the
sparsity state is broadcast from rank 0 after every ``sp.step()`` (:mod:`sparsewrap.train.distributed`), metrics are
averaged over ranks, and only rank 0 writes checkpoints and calls the callback.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..controller import Sparsifier, controller_of
from ..errors import ConfigError, SparsewrapError, choices
from ..io.atomic import remove_orphans
from . import collectives, distributed, rng
from .history import Callback, EpochRecord, History, LoopState
from .state import CHECKPOINT_NAME, StopSignal, refuse_overwrite, restore, run_settings, save_state

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")


class TrainingError(SparsewrapError, RuntimeError):
    """Training cannot go on (the loss is not finite)."""


@dataclass
class Evaluation:
    """Mean loss and top-1 accuracy (``None`` when the outputs are not class scores) over ``examples``."""

    loss: float
    accuracy: float | None
    examples: int


def _split_batch(batch: Any, device: torch.device) -> tuple[Any, Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise ConfigError(f"a batch must be an (inputs, targets) pair; the loader gave {type(batch).__name__}")
    x, y = batch
    move = (lambda t: t.to(device, non_blocking=True)) if device.type != "cpu" else (lambda t: t)
    return (move(x) if isinstance(x, Tensor) else x), move(y)


def _correct(out: Any, y: Tensor) -> tuple[int, int] | None:
    """(correct, count) for class scores ``(N, C)`` against integer labels ``(N,)``, else None."""
    if isinstance(out, Tensor) and out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
        return int((out.argmax(1) == y).sum()), int(y.numel())
    return None


def evaluate(model: nn.Module, loader: Iterable, loss_fn: Callable[[Any, Tensor], Tensor] | None = None) -> Evaluation:
    """Mean loss and accuracy of ``model`` in eval mode (summed over ranks in a distributed run).

    ``loss_fn`` (default cross-entropy) must average over the batch, as ``torch.nn.functional`` losses do.

    Raises:
        ConfigError: if a batch is not an ``(inputs, targets)`` pair.
    """
    loss_fn = loss_fn or F.cross_entropy
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, counted, n = 0.0, 0, 0, 0
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = _split_batch(batch, device)
                out = model(x)
                size = int(y.shape[0])
                loss_sum += float(loss_fn(out, y)) * size
                n += size
                hits = _correct(out, y)
                if hits is not None:
                    correct, counted = correct + hits[0], counted + hits[1]
    finally:
        model.train(was_training)
    if distributed.current() is not None:
        loss_sum, correct, counted, n = collectives.all_reduce_sum([loss_sum, correct, counted, n])
    return Evaluation(loss_sum / max(n, 1), correct / counted if counted else None, int(n))


@dataclass
class Run:
    """Everything one :func:`fit` call works with (internal)."""

    model: nn.Module
    net: nn.Module  # the model, or its DDP wrapper
    sp: Sparsifier | None
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Any, Tensor], Tensor]
    device: torch.device
    ctx: distributed.DistContext | None
    state: LoopState
    lr_schedule: str
    clip_grad_norm: float | None
    checkpoint: Path | None
    callback: Callback
    generators: list[torch.Generator] = field(default_factory=list)  # the train loader's own generators
    sums: list[float] = field(default_factory=lambda: [0.0] * 4)  # epoch's loss, penalty, correct, counted
    epoch_rng: Any = None  # RNG state when this epoch's data iterator was created
    resume_rng: Any = None  # RNG state to restore after skipping the batches already done
    settings: dict[str, Any] = field(default_factory=dict)  # examples, batch size, lrs: a resume must match them
    check_every: int = distributed.CHECK_EVERY  # steps between two checks that the ranks agree (DDP only)

    @property
    def main(self) -> bool:
        return self.ctx is None or self.ctx.is_main


def _make_optimizer(model: nn.Module, sp: Sparsifier | None, optimizer: str | torch.optim.Optimizer, lr: float,
                    weight_decay: float, momentum: float,
                    groups: dict[str, dict] | None) -> torch.optim.Optimizer:  # fmt: skip
    if isinstance(optimizer, torch.optim.Optimizer):
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise ConfigError(
                f"the optimizer does not hold {len(missing)} trainable parameter(s) of the model (e.g. {missing[0]!r}, "
                "often a method's gates); build it after sparsify() from sp.param_groups(lr=...)"
            )
        return optimizer
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer={optimizer!r} is unknown; valid: {choices(OPTIMIZERS)} or a torch.optim object")
    if sp is not None:
        params = sp.param_groups(lr=lr, weight_decay=weight_decay, **(groups or {}))
    else:
        params = [{"name": "weights", "params": [p for p in model.parameters() if p.requires_grad],
                   "weight_decay": weight_decay}]  # fmt: skip
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return (torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam)(params, lr=lr)


def _set_lr(run: Run) -> float:
    """Apply the learning-rate schedule to the weights group and to method groups marked ``"scheduled"`` (STR's
    thresholds, trained like weights in the paper); other method groups (gates) keep their own rate."""
    state, lr = run.state, 0.0
    total = state.epochs * (state.batches or 0)
    for g in run.optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
        weights = g.get("name", "weights") == "weights"
        if not (weights or g.get("scheduled")):
            continue
        if run.lr_schedule == "cosine" and total:
            g["lr"] = g["initial_lr"] * 0.5 * (1.0 + math.cos(math.pi * min(state.step, total) / total))
        if weights:
            lr = g["lr"]
    return lr


def _train_step(run: Run, batch: Any) -> tuple[float, float]:
    x, y = _split_batch(batch, run.device)
    out = run.net(x)
    task = run.loss_fn(out, y)
    penalty = run.sp.penalty() if run.sp is not None else task.new_zeros(())
    loss = task + penalty
    if not torch.isfinite(loss.detach()):
        raise TrainingError(
            f"the loss became {float(loss.detach())} at epoch {run.state.epoch + 1}, step {run.state.step + 1}; "
            "lower the learning rate (lr=...) or clip gradients (clip_grad_norm=...)"
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.clip_grad_norm:
        nn.utils.clip_grad_norm_(run.model.parameters(), run.clip_grad_norm)
    _set_lr(run)
    run.optimizer.step()
    if run.sp is not None:
        run.sp.step()
        distributed.sync_sparsity(run.sp, check_every=run.check_every)
    if run.ctx is not None:
        distributed.broadcast_buffers(run.model)  # BatchNorm statistics: distributed.wrap leaves them to us
    hits = _correct(out, y)
    value, pen, sums = float(loss.detach()), float(penalty.detach()), run.sums
    sums[0] += value
    sums[1] += pen
    if hits is not None:
        sums[2], sums[3] = sums[2] + hits[0], sums[3] + hits[1]
    return value, pen


def _generators(loader: Iterable) -> list[torch.Generator]:
    """The loader's own generators (shuffling without the global RNG), so that they are saved too."""
    found = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    out: list[torch.Generator] = []
    for g in found:
        if isinstance(g, torch.Generator) and all(g is not h for h in out):
            out.append(g)
    return out


def _batches(run: Run, loader: Iterable) -> Iterable:
    """The epoch's batches, skipping those a resumed run already did (same order: same RNG at iterator start)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(run.state.epoch)
    if run.state.batch == 0 or run.epoch_rng is None:
        run.epoch_rng = rng.get_state(run.generators)
    else:
        rng.set_state(run.epoch_rng, run.generators)
    it = iter(loader)
    if run.state.batch:
        for _ in range(run.state.batch):
            next(it, None)
        rng.set_state(run.resume_rng, run.generators)
    return it


def _stop_wanted(run: Run, stop: StopSignal) -> bool:
    """Whether to stop now; under torchrun every rank takes the same decision at the same step."""
    wanted = stop.requested is not None or run.state.stop
    if run.ctx is not None:
        wanted = collectives.all_reduce_sum([float(wanted)])[0] > 0
    if wanted:
        run.state.history.stopped = stop.requested or "callback"
    return wanted


def _train_epoch(run: Run, loader: Iterable, stop: StopSignal) -> bool:
    """Train until the loader is exhausted (False) or a stop is requested (True, after a finished step)."""
    state = run.state
    run.net.train()
    for batch in _batches(run, loader):
        loss, penalty = _train_step(run, batch)
        state.batch += 1
        state.step += 1
        if run.ctx is not None:
            loss, penalty = (v / run.ctx.world_size for v in collectives.all_reduce_sum([loss, penalty]))
        state.loss, state.penalty = loss, penalty
        state.history.losses.append(loss)
        state.history.penalties.append(penalty)
        if run.main:
            run.callback.on_step_end(state)
        if state.batch != state.batches and _stop_wanted(run, stop):  # on the last batch: finish the epoch first
            return True
    return False


def _end_epoch(run: Run, val_loader: Iterable | None, started: float) -> EpochRecord:
    state, sp, sums = run.state, run.sp, run.sums
    if run.ctx is not None:
        sums = collectives.all_reduce_sum(sums)
    steps = max(state.batch, 1) * (run.ctx.world_size if run.ctx else 1)
    val = evaluate(run.model, val_loader, run.loss_fn) if val_loader is not None else None
    report = sp.report() if sp is not None else None
    return EpochRecord(
        epoch=state.epoch + 1, step=state.step, train_loss=sums[0] / steps, penalty=sums[1] / steps,
        train_accuracy=sums[2] / sums[3] if sums[3] else None,
        val_loss=val.loss if val else None, val_accuracy=val.accuracy if val else None,
        requested=report.requested if report else None, achieved=report.achieved if report else None,
        exported=report.exported if report else None, method=dict(report.extras) if report else {},
        lr=_set_lr(run), seconds=time.perf_counter() - started,
    )  # fmt: skip


def _prepare(model: nn.Module, device: str | torch.device | None, ctx: distributed.DistContext | None) -> torch.device:
    if ctx is not None:
        dev = ctx.device
    elif device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={str(device)!r} but CUDA is not available; use device='cpu'")
    else:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    model.to(dev)
    return dev


def fit(obj: nn.Module | Sparsifier, train_loader: Iterable, val_loader: Iterable | None = None, *,
        epochs: int = 1, optimizer: str | torch.optim.Optimizer = "adam", lr: float = 1e-3,
        weight_decay: float = 0.0, momentum: float = 0.9, groups: dict[str, dict] | None = None,
        lr_schedule: str = "constant", loss_fn: Callable[[Any, Tensor], Tensor] | None = None,
        device: str | torch.device | None = None, out: str | Path | None = None, resume: bool = False,
        overwrite: bool = False, seed: int | None = None, clip_grad_norm: float | None = None,
        callback: Callback | None = None, handle_signals: bool = True,
        ddp_check_every: int = distributed.CHECK_EVERY) -> History:  # fmt: skip
    """Train a sparsified model (or a plain one), evaluating and checkpointing every epoch.

    Each step: ``loss = loss_fn(model(x), y) + sp.penalty()``, backward, optimizer step, ``sp.step()``. Before
    the first, ``sp.start(total_steps=epochs * len(train_loader), optimizer=...)`` tells the method the run's
    length (unknown for a loader without ``len()``) and the optimizer.

    Args:
        obj: the :class:`Sparsifier` (or its model); a plain ``nn.Module`` trains densely (no checkpoints).
        train_loader: yields ``(inputs, targets)``; use a ``DistributedSampler`` under ``torchrun``.
        val_loader: evaluated (eval mode) after every epoch.
        epochs: total number of epochs (a resumed run continues up to it).
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"`` (momentum ``momentum``) built on ``sp.param_groups``, or
            an optimizer you built (it must hold every trainable parameter, the method's included).
        lr: learning rate of the weights (and of method groups that do not fix their own).
        weight_decay: weight decay of the weights group (method parameters get the method's default).
        momentum: SGD momentum.
        groups: per-group overrides for ``sp.param_groups``, e.g. ``{"gates": {"lr": 0.1}}``.
        lr_schedule: ``"constant"`` or ``"cosine"`` (per step; the weights group and the method groups marked
            ``"scheduled"``, e.g. STR's thresholds).
        loss_fn: ``loss_fn(outputs, targets)`` averaged over the batch; default cross-entropy.
        device: move the model there first (ignored under ``torchrun``: each rank uses its own device).
        out: directory for ``last.safetensors``, written atomically after every epoch and when stopped.
        resume: continue the run saved in ``out`` (a missing checkpoint starts afresh, with a warning); the
            training set's size, the batch size and the learning rates must be the saved run's.
        overwrite: allow starting a new run over a directory that holds another checkpoint.
        seed: seed every generator first (rank ``r`` uses ``seed + r``); a resumed run restores its RNGs.
        clip_grad_norm: clip the gradients' global norm to this value.
        callback: progress hooks (rank 0 only).
        handle_signals: on SIGINT/SIGTERM finish the current step, save, and return (a second Ctrl-C aborts).
        ddp_check_every: under ``torchrun``, verify every this many steps that all ranks hold the same sparsity
            state (``distributed.check_identical``, one all-reduce of six integers); 0 turns it off.

    Returns:
        The :class:`History`; ``history.stopped`` says whether the run stopped early.

    Raises:
        ConfigError: on a bad argument, or ``out`` holding a checkpoint without ``resume``/``overwrite``.
        CheckpointError: when resuming from a checkpoint of a different run or a damaged file.
        TrainingError: if the loss becomes NaN or infinite.
        DivergenceError: if the ranks of a distributed run are found to hold different sparsity state.
    """
    model, sp = controller_of(obj)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r} must be a positive integer")
    if lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule={lr_schedule!r} is unknown; valid: {choices(LR_SCHEDULES)}")
    if out is not None and sp is None:
        raise ConfigError("checkpoints (out=) need a sparsified model; sparsify it first or leave out=None")
    ctx = distributed.current()
    dev = _prepare(model, device, ctx)
    if seed is not None:
        rng.seed_all(seed + (ctx.rank if ctx else 0))
    opt = _make_optimizer(model, sp, optimizer, lr, weight_decay, momentum, groups)
    batches = len(train_loader) if hasattr(train_loader, "__len__") else None
    history = History()
    state = LoopState(0, epochs, 0, batches, 0, math.nan, sp, history)
    ckpt = Path(out) / CHECKPOINT_NAME if out is not None else None
    net = distributed.wrap(model, ctx) if ctx is not None else model
    run = Run(model, net, sp, opt, loss_fn or F.cross_entropy, dev, ctx, state, lr_schedule, clip_grad_norm, ckpt,
               callback or Callback(), _generators(train_loader), settings=run_settings(train_loader, opt),
               check_every=distributed.check_every_value(ddp_check_every))  # fmt: skip
    if ckpt is not None and ckpt.exists():
        if resume:
            restore(run, ckpt)
            history.resumed_at = (state.epoch, state.batch)
        elif not overwrite:
            refuse_overwrite(ckpt)
    elif resume:
        warnings.warn(f"resume=True but {ckpt or 'out=None'} holds no checkpoint; starting a new run", stacklevel=2)
    if ckpt is not None and run.main:
        remove_orphans(ckpt)  # temporary files of this run's interrupted writes
    if sp is not None:
        sp.start(total_steps=epochs * batches if batches else None, optimizer=opt)
        distributed.sync_sparsity(sp, check_every=ddp_check_every, full=True)
    _loop(run, train_loader, val_loader, handle_signals)
    return history


def _loop(run: Run, train_loader: Iterable, val_loader: Iterable | None, handle_signals: bool) -> None:
    state = run.state
    with StopSignal(handle_signals) as stop:
        if run.main:
            run.callback.on_train_begin(state)
        while state.epoch < state.epochs:
            if state.batch == 0 and _stop_wanted(run, stop):
                break  # the last checkpoint is already this position
            started = time.perf_counter()
            if _train_epoch(run, train_loader, stop):
                save_state(run)
                break
            record = _end_epoch(run, val_loader, started)
            state.history.records.append(record)
            state.epoch, state.batch, run.sums = state.epoch + 1, 0, [0.0] * 4
            save_state(run)
            if run.main:
                run.callback.on_epoch_end(state, record)
    state.history.position = (state.epoch, state.batch)
    if run.main:
        run.callback.on_train_end(state)

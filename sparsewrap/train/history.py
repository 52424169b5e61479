"""What a :func:`sparsewrap.fit` run records (per-epoch figures, per-step losses) and the hooks it calls.

Plain dataclasses: the loop fills them, the CLI renders them, checkpoints store them as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..controller import Sparsifier


@dataclass
class EpochRecord:
    """What one epoch achieved. Sparsity figures are ``None`` when training a plain (unsparsified) model.

    Attributes:
        epoch: 1-based epoch number.
        step: optimizer steps taken so far.
        train_loss: mean training loss (task + penalty) over the epoch's steps.
        penalty: mean penalty term over the epoch's steps.
        train_accuracy: accuracy on the training batches (train mode, as seen during the epoch).
        val_loss: validation loss (eval mode), if a validation loader was given.
        val_accuracy: validation accuracy.
        requested: requested overall sparsity.
        achieved: current sparsity of the targeted weights (deterministic form).
        exported: sparsity the exported model would have.
        method: the method's own figures (``sp.method.summary()``: multipliers, expected density, ...).
        lr: learning rate of the weights at the end of the epoch.
        seconds: wall time of the epoch (training and evaluation).
    """

    epoch: int
    step: int
    train_loss: float
    penalty: float
    train_accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    requested: float | None
    achieved: float | None
    exported: float | None
    method: dict[str, float]
    lr: float
    seconds: float

    @property
    def task_loss(self) -> float:
        """Mean task loss over the epoch's steps (``train_loss`` without the penalty)."""
        return self.train_loss - self.penalty


@dataclass
class History:
    """The record of a :func:`fit` run (kept across resumes).

    Attributes:
        records: one :class:`EpochRecord` per finished epoch.
        losses: the loss (task + penalty, averaged over ranks) of every optimizer step.
        penalties: the penalty part of each step's loss (the task loss is ``losses[i] - penalties[i]``).
        stopped: why the run stopped before its last epoch (``"SIGINT"``, ``"SIGTERM"``, ``"callback"``), or None.
        checkpoint: the checkpoint written last, if any.
        resumed_at: ``(epoch, batch)`` where this call resumed a previous run, if it did.
        position: ``(epoch, batch)`` where the run ended (0-based epoch; ``(epochs, 0)`` when complete).
    """

    records: list[EpochRecord] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    penalties: list[float] = field(default_factory=list)
    stopped: str | None = None
    checkpoint: Path | None = None
    resumed_at: tuple[int, int] | None = None
    position: tuple[int, int] = (0, 0)

    @property
    def last(self) -> EpochRecord | None:
        return self.records[-1] if self.records else None

    def to_dict(self) -> dict[str, Any]:
        return {"records": [asdict(r) for r in self.records], "losses": list(self.losses),
                "penalties": list(self.penalties), "stopped": self.stopped,
                "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
                "resumed_at": self.resumed_at, "position": self.position}  # fmt: skip


@dataclass
class LoopState:
    """The live position of a run, handed to callbacks.

    Attributes:
        epoch: 0-based epoch in progress.
        epochs: total epochs.
        batch: batches done in this epoch.
        batches: batches per epoch (``None`` if the loader has no length).
        step: optimizer steps done in the whole run.
        loss: loss of the last step, task + penalty (averaged over ranks).
        sparsifier: the controller (``None`` for a plain model); callbacks may read ``sparsity()`` from it.
        history: the run's history so far.
        stop: set it to True in a callback to save a checkpoint and stop after the current step.
        penalty: the penalty part of ``loss`` (the task loss is ``loss - penalty``).
    """

    epoch: int
    epochs: int
    batch: int
    batches: int | None
    step: int
    loss: float
    sparsifier: Sparsifier | None
    history: History
    stop: bool = False
    penalty: float = 0.0


class Callback:
    """Progress hooks of :func:`fit` (all no-ops here); called on rank 0 only."""

    def on_train_begin(self, state: LoopState) -> None:
        """Before the first step (after a resume has been restored)."""

    def on_step_end(self, state: LoopState) -> None:
        """After each optimizer step and ``sp.step()``."""

    def on_epoch_end(self, state: LoopState, record: EpochRecord) -> None:
        """After each epoch's evaluation and checkpoint."""

    def on_train_end(self, state: LoopState) -> None:
        """After the last epoch, or after the checkpoint written when stopped early."""

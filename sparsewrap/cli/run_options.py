"""The command-line options that ``train`` and ``compare`` share: the same name, type, help and choices.

Each is an ``Annotated`` type that a command gives its own default (``lr: run.LrOption = 1e-3``, with this
module imported as ``run``), so that the two commands cannot drift apart in how they name or explain a setting.
"""

from __future__ import annotations

import enum
from typing import Annotated

import typer


class Optimizer(str, enum.Enum):  # noqa: UP042  (enum.StrEnum needs Python 3.11)
    """``--optimizer`` choices (``sparsewrap.train.loop.OPTIMIZERS``, kept here so that no torch import is needed)."""

    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


class LRSchedule(str, enum.Enum):  # noqa: UP042
    """``--lr-schedule`` choices (``sparsewrap.train.loop.LR_SCHEDULES``)."""

    constant = "constant"
    cosine = "cosine"


DataOption = Annotated[str, typer.Option(help="mnist, fashion-mnist (make data) or imagefolder:PATH.")]
DeviceOption = Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available).")]
OptimizerOption = Annotated[Optimizer, typer.Option(help="Optimizer of the weights and method groups.")]
LrOption = Annotated[float, typer.Option(help="Learning rate of the weights.")]
WeightDecayOption = Annotated[float, typer.Option(help="Weight decay of the weights.")]
LRScheduleOption = Annotated[LRSchedule, typer.Option(help="Schedule of the weights' rate.")]
ModelKwOption = Annotated[list[str] | None, typer.Option(help="Model keyword KEY=VALUE.")]
LimitOption = Annotated[int | None, typer.Option(help="Use only this many training examples.")]
ValLimitOption = Annotated[int | None, typer.Option(help="Use only this many validation examples.")]
ImageSizeOption = Annotated[int, typer.Option(help="Crop size for imagefolder data.")]

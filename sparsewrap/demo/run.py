"""The built-in demo (``sparsewrap demo``, ``make demo``): LeNet-5 on MNIST, L0 channel gates to 90 %, purge.

1. Train a dense LeNet-5-Caffe on the built-in MNIST (``dense_epochs``): the "before" model.
2. Attach constrained-L0 hard-concrete gates to its channels with a 90 % sparsity target and train on
   (``epochs``) with :func:`sparsewrap.fit`, checkpointing into ``out``. The gates get a large learning rate
   and the multiplier a fast dual ascent, so that the constraint is met within a few epochs (the paper trains
   200 epochs at 7e-4); the export then projects the gates exactly onto the target.
3. Export with ``purge=True`` (zeroed channels physically removed) and measure both models the same way: test
   accuracy, parameters, MACs and CPU latency; write a PNG of per-layer sparsity and the training curves
   (:mod:`sparsewrap.train.figure`, drawn with matplotlib; ``plot=False`` leaves it out).

The core returns figures (:class:`DemoResult`); the CLI prints the table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..analysis.macs import total_macs
from ..bake import export
from ..controller import sparsify
from ..io.plain import save_plain
from ..io.recipe import ModelRecipe
from ..purge.compare import latency
from ..report import Report
from ..train.compare_plot import require_matplotlib
from ..train.figure import write_training_figure
from ..train.history import Callback, History
from ..train.loop import evaluate, fit
from ..train.rng import seed_all
from .data import build_data, make_loaders

MODEL = "sparsewrap.demo.models:lenet5"
METHOD_NAMES = {"l0": "constrained L0 gates", "magnitude": "magnitude (L1) pruning"}
INPUT_SHAPE = (1, 28, 28)


def method_options(method: str, steps_per_epoch: int, epochs: int) -> dict[str, Any]:
    """Options for channel sparsity with ``method`` within a few epochs."""
    if method == "l0":
        return {"granularity": "channel", "gate_lr": 0.2, "dual_lr": 0.2}
    if method == "magnitude":  # cubic schedule reaching the target with one epoch left to fine-tune
        every = max(1, steps_per_epoch // 10)
        end = max(every, (max(epochs - 1, 1) * steps_per_epoch) // every * every)
        return {"granularity": "channel", "schedule": "cubic", "start": 0, "end": end, "every": every}
    return {"granularity": "channel"}


@dataclass
class DemoConfig:
    """Settings of the demo (the defaults fit in about three minutes on two CPU cores)."""

    method: str = "l0"
    target: float = 0.9
    dense_epochs: int = 1
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    train_limit: int | None = 20_000
    test_limit: int | None = None
    seed: int = 0
    out: Path = Path("runs/demo")
    latency_batch: int = 256
    options: dict[str, Any] = field(default_factory=dict)
    plot: bool = True


@dataclass
class ModelFigures:
    """How one model measures up."""

    accuracy: float
    params: int
    nonzero: int
    macs: int
    latency_ms: float


@dataclass
class DemoResult:
    """Everything the demo measured and wrote."""

    config: DemoConfig
    train_examples: int
    options: dict[str, Any]
    purged: bool
    before: ModelFigures
    after: ModelFigures
    history: History
    report: Report
    checkpoint: Path
    exported: Path
    figure: Path | None
    seconds: float


def latency_ms(model: nn.Module, batch: int, repeats: int = 15) -> float:
    """Median wall time (ms) of one eval-mode forward of a ``batch`` of MNIST-sized inputs (3 warm-up runs)."""
    return 1000 * latency(model, INPUT_SHAPE, batch, repeats, warmup=3)


def measure(model: nn.Module, test_loader: Any, batch: int) -> ModelFigures:
    """Accuracy on ``test_loader``, parameter and non-zero counts, MACs per example and latency."""
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    accuracy = evaluate(model, test_loader).accuracy or 0.0
    return ModelFigures(accuracy, params, nonzero, total_macs(model, INPUT_SHAPE), latency_ms(model, batch))


def _check(history: History) -> None:
    if history.stopped:  # Ctrl-C or SIGTERM: fit has saved what it could; stop the demo as well
        raise KeyboardInterrupt(history.stopped)


def _export(sp: Any) -> tuple[nn.Module, bool]:
    try:
        return export(sp, purge=True), True
    except NotImplementedError:  # purge not available in this version: the dense model with zeros
        return export(sp), False


def run_demo(config: DemoConfig | None = None, callback: Callback | None = None,
             on_phase: Callable[[str], None] | None = None) -> DemoResult:  # fmt: skip
    """Run the demo end to end.

    Args:
        config: settings (defaults: :class:`DemoConfig`).
        callback: progress hooks for both training phases.
        on_phase: called with a short description when a phase starts.

    Raises:
        KeyboardInterrupt: after a clean stop of training on Ctrl-C / SIGTERM (the checkpoint is saved).
        MissingDataError: without the MNIST data package (the message gives the install command).
        UnknownNameError: if ``config.method`` is not registered.
        ConfigError: with ``config.plot`` and no matplotlib installed (before any training).
    """
    config = config or DemoConfig()
    if config.plot:
        require_matplotlib("demo.png", "--no-plot, DemoConfig(plot=False)")
    phase = on_phase or (lambda _text: None)
    started = time.perf_counter()
    seed_all(config.seed)
    data = build_data("mnist", config.train_limit, config.test_limit)
    train, test = make_loaders(data, config.batch_size)
    model = ModelRecipe("factory", MODEL, {"num_classes": 10}, list(INPUT_SHAPE)).build()

    phase(f"dense LeNet-5: {config.dense_epochs} epoch(s) on {len(data.train):,} MNIST images")
    _check(fit(model, train, epochs=config.dense_epochs, lr=config.lr, seed=config.seed, callback=callback))
    before = measure(model, test, config.latency_batch)

    options = {**method_options(config.method, len(train), config.epochs), **config.options}
    sp = sparsify(model, config.method, target=config.target, **options)
    phase(f"{METHOD_NAMES.get(config.method, config.method)} to {config.target:.0%} channel sparsity: "
          f"{config.epochs} epoch(s)")  # fmt: skip
    history = fit(sp, train, test, epochs=config.epochs, lr=config.lr, out=config.out, overwrite=True,
                  seed=config.seed + 1, callback=callback)  # fmt: skip
    _check(history)

    phase("export (with purge where available) and measure both models")
    plain, purged = _export(sp)
    after = measure(plain, test, config.latency_batch)
    exported = save_plain(plain, config.out / "lenet5_sparse.safetensors")
    report, name = sp.report(), METHOD_NAMES.get(config.method, config.method)
    title = f"LeNet-5 on MNIST: {name}, {config.target:.0%} channel sparsity" + (", purged" if purged else "")
    figure = None
    if config.plot:
        figure = write_training_figure(config.out / "demo.png", report, history, title, before.accuracy)
    return DemoResult(config, len(data.train), options, purged, before, after, history, report,
                      history.checkpoint or config.out, exported, figure, time.perf_counter() - started)  # fmt: skip

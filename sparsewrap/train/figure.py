"""The training figure that ``sparsewrap demo`` and ``sparsewrap train`` write: what a run did, in one PNG.

Panels: the exported sparsity of each layer against the requested target; the training (task) loss per step;
the validation accuracy and the sparsity per epoch; and, for dynamic sparse training runs (SET, RigL, DSR,
DeepR: methods whose report has ``updates``), each layer's density over training with the connections moved per
update. Other methods have no per-layer history to draw (their per-epoch records hold only the overall
sparsity, already in the third panel), so their figure has three panels; ``static`` never moves a connection
and has three as well.

Drawn with matplotlib, the optional extra ``sparsewrap[plot]``, imported only when a figure is drawn (through
:func:`sparsewrap.train.compare_plot.require_matplotlib`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io.atomic import write_atomic
from ..report import Report
from .compare_plot import require_matplotlib
from .history import History

FIGURE_NAME = "figure.png"  # what ``sparsewrap train`` writes in its ``--out`` directory
DPI = 100
SIZE = (15.0, 5.0)  # inches: three panels in a row (1500 × 500 pixels)
SIZE_DST = (14.0, 10.0)  # four panels, two rows (1400 × 1000 pixels)
TITLES = {
    "layers": "sparsity per layer (exported)",
    "loss": "training loss (task) per step",
    "epochs": "per epoch",
    "density": "per-layer density over training",
}
LEGEND_LAYERS = 12  # more layers than this: a colour bar of the layer order instead of a legend


def smooth(values: Sequence[float], window: int) -> list[float]:
    """The running mean of the last ``window`` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def short(name: str, width: int = 18) -> str:
    """A layer name cut to its last ``width`` characters (the distinguishing end)."""
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def densities(report: Report) -> tuple[list[int], list[list[float]]]:
    """The steps of the recorded updates and, per layer, its density (active / size) after each of them."""
    steps = [u.step for u in report.updates]
    return steps, [[u.active[i] / la.params for u in report.updates] for i, la in enumerate(report.layers)]


def draw_layers(ax: Any, report: Report) -> None:
    """Bars of each layer's exported sparsity, the requested overall target as a dashed line."""
    names = [la.name for la in report.layers]
    values = [la.exported_sparsity for la in report.layers]
    ax.bar(range(len(values)), values, color="C0", label="exported sparsity")
    if len(values) <= 12:  # each value inside the top of its bar (above a short bar), clear of the target line
        for i, v in enumerate(values):
            inside = v > 0.15
            ax.annotate(f"{v:.3f}", (i, v), ha="center", va="top" if inside else "bottom", fontsize="small",
                        color="white" if inside else "black", xytext=(0, -3 if inside else 2),
                        textcoords="offset points")  # fmt: skip
    if report.requested is not None:
        ax.axhline(report.requested, color="C1", linestyle="--", label=f"requested overall {report.requested:g}")
    every = max(1, -(-len(names) // 30))  # at most 30 names under the bars: every k-th layer beyond that
    ticks = range(0, len(names), every)
    ax.set_xticks(ticks, [short(names[i]) for i in ticks], rotation=45 if len(names) > 4 else 0,
                  ha="right" if len(names) > 4 else "center", fontsize="small")  # fmt: skip
    ax.set_ylim(0, 1.25)  # room above the bars for the legend
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("sparsity")
    ax.set_title(TITLES["layers"])
    ax.legend(fontsize="small", loc="upper center", ncol=2)


def draw_loss(ax: Any, history: History) -> None:
    """The task loss of every step (thin) and its running mean."""
    losses = [loss - pen for loss, pen in zip(history.losses, history.penalties)]
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, color="grey", linewidth=0.6, alpha=0.6, label="per step")
    window = max(1, len(losses) // 50)
    if window > 1:
        ax.plot(steps, smooth(losses, window), color="C0", linewidth=1.8, label=f"mean of {window} steps")
    finite = [v for v in losses if math.isfinite(v)]
    if finite:
        ax.set_ylim(0, max(finite) * 1.05 or 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(TITLES["loss"])
    if losses:
        ax.legend(fontsize="small", loc="best")


def draw_epochs(ax: Any, history: History, before: float | None) -> None:
    """Validation accuracy and sparsity after each epoch (epoch 0: the model before sparsifying, if given)."""
    acc = [(r.epoch, r.val_accuracy) for r in history.records if r.val_accuracy is not None]
    spars = [(r.epoch, r.achieved) for r in history.records if r.achieved is not None]
    if before is not None:
        acc, spars = [(0, before), *acc], [(0, 0.0), *spars]
    if acc:
        ax.plot(*zip(*acc), color="C2", marker="o", label="validation accuracy")
    if spars:
        ax.plot(*zip(*spars), color="C0", marker="s", label="sparsity (learned masks/gates)")
    ax.set_ylim(0, 1.05)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction")
    ax.set_title(TITLES["epochs"])
    if acc or spars:
        ax.legend(fontsize="small", loc="lower right")


def draw_density(fig: Any, ax: Any, report: Report) -> None:
    """Each layer's density after every recorded update (left axis), the connections moved (right axis).

    Each layer's line carries the layer's name as its ``gid``. Up to ``LEGEND_LAYERS`` layers are named in the
    legend; beyond, a colour bar gives the layer order (dark: first layers).
    """
    import matplotlib

    steps, per_layer = densities(report)
    n, viridis = len(per_layer), matplotlib.colormaps["viridis"]
    colors, named = [viridis(0.9 * i / max(n - 1, 1)) for i in range(n)], n <= LEGEND_LAYERS
    for la, values, color in zip(report.layers, per_layer, colors):
        line = ax.plot(steps, values, color=color, linewidth=1.5, label=short(la.name, 24) if named else "_layer")[0]
        line.set_gid(la.name)
    if report.requested is not None:
        ax.axhline(1 - report.requested, color="black", linestyle="--", linewidth=1,
                   label=f"overall density {1 - report.requested:g}")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("density (active / size)")
    ax.set_title(TITLES["density"])
    moved = ax.twinx()
    moved.plot(steps, [u.moved for u in report.updates], color="C3", marker=".", linestyle=":", linewidth=1,
               label="connections moved (right axis)")  # fmt: skip
    moved.set_ylabel("connections moved per update", color="C3")
    moved.set_ylim(bottom=0)
    if not named:
        norm, cmap = matplotlib.colors.Normalize(-0.5, n - 0.5), matplotlib.colors.ListedColormap(colors)
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, location="right", pad=0.02)
        bar.set_label("layer (execution order)")
        bar.locator = matplotlib.ticker.MaxNLocator(integer=True)
        bar.update_ticks()
    lines, labels = ax.get_legend_handles_labels()
    extra, extra_labels = moved.get_legend_handles_labels()
    ax.legend(lines + extra, labels + extra_labels, fontsize="small", ncol=3, loc="upper center",
              bbox_to_anchor=(0.5, -0.14))  # fmt: skip


def training_figure(report: Report, history: History, title: str = "", before: float | None = None) -> Any:
    """The figure of a finished (or stopped) run, not yet saved: a ``matplotlib.figure.Figure``.

    Args:
        report: ``sp.report()`` at the end of the run (per-layer sparsity, the DST budget history).
        history: what :func:`sparsewrap.fit` returned (per-step losses, per-epoch records).
        title: a caption at the top.
        before: the validation accuracy before sparsifying (drawn at epoch 0), if known.

    Raises:
        ConfigError: when matplotlib is not installed, naming the install command.
    """
    plt = require_matplotlib("the training figure", "--no-plot")
    if report.updates:
        fig, grid = plt.subplots(2, 2, figsize=SIZE_DST, dpi=DPI, constrained_layout=True)
        axes = list(grid.flat)
    else:
        fig, axes = plt.subplots(1, 3, figsize=SIZE, dpi=DPI, constrained_layout=True)
    draw_layers(axes[0], report)
    draw_loss(axes[1], history)
    draw_epochs(axes[2], history, before)
    if report.updates:
        draw_density(fig, axes[3], report)
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def write_training_figure(path: str | os.PathLike, report: Report, history: History, title: str = "",
                          before: float | None = None) -> Path:  # fmt: skip
    """Draw :func:`training_figure` into ``path`` (PNG, written atomically) and return the path.

    Raises:
        ConfigError: when matplotlib is not installed, naming the install command.
    """
    plt = require_matplotlib(Path(path).name, "--no-plot")
    fig = training_figure(report, history, title, before)
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    finally:
        plt.close(fig)

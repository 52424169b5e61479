"""``compare.png``: accuracy against sparsity (one line per method, the dense baseline as a horizontal line) and
accuracy against MACs after purge. Drawn with matplotlib, the optional extra ``sparsewrap[plot]``, imported
only here and only when a figure is drawn.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..io.atomic import write_atomic

if TYPE_CHECKING:
    from .compare import CompareRow

INSTALL_HINT = "pip install 'sparsewrap[plot]'"


def require_matplotlib(figure: str = "compare.png", leave_out: str = "--no-plot, plot=False") -> Any:
    """The ``matplotlib.pyplot`` module on the non-interactive Agg backend.

    Args:
        figure: the file being drawn, named in the error.
        leave_out: how to do without the figure, named in the error.

    Raises:
        ConfigError: when matplotlib is not installed, naming the install command.
    """
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise ConfigError(
            f"drawing {figure} needs matplotlib, which is not installed: {INSTALL_HINT} (or leave the plot "
            f"out: {leave_out})"
        ) from None
    matplotlib.use("Agg", force=True)
    return importlib.import_module("matplotlib.pyplot")


def _score(row: CompareRow) -> float | None:
    return row.accuracy if row.accuracy is not None else row.loss


def draw(rows: Sequence[CompareRow], path: str | Path, title: str = "") -> Path:
    """Draw the two panels of the finished rows into ``path`` (PNG, written atomically).

    The y axis is the validation accuracy, or the validation loss when the model's outputs are not class scores.

    Raises:
        ConfigError: when matplotlib is not installed.
    """
    plt = require_matplotlib()
    done = [r for r in rows if r.status == "done" and _score(r) is not None]
    ylabel = "validation accuracy" if any(r.accuracy is not None for r in done) else "validation loss"
    dense = next((r for r in done if r.target is None), None)
    methods = list(dict.fromkeys(r.method for r in done if r.target is not None))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    markers = "osD^vP*Xh<>p"
    for i, method in enumerate(methods):
        cells = sorted((r for r in done if r.method == method), key=lambda r: r.target)
        style = {"marker": markers[i % len(markers)], "label": method, "color": f"C{i % 10}"}
        left.plot([r.sparsity for r in cells], [_score(r) for r in cells], **style)
        with_macs = [r for r in cells if r.macs is not None]
        right.plot([r.macs for r in with_macs], [_score(r) for r in with_macs], linestyle="none", **style)
    for ax in (left, right):
        if dense is not None:
            ax.axhline(_score(dense), color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if dense is not None and dense.macs is not None:
        right.axvline(dense.macs, color="grey", linestyle=":", linewidth=1, label="dense MACs")
    left.set_xlabel("sparsity of the exported model")
    left.set_title("accuracy vs sparsity")
    right.set_xlabel("MACs per example after purge")
    right.set_title("accuracy vs MACs after purge")
    left.legend(fontsize="small", loc="best")
    right.legend(fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)

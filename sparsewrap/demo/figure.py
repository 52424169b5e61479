"""A small PNG chart drawer on Pillow (already installed with torchvision), so the demo needs no matplotlib.

:func:`training_figure` draws three panels: per-layer sparsity at export against the requested target, the
training loss per step, and validation accuracy and sparsity per epoch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..io.atomic import write_atomic

INK, GRID, BLUE, ORANGE, GREEN, GREY = "#222222", "#dddddd", "#1f77b4", "#ff7f0e", "#2ca02c", "#888888"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (whole numbers only with ``integer``)."""
    span = (hi - lo) or 1.0
    raw = max(span / count, 1.0) if integer else span / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= step * m)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


@dataclass
class Panel:
    """A rectangle of the image with data limits; maps data coordinates to pixels and draws into it."""

    draw: ImageDraw.ImageDraw
    box: tuple[int, int, int, int]  # left, top, right, bottom of the plotting area
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def px(self, x: float, y: float) -> tuple[float, float]:
        (left, top, right, bottom), (x0, x1), (y0, y1) = self.box, self.xlim, self.ylim
        return (left + (x - x0) / ((x1 - x0) or 1) * (right - left),
                bottom - (y - y0) / ((y1 - y0) or 1) * (bottom - top))  # fmt: skip

    def frame(self, title: str, xlabel: str, ylabel: str, xticks: bool = True, integer_x: bool = False) -> None:
        left, top, right, bottom = self.box
        small, big = _font(13), _font(16)
        for y in _ticks(*self.ylim):
            _, py = self.px(self.xlim[0], y)
            self.draw.line([(left, py), (right, py)], fill=GRID)
            self.draw.text((left - 6, py), f"{y:g}", fill=INK, font=small, anchor="rm")
        if xticks:
            for x in _ticks(*self.xlim, integer=integer_x):
                px, _ = self.px(x, self.ylim[0])
                self.draw.line([(px, bottom), (px, bottom + 4)], fill=INK)
                self.draw.text((px, bottom + 6), f"{x:g}", fill=INK, font=small, anchor="mt")
        self.draw.rectangle([left, top, right, bottom], outline=INK)
        self.draw.text(((left + right) / 2, top - 12), title, fill=INK, font=big, anchor="md")
        self.draw.text(((left + right) / 2, bottom + 26), xlabel, fill=INK, font=small, anchor="mt")
        self.draw.text((left - 44, top - 12), ylabel, fill=INK, font=small, anchor="lm")

    def line(self, xs: Sequence[float], ys: Sequence[float], color: str, width: int = 2, dots: bool = False) -> None:
        points = [self.px(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(points) > 1:
            self.draw.line(points, fill=color, width=width, joint="curve")
        if dots:
            for x, y in points:
                self.draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)

    def hline(self, y: float, color: str) -> None:
        (x0, py), (x1, _) = self.px(self.xlim[0], y), self.px(self.xlim[1], y)
        for start in range(int(x0), int(x1), 12):  # dashed
            self.draw.line([(start, py), (min(start + 7, x1), py)], fill=color, width=2)

    def legend(self, entries: Sequence[tuple[str, str]]) -> None:
        left, _, _, bottom = self.box
        x, y, font = left, bottom + 56, _font(13)
        for label, color in entries:  # one row under the panel, clear of the data
            self.draw.line([(x, y), (x + 24, y)], fill=color, width=4)
            self.draw.text((x + 30, y), label, fill=INK, font=font, anchor="lm")
            x += 30 + font.getlength(label) + 24


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def training_figure(path: str | os.PathLike, layers: Sequence[tuple[str, float]], requested: float | None,
                    losses: Sequence[float], epochs: Sequence[tuple[int, float | None, float | None]],
                    title: str = "") -> Path:  # fmt: skip
    """Write the three-panel PNG.

    Args:
        path: the ``.png`` to write (atomically).
        layers: ``(layer name, sparsity at export)`` in execution order.
        requested: the requested overall sparsity (dashed line), if any.
        losses: training (task) loss per step.
        epochs: ``(epoch, validation accuracy, current sparsity)`` per epoch (epoch 0: before sparsifying).
        title: a caption at the top.
    """
    width, height = 1500, 560
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((width / 2, 16), title, fill=INK, font=_font(18), anchor="mt")
    top, bottom = 90, height - 100

    bars = Panel(draw, (80, top, 470, bottom), (0, max(len(layers), 1)), (0, 1))
    bars.frame("sparsity per layer (exported)", "layer", "sparsity", xticks=False)
    for i, (name, value) in enumerate(layers):
        (x0, y0), (x1, y1) = bars.px(i + 0.15, value), bars.px(i + 0.85, 0)
        draw.rectangle([x0, y0, x1, y1], fill=BLUE)
        draw.text(((x0 + x1) / 2, y0 - 3), f"{value:.3f}", fill=INK, font=_font(12), anchor="md")
        draw.text(((x0 + x1) / 2, y1 + 6), name[-14:], fill=INK, font=_font(12), anchor="mt")
    if requested is not None:
        bars.hline(requested, ORANGE)
        bars.legend([(f"requested overall {requested:g}", ORANGE)])

    steps = list(range(1, len(losses) + 1))
    finite = [v for v in losses if math.isfinite(v)] or [0.0, 1.0]
    curve = Panel(draw, (580, top, 980, bottom), (0, max(len(losses), 1)), (0, max(finite) * 1.05 or 1))
    curve.frame("training loss (task)", "step", "loss")
    curve.line(steps, losses, GREY, width=1)
    curve.line(steps, _smooth(list(losses), max(1, len(losses) // 50)), BLUE)

    numbers = [e for e, _, _ in epochs] or [1]
    last = Panel(draw, (1080, top, 1470, bottom), (min(numbers) - 0.2, max(numbers) + 0.2), (0, 1))
    last.frame("per epoch", "epoch", "fraction", integer_x=True)
    last.line([e for e, a, _ in epochs if a is not None], [a for _, a, _ in epochs if a is not None], GREEN, dots=True)
    last.line([e for e, _, s in epochs if s is not None], [s for _, _, s in epochs if s is not None], BLUE, dots=True)
    last.legend([("validation accuracy", GREEN), ("sparsity of the learned masks/gates", BLUE)])
    return write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))

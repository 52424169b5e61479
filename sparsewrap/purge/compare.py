"""Before/after measurements of a purge: parameters, MACs, file size, CPU latency (median of repeats)."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..analysis.macs import total_macs


@dataclass
class Row:
    """One measured quantity before and after."""

    name: str
    before: float
    after: float
    unit: str = ""
    lower_is_better: bool = True

    @property
    def ratio(self) -> float:
        return self.after / self.before if self.before else float("nan")

    @property
    def worse(self) -> bool:
        """The purged model is not better on this row (e.g. not faster)."""
        return self.after >= self.before if self.lower_is_better else self.after <= self.before


@dataclass
class Comparison:
    rows: list[Row] = field(default_factory=list)

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


def paired_latency(models: Sequence[nn.Module], input_shape: Sequence[int], batch: int, repeats: int = 5,
                   clock: Callable[[], float] = time.perf_counter, channels_last: bool = False,
                   warmup: int = 1) -> list[float]:  # fmt: skip
    """Median seconds of one eval forward at ``(batch, *input_shape)`` for each model, their runs interleaved
    (A B, B A, ...) after ``warmup`` untimed runs each, so that machine drift hits every model alike.

    ``clock=time.process_time`` measures CPU seconds instead of wall time: with one thread it is what the
    forward costs, unaffected by other processes sharing the cores. ``channels_last`` runs 4-D inputs in NHWC
    (the models are converted in place), oneDNN's native layout on the CPU. The models' train/eval modes are
    restored afterwards.
    """
    p = next(models[0].parameters())
    x = torch.randn(batch, *input_shape, dtype=p.dtype, device=p.device)
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
        for m in models:
            m.to(memory_format=torch.channels_last)
    modes = [m.training for m in models]
    times: list[list[float]] = [[] for _ in models]
    try:
        with torch.inference_mode():
            for m in models:
                m.eval()
                for _ in range(warmup):
                    m(x)
            for i in range(repeats):
                order = range(len(models)) if i % 2 == 0 else reversed(range(len(models)))
                for j in order:
                    start = clock()
                    models[j](x)
                    times[j].append(clock() - start)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return [statistics.median(t) for t in times]


def latency(model: nn.Module, input_shape: Sequence[int], batch: int, repeats: int = 5,
            clock: Callable[[], float] = time.perf_counter, channels_last: bool = False,
            warmup: int = 1) -> float:  # fmt: skip
    """Median seconds of one eval forward of ``model`` (see :func:`paired_latency`)."""
    return paired_latency([model], input_shape, batch, repeats, clock, channels_last, warmup)[0]


def file_size(write: Callable[[Path], object], suffix: str) -> int:
    """Bytes written by ``write(path)`` to a temporary file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"model{suffix}"
        write(path)
        return os.path.getsize(path)


def compare(dense: nn.Module, purged: nn.Module, input_shape: Sequence[int], batches: Sequence[int] = (1, 32),
            repeats: int = 5, sizes: tuple[int, int] | None = None,
            channels_last: bool = False) -> Comparison:  # fmt: skip
    """Parameters, MACs (per example), optional file sizes, and latency at each batch size (interleaved runs;
    ``channels_last`` converts both models and times NHWC inputs)."""
    out = Comparison()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    out.rows.append(Row("parameters", count(dense), count(purged)))
    out.rows.append(Row("MACs", total_macs(dense, input_shape), total_macs(purged, input_shape)))
    if sizes is not None:
        out.rows.append(Row("file size", sizes[0], sizes[1], "B"))
    for b in batches:
        before, after = paired_latency([dense, purged], input_shape, b, repeats, channels_last=channels_last)
        out.rows.append(Row(f"latency bs{b}", before * 1e3, after * 1e3, "ms"))
    return out

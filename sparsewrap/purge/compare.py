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

from ..macs import total_macs


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


def latency(model: nn.Module, input_shape: Sequence[int], batch: int, repeats: int = 5, warmup: int = 1,
            clock: Callable[[], float] = time.perf_counter) -> float:  # fmt: skip
    """Median seconds of one eval forward at ``(batch, *input_shape)`` on the model's device.

    ``clock=time.process_time`` measures CPU seconds instead of wall time: with one thread it is what the
    forward costs, unaffected by other processes sharing the cores.
    """
    p = next(model.parameters())
    x = torch.randn(batch, *input_shape, dtype=p.dtype, device=p.device)
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                start = clock()
                model(x)
                if i >= warmup:
                    times.append(clock() - start)
    finally:
        model.train(was_training)
    return statistics.median(times)


def file_size(write: Callable[[Path], object], suffix: str) -> int:
    """Bytes written by ``write(path)`` to a temporary file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"model{suffix}"
        write(path)
        return os.path.getsize(path)


def compare(dense: nn.Module, purged: nn.Module, input_shape: Sequence[int], batches: Sequence[int] = (1, 32),
            repeats: int = 5, sizes: tuple[int, int] | None = None) -> Comparison:  # fmt: skip
    """Parameters, MACs (per example), optional file sizes, and latency at each batch size."""
    out = Comparison()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    out.rows.append(Row("parameters", count(dense), count(purged)))
    out.rows.append(Row("MACs", total_macs(dense, input_shape), total_macs(purged, input_shape)))
    if sizes is not None:
        out.rows.append(Row("file size", sizes[0], sizes[1], "B"))
    for b in batches:
        before = latency(dense, input_shape, b, repeats)
        after = latency(purged, input_shape, b, repeats)
        out.rows.append(Row(f"latency bs{b}", before * 1e3, after * 1e3, "ms"))
    return out

"""``print(sp.report())``: the report's plain-text table."""

from __future__ import annotations

import torch

import sparsewrap as sw
from sparsewrap.report import LayerReport, Report

from .zoo import ResNetTiny


def test_str_of_a_report_is_the_table_with_totals_not_the_dataclass_repr() -> None:
    model = ResNetTiny()
    sp = sw.sparsify(model, "magnitude", target=0.5)
    text = str(sp.report())
    lines = text.splitlines()
    assert "LayerReport(" not in text and lines[0] == "method magnitude, step 0"
    assert lines[1].split() == ["layer", "shape", "params", "nonzeros", "sparsity", "exported"]
    rows = {line.split()[0]: line.split() for line in lines[3:] if line and not line.startswith("-")}
    for t in sp.targets:  # each layer's figures, counted here from the live weights
        w = t.module.weight.detach()
        zeros = int((w == 0).sum())
        assert rows[t.name][1:] == ["×".join(map(str, w.shape)), f"{w.numel():,}", f"{w.numel() - zeros:,}",
                                    f"{zeros / w.numel():.4f}", f"{zeros / w.numel():.4f}"]  # fmt: skip
    total = sum(t.numel for t in sp.targets)
    assert rows["total"][1:] == [f"{total:,}", f"{total - round(0.5 * total):,}", "0.5000", "0.5000"]
    assert "requested sparsity 0.5000   achieved now 0.5000   at export 0.5000" in lines
    assert "scheduled sparsity: 0.5" in lines


def test_str_aligns_columns_and_lists_notes() -> None:
    layers = [LayerReport("a", (4, 2), 8, 2, 4), LayerReport("long.name", (1000, 10), 10000, 10, 10)]
    report = Report("l0", None, 7, layers, {"lambda": 0.25}, ["layer 'x' stayed dense"])
    lines = str(report).splitlines()
    header, rule, row_a, row_b = lines[1:5]
    assert len({len(header), len(rule), len(row_a), len(row_b)}) == 1  # right-aligned numbers: same width
    assert row_a.split() == ["a", "4×2", "8", "2", "0.7500", "0.5000"]
    assert row_b.split() == ["long.name", "1000×10", "10,000", "10", "0.9990", "0.9990"]
    assert "requested sparsity -   achieved now 0.9988   at export 0.9986" in lines
    assert lines[-2:] == ["lambda: 0.25", "note: layer 'x' stayed dense"]
    assert repr(report).startswith("Report(method='l0'")  # the repr stays the dataclass's
    torch.testing.assert_close(report.achieved, 1 - 12 / 10008)

"""The training figure (sparsewrap/train/figure.py) and the DST budget history in reports (issues 17 and 19)."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparsewrap as sw
from sparsewrap.cli import main
from sparsewrap.errors import ConfigError
from sparsewrap.report import BudgetUpdate, LayerReport, Report
from sparsewrap.train.history import History

pytest.importorskip("matplotlib")

from sparsewrap.train.figure import TITLES, training_figure, write_training_figure  # noqa: E402

LAYERS = ["0", "2", "4"]  # the three hidden Linear layers; the head "6" stays dense


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                         nn.Linear(24, 3))  # fmt: skip


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(192, 12, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)


def trained(method: str, epochs: int = 2, **options) -> tuple[sw.Sparsifier, History]:
    train, val = loaders()
    sp = sw.sparsify(mlp(), method, target=0.75, include=LAYERS, **options)
    return sp, sw.fit(sp, train, val, epochs=epochs, lr=1e-2, seed=0)


def axes_by_title(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_three_panels_with_their_data_labels_and_legends():
    sp, history = trained("magnitude")
    report = sp.report()
    fig = training_figure(report, history, title="tiny", before=0.3)
    axes = axes_by_title(fig)
    assert set(axes) == {TITLES["layers"], TITLES["loss"], TITLES["epochs"]} and fig.get_suptitle() == "tiny"
    for ax in axes.values():
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None

    bars = axes[TITLES["layers"]]
    exported = sw.export(sp)  # each layer's sparsity, counted here in the exported weights
    counted = [1 - int(exported.get_submodule(n).weight.count_nonzero()) / exported.get_submodule(n).weight.numel()
               for n in LAYERS]  # fmt: skip
    assert [p.get_height() for p in bars.patches] == pytest.approx(counted)
    assert [t.get_text() for t in bars.get_xticklabels()] == LAYERS
    requested = [line for line in bars.get_lines() if "requested" in str(line.get_label())]
    assert len(requested) == 1 and list(requested[0].get_ydata()) == [0.75, 0.75]

    loss = axes[TITLES["loss"]].get_lines()[0]
    assert list(loss.get_ydata()) == pytest.approx([a - b for a, b in zip(history.losses, history.penalties)])
    assert list(loss.get_xdata()) == list(range(1, len(history.losses) + 1))

    accuracy, sparsity = axes[TITLES["epochs"]].get_lines()
    assert list(accuracy.get_xdata()) == [0, 1, 2]
    assert list(accuracy.get_ydata()) == pytest.approx([0.3] + [r.val_accuracy for r in history.records])
    assert list(sparsity.get_ydata()) == pytest.approx([0.0] + [r.achieved for r in history.records])


def test_the_png_is_written_atomically_at_the_expected_size(tmp_path):
    sp, history = trained("magnitude", epochs=1)
    path = write_training_figure(tmp_path / "figure.png", sp.report(), history)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (1500, 500)
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]  # no temporary file left behind


@pytest.mark.parametrize("method", ["set", "dsr"])
def test_the_dst_panel_draws_each_layers_density_from_the_history(method, tmp_path):
    sp, history = trained(method, every=3)
    recorded = sp.method.history
    assert len(recorded) >= 5
    fig = training_figure(sp.report(), history)
    axes = axes_by_title(fig)
    assert TITLES["density"] in axes and len(axes) == 4
    density = axes[TITLES["density"]]
    lines = {line.get_gid(): line for line in density.get_lines() if line.get_gid()}
    assert list(lines) == LAYERS
    for i, name in enumerate(LAYERS):
        size = sp.model.get_submodule(name).weight.numel()
        assert list(lines[name].get_xdata()) == [h[0] for h in recorded]
        assert list(lines[name].get_ydata()) == pytest.approx([h[2][i] / size for h in recorded])
    (moved,) = [ax for ax in fig.axes if ax is not density and ax.bbox.bounds == density.bbox.bounds]
    assert list(moved.get_lines()[0].get_ydata()) == [h[1] for h in recorded]
    assert density.get_ylabel() and moved.get_ylabel() and density.get_legend() is not None
    if method == "dsr":  # DSR moves budget between layers: some layer's density changes (the total does not)
        assert any(len({h[2][i] for h in recorded}) > 1 for i in range(len(LAYERS)))
        assert len({sum(h[2]) for h in recorded}) == 1
    path = write_training_figure(tmp_path / "figure.png", sp.report(), history)
    with Image.open(path) as img:
        assert img.size == (1400, 1000)


def test_methods_without_a_budget_history_get_three_panels():
    sp, history = trained("static", epochs=1)
    assert sp.report().updates == []
    assert TITLES["density"] not in axes_by_title(training_figure(sp.report(), history))


def test_missing_matplotlib_is_a_one_line_error_naming_the_install(monkeypatch, tmp_path):
    sp, history = trained("magnitude", epochs=1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(ConfigError) as error:
        write_training_figure(tmp_path / "figure.png", sp.report(), history)
    message = str(error.value)
    assert "\n" not in message and "pip install 'sparsewrap[plot]'" in message and "figure.png" in message
    assert not (tmp_path / "figure.png").exists()


def test_reports_show_moves_per_update_and_the_layer_budgets_over_time(capsys, tmp_path):
    sp, _ = trained("dsr", every=3)
    report = sp.report()
    recorded = sp.method.history
    assert [(u.step, u.moved, u.active) for u in report.updates] == [tuple(h) for h in recorded]
    rows = report.budget_table(columns=4)
    picks = [0, round((len(recorded) - 1) / 3), round(2 * (len(recorded) - 1) / 3), len(recorded) - 1]
    assert rows[0] == ["layer"] + [f"step {recorded[i][0]}" for i in picks]
    size = sp.model.get_submodule("2").weight.numel()
    assert rows[2] == ["2"] + [f"{recorded[i][2][1]:,} ({recorded[i][2][1] / size:.3f})" for i in picks]
    assert rows[-1] == ["moved"] + [f"{recorded[i][1]:,}" for i in picks]
    text = str(report)
    assert "budget over time" in text and f"{len(recorded)} updates recorded" in text

    ckpt = sw.save(sp, tmp_path / "dsr.safetensors", recipe=sw.ModelRecipe("factory", "tests.test_figure:mlp"))
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(ckpt), "--trust-factory"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and "budget over time" in out
    assert f"step {recorded[-1][0]}" in out and "moved" in out


def test_many_layers_thin_the_bar_names_and_trade_the_layer_legend_for_a_colour_bar():
    layers = [LayerReport(f"blocks.{i}.conv", (10, 10), 100, 10, 10) for i in range(40)]
    updates = [BudgetUpdate(step, 5, [10 + (i + step) % 3 - 1 for i in range(40)]) for step in (9, 19, 29)]
    fig = training_figure(Report("dsr", 0.9, 30, layers, updates=updates), History())
    axes = axes_by_title(fig)
    names = [t.get_text() for t in axes[TITLES["layers"]].get_xticklabels()]
    assert names == [f"blocks.{i}.conv" for i in range(0, 40, 2)]  # 40 layers: every other name
    density = axes[TITLES["density"]]
    assert len([line for line in density.get_lines() if line.get_gid()]) == 40
    legend = [t.get_text() for t in density.get_legend().get_texts()]
    assert legend == ["overall density 0.1", "connections moved (right axis)"]
    (bar,) = [ax for ax in fig.axes if ax.get_ylabel() == "layer (execution order)"]
    assert all(float(t).is_integer() for t in bar.get_yticks())

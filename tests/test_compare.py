"""sw.compare: every cell trained alike, the three files, skipping finished cells, resuming, failures."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparsewrap as sw
from sparsewrap.errors import ConfigError, UnknownNameError
from sparsewrap.train.compare import CompareCallback, compare

TARGETS = [0.5, 0.75]
OPTIONS = {"magnitude": {"granularity": "channel", "end": 0.5, "every": 2}, "gmp": {"end": 0.5}}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(384, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])


def loaders(data) -> tuple[DataLoader, DataLoader]:
    return DataLoader(data[0], batch_size=16, shuffle=True), DataLoader(data[1], batch_size=64)


class Counting:
    """A model_fn that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> nn.Module:
        self.calls += 1
        return Tiny()


def run(data, out, model_fn=None, **kwargs) -> list:
    train, val = loaders(data)
    kwargs.setdefault("options", OPTIONS)
    kwargs.setdefault("plot", False)
    return compare(model_fn or Tiny, train, val, methods=["magnitude", "gmp"], targets=TARGETS, epochs=2, out=out,
                   lr=1e-2, **kwargs)  # fmt: skip


def test_two_methods_two_targets_write_the_table(data, tmp_path):
    rows = run(data, tmp_path)
    assert [(r.method, r.target) for r in rows] == [("dense", None)] + [
        (m, t) for m in ("magnitude", "gmp") for t in TARGETS
    ]
    assert all(r.status == "done" and r.error is None for r in rows)
    dense = rows[0]
    assert dense.params == sum(p.numel() for p in Tiny().parameters()) == 8 * 16 + 16 + 16 * 16 + 16 + 16 * 3 + 3
    assert dense.macs == 8 * 16 + 16 * 16 + 16 * 3 and dense.relative_time is None
    assert all(r.accuracy is not None and 0 <= r.accuracy <= 1 for r in rows)
    for r in rows[1:]:
        assert r.relative_time == pytest.approx(r.step_seconds / dense.step_seconds)
        assert r.steps == 2 * 16
        # the row's sparsity is the exported checkpoint's, counted here independently on its targeted weights
        sp = sw.load(f"{r.directory}/last.safetensors", model=Tiny())
        plain = sw.export(sp)
        weights = [plain.fc1.weight, plain.fc2.weight]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert r.sparsity == pytest.approx(zeros) and r.sparsity == pytest.approx(r.target, abs=0.05)
    # channel magnitude removes whole units of fc1/fc2: the purged model is smaller; per-weight gmp keeps every shape
    assert all(r.params < dense.params and r.macs < dense.macs for r in rows if r.method == "magnitude")
    assert all(r.params == dense.params for r in rows if r.method == "gmp")
    table = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [(r["method"], r["target"], r["accuracy"]) for r in table] == [
        (r.method, r.target, r.accuracy) for r in rows
    ]
    md = (tmp_path / "compare.md").read_text().splitlines()
    assert len(md) == 2 + len(rows) and md[2].startswith("| dense |") and "| magnitude | 0.75 |" in md[4]


def test_same_initialisation_and_data_order_in_every_cell(data, tmp_path):
    seen: list[torch.Tensor] = []

    def model_fn() -> nn.Module:
        model = Tiny()
        seen.append(model.fc1.weight.detach().clone())
        return model

    run(data, tmp_path, model_fn=model_fn)
    assert len(seen) == 5 and all(torch.equal(s, seen[0]) for s in seen)


def test_rerun_skips_finished_cells(data, tmp_path):
    first = run(data, tmp_path)
    counting = Counting()
    again = run(data, tmp_path, model_fn=counting)
    assert counting.calls == 0  # nothing retrained
    assert [(r.accuracy, r.sparsity, r.params) for r in again] == [(r.accuracy, r.sparsity, r.params) for r in first]
    forced = run(data, tmp_path, model_fn=counting, force=True)
    assert counting.calls == 5 and [r.accuracy for r in forced] == [r.accuracy for r in first]


def test_rerun_with_other_settings_retrains_the_cells(data, tmp_path):
    run(data, tmp_path)
    counting = Counting()
    train, val = loaders(data)
    more = compare(counting, train, val, methods=["magnitude", "gmp"], targets=TARGETS, epochs=3, out=tmp_path,
                   options=OPTIONS, plot=False, lr=1e-2)  # fmt: skip
    assert counting.calls == 5 and all(r.status == "done" and r.steps == 3 * 16 for r in more)
    whole = compare(Tiny, train, val, methods=["magnitude", "gmp"], targets=TARGETS, epochs=3, out=tmp_path / "whole",
                    options=OPTIONS, plot=False, lr=1e-2)  # fmt: skip
    assert [(r.accuracy, r.sparsity) for r in more[1:]] == [(r.accuracy, r.sparsity) for r in whole[1:]]
    counting = Counting()
    bigger = DataLoader(data[0], batch_size=32, shuffle=True)  # another batch size: retrained too
    rows = compare(counting, bigger, val, methods=["magnitude", "gmp"], targets=TARGETS, epochs=3, out=tmp_path,
                   options=OPTIONS, plot=False, lr=1e-2)  # fmt: skip
    assert counting.calls == 5 and all(r.steps == 3 * 8 for r in rows)


class StopIn(CompareCallback):
    """Stops the run in cell ``cell`` after ``at`` steps, once."""

    def __init__(self, cell: str, at: int) -> None:
        self.cell, self.at, self.current, self.done = cell, at, "", False

    def on_cell_begin(self, index, total, method, target) -> None:
        self.current = f"{method}-{target:g}" if target is not None else "dense"

    def on_step_end(self, state) -> None:
        if self.current == self.cell and state.step == self.at and not self.done:
            state.stop, self.done = True, True


def test_interrupted_cell_resumes_to_the_uninterrupted_result(data, tmp_path):
    whole = run(data, tmp_path / "whole")
    stopper = StopIn("magnitude-0.75", 21)
    cut = run(data, tmp_path / "cut", callback=stopper)
    assert [r.status for r in cut] == ["done", "done", "interrupted"]  # the cells after it are not run
    assert json.loads((tmp_path / "cut" / "compare.json").read_text())["rows"][-1]["status"] == "interrupted"
    resumed = run(data, tmp_path / "cut")
    assert [r.status for r in resumed] == ["done"] * 5
    for a, b in zip(whole[1:], resumed[1:]):
        assert (a.accuracy, a.loss, a.sparsity, a.params, a.steps) == (
            b.accuracy,
            b.loss,
            b.sparsity,
            b.params,
            b.steps,
        )


def test_failing_cell_is_recorded_and_the_rest_complete(data, tmp_path):
    options = {**OPTIONS, "gmp": {"end": 0.5, "schedule": "no-such-schedule"}}
    rows = run(data, tmp_path, options=options)
    assert [r.status for r in rows] == ["done", "done", "done", "failed", "failed"]
    assert all("no-such-schedule" in r.error and "\n" not in r.error for r in rows if r.method == "gmp")
    md = (tmp_path / "compare.md").read_text()
    assert "failed: ConfigError" in md
    # failed cells are retried on a rerun, finished ones are not
    counting = Counting()
    run(data, tmp_path, model_fn=counting, options=options)
    assert counting.calls == 2


def test_unknown_method_lists_the_registered_ones(data, tmp_path):
    train, val = loaders(data)
    with pytest.raises(UnknownNameError, match="magnitude"):
        compare(Tiny, train, val, methods=["magnitude", "nosuch"], targets=[0.5], out=tmp_path, plot=False)
    assert not (tmp_path / "compare.json").exists()


def test_accepting_methods_leaves_out_those_that_refuse_the_model():
    from sparsewrap.train.compare import accepting_methods

    head_only = lambda: nn.Sequential(nn.Linear(8, 3))  # noqa: E731  (the head stays dense: nothing to sparsify)
    accepted, rejected = accepting_methods(head_only, ["magnitude", "gmp"], 0.5, OPTIONS)
    assert accepted == [] and set(rejected) == {"magnitude", "gmp"}
    assert rejected["gmp"].startswith("NoTargetsError")
    accepted, rejected = accepting_methods(Tiny, ["magnitude", "gmp"], 0.5, {"gmp": {"end": 0.5, "schedule": "nope"}})
    assert accepted == ["magnitude"] and "nope" in rejected["gmp"]
    # gmp without the end of its schedule refuses any model, naming the fix
    assert "end=" in accepting_methods(Tiny, ["gmp"], 0.5)[1]["gmp"]


def test_png_is_drawn_with_matplotlib(data, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    rows = run(data, tmp_path, plot=True)
    with Image.open(tmp_path / "compare.png") as image:
        assert image.format == "PNG" and image.size[0] > 2 * image.size[1] > 400  # two panels side by side
    assert all(r.status == "done" for r in rows)


def test_missing_matplotlib_fails_before_training_naming_the_install(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    counting = Counting()
    with pytest.raises(ConfigError, match=r"pip install 'sparsewrap\[plot\]'"):
        run(data, tmp_path, model_fn=counting, plot=True)
    assert counting.calls == 0 and not (tmp_path / "compare.json").exists()


def test_macs_or_none_leaves_an_uncountable_model_blank():
    from sparsewrap.train.compare import macs_or_none

    class Refuses(Tiny):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("needs a dict input")

    assert macs_or_none(Tiny(), (8,)) == 8 * 16 + 16 * 16 + 16 * 3 and macs_or_none(Refuses(), (8,)) is None

"""sw.compare(jobs=N) / `sparsewrap compare --jobs N` (issue 19): cells in worker processes give the rows of
jobs=1, progress reaches the callback, failing cells are recorded, Ctrl-C stops the pool, clear errors."""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from sparsewrap.cli import main
from sparsewrap.errors import ConfigError
from sparsewrap.train import compare_jobs
from sparsewrap.train.compare import CompareCallback, compare
from tests import test_compare
from tests.test_compare import OPTIONS, Tiny, loaders

METHODS = ["magnitude", "gmp", "dnw"]
ONE = {"magnitude": OPTIONS["magnitude"]}
BROKEN = {**OPTIONS, "dnw": {"nosuch": 1}}  # the dnw cell fails inside its cell: unknown option
data = test_compare.data  # the same samples fixture (three classes from the signs of two inputs)


class Events(CompareCallback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_cell_begin(self, index, total, method, target) -> None:
        self.events.append(("begin", index, method))

    def on_cell_end(self, index, total, row, cached) -> None:
        self.events.append(("end", index, row.status, cached))


def figures(rows) -> list[tuple]:
    return [(r.method, r.target, r.status, r.accuracy, r.loss, r.sparsity, r.params, r.macs, r.steps) for r in rows]


def test_jobs_two_gives_the_rows_of_jobs_one(data, tmp_path):
    rows = {}
    events = Events()
    for jobs in (1, 2):
        train, val = loaders(data)
        rows[jobs] = compare(Tiny, train, val, methods=METHODS, targets=[0.5], epochs=2, out=tmp_path / str(jobs),
                             options=BROKEN, plot=False, lr=1e-2, jobs=jobs,
                             callback=events if jobs == 2 else None)  # fmt: skip
    assert figures(rows[2]) == figures(rows[1])  # same cells, same numbers: only the timings differ
    assert [r.status for r in rows[2]] == ["done", "done", "done", "failed"]
    assert "nosuch" in rows[2][3].error and rows[2][1].sparsity == pytest.approx(0.5, abs=0.01)
    assert rows[2][1].relative_time == pytest.approx(rows[2][1].step_seconds / rows[2][0].step_seconds)
    for index in range(4):  # every cell begins, then ends, once
        begin = [i for i, e in enumerate(events.events) if e[:2] == ("begin", index)]
        end = [i for i, e in enumerate(events.events) if e[:2] == ("end", index)]
        assert len(begin) == len(end) == 1 and begin[0] < end[0]
    table = json.loads((tmp_path / "2" / "compare.json").read_text())["rows"]
    assert [(r["method"], r["status"]) for r in table] == [(r.method, r.status) for r in rows[1]]
    cell = json.loads((tmp_path / "2" / "gmp-0.5" / "cell.json").read_text())
    assert cell["status"] == "done" and cell["accuracy"] == rows[1][2].accuracy


def test_finished_cells_are_not_sent_to_the_pool(data, tmp_path, monkeypatch):
    train, val = loaders(data)
    compare(Tiny, train, val, methods=["magnitude"], targets=[0.5], epochs=1, out=tmp_path, options=ONE,
            plot=False)  # fmt: skip
    monkeypatch.setattr(compare_jobs, "_pool", lambda *a: pytest.fail("no cell should be trained"))
    events = Events()
    rows = compare(Tiny, train, val, methods=["magnitude"], targets=[0.5], epochs=1, out=tmp_path, options=ONE,
                   plot=False, jobs=2, callback=events)  # fmt: skip
    assert [r.status for r in rows] == ["done", "done"]
    assert [e for e in events.events if e[0] == "end"] == [("end", 0, "done", True), ("end", 1, "done", True)]


def test_a_model_fn_that_cannot_be_pickled_is_a_one_line_error(data, tmp_path):
    train, val = loaders(data)
    with pytest.raises(ConfigError, match=r"jobs=2 .* model_fn cannot be pickled .* module level .* or use jobs=1"):
        compare(lambda: Tiny(), train, val, methods=["magnitude"], targets=[0.5], out=tmp_path, plot=False, jobs=2)
    assert not (tmp_path / "compare.json").exists()
    for jobs in (0, 1.5, True):
        with pytest.raises(ConfigError, match=rf"jobs={jobs!r} must be a positive integer"):
            compare(Tiny, train, val, methods=["magnitude"], targets=[0.5], out=tmp_path, plot=False, jobs=jobs)


def test_each_cell_in_progress_takes_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [compare_jobs.cell_device({"device": "cuda", "lr": 1}, s)["device"] for s in range(3)] == [
        "cuda:0",
        "cuda:1",
        "cuda:0",
    ]
    assert compare_jobs.cell_device({"device": "cuda:1"}, 0) == {"device": "cuda:1"}  # an explicit GPU is kept
    assert compare_jobs.cell_device({"device": "cpu"}, 1) == {"device": "cpu"}


class SlowTiny(Tiny):
    """Tiny that touches ``marker`` at its first forward and sleeps at every one (a cell that runs for seconds)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Path(self.marker).touch()
        time.sleep(0.02)
        return super().forward(x)


def test_ctrl_c_stops_the_cells_in_progress_and_starts_no_other(data, tmp_path):
    marker = tmp_path / "training"

    def interrupt_when_training() -> None:  # the main process's Ctrl-C (the workers do not get this one)
        deadline = time.monotonic() + 300
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    train, val = DataLoader(data[0], batch_size=16, shuffle=True), DataLoader(data[1], batch_size=64)
    threading.Thread(target=interrupt_when_training, daemon=True).start()
    started = time.monotonic()
    rows = compare(functools.partial(SlowTiny, str(marker)), train, val, methods=["magnitude", "gmp"], targets=[0.5],
                   epochs=20, out=tmp_path / "cmp", options=OPTIONS, plot=False, lr=1e-2, jobs=2)  # fmt: skip
    assert "interrupted" in [r.status for r in rows] and all(r.status in ("interrupted", "done") for r in rows)
    assert len(rows) == 2 and "gmp" not in [r.method for r in rows]  # the third cell never started
    assert time.monotonic() - started < 20 * 16 * 0.02 + 120  # not the whole 20 epochs of a cell after the spawn
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert [r["status"] for r in table] == [r.status for r in rows]
    if rows[1].status == "interrupted":  # it saved its checkpoint: a rerun continues it
        assert (tmp_path / "cmp" / "magnitude-0.5" / "last.safetensors").is_file()


def test_cli_jobs_trains_the_cells_in_workers(capsys, tmp_path):
    argv = ["compare", "--data", "mnist", "--limit", "128", "--val-limit", "64", "--batch-size", "64", "--epochs", "1",
            "--no-plot", "--model", "sparsewrap.demo.models:mlp_300_100", "--methods", "magnitude", "--targets",
            "0.5", "--jobs", "2", "--out", tmp_path]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err
    assert "2 at a time" in out and "cell 2/2 (magnitude at 0.5) done: accuracy" in " ".join(out.split())
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("dense", "done"), ("magnitude", "done")]


def test_cli_jobs_must_be_positive(capsys, tmp_path):
    argv = ["compare", "--model", "sparsewrap.demo.models:mlp_300_100", "--methods", "magnitude", "--targets", "0.5",
            "--jobs", "0", "--out", tmp_path]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2 and "--jobs" in capsys.readouterr().err


def test_cli_jobs_under_torchrun_is_refused_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: the process group is never set up here
    argv = ["compare", "--model", "sparsewrap.demo.models:mlp_300_100", "--methods", "magnitude", "--targets", "0.5",
            "--jobs", "2", "--out", tmp_path]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2 and "2 under torchrun" in err and "drop --jobs" in err
    assert not (tmp_path / "compare.json").exists()

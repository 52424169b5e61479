"""sw.compare under two-process DDP (gloo, CPU; issue 19): each cell is a DDP run, rank 0 alone writes the files,
the rows match a single-process compare's sparsity, a rerun skips the finished cells on every rank, and jobs > 1
is refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from sparsewrap.demo.data import ShardSampler
from sparsewrap.train import compare as compare_module
from sparsewrap.train import compare_cell, compare_plot
from sparsewrap.train.compare import compare
from tests.test_compare import OPTIONS, Tiny

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

ONE = {"magnitude": OPTIONS["magnitude"]}
PLOT = importlib.util.find_spec("matplotlib") is not None


def samples() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(384, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> Tiny:
        self.calls += 1
        return Tiny()


def figures(rows) -> list[list]:
    return [[r.method, r.target, r.status, r.accuracy, r.loss, r.sparsity, r.params, r.steps] for r in rows]


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        writes: list[str] = []
        for module in (compare_module, compare_cell, compare_plot):  # record every file sw.compare writes
            original = module.write_atomic

            def recording(path, write, original=original):
                writes.append(str(Path(path).relative_to(tmp)))
                return original(path, write)

            module.write_atomic = recording
        train_set, val_set = samples()
        train = DataLoader(train_set, 16, sampler=DistributedSampler(train_set, world, rank, shuffle=True, seed=0))
        val = DataLoader(val_set, 64, sampler=ShardSampler(len(val_set), rank, world))
        kwargs = dict(methods=["magnitude"], targets=[0.5], epochs=2, out=f"{tmp}/cmp", options=ONE, lr=1e-2)
        try:
            compare(Tiny, train, val, plot=False, jobs=2, **kwargs)
            refused = ""
        except Exception as exc:  # noqa: BLE001  (reported to the test)
            refused = f"{type(exc).__name__}: {exc}"
        rows = compare(Tiny, train, val, plot=PLOT, **kwargs)
        first_writes = list(writes)
        counting = Counting()
        again = compare(counting, train, val, plot=False, **kwargs)
        record = {"rows": figures(rows), "writes": first_writes, "refused": refused, "again": figures(again),
                  "rebuilt": counting.calls}  # fmt: skip
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("compare_ddp")
    mp.spawn(_worker, args=(2, str(tmp)), nprocs=2, join=True)
    return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]


def test_rank_zero_alone_writes_the_files(ranks):
    zero, one = ranks
    assert one["writes"] == []
    cells = ["cmp/dense/cell.json", "cmp/magnitude-0.5/cell.json"]
    tables = ["cmp/compare.json", "cmp/compare.md"] + (["cmp/compare.png"] if PLOT else [])
    assert sorted(zero["writes"]) == sorted([c for c in cells for _ in ("running", "done")] + tables)


def test_each_cell_is_one_ddp_run_matching_the_single_process_sparsity(ranks, tmp_path):
    zero, one = ranks
    assert zero["rows"] == one["rows"]  # evaluation sums over the ranks: every rank has the same row
    assert [r[2] for r in zero["rows"]] == ["done", "done"]
    assert zero["rows"][1][7] == 2 * 256 // (16 * 2)  # each step takes 16 examples on each of the 2 ranks
    train_set, val_set = samples()
    single = compare(Tiny, DataLoader(train_set, 16, shuffle=True), DataLoader(val_set, 64), methods=["magnitude"],
                     targets=[0.5], epochs=2, out=tmp_path, options=ONE, lr=1e-2, plot=False)  # fmt: skip
    assert zero["rows"][1][5] == single[1].sparsity == pytest.approx(0.5, abs=0.01)
    assert zero["rows"][1][6] == single[1].params  # the same purged size


def test_a_rerun_skips_the_finished_cells_on_every_rank(ranks):
    for rank in ranks:
        assert rank["rebuilt"] == 0 and rank["again"] == rank["rows"]


def test_jobs_under_torchrun_is_refused_naming_the_conflict(ranks):
    for rank in ranks:
        assert rank["refused"].startswith("ConfigError: jobs=2 under torchrun (2 ranks)")
        assert "use jobs=1" in rank["refused"]

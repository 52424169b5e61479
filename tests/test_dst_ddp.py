"""DST under two-process DDP (gloo, CPU; issue 17): every rank takes the same decision at every update.

:func:`sparsewrap.train.distributed.sync_sparsity` makes rank 0's masks win after every step, so equal masks alone
prove nothing; the workers record the masks each rank chose *before* that sync. Equal choices need the growth RNG
seeded alike on every rank (for DeepR, as many noise draws on every rank before the growth) and, for RigL,
the dense gradients averaged over the ranks before choosing (each rank sees its own shard of the batch).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import sparsewrap as sw
from sparsewrap.demo.data import build_data, make_loaders
from sparsewrap.demo.models import mlp_300_100

from .ddp_launch import digest, process_group, save_record, spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

RUNS = {
    "rigl": dict(target=0.9, every=2, end=0.9),
    "set": dict(target=0.9, every=2, end=0.9, fraction=0.3),
    "dsr": dict(target=0.9, every=2, end=0.9, n_prune=500),
    # noise drawn per active weight: every rank draws as many, so the growth that follows draws alike
    "deepr": dict(target=0.9, every=2, end=0.9, temperature=1e-2, eta=0.5),
}


def _worker(rank: int, world: int, tmp: str) -> None:
    with process_group(rank, world, tmp):
        data = build_data("mnist", limit=512, val_limit=64)
        train, val = make_loaders(data, batch_size=32, seed=0, rank=rank, world_size=world)
        record = {}
        for method, options in RUNS.items():
            torch.manual_seed(0)
            sp = sw.sparsify(mlp_300_100(), method, **options)
            chosen: list[str] = []
            record_update = sp.method.record  # called at the end of every update (DeepR's too)

            def recording(t, moved, record_update=record_update, sp=sp, chosen=chosen) -> None:
                record_update(t, moved)
                chosen.append(digest([m.mask for m in sp.method.masks]))  # before rank 0's masks arrive

            sp.method.record = recording
            sw.fit(sp, train, val, epochs=1, optimizer="sgd", lr=0.05, seed=0)
            record[method] = {"chosen": chosen, "moved": sp.method.moved_total, "counts": sp.method.active_counts()}
        save_record(tmp, rank, record)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn(_worker, tmp_path_factory.mktemp("dst_ddp"))


@pytest.mark.parametrize("method", sorted(RUNS))
def test_every_rank_chooses_the_same_connections_at_every_update(ranks, method: str) -> None:
    zero, one = ranks[0][method], ranks[1][method]
    assert len(zero["chosen"]) == 4  # 8 steps per rank: updates after steps 1, 3, 5 and 7 (end = 0.9 of 8 -> 7)
    assert zero["chosen"] == one["chosen"]
    assert zero["moved"] > 0 and zero["counts"] == one["counts"]
    assert sum(zero["counts"]) == round(0.1 * (784 * 300 + 300 * 100))

"""HALO under two-process DDP on CPU (gloo): the coefficients are trained like the weights (DDP's averaged
gradients), never overwritten by rank 0's, and every rank ends with the same coefficients, weights and masks,
through the pruning step of ``finetune``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import sparsewrap as sw
from sparsewrap.demo.data import build_data, make_loaders
from sparsewrap.train import distributed

from .ddp_launch import digest, process_group, save_record, spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(784, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def _worker(rank: int, world: int, tmp: str) -> None:
    with process_group(rank, world, tmp):
        data = build_data("mnist", limit=256, val_limit=64)
        train, val = make_loaders(data, batch_size=32, seed=0, rank=rank, world_size=world)
        torch.manual_seed(100 + rank)  # different initial weights on purpose: DDP broadcasts rank 0's
        sp = sw.sparsify(MLP(), "halo", target=0.8, finetune=0.5, xi=1e-3, psi=1e-3, penalize_bias=True)
        lam = sp.method.coefficients()
        sw.fit(sp, train, val, epochs=2, seed=0, optimizer="sgd", lr=0.05, weight_decay=1e-4)
        record = {
            "lambda": digest(lam),
            "lambda_moved": float(sum((x - 1.0).abs().sum() for x in lam)),
            "model": digest(list(sp.model.state_dict().values())),
            "pruned": sp.method.pruned,
            "xi": sp.method.xi,
            "exported": sp.report().exported,
        }
        save_record(tmp, rank, record)


def test_halo_coefficients_and_weights_are_identical_on_every_rank(tmp_path) -> None:
    zero, one = spawn(_worker, tmp_path)
    assert zero["lambda_moved"] > 0 and zero["pruned"]  # trained, then pruned at half of the run
    assert zero == one
    assert zero["exported"] == pytest.approx(0.8, abs=1e-3)


def test_sync_sparsity_leaves_the_coefficients_to_ddp() -> None:
    sp = sw.sparsify(MLP(), "halo", target=0.5, penalize_bias=True)
    synced = {id(t) for t in distributed.sync_tensors(sp.model)}  # what rank 0 broadcasts when it changes
    assert synced == {id(p.mask) for p in sp.method.layers}  # the masks only: no lambda is broadcast
    assert sp.method.coefficients() and not synced & {id(c) for c in sp.method.coefficients()}

"""Two-process DDP on CPU (gloo): sparsity state identical on every rank at every step; same sparsity as one process.

The workers run in spawned processes (``torch.multiprocessing``); they write what they saw to files that the
test compares. A test-only method makes a *rank-dependent random* mask decision at every step, so identical
masks can only come from :func:`sparsewrap.train.distributed.sync_sparsity`, not from luck or determinism.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import sparsewrap as sw
from sparsewrap.demo.data import build_data, make_loaders
from sparsewrap.errors import DivergenceError
from sparsewrap.methods import Method, register_method
from sparsewrap.parametrizations import Masked, SparseParametrization, attach
from sparsewrap.train import distributed

from .ddp_launch import digest, process_group, save_record, spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(784, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


@dataclass
class CoinFlipConfig:
    pass


class CoinFlip(Method):
    """Test-only: at every step, zero one weight chosen with this rank's RNG, and draw a new "multiplier"."""

    name = "test-coinflip"
    description = "test only"
    Config = CoinFlipConfig

    def attach(self) -> None:
        self.masks = [attach(t.module, "weight", Masked(t.shape, t.original)) for t in self.targets]
        self.multiplier = torch.zeros(())
        self.seen: list[str] = []  # mask digest at the start of each step (= after the previous step's sync)
        self.chosen: list[int] = []  # this rank's own (pre-sync) decisions

    def step(self, t: int) -> None:
        self.seen.append(digest([m.mask for m in self.masks] + [self.multiplier]))
        flat = self.masks[0].mask.view(-1)
        self.chosen.append(int(torch.randint(flat.numel(), ())))
        flat[self.chosen[-1]] = 0
        self.multiplier = torch.rand(())

    def state_dict(self) -> dict:
        return {"multiplier": self.multiplier, "steps": len(self.chosen)}

    def load_state_dict(self, state: dict) -> None:
        self.multiplier = state["multiplier"].clone()


class Scaled(SparseParametrization):
    """Test-only: ``w * scale``, with ``scale`` a parameter trained by autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.scale


class Drift(Method):
    """Test-only and wrong on purpose: moves a trained parameter outside autograd with this rank's RNG."""

    name = "test-drift"
    description = "test only"
    Config = CoinFlipConfig
    needs_target = False

    def attach(self) -> None:
        self.scales = [attach(t.module, "weight", Scaled()) for t in self.targets]

    def parameter_groups(self) -> list[dict]:
        return [{"name": "scales", "params": [p.scale for p in self.scales]}]

    def step(self, t: int) -> None:
        if t == 2:
            with torch.no_grad():
                self.scales[0].scale.add_(torch.rand(()))


class OneRank(CoinFlip):
    """Test-only: rank 1 alone zeroes a mask entry, once; rank 0 never changes its masks."""

    name = "test-one-rank"

    def step(self, t: int) -> None:
        if t == 2 and dist.get_rank() == 1:
            self.masks[0].mask.view(-1)[0] = 0


def count_bytes(sent: list[int]) -> tuple:
    """Count the bytes of the tensors given to broadcast and all_reduce (sparsewrap's own collectives)."""
    originals = dist.broadcast, dist.all_reduce

    def broadcast(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return originals[0](tensor, *args, **kwargs)

    def all_reduce(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return originals[1](tensor, *args, **kwargs)

    dist.broadcast, dist.all_reduce = broadcast, all_reduce
    return originals


def magnitude(model: nn.Module) -> sw.Sparsifier:
    return sw.sparsify(model, "magnitude", target=0.9, granularity="channel", allocation="uniform",
                       schedule="cubic", end=8, every=2)  # fmt: skip


def _worker(rank: int, world: int, tmp: str) -> None:
    with process_group(rank, world, tmp):
        register_method(CoinFlip)  # in this process only: the test session's registry stays clean
        register_method(Drift)
        register_method(OneRank)
        data = build_data("mnist", limit=512, val_limit=200)
        train, val = make_loaders(data, batch_size=32, seed=0, rank=rank, world_size=world)
        torch.manual_seed(100 + rank)  # different initial weights on purpose: DDP broadcasts rank 0's
        flip = sw.sparsify(MLP(), "test-coinflip", target=0.5)
        history = sw.fit(flip, train, val, epochs=1, seed=0)
        torch.manual_seed(rank)
        mag = magnitude(MLP())
        mag_history = sw.fit(mag, train, val, epochs=2, seed=0)
        torch.manual_seed(rank)
        l0 = sw.sparsify(MLP(), "l0", target=0.7, granularity="channel", gate_lr=0.1, dual_lr=0.1)
        l0_history = sw.fit(l0, train, val, epochs=1, seed=0)
        torch.manual_seed(rank)
        gates = sw.sparsify(MLP(), "l0", target=0.7, dual_lr=0.1)  # per-weight gates: as many as the weights
        per_step: list[int] = []  # bytes that each per-step sync_sparsity gives to broadcast and all_reduce
        sync = distributed.sync_sparsity

        def counted(sp: sw.Sparsifier, *args, full: bool = False, **kwargs) -> None:
            sent: list[int] = []
            originals = count_bytes(sent)
            try:
                sync(sp, *args, full=full, **kwargs)
            finally:
                dist.broadcast, dist.all_reduce = originals
            if not full:
                per_step.append(sum(sent))

        distributed.sync_sparsity = counted
        try:
            sw.fit(gates, train, epochs=1, seed=0)
        finally:
            distributed.sync_sparsity = sync
        torch.manual_seed(rank)
        conv = sw.sparsify(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                         nn.Linear(4 * 26 * 26, 10)), "magnitude", target=0.5)  # fmt: skip
        sw.fit(conv, train, epochs=1, seed=0)
        bn = digest(list(conv.model[1].buffers()))
        resends = distributed.wrap(MLP(), distributed.current()).will_sync_module_buffers()
        one = sw.sparsify(MLP(), "test-one-rank", target=0.5)
        sw.fit(one, train, epochs=1, seed=0, ddp_check_every=1)  # checked after every step: no error
        one_rank = [int(m.mask.sum()) for m in one.method.masks]
        drift = sw.sparsify(MLP(), "test-drift")
        try:
            sw.fit(drift, train, epochs=1, seed=0, ddp_check_every=4)
            diverged = None
        except DivergenceError as exc:
            diverged = [str(exc), drift.step_count]
        record = {"seen": flip.method.seen, "chosen": flip.method.chosen, "losses": history.losses,
                  "final": digest(list(flip.model.state_dict().values()) + [flip.method.multiplier]),
                  "magnitude": digest(list(mag.model.state_dict().values())),
                  "layers": [la.exported_sparsity for la in mag.report().layers],
                  "exported": mag.report().exported, "val_accuracy": mag_history.last.val_accuracy,
                  "val_examples": len(val.sampler), "l0": digest(list(l0.model.state_dict().values())),
                  "l0_method": l0_history.last.method, "gate_bytes": sum(p.numel() * p.element_size() for p in
                  gates.method.method_parameters()), "sync_bytes": per_step, "diverged": diverged,
                  "bn": bn, "resends": resends,
                  "one_rank": one_rank}  # fmt: skip
        save_record(tmp, rank, record)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn(_worker, tmp_path_factory.mktemp("ddp"))


def test_masks_and_method_state_identical_on_every_rank_at_every_step(ranks):
    zero, one = ranks
    assert len(zero["seen"]) == len(one["seen"]) == 8  # 512 examples / (2 ranks * 32)
    assert zero["seen"] == one["seen"]  # state at the start of every step, after the previous step's sync
    assert zero["final"] == one["final"]  # weights, masks and the multiplier after training
    assert zero["chosen"] != one["chosen"]  # the ranks did decide differently: the sync made them agree
    assert zero["losses"] == one["losses"]  # losses are averaged over ranks
    assert zero["magnitude"] == one["magnitude"]
    assert zero["l0"] == one["l0"]  # gates (log_alpha), weights
    assert zero["l0_method"] == one["l0_method"] and zero["l0_method"]["multiplier"] > 0


def test_per_step_sync_sends_no_trained_gates(ranks):
    """Per-weight L0 gates are trained by autograd: DDP's all-reduce keeps them identical, nothing resends them."""
    per_step = ranks[0]["sync_bytes"]  # what each step's sync gave to broadcast and all_reduce
    gates = ranks[0]["gate_bytes"]  # one float32 log_alpha per weight of fc1 and fc2: 434 kB
    assert gates == 4 * (784 * 128 + 128 * 64)
    assert len(per_step) == 8 and max(per_step) < 1024  # before: every step broadcast all the gates again


def test_a_mask_changed_on_another_rank_only_gets_rank_0s_value(ranks):
    # rank 1's change is flagged to every rank (an all-reduce of flags), so rank 0's unchanged mask is sent
    assert ranks[0]["one_rank"] == ranks[1]["one_rank"] == [128 * 784, 64 * 128]


def test_ddp_leaves_buffers_to_sparsewrap_and_batchnorm_statistics_agree(ranks):
    assert ranks[0]["resends"] is ranks[1]["resends"] is False  # masks are not sent before every forward
    assert ranks[0]["bn"] == ranks[1]["bn"]  # running statistics: rank 0's, broadcast after every step


def test_ranks_that_differ_raise_a_divergence_error(ranks):
    for rank in ranks:  # every rank raises, none hangs; the check at step 4 sees rank-dependent step 2
        message, step = rank["diverged"]
        assert step == 4
        assert "ranks hold different sparsity state after step 4" in message
        assert "the parameters trained by autograd (gates, thresholds)" in message and "buffers (masks)" not in message
        assert "\n" not in message


def test_ddp_sparsity_matches_a_single_process_run(ranks):
    data = build_data("mnist", limit=512, val_limit=200)
    train, _ = make_loaders(data, batch_size=64, seed=0)
    torch.manual_seed(0)
    single = magnitude(MLP())
    sw.fit(single, train, epochs=2, seed=0)
    report = single.report()
    assert ranks[0]["layers"] == [la.exported_sparsity for la in report.layers]
    assert ranks[0]["exported"] == report.exported
    assert abs(report.exported - 0.9) < 784 / sum(la.params for la in report.layers)


def test_validation_is_sharded_without_padding_and_summed(ranks):
    assert ranks[0]["val_examples"] + ranks[1]["val_examples"] == 200
    assert ranks[0]["val_accuracy"] == ranks[1]["val_accuracy"]


def test_torchrun_train_two_processes(tmp_path):  # 10-25 s on two busy cores: in make test
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "sparsewrap", "train", "--model", "sparsewrap.demo.models:mlp_300_100", "--method", "magnitude", "--target",
           "0.8", "-O", "granularity=channel", "--epochs", "1", "--limit", "512", "--val-limit", "200",
           "--batch-size", "32", "--device", "cpu", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch 1/1") == 1  # only rank 0 prints
    sp = sw.load(out / "last.safetensors")
    assert sp.step_count == 8 and sp.report().exported == pytest.approx(0.8, abs=784 / 266_200)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "10"])
def test_a_bad_check_interval_is_refused_before_training(bad):
    data = build_data("mnist", limit=64, val_limit=0)
    train, _ = make_loaders(data, batch_size=32, seed=0)
    sp = sw.sparsify(MLP(), "magnitude", target=0.5)
    with pytest.raises(sw.ConfigError, match=r"check_every=.* must be a whole number of steps >= 0"):
        sw.fit(sp, train, ddp_check_every=bad)
    assert sp.step_count == 0

"""sw.fit: a real MNIST run reaches the target and learns; exact resume; clean stops; errors."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import sparsewrap as sw
from sparsewrap.demo.data import load_mnist
from sparsewrap.errors import CheckpointError, ConfigError
from sparsewrap.train import rng
from sparsewrap.train.history import Callback
from sparsewrap.train.loop import TrainingError, evaluate
from sparsewrap.train.state import StopSignal


class DropMLP(nn.Module):
    """784-128-64-10 with dropout, so that resumed runs also depend on the restored RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(784, 128), nn.Linear(128, 64), nn.Linear(64, 10)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.fc1(x.flatten(1))))
        return self.head(F.relu(self.fc2(x)))


@pytest.fixture(scope="module")
def mnist():
    splits = load_mnist()
    return splits["train"].dataset(1024), splits["test"].dataset(500)


def loaders(mnist, batch: int = 64) -> tuple[DataLoader, DataLoader]:
    train, test = mnist
    return DataLoader(train, batch_size=batch, shuffle=True), DataLoader(test, batch_size=250)


def sparsified(target: float = 0.8, end: int = 24, seed: int = 0) -> sw.Sparsifier:
    torch.manual_seed(seed)
    return sw.sparsify(DropMLP(), "magnitude", target=target, granularity="channel", schedule="cubic", end=end,
                       every=4, allocation="uniform")  # fmt: skip


def test_real_run_reaches_target_and_learns(mnist, tmp_path):
    sp = sparsified()
    train, test = loaders(mnist)
    before = evaluate(sp.model, test)
    history = sw.fit(sp, train, test, epochs=4, lr=3e-3, out=tmp_path, seed=0)
    last = history.last
    assert [r.epoch for r in history.records] == [1, 2, 3, 4]
    assert len(history.losses) == 4 * len(train) and last.step == 4 * len(train)
    assert last.val_accuracy > before.accuracy + 0.4 and last.val_accuracy > 0.7
    assert history.records[0].achieved < last.achieved  # the cubic schedule was still ramping up in epoch 1
    # an independent count on the exported model: zeros of the targeted weights
    plain = sw.export(sp)
    weights = [plain.fc1.weight, plain.fc2.weight]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert last.exported == pytest.approx(zeros / total, abs=1e-12)
    assert abs(zeros / total - 0.8) <= 784 / total  # exact to one channel (the widest row)
    assert last.achieved == pytest.approx(last.exported) and last.requested == 0.8
    assert last.method == {"scheduled sparsity": 0.8}
    assert history.checkpoint == tmp_path / "last.safetensors" and history.stopped is None


class StopAt(Callback):
    """Stops the run after global step ``at``, either by a real SIGINT or by setting ``state.stop``."""

    def __init__(self, at: int, how: str) -> None:
        self.at, self.how = at, how

    def on_step_end(self, state) -> None:
        if state.step == self.at:
            if self.how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                state.stop = True


@pytest.mark.parametrize("at,how", [(6, "sigint"), (8, "callback")])
def test_resume_continues_exactly(mnist, tmp_path, at, how):
    train, test = loaders(mnist, batch=256)  # 4 batches per epoch: 6 is mid-epoch 2, 8 the end of epoch 2
    uninterrupted = sparsified(end=8, seed=0)
    full = sw.fit(uninterrupted, train, test, epochs=3, out=tmp_path / "a", seed=0)
    reference = uninterrupted.model.state_dict()

    stopped = sw.fit(sparsified(end=8), train, test, epochs=3, out=tmp_path / "b", seed=0, callback=StopAt(at, how))
    assert stopped.stopped == ("SIGINT" if how == "sigint" else "callback")
    position = divmod(at, len(train))  # a stop on an epoch's last batch finishes that epoch first
    assert len(stopped.losses) == at and stopped.position == position and len(stopped.records) == position[0]

    sp = sparsified(end=8, seed=123)  # a different init and RNG: everything must come from the checkpoint
    resumed = sw.fit(sp, train, test, epochs=3, out=tmp_path / "b", resume=True)
    assert resumed.resumed_at == position
    assert resumed.losses == full.losses  # bit-identical, step by step
    assert [r.val_loss for r in resumed.records] == [r.val_loss for r in full.records]
    assert [r.train_loss for r in resumed.records] == [r.train_loss for r in full.records]
    for key, value in sp.model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_resume_continues_exactly_with_stochastic_gates(mnist, tmp_path, granularity):
    """L0 samples its gates from the RNG and updates a multiplier in step(): both must resume exactly (per
    weight, fc1's 100 K gates run on the native kernels where a C compiler exists)."""
    train, test = loaders(mnist, batch=256)

    def l0(seed: int) -> sw.Sparsifier:
        torch.manual_seed(seed)
        return sw.sparsify(DropMLP(), "l0", target=0.7, granularity=granularity, gate_lr=0.1, dual_lr=0.1)

    full = sw.fit(l0(0), train, test, epochs=2, out=tmp_path / "a", seed=0)
    stopped = sw.fit(l0(0), train, test, epochs=2, out=tmp_path / "b", seed=0, callback=StopAt(5, "sigint"))
    assert stopped.position == (1, 1)
    sp = l0(7)
    resumed = sw.fit(sp, train, test, epochs=2, out=tmp_path / "b", resume=True)
    assert resumed.losses == full.losses and resumed.penalties == full.penalties
    assert any(p != 0 for p in full.penalties)  # the multiplier did move
    assert resumed.last.method == full.last.method  # multiplier, expected density, ...


def test_finished_run_resumes_to_nothing(mnist, tmp_path):
    train, _ = loaders(mnist, batch=256)
    sw.fit(sparsified(), train, epochs=1, out=tmp_path)
    again = sw.fit(sparsified(), train, epochs=1, out=tmp_path, resume=True)
    assert again.resumed_at == (1, 0) and len(again.losses) == len(train) and len(again.records) == 1


def test_out_dir_with_a_checkpoint_needs_resume_or_overwrite(mnist, tmp_path):
    train, _ = loaders(mnist, batch=256)
    sw.fit(sparsified(), train, epochs=1, out=tmp_path)
    with pytest.raises(ConfigError, match=r"already holds a checkpoint .*target 0.8.*resume=True.*overwrite=True"):
        sw.fit(sparsified(), train, epochs=1, out=tmp_path)
    with pytest.raises(CheckpointError, match=r"belongs to another run: its target is 0.8, this run's is 0.5"):
        sw.fit(sparsified(target=0.5), train, epochs=1, out=tmp_path, resume=True)
    history = sw.fit(sparsified(target=0.5), train, epochs=1, out=tmp_path, overwrite=True)
    assert history.last.requested == 0.5
    assert sw.load(tmp_path / "last.safetensors", model=DropMLP()).spec.target == 0.5


def test_resume_without_checkpoint_warns_and_starts(mnist, tmp_path):
    train, _ = loaders(mnist, batch=512)
    with pytest.warns(UserWarning, match="holds no checkpoint; starting a new run"):
        history = sw.fit(sparsified(), train, epochs=1, out=tmp_path, resume=True)
    assert history.resumed_at is None and len(history.records) == 1


def test_cosine_schedule_decays_the_weights_group_only(mnist):
    train, _ = loaders(mnist, batch=256)  # 4 steps per epoch
    sp = sparsified()
    opt_lr = 0.01
    history = sw.fit(sp, train, epochs=2, lr=opt_lr, lr_schedule="cosine")
    assert history.records[0].lr == pytest.approx(opt_lr * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert history.records[1].lr == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("method", "group", "follows"),
    [("str", "thresholds", True), ("halo", "lambdas", True), ("sws", "lambdas", True), ("l0", "gates", False)],
)
def test_cosine_schedule_decays_method_groups_marked_scheduled(mnist, method, group, follows):
    """STR's thresholds and the penalties' coefficients are trained like weights (decayed with them); L0's gates
    keep their own rate."""
    train, _ = loaders(mnist, batch=256)  # 4 steps per epoch
    sp = sw.sparsify(DropMLP(), method, target=0.7)
    opt = torch.optim.SGD(sp.param_groups(lr=0.01, **{group: {"lr": 0.3}}), lr=0.01)
    sw.fit(sp, train, epochs=1, optimizer=opt, lr_schedule="cosine")
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["weights"] == pytest.approx(0.0, abs=1e-12)  # the end of the cosine
    assert lrs[group] == pytest.approx(0.0 if follows else 0.3, abs=1e-12)


def test_a_group_override_can_keep_the_thresholds_at_their_rate(mnist):
    train, _ = loaders(mnist, batch=256)
    sp = sw.sparsify(DropMLP(), "str", target=0.7)
    opt = torch.optim.SGD(sp.param_groups(lr=0.01, thresholds={"scheduled": False}), lr=0.01)
    sw.fit(sp, train, epochs=1, optimizer=opt, lr_schedule="cosine")
    assert {g["name"]: g["lr"] for g in opt.param_groups}["thresholds"] == pytest.approx(0.01)


def test_checkpoint_holds_the_optimizer_groups_and_state(mnist, tmp_path):
    from sparsewrap.io.checkpoint import read_extra

    train, _ = loaders(mnist, batch=256)
    torch.manual_seed(0)
    sp = sw.sparsify(DropMLP(), "l0", target=0.7, granularity="channel")
    sw.fit(sp, train, epochs=1, lr=2e-3, weight_decay=1e-4, groups={"gates": {"lr": 0.25}}, out=tmp_path)
    saved = read_extra(tmp_path / "last.safetensors")
    groups = {g["name"]: g for g in saved["optimizer"]["param_groups"]}
    assert (groups["weights"]["lr"], groups["weights"]["weight_decay"]) == (2e-3, 1e-4)
    assert (groups["gates"]["lr"], groups["gates"]["weight_decay"]) == (0.25, 0.0)
    steps = {float(v["step"]) for v in saved["optimizer"]["state"].values()}
    assert steps == {4.0}  # Adam's per-parameter step counters, as tensors in the safetensors file
    assert saved["loop"]["epoch"] == 1 and saved["loop"]["step"] == 4 and saved["losses"].shape == (2, 4)


def test_plain_model_trains_but_cannot_checkpoint(mnist, tmp_path):
    train, test = loaders(mnist, batch=128)
    torch.manual_seed(0)
    model = DropMLP()
    history = sw.fit(model, train, test, epochs=1, lr=2e-3)
    assert history.last.achieved is None and history.last.val_accuracy > 0.5
    with pytest.raises(ConfigError, match="need a sparsified model"):
        sw.fit(model, train, epochs=1, out=tmp_path)


def test_evaluate_matches_a_manual_count(mnist):
    _, test = loaders(mnist)
    torch.manual_seed(1)
    model = DropMLP().eval()
    x, y = mnist[1].tensors
    with torch.no_grad():
        out = model(x)
    result = evaluate(model, test)
    assert result.examples == 500
    assert result.accuracy == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert result.loss == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)


def test_bad_arguments_are_named(mnist):
    train, _ = loaders(mnist)
    sp = sparsified()
    with pytest.raises(ConfigError, match="epochs=0 must be a positive integer"):
        sw.fit(sp, train, epochs=0)
    with pytest.raises(ConfigError, match=r"lr_schedule='step' is unknown; valid: 'constant', 'cosine'"):
        sw.fit(sp, train, lr_schedule="step")
    with pytest.raises(ConfigError, match=r"optimizer='lamb' is unknown; valid: 'adam', 'adamw', 'sgd'"):
        sw.fit(sp, train, optimizer="lamb")
    partial = torch.optim.SGD([sp.model.head.weight], lr=0.1)
    with pytest.raises(ConfigError, match=r"does not hold 5 trainable parameter\(s\).*sp.param_groups"):
        sw.fit(sp, train, optimizer=partial)
    with pytest.raises(ConfigError, match=r"an \(inputs, targets\) pair"):
        sw.fit(sp, [torch.zeros(2, 784)])


def test_non_finite_loss_stops_with_advice(mnist):
    train, _ = loaders(mnist)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1, step 1; lower the learning rate"):
        sw.fit(sparsified(), train, loss_fn=lambda out, y: out.sum() * math.nan)


def test_stop_signal_repeat_and_second_signal():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a launcher's forwarded copy, within the repeat window: same request
        assert stop.requested == "SIGINT"
    stop = StopSignal()
    stop.repeat_window = 0.0
    with pytest.raises(KeyboardInterrupt):
        with stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested == "SIGTERM"
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C later: abort now
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_rng_state_round_trips_through_json():
    import json
    import random

    import numpy as np

    gen = torch.Generator().manual_seed(3)
    state = json.loads(json.dumps(rng.get_state([gen])))
    first = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=gen))
    rng.set_state(state, [gen])
    again = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=gen))
    assert torch.equal(first[0], again[0]) and first[1:3] == again[1:3] and torch.equal(first[3], again[3])


def test_callbacks_see_the_task_loss_and_the_penalty_apart(mnist):
    """The step's penalty reaches callbacks (the CLI shows task loss and penalty apart); the epoch record's task
    loss is the mean of the steps' losses without their penalties."""
    torch.manual_seed(0)
    sp = sw.sparsify(DropMLP(), "l0", lmbda=0.5)  # penalized mode: the penalty is lmbda * E[density] > 0

    class Seen(Callback):
        def __init__(self) -> None:
            self.steps: list[tuple[float, float]] = []

        def on_step_end(self, state) -> None:
            self.steps.append((state.loss, state.penalty))

    seen = Seen()
    history = sw.fit(sp, loaders(mnist)[0], epochs=1, callback=seen, seed=0)
    assert seen.steps == list(zip(history.losses, history.penalties))
    assert all(0 < p < loss for loss, p in seen.steps)  # the penalty is part of the loss, not all of it
    record = history.last
    expected = sum(loss - p for loss, p in seen.steps) / len(seen.steps)
    assert record.task_loss == pytest.approx(expected, rel=1e-9)
    assert record.penalty == pytest.approx(sum(p for _, p in seen.steps) / len(seen.steps), rel=1e-9)

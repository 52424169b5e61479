"""The hooks of the method base that the coming methods build on (docs/methods-api.md), each used by a small
method written here: the run's length, the optimizer and its state, the dense gradient on chosen steps.
(A method that wraps nothing has its contract test: tests/test_contract_unwrapped.py.)"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

import sparsewrap as sw
from sparsewrap.errors import ConfigError
from sparsewrap.methods import reset_optimizer_state, unregister_method
from sparsewrap.methods.run import reset_optimizer_state_at
from sparsewrap.methods.schedules import StepSpec, check_steps
from sparsewrap.parametrizations import Masked, attach, wrapped_tensors

from .zoo import MLP


# -- small methods using the hooks ----------------------------------------------------------------------------------
@dataclass
class PhasesConfig:
    end: StepSpec = 0.5  # the step (or fraction of the run) at which every other weight is pruned

    def __post_init__(self) -> None:
        check_steps(self.end, "end")


class Phases(sw.Method):
    """Dense until ``end``, then every other weight pruned: a method with a phase laid over the run's length."""

    name = "test-phases"
    description = "Prunes every other weight at step end (test method)."
    Config = PhasesConfig
    needs_target = False

    def attach(self) -> None:
        self.masks = [attach(t.module, "weight", Masked(t.shape, t.original)) for t in self.targets]
        self.end_step: int | None = None
        self.seen: list[int] = []

    started: list[int | None] = []  # every run length this method was started with, in this process

    def on_start(self) -> None:
        self.end_step = self.resolve_steps(self.config.end, "end")
        Phases.started.append(self.run.total_steps)

    def step(self, t: int) -> None:
        if self.end_step is None:  # sp.start() was never called: resolving a fraction raises, naming it
            self.end_step = self.resolve_steps(self.config.end, "end")
        self.seen.append(t)
        if t == self.end_step:
            with torch.no_grad():
                for m in self.masks:
                    m.mask.view(-1)[::2] = 0


@dataclass
class EveryConfig:
    every: int = 3


class DenseEvery(sw.Method):
    """Every other weight pruned; asks for the dense gradient on every ``every``-th step and records it; on those
    steps it regrows the first pruned weight of each layer at zero and resets its optimizer state (as RigL does)."""

    name = "test-dense-every"
    description = "Records the dense gradient every few steps (test method)."
    Config = EveryConfig
    needs_target = False

    def attach(self) -> None:
        self.masks = [attach(t.module, "weight", Masked(t.shape, t.original)) for t in self.targets]
        for m in self.masks:
            m.mask.view(-1)[::2] = 0
        self.recorded: dict[int, dict[tuple[str, str], Tensor]] = {}

    def dense_grad_step(self, t: int) -> bool:
        return t % self.config.every == self.config.every - 1

    def step(self, t: int) -> None:
        grads = self.dense_grads()
        assert bool(grads) == self.dense_grad_step(t)  # test code: seen on the asked steps only
        if grads:
            self.recorded[t] = {k: v.clone() for k, v in grads.items()}
            for target, m in zip(self.targets, self.masks):
                grow = torch.zeros_like(m.mask, dtype=torch.bool)
                grow.view(-1)[int((m.mask.view(-1) == 0).nonzero()[0])] = True
                with torch.no_grad():
                    m.mask[grow] = 1.0
                self.reset_optimizer_state(target.original, grow)


@pytest.fixture(autouse=True)
def test_methods() -> Iterator[None]:
    for cls in (Phases, DenseEvery):
        sw.register_method(cls)
    yield
    for cls in (Phases, DenseEvery):
        unregister_method(cls.name)


def _loader(batches: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(batches)]


# -- 1. the run's length ----------------------------------------------------------------------------------------------
def test_fit_tells_the_method_the_run_length_and_the_optimizer() -> None:
    torch.manual_seed(0)
    sp = sw.sparsify(MLP(), "test-phases", end=0.5)
    assert sp.total_steps is None and sp.optimizer is None
    sw.fit(sp, _loader(4), epochs=3, optimizer="sgd", lr=0.01, handle_signals=False)
    assert sp.total_steps == 12 and isinstance(sp.optimizer, torch.optim.SGD)
    assert sp.method.end_step == 6 and sp.method.seen == list(range(12))
    assert sp.sparsity() == pytest.approx(0.5, abs=0.01)  # pruned at step 6 of 12


def test_sparsewrap_train_tells_the_method_the_run_length(tmp_path, capsys) -> None:
    from sparsewrap.cli import main

    Phases.started.clear()
    argv = ["train", "--model", "sparsewrap.demo.models:lenet5", "--method", "test-phases", "-O", "end=0.5",
            "--limit", "128", "--val-limit", "64", "--batch-size", "64", "--epochs", "3",
            "--out", str(tmp_path / "run")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert Phases.started == [6]  # 128 examples / 64 per batch x 3 epochs


def test_a_hand_written_loop_passes_the_run_length_once() -> None:
    sp = sw.sparsify(MLP(), "test-phases", end=0.25)
    assert sp.start(total_steps=10) is sp
    assert sp.method.end_step == 3  # 2.5 rounds half up
    sp.start(total_steps=100)  # a second call (a resumed, longer run) replaces it
    assert sp.method.end_step == 25
    counted = sw.sparsify(MLP(), "test-phases", end=4)  # a step count needs no run length
    counted.start()
    assert counted.method.end_step == 4 and counted.total_steps is None


def test_a_method_that_needs_the_run_length_and_was_not_given_it_names_the_fix() -> None:
    sp = sw.sparsify(MLP(), "test-phases", end=0.75)
    expected = (
        r"end=0.75 is a fraction of the run, but method 'test-phases' was not told the run's length; call "
        r"sp.start\(total_steps=N, optimizer=opt\) before training \(sw.fit and `sparsewrap train` do it for a "
        r"train loader with a len\(\)\), or give end as a step count"
    )
    with pytest.raises(ConfigError, match=expected):
        sp.step()
    with pytest.raises(
        ConfigError, match=r"method 'test-phases' needs the run's length \(total_steps\); call sp.start"
    ):
        sp.method.total_steps()
    with pytest.raises(ConfigError, match=r"method 'test-phases' needs the optimizer .*; call sp.start"):
        sp.method.reset_optimizer_state(sp.targets[0].original, torch.ones(sp.targets[0].shape, dtype=torch.bool))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(total_steps=0), r"total_steps=0 must be a positive int"),
        (dict(total_steps=True), r"total_steps=True must be a positive int"),
        (dict(total_steps=10.0), r"total_steps=10.0 must be a positive int"),
        (dict(optimizer="sgd"), r"optimizer must be a torch.optim.Optimizer, got str"),
    ],
)
def test_start_checks_its_arguments(kwargs: dict, match: str) -> None:
    sp = sw.sparsify(MLP(), "test-phases", end=2)
    with pytest.raises(ConfigError, match=match):
        sp.start(**kwargs)


def test_step_options_are_checked_when_the_method_is_created() -> None:
    with pytest.raises(ConfigError, match=r"end=1.5 is a float outside \[0, 1\]"):
        sw.sparsify(MLP(), "test-phases", end=1.5)  # before any run: check_steps in the config


# -- 2. the optimizer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given", [True, False], ids=["optimizer-given", "no-optimizer"])
def test_magnitude_with_weight_decay_and_momentum_keeps_pruned_weights_at_exactly_zero(given: bool) -> None:
    """Gradual magnitude prunes at steps 2, 4 and 6 with live momentum and weight decay: after every ``sp.step()``
    every pruned original is exactly zero (the controller's pass), whether or not it was given the optimizer."""
    torch.manual_seed(0)
    sp = sw.sparsify(MLP(), "magnitude", target=0.8, schedule="cubic", start=2, end=6, every=2)
    opt = torch.optim.SGD(sp.param_groups(lr=0.1, weight_decay=1e-2), momentum=0.9)
    if given:
        sp.start(total_steps=10, optimizer=opt)
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(sp.model(x), y).backward()
        opt.step()
        sp.step()
        for t, m in zip(sp.targets, sp.method.masks):
            assert torch.all(t.original[m.mask == 0] == 0), t.name  # the original itself, no forward between
    assert sp.sparsity() == pytest.approx(0.8, abs=0.01)


def test_a_mask_attached_during_the_run_is_settled_too() -> None:
    """A method may attach a mask mid-run (a penalty method's fine-tune): ``sp.step()`` finds it."""
    sp = sw.sparsify(MLP(), "magnitude", target=0.5)
    sp.step()  # the controller has looked for masks once
    late = attach(sp.model.head, "weight", Masked(sp.model.head.weight.shape, sp.model.head.weight))
    late.mask.view(-1)[::3] = 0
    original = sp.model.head.parametrizations.weight.original
    with torch.no_grad():
        original.add_(1.0)  # a writer the mask has not seen (no forward since)
    sp.step()
    assert torch.all(original[late.mask == 0] == 0) and torch.all(original[late.mask == 1] != 0)


@pytest.mark.parametrize(
    ("opt_cls", "kwargs", "keys"),
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9), ["momentum_buffer"]),
        (torch.optim.Adam, dict(lr=0.01), ["exp_avg", "exp_avg_sq"]),
        (torch.optim.AdamW, dict(lr=0.01, amsgrad=True), ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
    ],
    ids=["SGD", "Adam", "AdamW"],
)
def test_reset_optimizer_state_zeroes_the_chosen_entries_only(opt_cls, kwargs, keys) -> None:
    w = nn.Parameter(torch.randn(4, 4))
    opt = opt_cls([w], **kwargs)
    for _ in range(3):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    before = {k: opt.state[w][k].clone() for k in keys}
    assert all(torch.all(v != 0) for v in before.values())
    chosen = torch.zeros(4, 4, dtype=torch.bool)
    chosen[1, 2] = chosen[3, 0] = True
    reset_optimizer_state(opt, w, chosen)
    for k in keys:
        assert torch.all(opt.state[w][k][chosen] == 0)
        assert torch.equal(opt.state[w][k][~chosen], before[k][~chosen])
    reset_optimizer_state(opt, w, torch.tensor([True, False, False, False]).view(4, 1))  # broadcast: row 0
    assert all(torch.all(opt.state[w][k][0] == 0) for k in keys)
    fresh = nn.Parameter(torch.randn(3))
    reset_optimizer_state(opt_cls([fresh], **kwargs), fresh, torch.ones(3, dtype=torch.bool))  # no state yet: no-op


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW], ids=["SGD", "AdamW"])
def test_reset_optimizer_state_at_positions_equals_the_bool_mask_form(opt_cls, layout: str) -> None:
    init = torch.randn(3, 2, 2, 2)
    if layout == "channels_last":
        init = init.to(memory_format=torch.channels_last)
    ws = [nn.Parameter(init.clone(memory_format=torch.preserve_format)) for _ in range(2)]
    kwargs = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {}
    opts = [opt_cls([w], lr=0.1, **kwargs) for w in ws]
    for w, opt in zip(ws, opts):
        for _ in range(2):
            opt.zero_grad()
            (w**2).sum().backward()
            opt.step()
    assert ws[1].is_contiguous() == (layout == "contiguous")
    positions = torch.tensor([0, 5, 17, 23])
    chosen = torch.zeros(24, dtype=torch.bool)
    chosen[positions] = True
    state = {k: v for k, v in opts[0].state[ws[0]].items() if torch.is_tensor(v) and v.shape == init.shape}
    before = {k: v.clone() for k, v in state.items()}
    reset_optimizer_state(opts[0], ws[0], chosen.reshape(init.shape))
    reset_optimizer_state_at(opts[1], ws[1], positions)
    for k in state:
        assert torch.equal(opts[1].state[ws[1]][k], opts[0].state[ws[0]][k]), k
        assert torch.all(before[k].reshape(-1)[chosen] != 0), k
        assert torch.equal(opts[1].state[ws[1]][k].reshape(-1)[~chosen], before[k].reshape(-1)[~chosen]), k
    w = ws[1]
    with pytest.raises(ConfigError, match=r"the optimizer does not hold this parameter"):
        reset_optimizer_state_at(opts[1], nn.Parameter(torch.randn(3)), positions)
    with pytest.raises(ConfigError, match=r"positions must be an integer tensor .*got torch.bool"):
        reset_optimizer_state_at(opts[1], w, chosen)


def test_reset_optimizer_state_refuses_what_it_does_not_know() -> None:
    w = nn.Parameter(torch.randn(3))
    with pytest.raises(ConfigError, match=r"cannot reset the state of optimizer RMSprop: .*; use one of 'Adam', "
                                          r"'AdamW', 'SGD'"):  # fmt: skip
        reset_optimizer_state(torch.optim.RMSprop([w]), w, torch.ones(3, dtype=torch.bool))
    other = nn.Parameter(torch.randn(3))
    with pytest.raises(ConfigError, match=r"the optimizer does not hold this parameter \(shape \(3,\)\)"):
        reset_optimizer_state(torch.optim.SGD([w], lr=0.1), other, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ConfigError, match=r"index_mask must be a bool tensor .*got torch.float32"):
        reset_optimizer_state(torch.optim.SGD([w], lr=0.1), w, torch.ones(3))
    with pytest.raises(ConfigError, match=r"index_mask of shape \(2,\) does not broadcast to the parameter's \(3,\)"):
        reset_optimizer_state(torch.optim.SGD([w], lr=0.1), w, torch.ones(2, dtype=torch.bool))


# -- 3. the dense gradient on chosen steps --------------------------------------------------------------------------
def _reference_dense_grads(sp: sw.Sparsifier, batches: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """dL/dW at the effective weights, computed on a plain copy whose weights are leaves (no sparsewrap)."""
    plain = MLP()
    plain.load_state_dict(sw.export(sp).state_dict())
    for _x, _y in batches:
        F.cross_entropy(plain(_x), _y).backward()
    return {t.name: plain.get_submodule(t.name).weight.grad for t in sp.targets}


def test_a_method_sees_the_dense_gradient_on_the_steps_it_asks_for_only() -> None:
    torch.manual_seed(0)
    sp = sw.sparsify(MLP(), "test-dense-every", every=3)
    opt = torch.optim.Adam(sp.param_groups(lr=0.01))
    sp.start(total_steps=9, optimizer=opt)
    data = _loader(9, seed=4)
    for t, (x, y) in enumerate(data):
        capturing = sp.method.dense_grad_step(t)
        assert all(p.capturing_dense_grad == capturing for _m, _mod, _t, p in wrapped_tensors(sp.model))
        original = sp.targets[0].original
        assert (sp.model.fc1.weight is original) != capturing  # other steps: the fast path, no view, no hook
        batches = [(x, y), (x[:4], y[:4])] if t == 5 else [(x, y)]  # a step with gradient accumulation
        reference = _reference_dense_grads(sp, batches) if capturing else None
        opt.zero_grad()
        for bx, by in batches:
            F.cross_entropy(sp.model(bx), by).backward()
        for target, m in zip(sp.targets, sp.method.masks):
            assert torch.all(target.original.grad[m.mask == 0] == 0)  # what the optimizer sees stays masked
        opt.step()
        sp.step()
        if capturing:
            for target in sp.targets:
                dense = sp.method.recorded[t][(target.name, "weight")]
                torch.testing.assert_close(dense, reference[target.name], rtol=1e-5, atol=1e-6)
                assert torch.any(dense[target.original.grad == 0] != 0)  # the pruned entries' gradient is there
    assert sorted(sp.method.recorded) == [2, 5, 8]
    assert all(p.dense_grad is None for _m, _mod, _t, p in wrapped_tensors(sp.model))


def _dense_worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        sw.register_method(DenseEvery)  # in this process only
        torch.manual_seed(0)  # the same model on every rank
        sp = sw.sparsify(MLP(), "test-dense-every", every=1)
        opt = torch.optim.SGD(sp.param_groups(lr=0.1))
        sp.start(total_steps=1, optimizer=opt)
        x, y = _loader(2, seed=9)[rank]  # each rank its own batch
        local = _reference_dense_grads(sp, [(x, y)])
        F.cross_entropy(sp.model(x), y).backward()
        opt.step()
        sp.step()
        record = {"local": {k: v.tolist() for k, v in local.items()},
                  "seen": {m: v.tolist() for (m, _t), v in sp.method.recorded[0].items()}}  # fmt: skip
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_under_ddp_every_rank_sees_the_dense_gradient_averaged_over_ranks(tmp_path) -> None:
    mp.spawn(_dense_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    zero, one = (json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(2))
    assert zero["seen"] == one["seen"] and zero["local"] != one["local"]
    for name, seen in zero["seen"].items():
        mean = (torch.tensor(zero["local"][name]) + torch.tensor(one["local"][name])) / 2
        torch.testing.assert_close(torch.tensor(seen), mean, rtol=1e-5, atol=1e-7)


def test_regrown_weights_start_at_zero_with_a_fresh_optimizer_state() -> None:
    torch.manual_seed(0)
    sp = sw.sparsify(MLP(), "test-dense-every", every=2)
    opt = torch.optim.SGD(sp.param_groups(lr=0.05), momentum=0.9)
    sp.start(total_steps=4, optimizer=opt)
    for t, (x, y) in enumerate(_loader(2, seed=1)):
        opt.zero_grad()
        F.cross_entropy(sp.model(x), y).backward()
        opt.step()
        if t == 1:  # a stale state at the entry about to be regrown
            for target in sp.targets:
                opt.state[target.original]["momentum_buffer"].view(-1)[0] = 5.0
        sp.step()
    for target, m in zip(sp.targets, sp.method.masks):  # step 1 regrew flat index 0 of each layer
        assert m.mask.view(-1)[0] == 1 and target.original.view(-1)[0] == 0
        assert opt.state[target.original]["momentum_buffer"].view(-1)[0] == 0
    with pytest.raises(ConfigError, match=r"cannot reset the state of optimizer Adagrad"):
        sp.start(total_steps=4, optimizer=torch.optim.Adagrad(sp.param_groups(lr=0.05)))
        for x, y in _loader(2, seed=2):
            F.cross_entropy(sp.model(x), y).backward()
            sp.step()


def test_a_deepcopy_of_a_capturing_model_trains_on_its_own() -> None:
    sp = sw.sparsify(MLP(), "test-dense-every", every=1)
    twin = copy.deepcopy(sp.model)
    x, y = _loader(1)[0]
    F.cross_entropy(twin(x), y).backward()
    assert twin.fc1.parametrizations.weight.original.grad is not None


def test_any_parametrization_records_the_gradient_of_its_effective_tensor() -> None:
    """The capture is the parametrization base's: a soft mask (the plain product) records dL/dW_eff, not the
    masked gradient of the original."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    p = attach(layer, "weight", Masked(layer.weight.shape, layer.weight, hard=False))
    p.mask.uniform_(0.2, 0.9)
    x = torch.randn(4, 5)
    effective = (layer.parametrizations.weight.original * p.mask).detach().requires_grad_()
    (reference,) = torch.autograd.grad(F.linear(x, effective, layer.bias).square().sum(), effective)
    p.start_dense_grad()
    layer(x).square().sum().backward()
    torch.testing.assert_close(p.dense_grad, reference)
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, reference * p.mask)
    p.stop_dense_grad()
    assert p.dense_grad is None and not p.capturing_dense_grad
    layer(x).sum().backward()  # no hook any more: nothing is recorded
    assert p.dense_grad is None


def test_unregister_method_removes_it_and_names_the_registered_ones_when_unknown() -> None:
    assert "test-phases" in sw.list_methods()
    assert unregister_method("test-phases") is Phases
    assert "test-phases" not in sw.list_methods()
    with pytest.raises(sw.UnknownNameError, match=r"unknown method 'test-phases'; registered methods: .*'magnitude'"):
        unregister_method("test-phases")
    sw.register_method(Phases)  # for the fixture's teardown

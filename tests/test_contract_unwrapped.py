"""The contract for a method that wraps nothing during training (penalty methods: HALO, L1, soft weight sharing):
it trains the plain model with a loss term, and ``sw.export`` writes what its ``bake()`` prunes, on every model of
the tiny zoo. The method used here, ``test-penalty-only``, is an L1 penalty pruned by global magnitude at bake.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import sparsewrap as sw
from sparsewrap.errors import ConfigError
from sparsewrap.methods import unregister_method
from sparsewrap.parametrizations import wrapped_tensors

from .zoo import ZOO, outputs

STEPS = 5
TARGET = 0.6


def _input(name: str) -> Tensor:
    torch.manual_seed(1234)
    return ZOO[name][1]()


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO[name][0]()


def _loss(out: object) -> Tensor:
    return sum(o.float().pow(2).mean() for o in outputs(out))


def _train(sp: sw.Sparsifier, x: Tensor) -> None:
    torch.manual_seed(7)
    opt = torch.optim.SGD(sp.param_groups(lr=0.05), momentum=0.9)
    sp.start(total_steps=STEPS, optimizer=opt)
    sp.model.train()
    for _ in range(STEPS):
        loss = _loss(sp.model(x)) + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


def _eval(model: nn.Module, x: Tensor) -> list[Tensor]:
    model.eval()
    with torch.no_grad():
        return outputs(model(x))


def _assert_outputs_equal(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


@dataclass
class _PenaltyOnlyConfig:
    xi: float = 1e-3


class _PenaltyOnly(sw.Method):
    """An L1 penalty on the targeted weights during training (nothing parametrized); ``bake`` keeps the largest
    ``|w|`` over all targets (global magnitude) at the requested sparsity."""

    name = "test-penalty-only"
    description = "L1 penalty, pruned at export (test method)."
    Config = _PenaltyOnlyConfig
    wraps_targets = False

    def attach(self) -> None:
        pass

    def penalty(self) -> Tensor:
        return self.config.xi * sum(t.original.abs().sum() for t in self.targets)

    def bake(self) -> dict[tuple[str, str], Tensor]:
        flat = torch.cat([t.original.detach().abs().reshape(-1) for t in self.targets])
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[torch.argsort(flat, stable=True)[: round(self.target * flat.numel())]] = False
        out, offset = {}, 0
        for t in self.targets:
            k = keep[offset : offset + t.numel].view(t.shape)
            out[(t.name, "weight")] = (t.original.detach() * k).clone()
            offset += t.numel
        return out


@pytest.fixture
def penalty_only():
    sw.register_method(_PenaltyOnly)
    yield _PenaltyOnly.name
    unregister_method(_PenaltyOnly.name)


@pytest.mark.parametrize("model_name", sorted(ZOO))
def test_a_method_that_wraps_nothing_trains_and_is_baked_by_export(model_name: str, penalty_only: str) -> None:
    """Nothing is parametrized during training; export writes what ``bake()`` prunes into the plain model."""
    x = _input(model_name)
    sp = sw.sparsify(_build(model_name, seed=5), penalty_only, target=TARGET)
    assert not list(wrapped_tensors(sp.model))
    with pytest.raises(ConfigError, match=r"is already sparsified; export it first"):
        sw.sparsify(sp.model, penalty_only, target=TARGET)
    sp.model.train()
    (_loss(sp.model(x)) + sp.penalty()).backward()
    for t in sp.targets:
        assert t.original.grad is not None and t.original.grad.abs().sum() > 0, t.name
    sp.model.zero_grad()
    _train(sp, x)
    assert not list(wrapped_tensors(sp.model))
    live_state = {k: v.detach().clone() for k, v in sp.model.state_dict().items()}
    live = _eval(sp.model, x)
    plain = sw.export(sp)
    # the expected tensors, computed here: the TARGET share of smallest |w| of all targets together are zero
    weights = {t.name: t.original.detach() for t in sp.targets}
    flat = torch.cat([w.abs().reshape(-1) for w in weights.values()])
    threshold = flat.sort().values[round(TARGET * flat.numel()) - 1]
    zeros = 0
    for name, w in weights.items():
        got = plain.get_submodule(name).weight
        torch.testing.assert_close(got, torch.where(w.abs() <= threshold, 0.0, w), rtol=0, atol=0)
        zeros += int((got == 0).sum())
    assert zeros == round(TARGET * flat.numel())
    assert sp.report().exported == pytest.approx(zeros / flat.numel(), abs=1e-12)
    live_vars, targeted = sp.model.state_dict(keep_vars=True), {id(t.original) for t in sp.targets}
    for key, value in plain.state_dict().items():  # every other tensor is the live one
        if id(live_vars[key]) not in targeted:
            assert torch.equal(value, live_state[key]), key
    fresh = _build(model_name, seed=3)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    _assert_outputs_equal(_eval(fresh, x), _eval(plain, x))
    _assert_outputs_equal(_eval(sp.model, x), live)  # export changed nothing in the live model
    for key, value in sp.model.state_dict().items():
        assert torch.equal(value, live_state[key]), key


def test_export_refuses_a_baked_tensor_the_model_does_not_have(penalty_only: str, monkeypatch) -> None:
    sp = sw.sparsify(_build("mlp"), penalty_only, target=0.5)
    monkeypatch.setattr(sp.method, "bake", lambda: {("fc1", "nope"): torch.zeros(3)})
    with pytest.raises(ConfigError, match=r"the method baked fc1.nope of shape \(3,\), but the model has no such "):
        sw.export(sp)
    monkeypatch.setattr(sp.method, "bake", lambda: {("fc1", "weight"): torch.zeros(3)})
    with pytest.raises(ConfigError, match=r"baked fc1.weight of shape \(3,\), but the model has shape \(32, 12\)"):
        sw.export(sp)


@pytest.mark.parametrize("model_name", ["mlp", "resnet_tiny", "tied_lm"])
def test_a_method_that_wraps_nothing_saves_loads_and_resumes(model_name: str, penalty_only: str, tmp_path) -> None:
    x = _input(model_name)
    sp = sw.sparsify(_build(model_name, seed=5), penalty_only, target=TARGET)
    _train(sp, x)
    path = sw.save(sp, tmp_path / "run.safetensors")
    again = sw.load(path, model=_build(model_name, seed=1))  # another initialisation: all from the file
    assert again.step_count == sp.step_count and not list(wrapped_tensors(again.model))
    _assert_outputs_equal(_eval(again.model, x), _eval(sp.model, x))
    for (k, a), (k2, b) in zip(sw.export(sp).state_dict().items(), sw.export(again).state_dict().items()):
        assert k == k2 and torch.equal(a, b), k

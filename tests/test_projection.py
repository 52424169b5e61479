"""EvalProjection: the final factors are computed once per forward, and reused across forwards while the
method's state key is unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsewrap as sw
from sparsewrap.parametrizations.projection import EvalProjection


class Source:
    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers, self.calls, self.state = layers, 0, 0

    def factors(self) -> dict[nn.Module, int]:
        self.calls += 1
        return {m: self.calls for m in self.layers}

    def key(self) -> int:
        return self.state


def _forward(holder: EvalProjection, layers: list[nn.Module]) -> list[int]:
    return [holder.factors(m) for m in layers]


def test_factors_are_asked_once_per_forward_and_again_only_when_the_state_key_changes() -> None:
    layers = [nn.Linear(2, 2), nn.Linear(2, 2)]
    keyed, plain = Source(layers), Source(layers)
    with_key, without = EvalProjection(), EvalProjection()
    with_key.bind(keyed.factors, keyed.key)
    without.bind(plain.factors)
    for _ in range(3):
        _forward(with_key, layers)
        _forward(without, layers)
    assert keyed.calls == 1 and plain.calls == 3  # one per forward without a key
    keyed.state = 1  # the method's tensors changed
    assert _forward(with_key, layers) == [2, 2] and keyed.calls == 2
    with_key.reset()  # the method's step
    assert _forward(with_key, layers) == [3, 3]


def test_evaluating_str_twice_on_unchanged_weights_projects_once(monkeypatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sp = sw.sparsify(model, "str", target=0.7, include=["0", "2"], s_init=-3.0)
    calls = []
    real = sp.method.final_factors
    monkeypatch.setattr(sp.method, "final_factors", lambda: calls.append(1) or real())
    sp.method.eval_projection.bind(sp.method.final_factors, sp.method.state_key)
    x = torch.randn(5, 8)
    model.eval()
    with torch.no_grad():
        first = model(x)
        torch.testing.assert_close(model(x), first)
        assert len(calls) == 1
        model[0].parametrizations.weight.original.mul_(1.5)  # a weight changed: projected again
        changed = model(x)
    assert len(calls) == 2
    torch.testing.assert_close(changed, sw.export(sp)(x))  # what one evaluates is still what export writes


def _in_eval(sp: sw.Sparsifier, x: torch.Tensor) -> torch.Tensor:
    sp.model.eval()
    with torch.no_grad():
        return sp.model(x)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="str", target=0.7, s_init=-3.0),
        dict(method="magnitude", target=0.7, schedule="cubic", end=10, every=1),
        dict(method="cs", target=0.7),
    ],
    ids=["str", "magnitude", "cs"],
)
def test_an_in_place_change_between_evaluations_is_seen(kwargs: dict) -> None:
    """What one evaluates stays what export writes when a weight, a mask or a score changes between two
    evaluation forwards (no step in between): the state key covers what the projection reads."""
    sp = sw.sparsify(_mlp(), include=["0", "2"], **kwargs)
    sp.start(total_steps=20)
    sp.step()  # magnitude: mid-schedule, its projection differs from the live masks
    x = torch.randn(5, 8)
    first = _in_eval(sp, x)
    torch.testing.assert_close(first, sw.export(sp)(x))
    layer = sp.model[0].parametrizations.weight
    with torch.no_grad():
        changed = layer.original if kwargs["method"] != "cs" else layer[0].s
        changed.copy_(torch.randn_like(changed))
    second = _in_eval(sp, x)
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, sw.export(sp)(x))


@pytest.mark.parametrize("method", ["str", "magnitude"])
def test_factors_made_under_inference_mode_are_not_reused_for_a_backward(method: str) -> None:
    options = dict(s_init=-3.0) if method == "str" else dict(schedule="cubic", end=10, every=1)
    sp = sw.sparsify(_mlp(), method, target=0.7, include=["0", "2"], **options)
    sp.start(total_steps=20)
    sp.step()
    sp.model.eval()
    x = torch.randn(5, 8)
    with torch.inference_mode():
        sp.model(x)
    x.requires_grad_(True)
    sp.model(x).sum().backward()  # an input gradient in eval mode (saliency) after an inference-mode pass
    assert x.grad is not None and x.grad.abs().sum() > 0

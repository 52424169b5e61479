"""EvalProjection: the final factors are computed once per forward, and reused across forwards while the
method's state key is unchanged."""

from __future__ import annotations

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

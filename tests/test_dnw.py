"""DNW: exact top-k forward, straight-through backward, per-layer budgets, on tiny hand-set layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import sparsewrap as sw
from sparsewrap.errors import ConfigError, NoTargetsError
from sparsewrap.parametrizations.topk import keep_largest, keep_largest_near

from .test_magnitude import Two

A = [[0.1, -0.4], [0.3, -0.2]]
B = [[1.0, -2.0], [3.0, 0.5], [-5.0, 6.0]]


def test_keep_largest_keeps_exactly_k_and_drops_the_earliest_ties() -> None:
    scores = torch.tensor([0.3, 0.1, 0.5, 0.2])
    assert keep_largest(scores, 2).tolist() == [True, False, True, False]
    ties = torch.tensor([1.0, 1.0, 1.0, 2.0])
    assert keep_largest(ties, 2).tolist() == [False, False, True, True]
    assert keep_largest(ties, 0).tolist() == [False] * 4
    assert keep_largest(ties, 4).tolist() == [True] * 4
    assert keep_largest(torch.tensor([[2.0, 1.0], [4.0, 3.0]]), 3).tolist() == [[True, False], [True, True]]


def test_keep_largest_near_gives_keep_largest_with_any_guess_and_selects_in_the_band() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4000, generator=g).abs()
    keep = 400
    exact = keep_largest(scores, keep)
    threshold = float(scores.kthvalue(4000 - keep).values)
    sizes: list[int] = []

    class Sizes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "kthvalue":
                sizes.append(args[0].numel())
            return func(*args, **(kwargs or {}))

    for guess in (None, threshold * 1.01, threshold * 0.97, threshold * 3, 1e-9, float("nan")):
        sizes.clear()
        with Sizes():
            mask, found = keep_largest_near(scores, keep, guess)
        assert torch.equal(mask, exact), guess
        assert found == threshold
        assert len(sizes) == 1 and (sizes[0] < 400) == (guess in (threshold * 1.01, threshold * 0.97))
    ties = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.5])  # ties at the threshold: the rule drops the earliest
    assert torch.equal(keep_largest_near(ties, 2, 1.0)[0], keep_largest(ties, 2))
    assert keep_largest_near(ties, 2, None)[0].tolist() == [False, False, True, True, False]


def test_forward_keeps_the_top_k_magnitudes_of_each_layer() -> None:
    sp = sw.sparsify(Two(A, B), "dnw", target=0.5)
    assert torch.equal(sp.model.a.weight, torch.tensor([[0.0, -0.4], [0.3, 0.0]]))
    assert torch.equal(sp.model.b.weight, torch.tensor([[0.0, 0.0], [3.0, 0.0], [-5.0, 6.0]]))
    with torch.no_grad():  # a pruned weight that grows past the k-th magnitude comes back at the next forward
        sp.model.a.parametrizations.weight.original[0, 0] = 0.35
    assert torch.equal(sp.model.a.weight, torch.tensor([[0.35, -0.4], [0.0, 0.0]]))


def test_backward_is_straight_through_to_every_weight() -> None:
    sp = sw.sparsify(Two(A, B), "dnw", target=0.5)
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    (sp.model.a(x) * torch.tensor([[1.0, 2.0], [3.0, -1.0]])).sum().backward()
    # independent: the gradient of the same loss with respect to the masked weight as a plain leaf
    w_eff = torch.tensor([[0.0, -0.4], [0.3, 0.0]], requires_grad=True)
    (F.linear(x, w_eff) * torch.tensor([[1.0, 2.0], [3.0, -1.0]])).sum().backward()
    grad = sp.model.a.parametrizations.weight.original.grad
    torch.testing.assert_close(grad, w_eff.grad, rtol=0, atol=0)
    assert (grad[w_eff.detach() == 0] != 0).all()  # pruned weights receive the gradient too


def test_one_selection_per_layer_per_forward_and_no_sort() -> None:
    sp = sw.sparsify(Two(A, B), "dnw", target=0.5)
    calls: list[str] = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Count():
        sp.model(torch.ones(1, 2))
    assert calls.count("kthvalue") == 2
    assert not {"sort", "argsort", "topk", "item", "tolist"} & set(calls)


def test_erk_and_uniform_hit_the_total_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 5), nn.ReLU(), nn.Linear(5, 3))
    sp = sw.sparsify(model, "dnw", target=0.7, allocation="erk", include=["0", "2", "4"])
    zeros = [int((m.weight == 0).sum()) for m in (model[0], model[2], model[4])]
    assert sum(zeros) == round(0.7 * (91 + 65 + 15))
    assert zeros[2] < round(0.7 * 15)  # ERK keeps the small layer denser than uniform would
    assert sp.report().exported == pytest.approx(sum(zeros) / 171)


def test_a_budget_dict_sets_each_layer_and_leaves_the_others_dense() -> None:
    sp = sw.sparsify(Two(A, B), "dnw", target={"a": 0.25, "re:b": 0.5})
    assert int((sp.model.a.weight == 0).sum()) == 1 and int((sp.model.b.weight == 0).sum()) == 3
    assert sp.method.requested_sparsity() == pytest.approx(4 / 10)
    plain = sw.export(sp)
    assert int((plain.a.weight == 0).sum()) == 1 and int((plain.b.weight == 0).sum()) == 3
    only_a = sw.sparsify(Two(A, B), "dnw", target={"a": 0.5})
    assert [t.name for t in only_a.targets] == ["a"]
    assert torch.equal(only_a.model.b.weight, torch.tensor(B))


def test_bad_options_give_one_line_errors() -> None:
    with pytest.raises(NoTargetsError, match=r"layer-wise target pattern 'c' matches no targeted layer; nearest layer"):
        sw.sparsify(Two(A, B), "dnw", target={"c": 0.5})
    with pytest.raises(ConfigError, match=r"allocation='global' is unknown for method 'dnw'; valid: 'erk', 'uniform'"):
        sw.sparsify(Two(A, B), "dnw", target=0.5, allocation="global")
    with pytest.raises(ConfigError, match=r"target\['a'\]=1.0 is outside \[0, 1\)"):
        sw.sparsify(Two(A, B), "dnw", target={"a": 1.0})
    with pytest.raises(ConfigError, match=r"method 'dnw' needs target="):
        sw.sparsify(Two(A, B), "dnw")

"""HashedNet (issue 17): the tied forward, its gradient, the bank's size and coverage, the report, bad targets."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import sparsewrap as sw
from sparsewrap.errors import ConfigError
from sparsewrap.parametrizations.hashed import Hashed, coverage_index

from .zoo import ZOO


def test_coverage_index_uses_every_bank_entry_evenly() -> None:
    index = coverage_index((4, 4), 5, torch.Generator().manual_seed(0))
    counts = torch.bincount(index.reshape(-1), minlength=5)
    assert sorted(counts.tolist()) == [3, 3, 3, 3, 4]  # 16 = 3 * 5 + 1


@pytest.mark.parametrize("sign", [False, True])
def test_forward_is_the_bank_gathered_and_the_gradient_its_scatter_add(sign: bool) -> None:
    torch.manual_seed(0)
    model = ZOO["mlp"][0]()
    sp = sw.sparsify(model, "hashednet", target=0.75, sign=sign)
    fc1 = model.fc1
    p = fc1.parametrizations.weight[0]
    bank = fc1.parametrizations.weight.original
    assert bank.shape == (round(0.25 * 12 * 32),)
    assert set(p.sign.unique().tolist()) <= {-1.0, 1.0} and (p.sign.eq(-1).any() == sign)
    expected = torch.stack([bank[i] * s for i, s in zip(p.index.reshape(-1).tolist(), p.sign.reshape(-1).tolist())])
    torch.testing.assert_close(fc1.weight, expected.reshape(32, 12), rtol=0, atol=0)
    x = ZOO["mlp"][1]()
    model(x).pow(2).sum().backward()
    # the weight's gradient, computed by hand for fc1: dL/dW = dL/dy^T x with y = fc1(x)
    with torch.no_grad():
        h = x @ fc1.weight.T + fc1.bias
        a = torch.relu(h)
        z = model.fc2(a)
        dz = 2 * model.head(torch.relu(z)) @ model.head.weight * (z > 0)
        dh = dz @ model.fc2.weight * (h > 0)
        grad_w = dh.T @ x
    scatter = torch.zeros_like(bank).index_add_(0, p.index.reshape(-1), (grad_w * p.sign).reshape(-1))
    torch.testing.assert_close(bank.grad, scatter, rtol=1e-5, atol=1e-6)
    assert any(q is bank for q in sp.param_groups()[0]["params"])  # the bank is what the optimizer sees


def test_without_the_sign_hash_the_forward_is_the_gather_alone() -> None:
    index = torch.tensor([[2, 0, 1], [1, 2, 0]])
    bank = torch.tensor([10.0, -20.0, 30.0], requires_grad=True)
    calls: list[str] = []

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    plain = Hashed(index, None, bank.detach(), 3)
    with Calls():
        out = plain(bank)
    assert torch.equal(out, torch.tensor([[30.0, 10.0, -20.0], [-20.0, 30.0, 10.0]]))
    assert not {"mul", "__mul__"} & set(calls)  # no product with a tensor of ones
    signed = Hashed(index, torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]]), bank.detach(), 3)
    assert torch.equal(signed(bank), torch.tensor([[30.0, -10.0, -20.0], [20.0, 30.0, 10.0]]))


def test_report_gives_the_bank_size_and_the_compression() -> None:
    sp = sw.sparsify(ZOO["mlp"][0](), "hashednet", target=0.9)
    report = sp.report()
    dense = 12 * 32 + 32 * 24
    bank = round(0.1 * 12 * 32) + round(0.1 * 32 * 24)
    assert report.extras == {"bank size": bank, "dense size": dense, "compression": pytest.approx(dense / bank)}
    assert [layer.params for layer in report.layers] == [12 * 32, 32 * 24]
    assert report.exported == 0.0 and "ties weights instead of zeroing them" in report.notes[0]
    plain = sw.export(sp)
    assert plain.fc1.weight.shape == (32, 12)
    assert len(torch.unique(plain.fc1.weight)) <= round(0.1 * 12 * 32)


def test_a_target_that_leaves_an_empty_bank_is_refused() -> None:
    model = ZOO["mlp"][0]()
    with pytest.raises(ConfigError, match=r"leaves layer 'fc1' \(384 weights\) a bank of 0 values; use a target below"):
        sw.sparsify(model, "hashednet", target=0.999)
    with pytest.raises(ConfigError, match=r"sign='yes' must be True or False"):
        sw.sparsify(model, "hashednet", target=0.5, sign="yes")

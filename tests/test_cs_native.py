"""CS's fused soft mask (:class:`~sparsewrap.parametrizations.soft_mask.SoftMaskMul`): the native kernels against the
eager path, the eager path against plain autograd, the penalty taken from the forward, the driven coefficient's
count taken from the forward (a step late), and a training run with the kernels on and off."""

from __future__ import annotations

import copy
import gc
import math
import pickle
import weakref

import pytest
import torch
from torch import nn

import sparsewrap as sw
from sparsewrap import native, switches
from sparsewrap.parametrizations import soft_mask
from sparsewrap.parametrizations.soft_mask import SoftMaskMul

from .test_dnw import Two

needs_native = pytest.mark.skipif(native.kernels() is None, reason="no native kernels (no C compiler)")


def _run(w: torch.Tensor, s: torch.Tensor, scale: float, beta: float, g: torch.Tensor | None, g_total: float,
         w_grad: bool = True, s_grad: bool = True) -> list[torch.Tensor | None]:  # fmt: skip
    w = w.clone().requires_grad_(w_grad)
    s = s.clone().requires_grad_(s_grad)
    out, total, positive = SoftMaskMul.apply(w, s, scale, beta)
    loss = total * g_total + ((out * g).sum() if g is not None else 0.0)
    loss.backward()
    return [out.detach(), total.detach(), positive, w.grad, s.grad]


@needs_native
@pytest.mark.parametrize("n", [1, 15, 17, 4097, 70001])  # not multiples of the vector width; one runs threaded
@pytest.mark.parametrize("beta", [1.0, 37.5])
def test_the_kernels_give_the_eager_results(monkeypatch, n: int, beta: float) -> None:
    gen = torch.Generator().manual_seed(n)
    w, s, g = (torch.randn(n, generator=gen) for _ in range(3))
    s[: n // 3] *= 10.0  # scores far from 0: beta * s up to several hundred, where the kernels clamp
    cases = [(g, 0.7, True, True), (None, 0.7, True, True), (g, 0.0, False, True), (g, 0.7, True, False)]
    for grad, g_total, w_grad, s_grad in cases:
        got = {}
        for lo in (0, 1 << 62):  # native on every size, then never
            monkeypatch.setattr(soft_mask, "NATIVE_MIN_NUMEL", lo)
            assert (soft_mask.native_for(w, s) is not None) == (lo == 0)
            got[lo] = _run(w, s, 1.3, beta, grad, g_total, w_grad, s_grad)
        for a, b in zip(got[0], got[1 << 62]):
            assert (a is None) == (b is None)
            if a is not None:
                # float32 rounding, on the tensor's scale: near saturation sigmoid(x) (1 - sigmoid(x)) is a
                # difference of nearly equal values in both paths
                torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6 * max(1.0, float(b.abs().max())))
        assert int(got[0][2]) == int((s > 0).sum())


def test_the_eager_path_has_plain_autograd_gradients_in_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    s = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    scale, beta, lmbda = 1.7, 2.5, 0.3

    def fused(w: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, total, _ = SoftMaskMul.apply(w, s, scale, beta)
        return out, lmbda * total

    assert torch.autograd.gradcheck(fused, (w, s))
    g = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    out, penalty = fused(w, s)
    grads = torch.autograd.grad((out * g).sum() + penalty, (w, s))
    m = torch.sigmoid(beta * s)
    plain_out, plain_penalty = w * scale * m, lmbda * m.sum()
    plain = torch.autograd.grad((plain_out * g).sum() + plain_penalty, (w, s))
    torch.testing.assert_close(out, plain_out, rtol=1e-14, atol=0)
    torch.testing.assert_close(penalty, plain_penalty, rtol=1e-14, atol=0)
    for a, b in zip(grads, plain):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


A = [[1.0, -0.75], [0.5, -0.25]]
B = [[2.0, 3.0], [-4.0, 0.1], [0.2, 6.0]]
SA, SB = [[0.3, -0.5], [-0.1, 0.05]], [[0.2, -0.3], [1.0, -2.0], [0.05, 0.0]]


def _cs(**options) -> sw.Sparsifier:
    sp = sw.sparsify(Two(A, B), "cs", **{"target": 0.8, "rounds": 1, "ticket_start": 5, **options})
    with torch.no_grad():
        for p, v in zip(sp.method.layers, (SA, SB)):
            p.s.copy_(torch.tensor(v))
    return sp


def _formula(sp: sw.Sparsifier, beta: float) -> float:
    total = sum(1.0 / (1.0 + math.exp(-beta * float(v))) for p in sp.method.layers for v in p.s.detach().flatten())
    return float(sp.method.coefficient()) * total


def test_the_penalty_is_the_formula_and_takes_the_forward_sum(monkeypatch) -> None:
    sp = _cs(lmbda=2e-3)
    expected = _formula(sp, 1.0)
    assert float(sp.penalty().detach()) == pytest.approx(expected, rel=1e-6)  # no forward yet: computed
    x = torch.randn(4, 2)
    out = sp.model(x)
    assert all(p.last.total is not None and p.last.total.requires_grad for p in sp.method.layers)

    def no_second_pass(self) -> None:
        raise AssertionError("the penalty computed the soft mask again")

    monkeypatch.setattr(soft_mask.SoftMask, "soft_mask", no_second_pass)
    penalty = sp.penalty()
    monkeypatch.undo()
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-6)
    assert all(p.last.total is None for p in sp.method.layers)  # taken once: a second call computes again
    (out.pow(2).mean() + penalty).backward()
    # the same loss through plain autograd on w * c * sigmoid(s) (c = 2 at s0 = 0, beta = 1)
    sa, sb = (torch.tensor(v, requires_grad=True) for v in (SA, SB))
    wa, wb = torch.tensor(A) * 2.0 * torch.sigmoid(sa), torch.tensor(B) * 2.0 * torch.sigmoid(sb)
    head = sp.model.head
    plain = head(torch.relu(torch.relu(x @ wa.T) @ wb.T)).pow(2).mean()
    (plain + 2e-3 * (torch.sigmoid(sa).sum() + torch.sigmoid(sb).sum())).backward()
    for p, s in zip(sp.method.layers, (sa, sb)):
        torch.testing.assert_close(p.s.grad, s.grad, rtol=1e-6, atol=1e-9)


def test_the_penalty_after_a_backward_or_in_eval_or_after_a_change_is_computed_again() -> None:
    sp = _cs(lmbda=2e-3)
    x = torch.randn(4, 2)
    sp.model(x).pow(2).mean().backward()  # the forward's graph is spent (its sums were not used)
    penalty = sp.penalty()
    penalty.backward()  # a separate backward of the penalty works
    assert float(penalty.detach()) == pytest.approx(_formula(sp, 1.0), rel=1e-6)
    assert all(p.s.grad is not None for p in sp.method.layers)
    sp.model(x)
    with torch.no_grad():
        sp.method.layers[1].s.add_(0.5)  # the scores changed after the forward
    assert float(sp.penalty().detach()) == pytest.approx(_formula(sp, 1.0), rel=1e-6)
    sp.model.eval()
    sp.model(x)
    assert float(sp.penalty().detach()) == pytest.approx(_formula(sp, 1.0), rel=1e-6)
    sp.model.train()
    sp.model(x)
    for p in sp.method.layers:
        p.beta = 3.0  # another temperature than the forward's
    assert float(sp.penalty().detach()) == pytest.approx(_formula(sp, 3.0), rel=1e-6)


def test_the_driven_coefficient_reads_the_count_the_forward_took() -> None:
    sp = _cs(drive=0.5, lmbda_init=1e-3)  # five of ten scores > 0 (goal density 0.2)
    opt = torch.optim.SGD(sp.param_groups(lr=0.0))
    x = torch.randn(4, 2)
    sp.model(x).pow(2).mean().backward()
    with torch.no_grad():  # as if the optimizer step had moved every score below 0 after the forward
        for p in sp.method.layers:
            p.s.fill_(-1.0)
    opt.step()
    sp.step()  # a step late: the density of the scores the forward saw, 0.5
    assert float(sp.method.log_gain) == pytest.approx(0.5 * (0.5 - 0.2))
    sp.step()  # no forward since the last step: counted now (density 0, below the goal: relative gap -1)
    assert float(sp.method.log_gain) == pytest.approx(0.5 * 0.3 + 0.5 * (-1.0))


def test_a_forward_leaves_the_parametrization_copyable() -> None:
    sp = _cs(lmbda=2e-3)
    sp.model(torch.randn(4, 2))
    assert sp.method.layers[0].last.total is not None
    clone = copy.deepcopy(sp.model)  # the forward's sum (a non-leaf tensor) is not copied
    assert clone.a.parametrizations.weight[0].last.total is None
    assert pickle.loads(pickle.dumps(sp.method.layers[0].last)).total is None


def test_an_unused_forward_is_freed_without_the_garbage_collector() -> None:
    sp = _cs(lmbda=2e-3)
    out = sp.model(torch.randn(4, 2))  # neither the penalty nor a backward uses it
    p = sp.method.layers[0]
    record = weakref.ref(p.last)
    gc.disable()
    try:
        del out
        p.last = soft_mask.Pass()
        assert record() is None  # no reference cycle through the autograd graph keeps it (and its saved tensors)
    finally:
        gc.enable()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(9, 23), nn.Linear(23, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _train_tiny(steps: int) -> tuple[list[torch.Tensor], float]:
    torch.manual_seed(0)
    sp = sw.sparsify(Net(), "cs", target=0.7, rounds=2, rewind=1)
    opt = torch.optim.SGD(sp.param_groups(lr=0.1), momentum=0.9)
    sp.start(total_steps=3 * steps, optimizer=opt)
    x, y = torch.randn(32, 9), torch.randint(0, 5, (32,))
    for _ in range(steps):
        loss = nn.functional.cross_entropy(sp.model(x), y) + sp.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sp.step()
    return [t.detach().clone() for t in sp.model.state_dict().values()], float(sp.method.log_gain)


@needs_native
def test_training_gives_the_same_result_with_the_kernels_on_and_off(monkeypatch) -> None:
    monkeypatch.setattr(soft_mask, "NATIVE_MIN_NUMEL", 0)  # the tiny layers run on the kernels
    used = []
    native_for = soft_mask.native_for
    monkeypatch.setattr(soft_mask, "native_for", lambda w, s: used.append(native_for(w, s)) or used[-1])
    on, gain_on = _train_tiny(12)
    assert used and all(lib is not None for lib in used)
    monkeypatch.setattr(switches, "NATIVE", False)
    used.clear()
    off, gain_off = _train_tiny(12)
    assert used and all(lib is None for lib in used)
    assert gain_on == pytest.approx(gain_off, rel=1e-6) and gain_on != 0.0
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

"""STR's native kernels (sparsewrap/native/shrink.c) against the eager path, and the controller's count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsewrap as sw
from sparsewrap import native, switches
from sparsewrap.parametrizations import threshold
from sparsewrap.parametrizations.threshold import SoftThreshold

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="no C compiler: the eager path is used")

N = threshold.NATIVE_MIN_NUMEL + 13  # native, and not a multiple of any vector width


def weights(n: int = N, seed: int = 0) -> torch.Tensor:
    """Random weights with +-t (t = 0.5), zeros of both signs and tiny values among them."""
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.4
    w[:7] = torch.tensor([0.5, -0.5, 0.0, -0.0, 1e-30, -1e-30, 0.5000001])
    return w


def shrink(w: torch.Tensor, g: torch.Tensor, native_on: bool, monkeypatch) -> tuple[torch.Tensor, ...]:
    monkeypatch.setattr(switches, "NATIVE", native_on)
    w = w.clone().requires_grad_()
    p = SoftThreshold(w, s_init=0.0)  # t = 0.5
    out = p(w)
    out.backward(g)
    return out.detach(), w.grad, p.s.grad, p.trained_kept


@pytest.mark.parametrize("n", [N, 3 * N + 1])
def test_the_kernels_equal_the_eager_path_bit_for_bit_and_the_dot_to_rounding(n, monkeypatch) -> None:
    w, g = weights(n), torch.randn(n, generator=torch.Generator().manual_seed(1))
    out, grad_w, grad_s, kept = shrink(w, g, True, monkeypatch)
    eager = shrink(w, g, False, monkeypatch)
    clamp_form = w - torch.clamp(w, -0.5, 0.5)  # +0 where |w| <= t
    assert torch.equal(out.view(torch.int32), clamp_form.view(torch.int32))  # the same bits, zeros' signs too
    assert torch.equal(out, eager[0])  # softshrink's values (its zeros may be -0)
    assert torch.equal(grad_w, eager[1])
    assert torch.equal(grad_w, torch.where(w.abs() > 0.5, g, 0))  # nothing at |w| == t
    # dL/ds = -t (1 - t) <g, sign(S)> in float64, independently
    reference = -(g.double() * torch.sign(w.double()) * (w.abs() > 0.5)).sum() * 0.25
    assert grad_s.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(grad_s, eager[2], rtol=1e-4, atol=1e-4)  # the eager dot is float32
    assert int(kept) == int(eager[3]) == int((w.abs() > 0.5).sum())


def test_the_output_and_gradient_buffers_are_reused_and_never_change_a_result(monkeypatch) -> None:
    w = weights().requires_grad_()
    p = SoftThreshold(w, s_init=0.0)
    first = p(w)
    kept_out = first.detach().clone()
    second = p(w)  # the first output is still alive: a new buffer
    assert second.data_ptr() != first.data_ptr() and torch.equal(first, kept_out)
    del first, second
    third = p(w)
    ptr = third.data_ptr()
    third.sum().backward()
    grad = w.grad.clone()
    del third
    w.grad = None  # as zero_grad(set_to_none=True)
    fourth = p(w)
    assert fourth.data_ptr() == ptr  # the output buffer came back
    fourth.sum().backward()
    assert torch.equal(w.grad, grad)


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 600), nn.ReLU(), nn.Linear(600, 60), nn.ReLU(), nn.Linear(60, 3))


def train(native_on: bool, monkeypatch, steps: int = 6) -> tuple[sw.Sparsifier, list[float]]:
    monkeypatch.setattr(switches, "NATIVE", native_on)
    model = build()
    assert model[2].weight.numel() >= threshold.NATIVE_MIN_NUMEL  # 600 x 64 and 60 x 600 take the kernels
    sp = sw.sparsify(model, "str", target=0.8, include=["0", "2"], s_init=-4.0)
    opt = torch.optim.SGD(sp.param_groups(lr=0.05), momentum=0.9)
    x, y = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)), torch.arange(32) % 3
    shifts = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
        shifts.append(sp.method.state_dict()["shift"])
    return sp, shifts


def test_native_on_and_off_train_a_model_to_the_same_weights(monkeypatch) -> None:
    on, shifts_on = train(True, monkeypatch)
    off, shifts_off = train(False, monkeypatch)
    assert shifts_on == pytest.approx(shifts_off, abs=1e-6)  # the same counts: the shifts agree
    for a, b in zip(on.model.state_dict().values(), off.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # only dL/ds's dot is summed in another order


@pytest.mark.parametrize("native_on", [True, False])
def test_the_controller_reads_the_count_of_the_weights_its_step_trained_on(native_on, monkeypatch) -> None:
    monkeypatch.setattr(switches, "NATIVE", native_on)
    model = build()
    sp = sw.sparsify(model, "str", target=0.8, include=["0", "2"], s_init=-4.0, drive=0.3, learn=1.0)
    opt = torch.optim.SGD(sp.param_groups(lr=0.5), momentum=0.9)
    x, y = torch.randn(32, 64), torch.arange(32) % 3
    layers, targets = sp.method.layers, sp.method.targets
    for _ in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        # the zeros of the weights and thresholds this forward used, independently of S
        seen = sum(int((t.original.abs() <= torch.sigmoid(p.s)).sum()) for t, p in zip(targets, layers))
        assert int(sp.method.trained_zeros()) == seen
        for p in layers:  # trained_zeros took the counts: give them back for the step
            p.trained_kept = None
        nn.functional.cross_entropy(model(x), y).backward()  # the same weights: the same counts
        opt.step()  # the weights and thresholds move: the exact count now differs from the trained one
        assert int(sp.method.zeros()) != seen
        s_before = sp.method.levels()
        drift = (s_before - sp.method.last).mean()
        sp.step()
        expected = 0.3 * (0.8 - seen / sp.method.numel)  # the step's count, not the current weights'
        torch.testing.assert_close(sp.method.levels(), s_before - drift + expected, rtol=0, atol=1e-6)
        opt.zero_grad()
    # without a training forward since the last step, the controller counts the current weights exactly
    assert all(p.trained_kept is None for p in layers)
    assert int(sp.method.trained_zeros()) == int(sp.method.zeros())

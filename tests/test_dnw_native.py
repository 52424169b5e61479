"""DNW's native top-k (sparsewrap/native/topk.c): the same masked weight as keep_largest in every case."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import sparsewrap as sw
from sparsewrap import native, switches
from sparsewrap.parametrizations import topk
from sparsewrap.parametrizations.topk import TopMagnitude, keep_largest, native_largest_near

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="no C compiler: the eager path is used")

N = topk.NATIVE_MIN_NUMEL + 13  # native, and not a multiple of any vector width


def exact(w: torch.Tensor, keep: int) -> torch.Tensor:
    """The eager forward's value: w where kept, w - w = +0 where dropped."""
    return w - torch.where(keep_largest(w.abs(), keep), 0, w)


class KthSizes(TorchFunctionMode):
    """Records the size of every kthvalue's input."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "kthvalue":
            self.sizes.append(args[0].numel())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [N, 2 * N + 7])
def test_the_kernels_give_keep_largest_with_any_guess_and_search_the_band_alone(n, threads) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the band is gathered in one part per thread
    try:
        w = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.1
        w[:4] = torch.tensor([0.0, -0.0, -0.3, 0.3])
        keep = n // 10 + 1
        expected = exact(w, keep)
        threshold = float(w.abs().kthvalue(n - keep).values)
        for guess in (None, threshold, threshold * 1.03, threshold * 0.96, threshold * 3, 1e-12, float("nan")):
            with KthSizes() as sizes:
                out, found = native_largest_near(w, keep, guess)
            assert torch.equal(out.view(torch.int32), expected.view(torch.int32)), guess  # the same bits
            assert found == threshold
            in_band = guess in (threshold, threshold * 1.03, threshold * 0.96)
            assert len(sizes.sizes) == 1 and (sizes.sizes[0] < n // 10) == in_band, guess
    finally:
        torch.set_num_threads(before)


def test_ties_at_the_threshold_and_an_overfull_band_follow_the_exact_rule() -> None:
    w = torch.ones(N)
    w[::3] = -2.0  # 10934 entries of |w| = 2, the rest tied at 1
    keep = (N + 2) // 3 + 100  # 100 of the tied ones stay: the earliest are dropped
    out, found = native_largest_near(w, keep, 1.0)
    assert found == 1.0 and int((out != 0).sum()) == keep
    assert torch.equal(out, exact(w, keep))
    assert torch.equal(out[-300:], exact(w, keep)[-300:]) and (out[-300:] != 0).any()
    # the band holds every |w| == 1 (two thirds of the tensor: more than its capacity) -> the full kthvalue
    with KthSizes() as sizes:
        out, found = native_largest_near(w, keep, 1.0)
    assert sizes.sizes[0] == N and torch.equal(out, exact(w, keep))
    # |w| == threshold for the k-th and (k+1)-th largest: the tie rule again
    w = torch.randn(N, generator=torch.Generator().manual_seed(5))
    w[10], w[20] = 7.0, -7.0
    out, _ = native_largest_near(w, 1, 7.0)
    assert torch.equal(out, exact(w, 1)) and out[20] == -7.0 and out[10] == 0


def test_the_forward_equals_the_eager_path_and_the_backward_hands_the_gradient_on(monkeypatch) -> None:
    w0 = torch.randn(N, generator=torch.Generator().manual_seed(3))
    g = torch.randn(N)
    p = TopMagnitude(N // 4)
    for _ in range(2):  # the first forward finds the threshold over every |w|, the second in the band
        w = w0.clone().requires_grad_()
        seen: list[torch.Tensor] = []
        out = p(w)
        out.register_hook(seen.append)
        w.register_hook(seen.append)
        out.backward(g)
        assert torch.equal(out.detach().view(torch.int32), exact(w0, N // 4).view(torch.int32))
        assert seen[0] is g and seen[1].data_ptr() == g.data_ptr()  # straight-through: not even a copy
        assert torch.equal(w.grad, g)
    monkeypatch.setattr(switches, "NATIVE", False)
    assert torch.equal(p(w0.clone().requires_grad_()).detach().view(torch.int32), out.detach().view(torch.int32))


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 600), nn.ReLU(), nn.Linear(600, 60), nn.ReLU(), nn.Linear(60, 3))


def train(native_on: bool, monkeypatch, steps: int = 6) -> nn.Module:
    monkeypatch.setattr(switches, "NATIVE", native_on)
    model = build()
    sp = sw.sparsify(model, "dnw", target=0.9, include=["0", "2"])
    opt = torch.optim.SGD(sp.param_groups(lr=0.05), momentum=0.9)
    x, y = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)), torch.arange(32) % 3
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
    return model


def test_native_on_and_off_train_a_model_to_the_same_weights(monkeypatch) -> None:
    on, off = train(True, monkeypatch), train(False, monkeypatch)
    assert on[2].weight.numel() >= topk.NATIVE_MIN_NUMEL  # both layers took the kernels
    for a, b in zip(on.state_dict().values(), off.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(on[0].weight, off[0].weight) and int((on[0].weight != 0).sum()) == 3840

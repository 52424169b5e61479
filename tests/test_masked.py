"""The masked parametrization's fast path for hard masks: exact against the plain product, whatever the optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sparsewrap import native
from sparsewrap.parametrizations import Masked, attach, masked


@pytest.fixture(params=["bits", "product"], autouse=True)
def grad_path(request, monkeypatch) -> str:
    """Every test runs twice: pruned entries zeroed by the native kernel with the mask packed in bits (for
    every full-size mask, however small), and by the product with the float mask."""
    if request.param == "bits":
        lib = native.kernels()
        if lib is None or not lib.sw_mask_vectorized():
            pytest.skip("no vectorized native mask kernel here")
        monkeypatch.setattr(masked, "NATIVE_MIN_NUMEL", 1)
    else:
        monkeypatch.setattr(masked, "NATIVE_MIN_NUMEL", 1 << 62)
    return request.param


class Product(nn.Module):
    """The reference: the textbook ``w * mask`` parametrization."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def _net(kind: str, seed: int = 0) -> tuple[nn.Sequential, list[nn.Module]]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Conv1d(1, 3, 5), nn.Flatten(), nn.Linear(48, 4))
    gen = torch.Generator().manual_seed(1)
    masks = []
    for layer in (net[0], net[2], net[4]):
        # per weight on the Linears, per output channel on the conv
        shape = layer.weight.shape if isinstance(layer, nn.Linear) else (3, 1, 1)
        mask = (torch.rand(shape, generator=gen) > 0.4).to(layer.weight.dtype)
        if kind == "fast":
            p = attach(layer, "weight", Masked(shape, layer.weight))
            p.mask.copy_(mask)
        else:
            p = Product(mask)
            parametrize.register_parametrization(layer, "weight", p)
        masks.append(p)
    return net, masks


def _forward(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    h = net[1](net[0](x))
    return net[4](net[3](net[2](h.unsqueeze(1)[..., :20])))


OPTIMIZERS = [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-2)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (torch.optim.Adam, dict(lr=0.01, weight_decay=1e-2)),
    (torch.optim.AdamW, dict(lr=0.01, amsgrad=True)),
    (torch.optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
    (torch.optim.Adagrad, dict(lr=0.05)),
    (torch.optim.Adadelta, dict(lr=0.5)),  # not zero-preserving-listed: the per-step projection path
]


@pytest.mark.parametrize("opt_cls,kwargs", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", ""))
def test_hard_mask_training_equals_the_plain_product(opt_cls, kwargs, grad_path) -> None:
    """Every step's effective weights and gradients equal those of ``w * mask``, through gradient clipping,
    gradient accumulation, gradient noise and a mask change in the middle of training (new zeros with live
    optimizer state)."""
    runs = []
    for kind in ("fast", "reference"):
        net, masks = _net(kind)
        opt = opt_cls(net.parameters(), **kwargs)
        runs.append((net, masks, opt))
    gen = torch.Generator().manual_seed(2)
    for step in range(24):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        for net, masks, opt in runs:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(_forward(net, x), y).backward()
            if step % 5 == 1:
                F.cross_entropy(_forward(net, x[:8]), y[:8]).backward()  # accumulate a second micro-batch
            if step % 7 == 3:
                nn.utils.clip_grad_norm_(net.parameters(), 0.1)
            if step % 6 == 5:
                for p in net.parameters():  # a writer that does not keep zeros (gradient noise)
                    p.grad.add_(0.01)
            opt.step()
            if step == 9:
                with torch.no_grad():
                    for m in masks:
                        m.mask.view(-1)[::3] = 0
        (fast, fast_masks, _), (ref, _, _) = runs
        for a, b in zip(fast.parameters(), ref.parameters()):
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)
        for i in (0, 2, 4):
            torch.testing.assert_close(fast[i].weight, ref[i].weight, rtol=0, atol=1e-6)
    for m, i in zip(fast_masks, (0, 2, 4)):  # the original itself is zero where the mask is
        original = fast[i].parametrizations.weight.original
        assert torch.all(original[(m.mask == 0).expand_as(original)] == 0)
    # the path under test was the one taken: bits per weight for the Linears, per output channel for the conv
    rows = [m._bits[1] if m._bits is not None else None for m in fast_masks]
    assert rows == ([1, 5, 1] if grad_path == "bits" else [None, None, None])


def _count_projections(monkeypatch) -> list[int]:
    calls = [0]
    real = Masked.project

    def counting(self, original):
        calls[0] += 1
        real(self, original)

    monkeypatch.setattr(Masked, "project", counting)
    return calls


def _train_step(net: nn.Sequential, opt: torch.optim.Optimizer, clip: bool = False) -> None:
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(_forward(net, x), y).backward()
    if clip:
        nn.utils.clip_grad_norm_(net.parameters(), 1e-3)
    opt.step()


def test_a_clean_original_needs_no_projection_and_any_writer_is_seen(monkeypatch) -> None:
    net, masks = _net("fast")
    calls = _count_projections(monkeypatch)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    _train_step(net, opt)
    assert calls[0] == 3  # the first forward projects each weight once
    calls[0] = 0
    for m, i in zip(masks, (0, 2, 4)):
        m.settle(net[i].parametrizations.weight.original)  # what sp.step() does after the optimizer's step
    assert calls[0] == 3  # the step wrote every original
    calls[0] = 0
    for m, i in zip(masks, (0, 2, 4)):
        m.settle(net[i].parametrizations.weight.original)
    _train_step(net, opt)
    assert calls[0] == 0  # settled: neither a second settle nor the forward had anything to do
    for m, i in zip(masks, (0, 2, 4)):
        m.settle(net[i].parametrizations.weight.original)
    with torch.no_grad():
        masks[0].mask.view(-1)[:5] = 0  # a mask change re-projects that weight only
    calls[0] = 0
    weights = [net[i].weight for i in (0, 2, 4)]
    assert calls[0] == 1 and torch.all(weights[0][masks[0].mask == 0] == 0)
    with torch.no_grad():
        net[0].parametrizations.weight.original.add_(1.0)  # any in-place write is seen
    calls[0] = 0
    assert torch.all(net[0].weight[masks[0].mask == 0] == 0) and calls[0] == 1


def test_settling_a_weight_zeroes_its_pruned_entries_strays_included(grad_path) -> None:
    """After an optimizer step a few pruned weights moved off zero (a stale momentum buffer, a NaN): the settle
    pass leaves them exactly zero and the kept entries bit for bit, on the packed-mask kernels and without them."""
    layer = nn.Linear(256, 128)  # 32768 weights: the packed-mask kernels take it
    m = attach(layer, "weight", Masked(layer.weight.shape, layer.weight))
    original = layer.parametrizations.weight.original
    with torch.no_grad():
        m.mask.view(-1)[::3] = 0
        layer.weight  # noqa: B018 (the forward projects the original once)
        pruned = m.mask.view(-1) == 0
        original.view(-1)[pruned.nonzero()[1::50, 0]] = 3.0
        original.view(-1)[pruned.nonzero()[2::50, 0]] = float("nan")
    expected = torch.where(m.mask.bool(), original.detach(), torch.zeros(()))
    m.settle(original)
    assert torch.equal(original.detach(), expected)


def test_soft_masks_use_the_plain_product_and_leave_the_original_alone() -> None:
    layer = nn.Linear(4, 3)
    before = layer.weight.detach().clone()
    p = attach(layer, "weight", Masked(layer.weight.shape, layer.weight, hard=False))
    p.mask.fill_(0.25)
    torch.testing.assert_close(layer.weight, before * 0.25)
    torch.testing.assert_close(layer.parametrizations.weight.original, before)


def test_bake_and_deepcopy_do_not_touch_the_live_original() -> None:
    net, masks = _net("fast")
    original = net[0].parametrizations.weight.original
    before = original.detach().clone()
    baked = masks[0].bake(original)
    torch.testing.assert_close(baked, before * masks[0].mask)
    torch.testing.assert_close(original, before)  # not projected by bake
    twin = copy.deepcopy(net)
    x = torch.randn(2, 12)
    torch.testing.assert_close(_forward(twin, x), _forward(net, x))
    assert twin[0].parametrizations.weight[0]._original() is twin[0].parametrizations.weight.original


def test_a_loaded_optimizer_state_never_reaches_the_pruned_weights() -> None:
    """Resuming with an optimizer state saved elsewhere (non-zero momentum at pruned entries) stays exact."""
    net, masks = _net("fast")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    _train_step(net, opt)
    _train_step(net, opt)
    state = opt.state_dict()
    for s in state["state"].values():
        s["momentum_buffer"] = torch.ones_like(s["momentum_buffer"])  # stale state, non-zero everywhere
    opt.load_state_dict(state)
    _train_step(net, opt)
    _train_step(net, opt)
    for m, i in zip(masks, (0, 2, 4)):
        weight = net[i].weight  # the forward's read: projected, since the optimizer wrote the original
        assert torch.all(weight[(m.mask == 0).expand_as(weight)] == 0)


def test_pruned_gradient_entries_are_zero_even_where_the_incoming_gradient_is_not_finite(grad_path) -> None:
    layer = nn.Linear(70, 3)  # 210 weights: three full 64-bit words and a tail
    p = attach(layer, "weight", Masked(layer.weight.shape, layer.weight))
    p.mask.view(-1)[::2] = 0
    w = layer.weight
    g = torch.randn(w.shape)
    g.view(-1)[:8] = float("nan")  # 4 pruned, 4 kept
    w.backward(g)
    grad = layer.parametrizations.weight.original.grad
    kept = p.mask.bool()
    torch.testing.assert_close(grad[kept], g[kept], equal_nan=True)
    assert torch.all(grad[~kept] == 0)  # exactly zero, NaN included (a product would give NaN * 0 = NaN)


def test_a_weight_frozen_at_the_first_forward_and_trained_later_gets_masked_gradients() -> None:
    """Frozen when first seen (no hook can go on it): the gradient is masked once it is unfrozen."""
    layer = nn.Linear(40, 30)
    layer.weight.requires_grad_(False)
    p = attach(layer, "weight", Masked(layer.weight.shape, layer.weight))
    p.mask.view(-1)[::3] = 0
    layer(torch.randn(2, 40))  # tracked while frozen
    original = layer.parametrizations.weight.original
    original.requires_grad_(True)
    opt = torch.optim.SGD([original], lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(4, 40)).square().sum().backward()
        assert torch.all(original.grad[p.mask == 0] == 0) and original.grad.abs().sum() > 0
        opt.step()
    assert torch.all(layer.weight[p.mask == 0] == 0)


def test_a_loss_on_the_original_itself_leaves_pruned_weights_frozen_at_zero() -> None:
    layer = nn.Linear(40, 30)
    p = attach(layer, "weight", Masked(layer.weight.shape, layer.weight))
    p.mask.view(-1)[::2] = 0
    original = layer.parametrizations.weight.original
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    loss = layer(torch.randn(4, 40)).sum() + original.square().sum() + (original - 1).abs().sum()
    loss.backward()
    assert torch.all(original.grad[p.mask == 0] == 0)
    opt.step()
    assert torch.all(original[p.mask == 0] == 0)


def test_a_non_leaf_original_from_functional_call_gets_its_gradient_masked_on_the_way_back() -> None:
    layer = nn.Linear(40, 30)
    p = attach(layer, "weight", Masked(layer.weight.shape, layer.weight))
    p.mask.view(-1)[::2] = 0
    layer.parametrizations.weight.original.detach().mul_(p.mask)  # clean, as the forward keeps it
    leaf = (torch.randn(30, 40) * p.mask).requires_grad_(True)
    w = leaf * 1.0  # a non-leaf, zero where the mask is: no accumulation hook can go on it
    out = torch.func.functional_call(layer, {"parametrizations.weight.original": w}, (torch.randn(4, 40),))
    (g,) = torch.autograd.grad(out.square().sum(), w)
    assert torch.all(g[p.mask == 0] == 0) and g[p.mask == 1].abs().sum() > 0


class Double(nn.Module):
    """A user's own parametrization, stacked with ours."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_a_mask_stacks_with_a_users_parametrization_in_either_order() -> None:
    mask = (torch.rand(5, 4, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    alone, user_on_top, ours_on_top = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(4, 5)
    for lin in (user_on_top, ours_on_top):
        lin.load_state_dict(alone.state_dict())
    w = alone.weight.detach().clone()
    parametrize.register_parametrization(ours_on_top, "weight", Double())
    for lin in (alone, user_on_top, ours_on_top):
        attach(lin, "weight", Masked(mask.shape, lin.weight)).mask.copy_(mask)
    parametrize.register_parametrization(user_on_top, "weight", Double())
    torch.testing.assert_close(alone.weight, w * mask, rtol=0, atol=0)
    # the order of the stack is kept: torch's forward runs every parametrization
    torch.testing.assert_close(user_on_top.weight, 2 * (w * mask), rtol=0, atol=0)
    torch.testing.assert_close(ours_on_top.weight, 2 * w * mask, rtol=0, atol=0)
    # gradients reach the original
    plist = alone.parametrizations.weight
    alone(torch.ones(1, 4)).sum().backward()
    torch.testing.assert_close(plist.original.grad, mask, rtol=0, atol=0)
    # removing our parametrization restores a plain Linear
    parametrize.remove_parametrizations(alone, "weight", leave_parametrized=True)
    assert type(alone) is nn.Linear and torch.equal(alone.weight.detach(), w * mask)


class _Forward(nn.Module):
    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self.net, x)


def test_torch_compile_traces_hard_masks_in_one_graph_with_the_same_training() -> None:
    torch.compiler.reset()
    (fast, fast_masks), (ref, _) = _net("fast"), _net("reference")
    compiled = torch.compile(_Forward(fast), backend="aot_eager", fullgraph=True)  # fails on any graph break
    runs = [compiled, lambda x: _forward(ref, x)]
    opts = [torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2) for net in (fast, ref)]
    gen = torch.Generator().manual_seed(2)
    for step in range(6):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        for run, opt in zip(runs, opts):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(run(x), y).backward()
            opt.step()
        if step == 3:  # a mask changed in place between steps, as methods do: the compiled graph reads it
            with torch.no_grad():
                fast_masks[0].mask.view(-1)[::3] = 0
                ref[0].parametrizations.weight[0].mask.view(-1)[::3] = 0
    for a, b in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)
    for i in (0, 2, 4):
        torch.testing.assert_close(fast[i].weight, ref[i].weight, rtol=0, atol=1e-6)

"""sparsewrap/torch_compat.py: each private torch API it wraps, and the same training results with its fallback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import sparsewrap as sw
from sparsewrap import switches, torch_compat
from sparsewrap.parametrizations import Masked, attach
from sparsewrap.parametrizations.base import version_key
from tests.test_masked import Product

PACKAGE = Path(sw.__file__).resolve().parent


def test_no_private_torch_name_is_used_outside_the_compat_module() -> None:
    private = re.compile(r"torch\._[A-Za-z]|\._version\b|\._base\b|_cdata|_foreach_utils|_Use_Count|parametrize\._")
    hits = [
        f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "torch_compat.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert hits == []


# -- version counters -------------------------------------------------------------------------------------------
def test_the_version_counter_grows_at_in_place_writes_and_its_fallback_reports_a_change_at_every_call(
    monkeypatch,
) -> None:
    t = torch.zeros(4)
    before = torch_compat.version(t)
    assert isinstance(before, int) and torch_compat.version(t) == before  # reading changes nothing
    t.add_(1)
    assert torch_compat.version(t) == before + 1
    assert version_key(t) == version_key(t)
    monkeypatch.setattr(torch_compat, "version", torch_compat.no_version)
    assert torch_compat.version(t) is None
    assert version_key(t) != version_key(t)  # unknown: every lazy projection is redone


def _masked_net(reference: bool) -> tuple[nn.Sequential, list[nn.Module]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 4))
    gen = torch.Generator().manual_seed(1)
    masks = []
    for layer in (net[0], net[2]):
        mask = (torch.rand(layer.weight.shape, generator=gen) > 0.4).float()
        if reference:
            p = Product(mask)
            parametrize.register_parametrization(layer, "weight", p)
        else:
            p = attach(layer, "weight", Masked(tuple(mask.shape), layer.weight))
            p.mask.copy_(mask)
        masks.append(p)
    return net, masks


@pytest.mark.parametrize("counters", ["torch", "fallback"])
def test_hard_masks_train_as_the_plain_product_with_and_without_version_counters(counters, monkeypatch) -> None:
    """Through gradient noise (a writer that does not keep zeros) and a mask change."""
    if counters == "fallback":
        monkeypatch.setattr(torch_compat, "version", torch_compat.no_version)
    runs = []
    for reference in (False, True):
        net, masks = _masked_net(reference)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
        runs.append((net, masks, opt))
    gen = torch.Generator().manual_seed(2)
    for step in range(12):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        for net, masks, opt in runs:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            if step % 4 == 3:
                for p in net.parameters():
                    p.grad.add_(0.01)
            opt.step()
            if step == 5:
                with torch.no_grad():
                    for m in masks:
                        m.mask.view(-1)[::3] = 0
        (fast, fast_masks, _), (ref, _, _) = runs
        for i in (0, 2):
            torch.testing.assert_close(fast[i].weight, ref[i].weight, rtol=0, atol=1e-6)
    for m, i in zip(fast_masks, (0, 2)):
        assert torch.all(fast[i].parametrizations.weight.original[m.mask == 0] == 0)


# -- whole methods under every fallback ---------------------------------------------------------------------------
FALLBACKS = {
    "version": ("version", torch_compat.no_version),
    "use_count": ("use_count", None),
    "owns_memory": ("owns_memory", lambda t: False),
}


def _train(method_kwargs: dict, model: nn.Module, x: torch.Tensor, steps: int = 4) -> dict[str, torch.Tensor]:
    sp = sw.sparsify(model, **method_kwargs)
    opt = torch.optim.SGD(sp.param_groups(lr=0.05), lr=0.05, momentum=0.9)
    sp.start(total_steps=steps, optimizer=opt)
    y = torch.arange(x.shape[0]) % 10
    torch.manual_seed(3)  # the gates' noise
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x), y) + sp.penalty()).backward()
        opt.step()
        sp.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class SharedLayer(nn.Module):
    """A layer used twice in one forward: its weight is read again after a first use saved it for backward."""

    def __init__(self) -> None:
        super().__init__()
        # 256 x 256 weights: large enough for the native kernels and the reused buffers
        self.inp, self.mid, self.out = nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        return self.out(F.relu(self.mid(F.relu(self.mid(h)))))


def _per_weight_model() -> nn.Module:
    torch.manual_seed(0)
    return SharedLayer()


def _channel_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


CASES = {
    "magnitude": (dict(method="magnitude", target=0.9), _per_weight_model, (16, 64)),
    "l0": (dict(method="l0", target=0.9), _per_weight_model, (16, 64)),
    "l0-channel": (dict(method="l0", target=0.5, granularity="channel"), _channel_model, (8, 3, 8, 8)),
    # DeepR's index lists are refreshed when a mask's version changes: every call without the counters
    "deepr": (dict(method="deepr", target=0.9, temperature=1e-2, eta=0.5, anneal=[]), _per_weight_model, (16, 64)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_gives_the_same_model_with_every_fallback(case, monkeypatch) -> None:
    kwargs, build, shape = CASES[case]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    expected = _train(kwargs, build(), x)
    for name, value in FALLBACKS.values():
        monkeypatch.setattr(torch_compat, name, value)
    got = _train(kwargs, build(), x)
    assert got.keys() == expected.keys()
    for key in expected:
        # the fallback recomputes the gates' expected count in float32 instead of reusing the forward's
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


# -- storage use counts, views ------------------------------------------------------------------
def test_the_storage_use_count_counts_tensors_and_is_none_where_torch_lacks_it(monkeypatch) -> None:
    t = torch.zeros(8)
    storage = t.untyped_storage()
    assert torch_compat.storage_use_count(storage) == 2  # the tensor and the storage object
    view = t[2:]
    assert torch_compat.storage_use_count(storage) == 3
    del view
    assert torch_compat.storage_use_count(storage) == 2
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    assert torch_compat.find_storage_use_count() is None
    monkeypatch.setattr(torch_compat, "use_count", None)
    assert torch_compat.storage_use_count(storage) is None


def test_owns_memory_tells_views_from_tensors() -> None:
    t = torch.zeros(4, 4)
    assert torch_compat.owns_memory(t)
    assert not torch_compat.owns_memory(t[1:])
    assert not torch_compat.owns_memory(t.view(16))


# -- the measurement switches (sparsewrap/switches.py): each piece off gives the same training ----------------------
SWITCHES = {
    "magnitude": ["NATIVE", "HARD_MASKS"],
    "l0": ["REUSE_BUFFERS"],  # NATIVE: the eager gates draw another noise stream
    "deepr": ["HARD_MASKS"],  # the masked weight w * mask: the penalty's gradient reaches the original through it
}


@pytest.mark.parametrize("case,switch", [(c, s) for c, names in SWITCHES.items() for s in names])
def test_each_hot_path_piece_switched_off_trains_the_same_model(case, switch, monkeypatch) -> None:
    """bench/overhead.py times a method with one piece off against the method with all on: the same work."""
    kwargs, build, shape = CASES[case]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    expected_model = build()  # built right before training: sparsify draws the gates' initial values
    _train(kwargs, expected_model, x)
    monkeypatch.setattr(switches, switch, False)
    model = build()
    _train(kwargs, model, x)
    with torch.no_grad():
        expected, got = expected_model.eval()(x), model.eval()(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for a, b in zip(expected_model.modules(), model.modules()):
            if parametrize.is_parametrized(a, "weight"):  # the effective weights (the plain path keeps pruned
                torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6)  # originals non-zero)

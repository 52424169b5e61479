"""Dynamic sparse training (issue 17): budgets, exact drop/grow sets on a 4x4 weight, state resets, options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparsewrap as sw
from sparsewrap.errors import ConfigError
from sparsewrap.methods.dst.distribution import initial_masks, layer_counts
from sparsewrap.methods.dst.selection import largest_inactive, random_growth, smallest_active

from .zoo import ZOO

# a 4x4 weight with distinct magnitudes; the first 8 positions (rows 0 and 1) active
W = torch.tensor(
    [
        [0.5, -0.1, 0.9, -0.3],
        [0.05, 0.7, -0.2, 0.8],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
)
ACTIVE = torch.zeros(4, 4, dtype=torch.bool)
ACTIVE[:2] = True


def _positions(mask: torch.Tensor) -> list[int]:
    return mask.reshape(-1).nonzero().reshape(-1).tolist()


class Net(nn.Module):
    """fc (4 -> 4, the only target) then a fixed head (4 -> 1, left dense as the classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x))


def _net_at(method: str, **options) -> sw.Sparsifier:
    """Net with fc = W under the mask ACTIVE, head = [1, 10, 100, 1000] (so dL/dfc[i, j] = head[i] * x[j])."""
    net = Net()
    sp = sw.sparsify(net, method, target=0.5, **options)
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([[1.0, 10.0, 100.0, 1000.0]]))
        sp.method.masks[0].mask.copy_(ACTIVE.float())
        sp.targets[0].original.copy_(W)
    return sp


# -- distribution --------------------------------------------------------------------------------------------------
def test_erk_counts_are_rounded_to_the_exact_budget() -> None:
    # ERK densities 0.75 * 20/18 and 0.375 * 20/18 give quotas 6.67 and 13.33 of a 20-weight budget: 7 and 13
    assert layer_counts("erk", [(4, 2), (8, 4)], 0.5) == [7, 13]
    # a layer whose share exceeds its size stays dense; the rest (48 of 52) goes to the other
    assert layer_counts("erk", [(2, 2), (10, 10)], 0.5) == [4, 48]
    # uniform: quotas 4.8 and 2.7 of round(0.3 * 25) = 8 -> 5 and 3
    assert layer_counts("uniform", [(4, 4), (3, 3)], 0.7) == [5, 3]
    assert layer_counts("global", [(4, 4), (3, 3)], 0.7) is None


@pytest.mark.parametrize("distribution", ["erk", "uniform", "global"])
def test_initial_masks_hold_the_budget_and_depend_only_on_the_seed(distribution: str) -> None:
    shapes = [(8, 4, 3, 3), (16, 8), (3, 5)]
    masks = initial_masks(distribution, shapes, 0.8, torch.Generator().manual_seed(3))
    again = initial_masks(distribution, shapes, 0.8, torch.Generator().manual_seed(3))
    assert sum(int(m.sum()) for m in masks) == round(0.2 * (288 + 128 + 15))
    assert all(torch.equal(a, b) for a, b in zip(masks, again))
    counts = layer_counts(distribution, shapes, 0.8)
    if counts is not None:
        assert [int(m.sum()) for m in masks] == counts


# -- exact drop and grow sets on the 4x4 weight --------------------------------------------------------------------
def test_drop_takes_the_smallest_active_magnitudes() -> None:
    # active |w|: 0.5 0.1 0.9 0.3 0.05 0.7 0.2 0.8 -> the four smallest are 0.05 (4), 0.1 (1), 0.2 (6), 0.3 (3)
    assert _positions(smallest_active(W, ACTIVE, 4)) == [1, 3, 4, 6]
    ties = torch.ones(4, 4)
    assert _positions(smallest_active(ties, ACTIVE, 3)) == [0, 1, 2]  # ties by position


def test_random_growth_draws_among_the_positions_inactive_before_the_drop() -> None:
    drop = smallest_active(W, ACTIVE, 4)
    grow = random_growth(ACTIVE, drop, 4, torch.Generator().manual_seed(0))
    # the rule, computed independently: a permutation of the 8 fresh positions (8..15) from the same seed
    expected = sorted((8 + torch.randperm(8, generator=torch.Generator().manual_seed(0))[:4]).tolist())
    assert _positions(grow) == expected
    # more to grow than fresh positions: the rest comes from the just-dropped ones, so the budget stays exact
    dense = torch.ones(4, 4, dtype=torch.bool)
    dense[3, 3] = False
    drop2 = smallest_active(torch.arange(1.0, 17.0).reshape(4, 4), dense, 3)
    grow2 = random_growth(dense, drop2, 3, torch.Generator().manual_seed(0))
    assert int(grow2.sum()) == 3 and bool(grow2[3, 3]) and not (grow2 & dense & ~drop2).any()


def test_grow_by_gradient_takes_the_largest_candidates() -> None:
    score = torch.arange(16.0).reshape(4, 4)
    cand = ~ACTIVE
    assert _positions(largest_inactive(score, cand, 3)) == [13, 14, 15]
    assert _positions(largest_inactive(torch.ones(4, 4), cand, 2)) == [8, 9]  # ties by position


def test_set_update_on_the_hand_built_weight() -> None:
    sp = _net_at("set", every=1, end=10, fraction=0.5, seed=4)
    gen_state = sp.method.generator.get_state()
    drops, grows = sp.method.rewire(0)
    assert _positions(drops[0]) == [1, 3, 4, 6]
    rng = torch.Generator()
    rng.set_state(gen_state)
    assert _positions(grows[0]) == sorted((8 + torch.randperm(8, generator=rng)[:4]).tolist())


def test_rigl_update_through_the_controller_uses_the_dense_gradient() -> None:
    sp = _net_at("rigl", every=1, end=10, fraction=0.5, decay="constant")
    opt = torch.optim.SGD(sp.param_groups(lr=0.0), momentum=0.9)  # lr 0: the weights stay W
    sp.start(optimizer=opt)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    sp.model(x).sum().backward()  # dL/dfc[i, j] = head[i] * x[j], dense (the mask does not touch it)
    opt.step()
    sp.step()
    grad = torch.tensor([1.0, 10.0, 100.0, 1000.0])[:, None] * x
    drop = smallest_active(W, ACTIVE, 4)  # positions 1, 3, 4, 6
    cand = (~ACTIVE | drop).reshape(-1)
    order = sorted(sorted((i for i in range(16) if cand[i]), key=lambda i: -float(grad.reshape(-1)[i]))[:4])
    assert order == [12, 13, 14, 15]  # the last row's gradient is the largest
    expected = (ACTIVE & ~drop).reshape(-1).clone()
    expected[order] = True
    assert torch.equal(sp.method.masks[0].mask.reshape(-1).bool(), expected)
    fc = sp.targets[0].original
    assert (fc.reshape(-1)[order] == 0).all()  # regrown at zero
    assert torch.equal(fc * sp.method.masks[0].mask, torch.where(expected.reshape(4, 4), W, 0.0))


def test_rigl_regrowing_a_just_dropped_connection_keeps_its_weight() -> None:
    sp = _net_at("rigl", every=1, end=10, fraction=0.5, decay="constant")
    opt = torch.optim.SGD(sp.param_groups(lr=0.0))
    sp.start(optimizer=opt)
    grad = torch.zeros(4, 4)
    grad[0, 1] = 5.0  # position 1 is dropped (|w| = 0.1) and has the largest gradient
    grad[3] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    sp.method.dense_grads = lambda: {("fc", "weight"): grad}
    drops, grows = sp.method.rewire(0)
    assert _positions(drops[0]) == [1, 3, 4, 6] and _positions(grows[0]) == [1, 12, 13, 14]
    sp.method.apply(drops, grows, 0)
    assert float(sp.targets[0].original.detach()[0, 1]) == pytest.approx(-0.1)
    assert sp.method.last_moved == 3


def test_rigl_cosine_drop_fraction() -> None:
    sp = sw.sparsify(ZOO["mlp"][0](), "rigl", target=0.8, fraction=0.4, start=0, end=8)
    assert [sp.method.drop_fraction(t) for t in (0, 2, 4, 8)] == pytest.approx(
        [0.4, 0.2 * (1 + math.cos(math.pi / 4)), 0.2, 0.0]
    )


# -- budget, zero start, optimizer state ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["set", "rigl"])
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_budget_is_exact_and_regrown_weights_and_moments_start_at_zero(method: str, opt_cls) -> None:
    torch.manual_seed(0)
    model = ZOO["conv_bn"][0]()
    x = ZOO["conv_bn"][1]()
    sp = sw.sparsify(model, method, target=0.8, every=1, end=20, fraction=0.4, decay="constant")
    kwargs = dict(momentum=0.9) if opt_cls is torch.optim.SGD else {}
    opt = opt_cls(sp.param_groups(lr=0.01), **kwargs)
    sp.start(optimizer=opt)
    budget = sp.method.active_counts()
    assert sum(budget) == round(0.2 * sum(t.numel for t in sp.targets))
    for _ in range(4):
        before = sp.method.active()
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        for t in sp.targets:  # non-zero state everywhere: only the reset can make it zero at the arrivals
            for v in opt.state[t.original].values():
                if v.dim() > 0:
                    v.fill_(1.0)
        sp.step()
        assert sp.method.active_counts() == budget
        assert sp.method.last_moved > 0
        for t, b, a in zip(sp.targets, before, sp.method.active()):
            arrived = a & ~b
            assert (t.original[arrived] == 0).all()
            for v in opt.state[t.original].values():
                if v.dim() > 0:
                    assert (v[arrived] == 0).all() and (v[a & b] == 1).all()


def test_static_never_moves_and_needs_no_optimizer() -> None:
    torch.manual_seed(0)
    model, x = ZOO["mlp"][0](), ZOO["mlp"][1]()
    sp = sw.sparsify(model, "static", target=0.9, distribution="uniform")
    masks = [m.clone() for m in sp.method.active()]
    opt = torch.optim.RMSprop(sp.param_groups(lr=0.01))
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sp.step()
    assert all(torch.equal(a, b) for a, b in zip(masks, sp.method.active()))
    assert sp.report().exported == pytest.approx(0.9, abs=1 / 700)


# -- state, resume --------------------------------------------------------------------------------------------------
def _run(sp: sw.Sparsifier, x: torch.Tensor, steps: int) -> None:
    opt = torch.optim.SGD(sp.param_groups(lr=0.05), momentum=0.9)
    sp.start(optimizer=opt)
    for _ in range(steps):
        sp.model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sp.step()


def test_resume_draws_the_same_random_growth() -> None:
    x = ZOO["mlp"][1]()
    torch.manual_seed(0)
    sp = sw.sparsify(ZOO["mlp"][0](), "set", target=0.8, every=1, end=50, fraction=0.5, seed=9)
    _run(sp, x, 2)
    torch.manual_seed(1)
    sp2 = sw.sparsify(ZOO["mlp"][0](), "set", target=0.8, every=1, end=50, fraction=0.5, seed=123)
    sp2.model.load_state_dict(sp.model.state_dict())
    sp2.load_state_dict(sp.state_dict())
    assert sp2.method.history == sp.method.history and sp2.method.moved_total == sp.method.moved_total
    # zero momentum on both sides: the optimizer state is not part of this check, the growth's RNG is
    for a in (sp, sp2):
        with torch.no_grad():
            for t in a.targets:
                t.original.mul_(a.method.masks[a.targets.index(t)].mask)
    _run(sp, x, 3)
    _run(sp2, x, 3)
    assert all(torch.equal(a, b) for a, b in zip(sp.method.active(), sp2.method.active()))


# -- bad options ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("set", dict(fraction=0.0), r"fraction=0.0 is outside \(0, 1\); it is the share of active connections"),
        ("rigl", dict(fraction=1.5), r"fraction=1.5 is outside \(0, 1\)"),
        ("set", dict(every=0), r"every=0 must be a step count >= 1"),
        ("rigl", dict(start=10, end=5), r"end=5 comes before start=10; the updates need start < end"),
        ("set", dict(start=0.5, end=0.2), r"end=0.2 comes before start=0.5"),
        ("rigl", dict(distribution="erdos"), r"distribution='erdos' is unknown for method 'rigl'; valid: 'erk', "),
        ("static", dict(distribution="nope"), r"distribution='nope' is unknown for method 'static'"),
        ("rigl", dict(decay="linear"), r"decay='linear' is unknown; valid: 'constant', 'cosine'"),
    ],
)
def test_bad_options_are_one_line_errors(method: str, options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        sw.sparsify(ZOO["mlp"][0](), method, target=0.8, **options)
    assert "\n" not in str(info.value)


def test_an_optimizer_whose_state_cannot_be_reset_is_refused_at_start() -> None:
    sp = sw.sparsify(ZOO["mlp"][0](), "set", target=0.8, end=10)
    with pytest.raises(ConfigError, match=r"cannot reset that of RMSprop; use one of 'Adam', 'AdamW', 'SGD'"):
        sp.start(optimizer=torch.optim.RMSprop(sp.param_groups(lr=0.1)))


def test_without_the_run_length_or_optimizer_the_first_update_names_the_fix() -> None:
    model, x = ZOO["mlp"][0](), ZOO["mlp"][1]()
    sp = sw.sparsify(model, "rigl", target=0.8)  # end=0.75 of the run
    model(x).sum().backward()
    with pytest.raises(ConfigError, match=r"end=0.75 is a fraction of the run, but method 'rigl' was not told"):
        sp.step()
    sp = sw.sparsify(ZOO["mlp"][0](), "set", target=0.8, every=1, end=5)
    with pytest.raises(ConfigError, match=r"method 'set' needs the optimizer \(to reset its state\)"):
        sp.step()

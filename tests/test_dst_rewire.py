"""DSR and DeepR (issue 17): reallocation arithmetic, threshold adaptation, sign flips, the noise, resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparsewrap as sw
from sparsewrap.errors import ConfigError
from sparsewrap.methods.dst import deepr
from sparsewrap.methods.dst.deepr import insert_sorted, replace_sorted
from sparsewrap.methods.dst.dsr import adapt_threshold, reallocate
from sparsewrap.methods.dst.selection import random_free

from .zoo import ZOO


class TwoLayers(nn.Module):
    """Two 4x4 targets and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)))


A = torch.tensor([[0.5, -0.1, 0.9, -0.3], [0.05, 0.7, -0.2, 0.8], [0.0] * 4, [0.0] * 4])  # rows 0-1 active
B = torch.tensor([[0.1, 0.3, -0.6, 0.9], [0.0] * 4, [0.0] * 4, [0.0] * 4])  # row 0 active


def _two_layers(method: str, **options) -> sw.Sparsifier:
    sp = sw.sparsify(TwoLayers(), method, target=0.5, distribution="uniform", **options)
    with torch.no_grad():
        for t, m, w in zip(sp.targets, sp.method.masks, (A, B)):
            m.mask.copy_((w != 0).float())
            t.original.copy_(w)
    return sp.start(optimizer=torch.optim.SGD(sp.param_groups(lr=0.0)))


def _positions(mask: torch.Tensor) -> list[int]:
    return mask.reshape(-1).nonzero().reshape(-1).tolist()


# -- DSR ------------------------------------------------------------------------------------------------------------
def test_reallocation_is_proportional_to_survivors_and_exact_in_total() -> None:
    # K = 4 freed; survivors 4 and 12: quotas 1 and 3 (layer a gives budget to layer b)
    assert reallocate([4, 0], [4, 12], [8, 4], [12, 4]) == [1, 3]
    # quotas 2.5 and 1.5: floors 2 + 1, the last one to the earlier layer of the tie
    assert reallocate([3, 1], [5, 3], [8, 12], [11, 13]) == [3, 1]
    # quotas 3 and 1 but layer a has one fresh position: the cap sends the rest to layer b
    assert reallocate([0, 4], [12, 4], [1, 12], [4, 12]) == [1, 3]
    # no fresh position anywhere: the dropped ones come back, still exact
    assert reallocate([2, 1], [2, 2], [0, 0], [2, 1]) == [2, 1]


@pytest.mark.parametrize(
    ("dropped", "expected"), [(12, 0.05), (11, 0.1), (10, 0.1), (9, 0.1), (8, 0.2)]
)  # fmt: skip
def test_threshold_adaptation_with_ten_percent_tolerance(dropped: int, expected: float) -> None:
    assert adapt_threshold(0.1, dropped, 10, 0.1) == pytest.approx(expected)


def test_dsr_update_on_hand_built_layers() -> None:
    sp = _two_layers("dsr", every=1, end=10, threshold=0.25, n_prune=10)
    drops, grows = sp.method.rewire(0)
    # |w| < 0.25 among the active: a drops 0.1 (1), 0.05 (4), 0.2 (6); b drops 0.1 (0)
    assert _positions(drops[0]) == [1, 4, 6] and _positions(drops[1]) == [0]
    # K = 4 over survivors 5 and 3: quotas 2.5 and 1.5 -> 3 and 1, among positions inactive before the drop
    assert [int(g.sum()) for g in grows] == [3, 1]
    assert all(_positions(g)[0] >= 8 for g in grows[:1]) and _positions(grows[1])[0] >= 4
    assert sp.method.threshold == pytest.approx(0.5)  # 4 < 0.9 * 10: doubled
    sp.method.apply(drops, grows, 0)
    assert sp.method.active_counts() == [8, 4]


def test_dsr_aims_to_move_a_tenth_of_the_budget_unless_told_a_count() -> None:
    sp = _two_layers("dsr", every=1, end=10, threshold=0.25)
    assert sp.method.n_prune == 2  # a tenth of the 20 connections of the initial masks (the test then sets 12)
    big = sw.sparsify(ZOO["mlp"][0](), "dsr", target=0.5)
    assert big.method.n_prune == round(0.1 * sum(big.method.active_counts())) > 1
    assert big.report().extras["n_prune"] == big.method.n_prune
    assert sw.sparsify(ZOO["mlp"][0](), "dsr", target=0.5, n_prune=7).method.n_prune == 7
    sp.method.rewire(0)  # 4 dropped > 1.1 * 2: H halved
    assert sp.method.threshold == pytest.approx(0.125)


def test_dsr_keeps_the_largest_weight_of_a_layer_below_the_threshold() -> None:
    sp = _two_layers("dsr", every=1, end=10, threshold=1.0, n_prune=10)
    drops, grows = sp.method.rewire(0)
    assert _positions(drops[1]) == [0, 1, 2]  # 0.9 (3) stays
    assert _positions(drops[0]) == [0, 1, 3, 4, 5, 6, 7]  # 0.9 (2) stays
    assert sum(int(g.sum()) for g in grows) == 10
    assert sp.method.threshold == pytest.approx(1.0)


def test_dsr_moves_budget_between_layers_and_resumes_with_its_threshold() -> None:
    x = ZOO["conv_bn"][1]()
    torch.manual_seed(0)
    sp = sw.sparsify(ZOO["conv_bn"][0](), "dsr", target=0.8, every=1, end=40, n_prune=30, seed=2)
    opt = torch.optim.SGD(sp.param_groups(lr=0.1), momentum=0.9)
    sp.start(optimizer=opt)
    total = sum(sp.method.active_counts())
    layer_budgets = set()
    for _ in range(8):
        sp.model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sp.step()
        assert sum(sp.method.active_counts()) == total
        layer_budgets.add(tuple(sp.method.active_counts()))
    assert len(layer_budgets) > 1
    assert sp.method.threshold != 1e-3
    sp2 = sw.sparsify(ZOO["conv_bn"][0](), "dsr", target=0.8, every=1, end=40, n_prune=30, seed=7)
    sp2.model.load_state_dict(sp.model.state_dict())
    sp2.load_state_dict(sp.state_dict())
    assert sp2.method.threshold == sp.method.threshold
    assert [h[2] for h in sp2.method.history] == [h[2] for h in sp.method.history]
    assert sp.report().extras["threshold H"] == sp.method.threshold


# -- DeepR ----------------------------------------------------------------------------------------------------------
def test_deepr_drops_exactly_the_active_weights_whose_sign_flipped() -> None:
    sp = _two_layers("deepr", end=10, anneal=[])  # sp.start() recorded the signs of A and B
    with torch.no_grad():
        flipped = A.clone()
        flipped[0, 0], flipped[1, 3] = -0.2, -0.4  # two sign flips
        flipped[0, 1] = 0.0  # reaching zero is not a flip
        sp.targets[0].original.copy_(flipped)
    drops, grows = sp.method.rewire(0)
    assert _positions(drops[0]) == [0, 7] and not drops[1].any()
    assert int(grows[0].sum()) == 2 and all(p >= 8 for p in _positions(grows[0]))
    sp.method.apply(drops, grows, 0)
    # the index follows the mask that apply() wrote; the kept weights keep the signs recorded at start (A's),
    # the regrown ones have none (A is zero there)
    index = sp.method.active_index(0)
    assert index.tolist() == _positions(sp.method.masks[0].mask)
    assert torch.equal(sp.method.signs[0], torch.sign(A.reshape(-1)[index]).to(torch.int8))
    assert (sp.method.signs[0][torch.isin(index, grows[0].reshape(-1).nonzero().reshape(-1))] == 0).all()


def test_deepr_step_moves_the_flipped_weights_alone() -> None:
    sp = _two_layers("deepr", end=10, anneal=[])
    with torch.no_grad():
        flipped = A.clone()
        flipped[0, 0], flipped[1, 3] = -0.2, -0.4  # two sign flips
        flipped[0, 1] = 0.0  # reaching zero is not a flip
        sp.targets[0].original.copy_(flipped)
    b_mask = sp.method.masks[1].mask.clone()
    sp.step()  # step 0 is an update (every=1)
    mask = sp.method.masks[0].mask.reshape(-1)
    grown = [p for p in _positions(mask) if p >= 8]
    assert _positions(mask)[:6] == [1, 2, 3, 4, 5, 6] and len(grown) == 2  # 0 and 7 dropped, two regrown
    weight = sp.targets[0].original.detach().reshape(-1)
    assert weight[[0, 7] + grown].eq(0).all() and torch.equal(weight[1:7], flipped.reshape(-1)[1:7])
    assert torch.equal(sp.method.masks[1].mask, b_mask) and sp.method.last_moved == 2
    assert sp.method.active_index(0).tolist() == _positions(mask)
    assert sp.method.signs[0].tolist() == [0, 1, -1, 1, 1, -1, 0, 0]  # position 1 at zero, the regrown at zero


def test_deepr_with_too_few_free_positions_regrows_just_dropped_ones_in_place() -> None:
    sp = sw.sparsify(TwoLayers(), "deepr", target=0.25, distribution="uniform", end=10, anneal=[])
    w = torch.arange(1.0, 17.0).reshape(4, 4)  # 12 active (positions 0-11), 4 free
    with torch.no_grad():
        sp.method.masks[0].mask.copy_((torch.arange(16) < 12).float().reshape(4, 4))
        sp.targets[0].original.copy_(w * sp.method.masks[0].mask)
    sp.start(optimizer=torch.optim.SGD(sp.param_groups(lr=0.0)))
    with torch.no_grad():
        sp.targets[0].original.reshape(-1)[:6] *= -1  # six flips, four free positions: two come back
    sp.step()
    mask = sp.method.masks[0].mask.reshape(-1)
    weight = sp.targets[0].original.detach().reshape(-1)
    assert int(mask.sum()) == 12 and mask[12:].sum() == 4 and sp.method.last_moved == 4
    back = [p for p in range(6) if mask[p]]
    assert len(back) == 2 and all(weight[p] == -(p + 1) for p in back)  # kept their weight (they did not move)
    assert weight[[p for p in range(6) if p not in back]].eq(0).all() and weight[12:].eq(0).all()
    assert sp.method.active_index(0).tolist() == _positions(mask)
    assert sp.method.signs[0].tolist() == [-1] * 2 + [1] * 6 + [0] * 4  # the regrown-in-place keep their new sign


def test_insert_sorted_merges_positions_and_zero_values() -> None:
    index, values = torch.tensor([2, 5, 9]), torch.tensor([1, -1, 1], dtype=torch.int8)
    merged, out = insert_sorted(index, values, torch.tensor([11, 0, 6]))
    assert merged.tolist() == [0, 2, 5, 6, 9, 11] and out.tolist() == [0, 1, -1, 0, 1, 0]
    merged, out = insert_sorted(index, values, torch.tensor([], dtype=torch.int64))
    assert merged.tolist() == [2, 5, 9] and out.tolist() == [1, -1, 1]


@pytest.mark.parametrize("few", [64, 0], ids=["slices", "bool mask"])
def test_replace_sorted_removes_and_inserts_in_order(few: int, monkeypatch) -> None:
    monkeypatch.setattr(deepr, "FEW_CHANGES", few)
    index = torch.tensor([2, 5, 9, 12, 20])
    values = torch.tensor([1, -1, 1, -1, 1], dtype=torch.int8)
    # remove 5 and 20, insert 0, 4 (before the removed 5), 6, 30
    merged, out = replace_sorted(index, values, torch.tensor([1, 4]), torch.tensor([30, 6, 0, 4]))
    assert merged.tolist() == [0, 2, 4, 6, 9, 12, 30] and out.tolist() == [0, 1, 0, 0, 1, -1, 0]
    merged, out = replace_sorted(index, values, torch.tensor([0]), torch.tensor([3]))
    assert merged.tolist() == [3, 5, 9, 12, 20] and out.tolist() == [0, -1, 1, -1, 1]


def test_random_free_draws_distinct_free_positions_uniformly() -> None:
    taken = torch.tensor([1, 4, 7])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    for _ in range(3500):
        pos = random_free(10, taken, 2, gen)
        assert pos.numel() == 2 and pos[0] != pos[1] and not torch.isin(pos, taken).any()
        counts[pos] += 1
    assert counts[taken].sum() == 0
    free = counts[[0, 2, 3, 5, 6, 8, 9]]
    assert ((free - 1000).abs() < 100).all()  # 7000 draws over 7 positions: 1000 each (sd about 28)
    assert random_free(10, torch.arange(6), 2, gen) is None  # fewer than half free: the caller's bool path
    assert random_free(10, taken, 0, gen).numel() == 0


def test_deepr_penalty_gradient_is_l1_plus_the_seeded_noise() -> None:
    sp = _two_layers("deepr", end=10, anneal=[[3, 1e-6]], temperature=1e-2, eta=0.5, l1=1e-3, seed=5)
    assert sp.method.noise_std(0) == pytest.approx(math.sqrt(2 * 0.5 * 1e-2))
    assert sp.method.noise_std(3) == pytest.approx(math.sqrt(2 * 0.5 * 1e-6))
    assert sp.method.noise_std(11) == 0.0  # after the window
    rng = torch.Generator()
    rng.set_state(sp.method.generator.get_state())
    sp.penalty().backward()
    std = math.sqrt(2 * 0.5 * 1e-2)
    for t, w in zip(sp.targets, (A, B)):
        active = w != 0
        xi = torch.zeros(w.shape)
        xi[active] = torch.randn(int(active.sum()), generator=rng) * std  # one draw per active weight, in order
        expected = (1e-3 * torch.sign(w) + xi) * active
        torch.testing.assert_close(t.original.grad, expected)
    assert torch.equal(rng.get_state(), sp.method.generator.get_state())  # nothing drawn for inactive weights


def _deepr_step(sp: sw.Sparsifier, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    (sp.model(x).pow(2).mean() + sp.penalty()).backward()
    opt.step()
    opt.zero_grad()
    sp.step()


@pytest.mark.parametrize("order", ["model first", "state first", "full-size signs"])
def test_deepr_resume_restores_signs_and_the_noise(order: str) -> None:
    x = ZOO["mlp"][1]()
    torch.manual_seed(0)
    options = dict(target=0.8, end=40, anneal=[], temperature=1e-2, eta=0.5)
    sp = sw.sparsify(ZOO["mlp"][0](), "deepr", **options)
    opt = torch.optim.SGD(sp.param_groups(lr=0.1))
    sp.start(optimizer=opt)
    budget = sp.method.active_counts()
    for _ in range(3):
        _deepr_step(sp, opt, x)
        assert sp.method.active_counts() == budget  # per layer, after every update
        for i, m in enumerate(sp.method.masks):  # the index lists follow the masks
            assert sp.method.active_index(i).tolist() == _positions(m.mask)
    assert sp.method.moved_total > 0
    state = sp.state_dict()
    if order == "full-size signs":  # a checkpoint of the earlier format: one sign per position of the layer
        full = [torch.sign(t.original.detach() * m.mask).to(torch.int8) for t, m in zip(sp.targets, sp.method.masks)]
        state["method"]["signs"] = full
    sp2 = sw.sparsify(ZOO["mlp"][0](), "deepr", **options | dict(seed=3))
    if order == "state first":  # the method's state before the masks it refers to
        sp2.load_state_dict(state)
        sp2.model.load_state_dict(sp.model.state_dict())
    else:
        sp2.model.load_state_dict(sp.model.state_dict())
        sp2.load_state_dict(state)
    assert sp2.method.next_step == 3
    for i in range(len(sp.targets)):
        assert torch.equal(sp2.method.active_index(i), sp.method.active_index(i))
        assert torch.equal(sp2.method.signs[i], sp.method.signs[i])
    torch.testing.assert_close(sp2.penalty(), sp.penalty(), rtol=0, atol=0)
    # the resumed run takes the continued run's next decisions
    opt2 = torch.optim.SGD(sp2.param_groups(lr=0.1))
    opt2.load_state_dict(opt.state_dict())
    sp2.start(optimizer=opt2)
    sp.model.zero_grad()
    sp2.model.zero_grad()
    for _ in range(2):
        _deepr_step(sp, opt, x)
        _deepr_step(sp2, opt2, x)
    assert sp2.method.moved_total == sp.method.moved_total
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(sp.method.masks, sp2.method.masks))


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("dsr", dict(n_prune=0), r"n_prune=0 must be an int >= 1"),
        ("dsr", dict(threshold=-1.0), r"threshold=-1.0 must be a positive float"),
        ("dsr", dict(tolerance=1.5), r"tolerance=1.5 is outside \(0, 1\)"),
        ("dsr", dict(every=0), r"every=0 must be a step count >= 1"),
        ("deepr", dict(start=5, end=2), r"end=2 comes before start=5"),
        ("deepr", dict(anneal=[[0.5]]), r"anneal entry \[0.5\] must be a \[step, temperature\] pair"),
        ("deepr", dict(eta=-1.0), r"eta=-1.0 must be a float >= 0"),
        ("deepr", dict(distribution="x"), r"distribution='x' is unknown for method 'deepr'"),
    ],
)
def test_bad_options_are_one_line_errors(method: str, options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        sw.sparsify(ZOO["mlp"][0](), method, target=0.8, **options)

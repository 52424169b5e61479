"""Layer-wise allocation (uniform, ERK), largest-remainder rounding, and exact ``drop_lowest``."""

from __future__ import annotations

import pytest
import torch

from sparsewrap.errors import ConfigError
from sparsewrap.methods.allocation import drop_lowest, erk_densities, largest_remainder, layer_sparsities


def test_erk_densities_match_a_hand_computation() -> None:
    # raw scores sum(shape)/prod(shape): 6/8 = 0.75 and 12/32 = 0.375; budget 0.5 * 40 = 20 weights;
    # eps = 20 / (0.75 * 8 + 0.375 * 32) = 20 / 18
    d = erk_densities([(4, 2), (8, 4)], 0.5)
    assert d == pytest.approx([0.75 * 20 / 18, 0.375 * 20 / 18])
    assert d[0] * 8 + d[1] * 32 == pytest.approx(20)


def test_erk_caps_dense_layers_and_redistributes_the_rest() -> None:
    # (2, 2): raw 1.0, size 4; (10, 10): raw 0.2, size 100; density 0.5 -> budget 52.
    # First pass eps = 52 / 24 > 1 for the small layer: it becomes dense (4 weights), the rest gets 48 / 100.
    d = erk_densities([(2, 2), (10, 10)], 0.5)
    assert d == pytest.approx([1.0, 0.48])


def test_erk_counts_kernel_dims_like_rigl() -> None:
    # a conv (8, 4, 3, 3) scores (8 + 4 + 3 + 3) / 288; a linear (8, 16) scores 24 / 128
    shapes = [(8, 4, 3, 3), (8, 16)]
    d = erk_densities(shapes, 0.3)
    assert d[0] / d[1] == pytest.approx((18 / 288) / (24 / 128))
    assert d[0] * 288 + d[1] * 128 == pytest.approx(0.3 * 416)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_erk_rejects_densities_outside_the_unit_interval(density: float) -> None:
    with pytest.raises(ConfigError, match=f"density must be in \\(0, 1\\], got {density}"):
        erk_densities([(4, 4)], density)


def test_layer_sparsities_uniform_erk_and_unknown() -> None:
    assert layer_sparsities("uniform", [(3, 3), (5, 5)], 0.4) == [0.4, 0.4]
    erk = layer_sparsities("erk", [(4, 2), (8, 4)], 0.5)
    assert erk == pytest.approx([1 - 0.75 * 20 / 18, 1 - 0.375 * 20 / 18])
    with pytest.raises(ConfigError, match=r"allocation='random' is unknown; valid: 'erk', 'global', 'uniform'"):
        layer_sparsities("random", [(3, 3)], 0.5)


def test_largest_remainder_gives_the_extra_units_to_the_largest_fractions() -> None:
    assert largest_remainder([1.2, 2.7, 0.6], 5, [10, 10, 10]) == [1, 3, 1]
    assert largest_remainder([1.5, 2.5, 0.2], 4, [10, 10, 10]) == [2, 2, 0]  # equal fractions: lower index first


def test_largest_remainder_respects_caps() -> None:
    assert largest_remainder([3.7, 1.2], 5, [3, 5]) == [3, 2]
    assert largest_remainder([5.0, 5.0], 10, [2, 2]) == [2, 2]  # infeasible: stops at the caps


def test_largest_remainder_removes_units_when_the_floors_overshoot() -> None:
    ks = largest_remainder([2.0, 2.0], 3, [5, 5])
    assert sum(ks) == 3 and ks == [2, 1]


def test_largest_remainder_sums_exactly_on_random_quotas() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        caps = torch.randint(1, 50, (6,), generator=g).tolist()
        quotas = [float(c) * float(torch.rand((), generator=g)) for c in caps]
        total = round(sum(quotas))
        ks = largest_remainder(quotas, total, caps)
        assert sum(ks) == total
        assert all(0 <= k <= c for k, c in zip(ks, caps))
        assert all(abs(k - q) < 1 + 1e-9 for k, q in zip(ks, quotas))


def test_drop_lowest_exact_values() -> None:
    s = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0])
    assert drop_lowest(s, 2).tolist() == [True, False, True, False, True]
    assert drop_lowest(s, 3).tolist() == [True, False, False, False, True]


def test_drop_lowest_breaks_ties_by_index() -> None:
    s = torch.tensor([1.0, 0.5, 0.5, 0.5, 2.0])
    assert drop_lowest(s, 1).tolist() == [True, False, True, True, True]
    assert drop_lowest(s, 2).tolist() == [True, False, False, True, True]
    assert drop_lowest(torch.zeros(6), 4).tolist() == [False] * 4 + [True] * 2


def test_drop_lowest_edge_counts_and_shape() -> None:
    s = torch.arange(12.0).reshape(3, 4)
    assert drop_lowest(s, 0).all() and drop_lowest(s, -3).all()
    assert not drop_lowest(s, 12).any() and not drop_lowest(s, 99).any()
    keep = drop_lowest(s, 5)
    assert keep.shape == (3, 4) and keep.dtype == torch.bool
    assert keep.reshape(-1).tolist() == [False] * 5 + [True] * 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_drop_lowest_drops_exactly_k_and_only_the_lowest(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 20, (1000,), generator=g).to(dtype)  # many ties
    for k in (1, 37, 500, 999):
        keep = drop_lowest(s, k)
        assert int((~keep).sum()) == k
        assert s[~keep].max() <= s[keep].min()

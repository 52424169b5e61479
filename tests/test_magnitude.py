"""Magnitude pruning with exact values on tiny hand-set layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

import sparsewrap as sw
from sparsewrap.errors import ConfigError

from .zoo import ResNetTiny


class Two(nn.Module):
    """Two bias-free Linear layers with hand-set weights, and a head (excluded by default)."""

    def __init__(self, a: list, b: list) -> None:
        super().__init__()
        a_t, b_t = torch.tensor(a), torch.tensor(b)
        self.a = nn.Linear(a_t.shape[1], a_t.shape[0], bias=False)
        self.b = nn.Linear(b_t.shape[1], b_t.shape[0], bias=False)
        self.head = nn.Linear(b_t.shape[0], 1)
        with torch.no_grad():
            self.a.weight.copy_(a_t)
            self.b.weight.copy_(b_t)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.b(F.relu(self.a(x)))))


SMALL_A = [[0.1, -0.2], [0.3, 0.4]]
BIG_B = [[1.0, -2.0], [3.0, 4.0], [-5.0, 6.0]]


def effective(model: nn.Module, name: str, tensor: str = "weight") -> Tensor:
    return getattr(model.get_submodule(name), tensor).detach()


def keep(model: nn.Module, name: str) -> list:
    return (effective(model, name) != 0).int().tolist()


def test_oneshot_global_ranks_all_layers_together() -> None:
    model = Two(SMALL_A, BIG_B)
    sw.sparsify(model, "magnitude", target=0.4)  # drop round(0.4 * 10) = 4 smallest |w| of all 10
    assert keep(model, "a") == [[0, 0], [0, 0]]
    assert keep(model, "b") == [[1, 1], [1, 1], [1, 1]]
    assert not parametrize.is_parametrized(model.head)


def test_oneshot_uniform_prunes_each_layer_to_the_target() -> None:
    model = Two(SMALL_A, BIG_B)
    sw.sparsify(model, "magnitude", target=0.4, allocation="uniform")
    # quotas 0.4*4 = 1.6 and 0.4*6 = 2.4 -> floors 1, 2, the extra unit to the larger fraction (a): 2 and 2
    assert keep(model, "a") == [[0, 0], [1, 1]]
    assert keep(model, "b") == [[0, 0], [1, 1], [1, 1]]


def test_oneshot_erk_follows_the_erdos_renyi_kernel_counts() -> None:
    model = Two(SMALL_A, BIG_B)
    sw.sparsify(model, "magnitude", target=0.4, allocation="erk")
    # raw 4/4 = 1 and 5/6; budget 6 kept of 10 -> eps = 6 / 9; sparsities 1/3 and 4/9
    # quotas 4/3 and 8/3 -> floors 1, 2 + the extra unit to b: drop 1 of a, 3 of b
    assert keep(model, "a") == [[0, 1], [1, 1]]
    assert keep(model, "b") == [[0, 0], [0, 1], [1, 1]]


def test_weights_and_outputs_are_the_original_times_the_mask() -> None:
    model = Two(SMALL_A, BIG_B)
    x = torch.randn(5, 2)
    sw.sparsify(model, "magnitude", target=0.4, allocation="uniform")
    mask = model.a.parametrizations.weight[0].mask
    torch.testing.assert_close(model.a.weight, torch.tensor(SMALL_A) * mask)
    expected = model.head(F.relu(F.linear(F.relu(F.linear(x, model.a.weight)), model.b.weight)))
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize(
    ("schedule", "expected_zeros"),
    # cubic, n = 2 events: 0 at t=0, 0.8 * (1 - 0.5^3) = 0.7 at t=2, 0.8 at t=4 (of 10 weights)
    # exponential: density (0.2)^(k/2): 1, 0.447 -> 5.53 -> round 6 zeros, 0.2 -> 8 zeros
    [("cubic", {0: 0, 2: 7, 4: 8}), ("exponential", {0: 0, 2: 6, 4: 8})],
)
def test_gradual_schedule_reaches_the_scheduled_sparsity_at_each_event(schedule: str, expected_zeros: dict) -> None:
    model = Two(SMALL_A, BIG_B)
    sp = sw.sparsify(model, "magnitude", target=0.8, schedule=schedule, start=0, end=4, every=2)
    assert sp.sparsity() == 0.0  # nothing pruned before the first event
    zeros = {}
    for t in range(6):
        sp.step()  # runs the method at t, then counts
        zeros[t] = 10 - int(effective(model, "a").count_nonzero() + effective(model, "b").count_nonzero())
    assert {t: zeros[t] for t in expected_zeros} == expected_zeros
    assert zeros[1] == zeros[0] and zeros[3] == zeros[2] and zeros[5] == zeros[4]


def test_gradual_keeps_pruned_weights_pruned_even_if_their_originals_grow() -> None:
    model = Two(SMALL_A, BIG_B)
    sp = sw.sparsify(model, "magnitude", target=0.8, schedule="cubic", start=0, end=2, every=1)
    sp.step()  # t=0: 0
    sp.step()  # t=1: 0.8 * (1 - 0.125) = 0.7 -> 7 zeros
    pruned_a = effective(model, "a") == 0
    pruned_b = effective(model, "b") == 0
    assert int(pruned_a.sum() + pruned_b.sum()) == 7
    with torch.no_grad():  # make the pruned originals the largest weights: they must still stay pruned
        model.a.parametrizations.weight.original[pruned_a] = 100.0
        model.b.parametrizations.weight.original[pruned_b] = 100.0
    sp.step()  # t=2: 0.8 -> 8 zeros
    assert (effective(model, "a")[pruned_a] == 0).all() and (effective(model, "b")[pruned_b] == 0).all()
    assert int((effective(model, "a") == 0).sum() + (effective(model, "b") == 0).sum()) == 8


def test_export_before_the_schedule_ends_projects_onto_the_target_exactly() -> None:
    model = Two(SMALL_A, BIG_B)
    sp = sw.sparsify(model, "magnitude", target=0.8, schedule="cubic", start=0, end=100, every=10)
    sp.step()
    plain = sw.export(sp)
    nonzero = int(plain.a.weight.count_nonzero() + plain.b.weight.count_nonzero())
    assert nonzero == 2  # the two largest: 6 and -5
    assert plain.b.weight.tolist() == [[0, 0], [0, 0], [-5.0, 6.0]]
    assert sp.report().exported == pytest.approx(0.8)
    assert sp.sparsity() == 0.0  # the live model is unchanged by the projection


def test_eval_mode_shows_the_export_while_training_follows_the_schedule() -> None:
    model = Two(SMALL_A, BIG_B)
    sp = sw.sparsify(model, "magnitude", target=0.8, schedule="cubic", start=0, end=100, every=10)
    sp.step()
    model.train()
    assert int((effective(model, "a") == 0).sum() + (effective(model, "b") == 0).sum()) == 0  # scheduled: 0 %
    model.eval()  # the final projection, computed here from the weights: the two largest, 6 and -5, are kept
    assert effective(model, "a").tolist() == [[0, 0], [0, 0]]
    assert effective(model, "b").tolist() == [[0, 0], [0, 0], [-5.0, 6.0]]
    with torch.no_grad():  # a weight that grows past the others is kept by the next eval, as by export
        model.a.parametrizations.weight.original[0, 0] = 10.0
    assert effective(model, "a").tolist() == [[10.0, 0], [0, 0]]
    assert effective(model, "b").tolist() == [[0, 0], [0, 0], [0, 6.0]]
    assert torch.equal(sw.export(sp).b.weight, effective(model, "b"))


def test_pruned_weights_stay_pruned_through_training() -> None:
    torch.manual_seed(0)
    model = Two(torch.randn(8, 6).tolist(), torch.randn(5, 8).tolist())
    sp = sw.sparsify(model, "magnitude", target=0.6)
    pruned = [effective(model, n) == 0 for n in ("a", "b")]
    opt = torch.optim.SGD(sp.param_groups(lr=0.1, weight_decay=1e-2), momentum=0.9)
    for _ in range(5):
        loss = model(torch.randn(16, 6)).pow(2).mean() + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
    for n, p in zip(("a", "b"), pruned):
        assert (effective(model, n)[p] == 0).all()
        assert (effective(model, n)[~p] != 0).all()
    assert sp.sparsity() == pytest.approx(round(0.6 * 88) / 88)


# -- channel granularity ---------------------------------------------------------------------------------------
class Chan(nn.Module):
    """a: Linear(2 -> 4), b: Linear(4 -> 2), head; biases are channel companions."""

    def __init__(self, b_scale: float = 1.0) -> None:
        super().__init__()
        self.a = nn.Linear(2, 4)
        self.b = nn.Linear(4, 2)
        self.head = nn.Linear(2, 1)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, 1.0], [0.1, -0.1], [3.0, 3.0], [0.5, -0.4]]))
            self.b.weight.copy_(torch.tensor([[1.0, 1.0, -1.0, 1.0], [0.1, 0.2, 0.3, -0.4]]) * b_scale)
            self.a.bias.fill_(1.0)
            self.b.bias.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.b(F.relu(self.a(x)))))


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_channel_pruning_drops_rows_of_smallest_l1_norm_with_their_biases(allocation: str) -> None:
    model = Chan(b_scale=100.0)  # global scores are normalised per group: b's scale must not matter
    sp = sw.sparsify(model, "magnitude", target=0.5, granularity="channel", allocation=allocation)
    # mean |w| per row: a = 1, 0.1, 3, 0.45 -> drop rows 1, 3; b = 1, 0.25 -> drop row 1; 4 + 4 = 8 of 16
    assert keep(model, "a") == [[1, 1], [0, 0], [1, 1], [0, 0]]
    assert keep(model, "b") == [[1, 1, 1, 1], [0, 0, 0, 0]]
    assert model.a.bias.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert model.b.bias.tolist() == [1.0, 0.0]
    plain = sw.export(sp)
    assert plain.a.bias.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert sp.report().exported == pytest.approx(0.5)


def test_channel_masks_are_one_entry_per_output_channel() -> None:
    model = Chan()
    sw.sparsify(model, "magnitude", target=0.5, granularity="channel")
    assert tuple(model.a.parametrizations.weight[0].mask.shape) == (4, 1)
    assert tuple(model.a.parametrizations.bias[0].mask.shape) == (4,)


def _zero_rows(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], -1).abs().sum(1) == 0


def test_residual_members_lose_the_same_channels_and_bn_companions_are_zeroed() -> None:
    model = ResNetTiny()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.5, 1.5)
    sp = sw.sparsify(model, "magnitude", target=0.5, granularity="channel")
    plain = sw.export(sp)
    # the identity block adds its conv2 output to the stem's: one group of 8 channels
    gone = _zero_rows(plain.stem.weight)
    assert gone.any() and not gone.all()
    assert torch.equal(_zero_rows(plain.block1.conv2.weight), gone)
    for bn in (plain.bn, plain.block1.bn2):
        assert torch.equal(bn.weight == 0, gone) and torch.equal(bn.bias == 0, gone)
    # the projection block: conv2 and the 1x1 shortcut are added
    gone2 = _zero_rows(plain.block2.conv2.weight)
    assert torch.equal(_zero_rows(plain.block2.shortcut[0].weight), gone2)
    assert torch.equal(plain.block2.shortcut[1].weight == 0, gone2)
    # a removed channel is exactly zero after the block (every producer and BN of the group is zeroed)
    plain.eval()
    with torch.no_grad():
        feats = plain.block2(plain.block1(F.relu(plain.bn(plain.stem(torch.randn(2, 3, 8, 8))))))
    assert (feats[:, gone2] == 0).all()


def test_channel_export_is_exact_to_one_channel() -> None:
    model = ResNetTiny()
    sp = sw.sparsify(model, "magnitude", target=0.6, granularity="channel")
    plain = sw.export(sp)
    total = sum(t.numel for t in sp.targets)
    zeros = sum(int((plain.get_submodule(t.name).weight == 0).sum()) for t in sp.targets)
    widest_row = max(t.fan_in for t in sp.targets) * 2  # a channel of the stem group spans two layers
    assert abs(zeros - 0.6 * total) <= widest_row / 2
    assert sp.report().exported == pytest.approx(zeros / total)


def test_unstructured_export_is_exact_to_one_weight() -> None:
    model = ResNetTiny()
    sp = sw.sparsify(model, "magnitude", target=0.37)
    plain = sw.export(sp)
    total = sum(t.numel for t in sp.targets)
    zeros = sum(int((plain.get_submodule(t.name).weight == 0).sum()) for t in sp.targets)
    assert zeros == round(0.37 * total)


def test_magnitude_rejects_layer_wise_targets_and_bad_options() -> None:
    with pytest.raises(ConfigError, match=r"per-layer dict target with granularity='weight' only"):
        sw.sparsify(Two(SMALL_A, BIG_B), "magnitude", target={"a": 0.5}, granularity="channel")
    with pytest.raises(ConfigError, match=r"granularity='filter' is unknown; valid: 'channel', 'weight'"):
        sw.sparsify(Two(SMALL_A, BIG_B), "magnitude", target=0.5, granularity="filter")
    with pytest.raises(ConfigError, match=r"allocation='erk2' is unknown; valid: 'erk', 'global', 'uniform'"):
        sw.sparsify(Two(SMALL_A, BIG_B), "magnitude", target=0.5, allocation="erk2")
    with pytest.raises(ConfigError, match=r"every=3 must be positive and divide end - start = 10"):
        sw.sparsify(Two(SMALL_A, BIG_B), "magnitude", target=0.5, schedule="cubic", end=10, every=3)


def test_state_dict_round_trip_restores_the_schedule_position() -> None:
    model = Two(SMALL_A, BIG_B)
    sp = sw.sparsify(model, "magnitude", target=0.8, schedule="cubic", start=0, end=4, every=2)
    for _ in range(3):
        sp.step()
    fresh = Two(SMALL_A, BIG_B)
    sp2 = sw.sparsify(fresh, "magnitude", target=0.8, schedule="cubic", start=0, end=4, every=2)
    fresh.load_state_dict(model.state_dict())
    sp2.load_state_dict(sp.state_dict())
    assert sp2.step_count == 3 and sp2.method.current == pytest.approx(0.7)
    sp.step()
    sp2.step()
    assert keep(fresh, "a") == keep(model, "a") and keep(fresh, "b") == keep(model, "b")


@pytest.mark.parametrize("allocation", ["uniform", "erk"])
def test_layer_wise_channel_allocations_stay_within_one_channel_of_each_quota(allocation: str) -> None:
    from sparsewrap.methods.allocation import layer_sparsities

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    sp = sw.sparsify(model, "magnitude", target=0.5, granularity="channel", allocation=allocation)
    shapes = [t.shape for t in sp.targets]
    quotas = [s * shape[0] for s, shape in zip(layer_sparsities(allocation, shapes, 0.5), shapes)]
    dropped = [int(_zero_rows(t.module.weight.detach()).sum()) for t in sp.targets]
    assert all(abs(d - q) < 1 for d, q in zip(dropped, quotas)), (dropped, quotas)
    total = sum(t.numel for t in sp.targets)
    removed = sum(d * t.fan_in for d, t in zip(dropped, sp.targets))
    assert abs(removed - 0.5 * total) <= max(t.fan_in for t in sp.targets) / 2  # and overall within one channel


# -- weights it cannot rank ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["weight", "channel"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_sparsify_naming_the_layer(granularity: str, bad: float) -> None:
    model = Two(SMALL_A, BIG_B)
    with torch.no_grad():
        model.b.weight.fill_(bad)  # a whole layer of NaN used to give sparsity 0.0 everywhere, silently
    with pytest.raises(ConfigError, match=r"^layer 'b' has non-finite weights \(NaN or inf\) at sparsify; .*load"):
        sw.sparsify(model, "magnitude", target=0.5, granularity=granularity)
    assert not parametrize.is_parametrized(model.a)  # refused before any layer is wrapped


def test_weights_that_turn_nan_during_training_are_refused_at_the_next_mask_update() -> None:
    model = Two(SMALL_A, BIG_B)
    sp = sw.sparsify(model, "magnitude", target=0.8, schedule="cubic", start=0, end=4, every=2)
    sp.step()  # step 0: an update with finite weights
    with torch.no_grad():
        model.a.parametrizations.weight.original[0, 0] = float("nan")
    sp.step()  # step 1 is not an update step: nothing is ranked
    with pytest.raises(ConfigError, match=r"^layer 'a' has non-finite weights \(NaN or inf\) at step 2; .*diverged"):
        sp.step()
    with pytest.raises(ConfigError, match=r"layer 'a' has non-finite weights .* at the final projection"):
        sw.export(sp)


def test_a_meta_device_model_is_refused_with_one_line() -> None:
    with torch.device("meta"):
        model = Two(SMALL_A, BIG_B)
    with pytest.raises(ConfigError, match=r"^layer 'a' is on the meta device .*\(model\.to_empty\(device='cpu'\)"):
        sw.sparsify(model, "magnitude", target=0.5, schedule="cubic", end=10, every=5)


def test_a_gradual_schedule_given_as_fractions_of_the_run_follows_its_length() -> None:
    model = Two(SMALL_A, BIG_B)
    sp = sw.sparsify(model, "magnitude", target=0.8, schedule="cubic", start=0.0, end=0.5, every=2)
    with pytest.raises(ConfigError, match=r"needs the run's length.*sp\.start"):
        sp.step()
    sp.start(total_steps=8)  # start=0, end=4: events at 0, 2, 4
    assert (sp.method.schedule.start, sp.method.schedule.end) == (0, 4)
    zeros = []
    for _ in range(6):
        sp.step()
        zeros.append(int((effective(model, "a") == 0).sum() + (effective(model, "b") == 0).sum()))
    # cubic: s_k = 0.8 (1 - (1 - k/2)^3) of 10 weights at k = 0, 1, 2 -> 0, 7, 8 zeros, held between events
    assert zeros == [0, 0, 7, 7, 8, 8]

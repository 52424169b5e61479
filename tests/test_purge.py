"""Purge: exact removal of zero channels, features and heads on the tiny zoo and on targeted structures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sparsewrap as sw
from sparsewrap.analysis.tracing import analyse
from sparsewrap.errors import ConfigError
from sparsewrap.purge import purge, purge_report
from sparsewrap.purge.plan import Planner

from .zoo import ZOO, ResNetTiny, outputs

TIED = {"tied_lm"}  # its only hidden group feeds a weight tied to the embedding: refused by design


def force_channel_masks(model: nn.Module, gen: torch.Generator) -> dict[str, int]:
    """Zero a random 30-70 % of the channels of every group that does not reach the output (rows + companions)."""
    modules = dict(model.named_modules())
    zeroed = {}
    with torch.no_grad():
        for g in analyse(model).groups:
            if any("model output" in r for r in g.reasons):
                continue
            frac = 0.3 + 0.4 * float(torch.rand(1, generator=gen))
            idx = torch.randperm(g.size, generator=gen)[: max(1, round(frac * g.size))]
            for p in g.producers:
                modules[p].weight[idx] = 0
            for m, t in g.companions:
                getattr(modules[m], t)[idx] = 0
            zeroed[g.producers[0]] = idx.numel()
    return zeroed


def rel_err(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x - y).abs().max() / x.abs().max()) for x, y in zip(a, b))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(model: nn.Module, x) -> list[Tensor]:
    with torch.no_grad():
        return outputs(model(x))


def double_input(x: Tensor) -> Tensor:
    return x.double() if x.is_floating_point() else x


@pytest.mark.parametrize("seed", [0, 1])
def test_zoo_purge_equals_the_masked_model_with_fewer_parameters(zoo_name: str, seed: int) -> None:
    factory, make_input = ZOO[zoo_name]
    model = factory().double().eval()
    x = double_input(make_input())
    force_channel_masks(model, torch.Generator().manual_seed(seed))
    result = purge(model, x)
    assert rel_err(run(model, x), run(result.model, x)) <= 1e-6
    if zoo_name in TIED:
        assert n_params(result.model) == n_params(model)
        assert any("tied" in u.reason for u in result.report.units)
        return
    assert n_params(result.model) < n_params(model)
    assert result.report.params_after == n_params(result.model)
    assert result.report.coverage in ("full", "partial")


def test_purge_does_not_touch_its_input() -> None:
    model = ZOO["conv_bn"][0]().eval()
    force_channel_masks(model, torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    purge(model, torch.randn(2, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_flatten_to_linear_expands_the_channel_mask_over_positions() -> None:
    model = ZOO["conv_bn"][0]().double().eval()
    with torch.no_grad():
        model.conv2.weight[[1, 4, 9]] = 0
        model.bn2.weight[[1, 4, 9]] = 0
        model.bn2.bias[[1, 4, 9]] = 0
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    small = purge(model, x).model
    assert small.conv2.out_channels == 13 and small.bn2.num_features == 13
    assert small.fc.in_features == 13 * 4  # 2x2 positions per channel after the last pool
    keep = [c for c in range(16) if c not in (1, 4, 9)]
    cols = torch.tensor([4 * c + r for c in keep for r in range(4)])
    torch.testing.assert_close(small.fc.weight, model.fc.weight[:, cols])
    assert rel_err(run(model, x), run(small, x)) <= 1e-12


def test_concat_removes_each_branch_at_its_offset() -> None:
    model = ZOO["concat"][0]().double().eval()
    with torch.no_grad():
        model.a.weight[[0, 5]] = 0
        model.a.bias[[0, 5]] = 0
        model.b.weight[[2]] = 0
        model.b.bias[[2]] = 0
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    small = purge(model, x).model
    assert (small.a.out_channels, small.b.out_channels, small.merge.in_channels) == (4, 9, 13)
    cols = [1, 2, 3, 4] + [6 + c for c in range(10) if c != 2]
    torch.testing.assert_close(small.merge.weight, model.merge.weight[:, cols])
    assert rel_err(run(model, x), run(small, x)) <= 1e-12


def test_a_bn_shift_keeps_a_zero_conv_channel_alive() -> None:
    model = ZOO["conv_bn"][0]().double().eval()
    with torch.no_grad():
        model.conv1.weight[3] = 0
        model.conv1.bias[3] = 0
        model.bn1.bias.fill_(0.5)  # BN turns the zero channel into a constant: it must stay
    result = purge(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert result.model.conv1.out_channels == 8
    unit = next(u for u in result.report.units if u.name == "conv1")
    assert unit.status == "dense" and unit.zero == 1


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.grouped(F.relu(self.pw(x))))
        return self.head(F.relu(self.gn(x)).mean((2, 3)))


def test_grouped_conv_drops_empty_groups_and_keeps_groups_consistent() -> None:
    model = GroupedNet().double().eval()
    with torch.no_grad():
        for conv in (model.pw, model.grouped):  # channels 2, 3 = conv group 1 on both sides (and GN group 1)
            conv.weight[2:4] = 0
            conv.bias[2:4] = 0
        model.gn.bias[2:4] = 0
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    small = purge(model, x).model
    assert (small.pw.out_channels, small.grouped.groups, small.grouped.in_channels) == (6, 3, 6)
    assert (small.gn.num_groups, small.gn.num_channels, small.head.in_features) == (3, 6, 6)
    assert rel_err(run(model, x), run(small, x)) <= 1e-12


def test_grouped_conv_pads_uneven_groups_with_zero_channels() -> None:
    model = GroupedNet().double().eval()
    with torch.no_grad():
        model.pw.weight[[0, 2]] = 0  # one dead input in groups 0 and 1 only: groups need equal counts
        model.pw.bias[[0, 2]] = 0
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    small = purge(model, x).model
    assert small.grouped.groups == 4 and small.grouped.in_channels == 8  # padded back: nothing removable
    assert rel_err(run(model, x), run(small, x)) <= 1e-12


def test_groupnorm_keeps_partially_dead_groups() -> None:
    model = GroupedNet().double().eval()
    with torch.no_grad():
        model.grouped.weight[2] = 0  # half of GN group 1 only
        model.grouped.bias[2] = 0
        model.gn.bias[2] = 0
    small = purge(model, torch.randn(2, 3, 6, 6, dtype=torch.float64)).model
    assert small.gn.num_channels == 8


class TimmAttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from timm.layers import Attention

        self.embed = nn.Linear(6, 16)
        self.attn = Attention(16, num_heads=4, qkv_bias=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        return self.head((h + self.attn(h)).mean(1))


def test_dead_attention_heads_are_removed_and_the_head_count_updated() -> None:
    model = TimmAttentionBlock().double().eval()
    with torch.no_grad():
        d = 4
        model.attn.qkv.weight[2 * 16 + 1 * d : 2 * 16 + 2 * d] = 0  # value rows of head 1
        model.attn.qkv.bias[2 * 16 + 1 * d : 2 * 16 + 2 * d] = 0
        model.attn.proj.weight[:, 3 * d : 4 * d] = 0  # projection columns of head 3
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    result = purge(model, x)
    small = result.model
    assert small.attn.num_heads == 2 and small.attn.attn_dim == 8
    assert small.attn.qkv.out_features == 24 and small.attn.proj.in_features == 8
    assert rel_err(run(model, x), run(small, x)) <= 1e-12
    unit = next(u for u in result.report.units if u.kind == "heads")
    assert (unit.size, unit.kept, unit.status) == (4, 2, "purged")


def test_round_to_keeps_counts_a_multiple_of_n() -> None:
    model = ZOO["mlp"][0]().double().eval()
    with torch.no_grad():
        model.fc1.weight[:21] = 0  # 11 of 32 alive
        model.fc1.bias[:21] = 0
    x = torch.randn(4, 12, dtype=torch.float64)
    assert purge(model, x).model.fc1.out_features == 11
    small = purge(model, x, round_to=8).model
    assert small.fc1.out_features == 16 and small.fc2.in_features == 16
    assert rel_err(run(model, x), run(small, x)) <= 1e-12


class ChannelShuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # not understood: must stay dense
        return self.b(y)


def test_an_op_the_analysis_does_not_understand_keeps_the_group_dense() -> None:
    model = ChannelShuffle().double().eval()
    with torch.no_grad():
        model.a.weight[1] = 0
        model.a.bias[1] = 0
    result = purge(model, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert result.model.a.out_channels == 8
    unit = next(u for u in result.report.units if u.name == "a")
    assert unit.status == "dense" and "reshape" in unit.reason


def test_verification_rolls_back_a_group_whose_removal_changes_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ZOO["mlp"][0]().double().eval()
    with torch.no_grad():
        model.fc2.weight[:4] = 0
        model.fc2.bias[:4] = 0
    original = Planner._removable

    def lying(self: Planner, g: int) -> Tensor:  # claims every channel of fc1's group removable
        out = original(self, g)
        return torch.ones_like(out) if self.groups[g].producers == ["fc1"] else out

    monkeypatch.setattr(Planner, "_removable", lying)
    x = torch.randn(4, 12, dtype=torch.float64)
    result = purge(model, x)
    assert result.model.fc1.out_features == 32 and result.model.fc2.out_features == 20
    assert rel_err(run(model, x), run(result.model, x)) <= 1e-12
    unit = next(u for u in result.report.units if u.name == "fc1")
    assert unit.status == "dense" and "outputs change" in unit.reason


def test_export_purge_from_magnitude_channels_matches_the_live_model() -> None:
    model = ResNetTiny().double()
    sp = sw.sparsify(model, "magnitude", target=0.5, granularity="channel")
    model.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    small = sw.export(sp, purge=True, example_inputs=x)
    assert rel_err(run(model, x), run(small, x)) <= 1e-6
    assert n_params(small) < n_params(sw.export(sp))
    report = purge_report(small)
    assert report.changed and report.params_after == n_params(small)
    model.train()
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()  # the live model is still trainable


def test_export_purge_of_a_model_without_zero_channels_returns_an_equal_model_and_says_so() -> None:
    model = ZOO["mlp"][0]()
    sp = sw.sparsify(model, "magnitude", target=0.5)  # unstructured: no channel is entirely zero
    x = torch.randn(4, 12)
    with pytest.warns(UserWarning, match="nothing to purge"):
        small = sw.export(sp, purge=True, example_inputs=x)
    plain = sw.export(sp)
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in small.state_dict().items())
    assert not purge_report(small).changed


def test_bad_arguments_raise_clear_errors() -> None:
    model = ZOO["mlp"][0]()
    x = torch.randn(2, 12)
    with pytest.raises(ConfigError, match="round_to=0"):
        purge(model, x, round_to=0)
    sw.sparsify(model, "magnitude", target=0.5)
    with pytest.raises(ConfigError, match="export"):
        purge(model, x)
    with pytest.raises(ConfigError, match="example_inputs"):
        sw.export(model, purge=True)


class GhostLike(nn.Module):
    """cat of two branches added to one wider shortcut: channels are tied across groups position by position."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.short = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([self.a(x), self.b(x)], dim=1) + self.short(x)
        return self.out(F.relu(y))


def test_channels_tied_across_layouts_go_only_when_zero_on_every_side() -> None:
    model = GhostLike().double().eval()
    with torch.no_grad():
        for conv, ch in ((model.a, 1), (model.short, 1), (model.b, 3), (model.short, 7), (model.a, 2)):
            conv.weight[ch] = 0
            conv.bias[ch] = 0
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    small = purge(model, x).model
    # positions 1 (a1 + short1) and 7 (b3 + short7) are zero on both sides; position 2 only in a
    assert (small.a.out_channels, small.b.out_channels, small.short.out_channels) == (3, 3, 6)
    torch.testing.assert_close(small.out.weight, model.out.weight[:, [0, 2, 3, 4, 5, 6]])
    assert rel_err(run(model, x), run(small, x)) <= 1e-12


class Glu(nn.Module):
    """chunk(2) into value and gate halves: a value channel and its gate go together, so the halves stay equal."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.a(x).chunk(2, dim=1)
        return self.c(value * torch.sigmoid(gate))


class FixedSplit(Glu):
    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.a(x).split([4, 4], dim=1)  # literal sizes: they would not follow a purge
        return self.c(value * torch.sigmoid(gate))


def test_chunk_keeps_pieces_equal_and_a_fixed_split_stays_dense() -> None:
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    model = Glu().double().eval()
    with torch.no_grad():
        model.a.weight[[1, 2]] = 0  # value channels 1 and 2: their gates (5, 6) are not needed either
        model.a.bias[[1, 2]] = 0
    small = purge(model, x).model
    assert small.a.out_channels == 4 and small.c.in_channels == 2
    torch.testing.assert_close(small.a.weight, model.a.weight[[0, 3, 4, 7]])
    assert rel_err(run(model, x), run(small, x)) <= 1e-12
    fixed = FixedSplit().double().eval()
    fixed.load_state_dict(model.state_dict())
    result = purge(fixed, x)
    assert result.model.a.out_channels == 8
    assert "fixed sizes" in next(u for u in result.report.units if u.name == "a").reason


def test_an_analysis_failure_returns_the_model_unchanged_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, *args, **kwargs) -> None:
        raise IndexError("boom")

    monkeypatch.setattr(Planner, "__init__", broken)
    model = ZOO["mlp"][0]().eval()
    x = torch.randn(2, 12)
    result = purge(model, x)
    assert not result.report.changed and "analysis failed: IndexError: boom" in result.report.trace_error
    assert torch.equal(run(result.model, x)[0], run(model, x)[0])

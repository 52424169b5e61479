"""SparseTracer, execution order, channel groups, and the untraceable fallback."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

import sparsewrap as sw
from sparsewrap.analysis.tracing import SparseTracer, analyse, original_class, symbolic_trace
from sparsewrap.errors import TraceError

from .zoo import ZOO, DepthwiseGrouped, ResNetTiny


class MyLinear(nn.Linear):
    """A user subclass of nn.Linear defined outside torch.nn (like timm's Linear)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2.0


class UsesMyLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = MyLinear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.inner(x)))


class Reversed(nn.Module):
    """Registration order differs from execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.last = nn.Linear(5, 2)
        self.middle = nn.Linear(5, 5)
        self.first = nn.Linear(3, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.middle(self.first(x)))


class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(4, 4)
        self.a = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.a(x)
        if x.sum() > 0:
            x = F.relu(x)
        return self.head(self.b(x))


def signature(gm: fx.GraphModule) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in gm.graph.nodes]


def test_wrapped_user_subclass_of_linear_traces_to_the_same_graph() -> None:
    model = UsesMyLinear()
    before = signature(symbolic_trace(model))
    assert ("call_module", "inner") in before  # a leaf: the traced graph never reads its weight as a constant
    sw.sparsify(model, "magnitude", target=0.5)
    assert original_class(model.inner) is MyLinear and type(model.inner) is not MyLinear
    assert signature(symbolic_trace(model)) == before


def test_the_default_fx_tracer_would_see_a_different_graph() -> None:
    """Documents why SparseTracer exists: torch's tracer treats a wrapped module as a leaf, but not the bare one."""
    model = UsesMyLinear()
    before = signature(fx.GraphModule(model, fx.Tracer().trace(model)))
    sw.sparsify(model, "magnitude", target=0.5)
    after = signature(fx.GraphModule(model, fx.Tracer().trace(model)))
    assert before != after


def test_traced_wrapped_model_computes_the_same_outputs() -> None:
    model = ResNetTiny().eval()
    sw.sparsify(model, "magnitude", target=0.5)
    x = torch.randn(2, 3, 8, 8)
    gm = symbolic_trace(model)
    torch.testing.assert_close(gm(x), model(x))
    with torch.no_grad():
        model.stem.parametrizations.weight[0].mask.zero_()  # the graph reads the live mask, not a copy
    torch.testing.assert_close(gm(x), model(x))


def test_sparse_tracer_keeps_norms_and_sparsifiable_layers_as_leaves() -> None:
    tracer = SparseTracer()
    assert tracer.is_leaf_module(MyLinear(2, 2), "x")
    assert tracer.is_leaf_module(nn.LayerNorm(4), "n")
    assert not tracer.is_leaf_module(nn.Sequential(nn.Linear(2, 2)), "s")
    assert not tracer.is_leaf_module(UsesMyLinear(), "u")


def test_execution_order_is_the_order_modules_run() -> None:
    model = Reversed()
    graph = analyse(model)
    assert graph.traced
    assert graph.order == ["first", "middle", "last"]
    sp = sw.sparsify(model, "magnitude", target=0.5)
    assert [t.name for t in sp.targets] == ["first", "middle"]  # the head (last to run) is excluded


def test_leaf_module_children_follow_their_parent_in_order() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.post = nn.Linear(3, 3)
            self.block = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)  # a torch.nn leaf with children
            self.pre = nn.Linear(3, 8)

        def forward(self, x: Tensor) -> Tensor:
            return self.block(self.pre(x)).mean(-1, keepdim=True).expand(-1, -1, 3) + self.post(x)

    order = analyse(Wrapper()).order
    assert order.index("pre") < order.index("block") < order.index("block.linear1") < order.index("post")


def test_channel_groups_of_a_residual_network() -> None:
    groups = {tuple(sorted(g.producers)): g for g in analyse(ResNetTiny()).groups}
    stem = groups[("block1.conv2", "stem")]  # the identity residual merges the stem's space with block1's output
    assert stem.size == 8 and stem.exact
    assert set(stem.companions) == {("bn", "weight"), ("bn", "bias"), ("block1.bn2", "weight"), ("block1.bn2", "bias")}
    assert set(stem.consumers) == {"block1.conv1", "block2.conv1", "block2.shortcut.0"}
    proj = groups[("block2.conv2", "block2.shortcut.0")]  # the 1x1 projection joins block2's output
    assert proj.size == 16 and proj.exact and proj.consumers == ["head"]
    inner = groups[("block1.conv1",)]
    assert inner.consumers == ["block1.conv2"] and inner.exact
    assert not groups[("head",)].exact and "reaches the model output" in groups[("head",)].reasons


def test_channel_groups_of_timm_resnet18() -> None:
    timm = pytest.importorskip("timm")
    groups = analyse(timm.create_model("resnet18", pretrained=False)).groups
    stage1 = next(g for g in groups if "conv1" in g.producers)
    assert sorted(stage1.producers) == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert stage1.exact and "layer2.0.downsample.0" in stage1.consumers
    stage2 = next(g for g in groups if "layer2.0.downsample.0" in g.producers)
    assert sorted(stage2.producers) == ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"]
    # 8 block-internal groups (each BasicBlock's conv1) + 4 stage groups (residual chains), as Torch-Pruning finds
    assert len([g for g in groups if g.exact]) == 12
    assert {g.size for g in groups if g.exact} == {64, 128, 256, 512}


def test_depthwise_joins_its_input_group_and_grouped_convs_are_understood() -> None:
    groups = analyse(DepthwiseGrouped()).groups
    pw = next(g for g in groups if "pw" in g.producers)
    assert pw.producers == ["pw", "dw"] and ("bn2", "weight") in pw.companions
    assert pw.exact and pw.consumers == ["grouped"]  # a grouped conv reads its input channels (issue 4)
    grouped = next(g for g in groups if "grouped" in g.producers)
    assert grouped.exact


def test_concat_keeps_its_branches_exact() -> None:
    groups = analyse(ZOO["concat"][0]()).groups
    for name in ("a", "b"):
        g = next(g for g in groups if name in g.producers)
        assert g.exact and g.consumers == ["merge"]  # cat on the channel axis is followed by offsets (issue 4)


def test_untraceable_model_warns_and_falls_back_to_a_module_walk() -> None:
    model = DataDependent()
    with pytest.warns(UserWarning, match=r"torch.fx could not trace DataDependent.*Falling back to a module walk"):
        graph = analyse(model)
    assert not graph.traced and graph.groups == []
    assert graph.order == ["b", "a", "head"]  # registration order
    with pytest.raises(TraceError, match=r"could not trace DataDependent"):
        symbolic_trace(model)


def test_untraceable_model_still_sparsifies_unstructured() -> None:
    model = DataDependent()
    with pytest.warns(UserWarning, match="Falling back"):
        sp = sw.sparsify(model, "magnitude", target=0.5)
    assert [t.name for t in sp.targets] == ["b", "a"]
    assert sp.sparsity() == pytest.approx(0.5)
    model(torch.randn(2, 4))


def test_untraceable_model_with_structured_granularity_raises_a_clear_error() -> None:
    model = DataDependent()
    with pytest.warns(UserWarning, match="Falling back"):
        with pytest.raises(TraceError, match=r"granularity='channel' needs the model's graph.*granularity='weight'"):
            sw.sparsify(model, "magnitude", target=0.5, granularity="channel")
    assert not any(isinstance(m, nn.Linear) and type(m) is not nn.Linear for m in model.modules())  # left unwrapped

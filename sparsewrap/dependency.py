"""Channel groups: the sets of layers that must lose the same output channel together.

A *channel space* is the set of channels of one activation tensor along its channel axis (dim 1 for
convolutions, the last dim for Linear). Walking the FX graph in topological order, every Conv/Linear opens a
new space (its output channels); zero-preserving element-wise ops pass a space through; a residual ``add``
or an element-wise ``mul`` of two spaces merges them (union-find); a depthwise conv and a BatchNorm join the
space of their input. A group is *exact* when zeroing its producers' rows and its companions (biases, BN
affine parameters) makes the channel exactly zero at every consumer; any op the walk does not understand marks
the space inexact with a reason, so that later passes (gating, purge) stay correct by refusing it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .tracing import NORMS, SPARSIFIABLE

# Functions and modules f with f(0) == 0 element-wise: a zero channel stays zero through them.
_ZERO_FUNCS: set[Any] = {
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.elu, F.mish, F.hardtanh, F.dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    torch.relu, torch.tanh, torch.neg, operator.neg, torch.nn.functional.dropout2d,
}  # fmt: skip
_ZERO_METHODS = {"relu", "relu_", "tanh", "neg", "contiguous", "clone", "float", "half", "to", "type_as", "detach"}
_ZERO_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.Mish, nn.Tanh, nn.Hardtanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_SCALE_OPS = {operator.mul, torch.mul, operator.truediv, torch.div, "mul", "div", "mul_", "div_"}
_ADD_OPS = {operator.add, torch.add, operator.iadd, "add", "add_", operator.sub, torch.sub, "sub"}
# Ops that only read metadata (shape, dtype) and never consume channel values.
_META_METHODS = {"size", "dim", "numel", "shape", "dtype", "device"}


@dataclass
class ChannelGroup:
    """Channels that must be zeroed or removed together.

    Attributes:
        size: number of channels.
        producers: modules whose weight dim 0 indexes these channels (convs, Linears, depthwise convs).
        companions: ``(module, param)`` per-channel parameters zeroed with the channel (biases, BN affine).
        consumers: modules that read these channels on their input (weight dim 1).
        reasons: why the group is not exact (empty when it is).
    """

    size: int
    producers: list[str] = field(default_factory=list)
    companions: list[tuple[str, str]] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.reasons


@dataclass
class _State:
    space: int
    axis: int  # 1 (N, C, ...) or -1 (..., C)
    ndim: int | None = None
    spatial_one: bool = False  # spatial dims known to be 1 (after a global pool)


class _Walker:
    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.modules = dict(model.named_modules())
        self.gm = gm
        self.parent: list[int] = []
        self.groups: list[ChannelGroup] = []
        self.state: dict[fx.Node, _State | None] = {}

    # -- union-find over spaces ------------------------------------------------------------------------------
    def new_space(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.groups.append(ChannelGroup(size=size))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def group(self, state: _State) -> ChannelGroup:
        return self.groups[self.find(state.space)]

    def union(self, a: _State, b: _State, what: str) -> None:
        ra, rb = self.find(a.space), self.find(b.space)
        if ra == rb:
            return
        ga, gb = self.groups[ra], self.groups[rb]
        self.parent[rb] = ra
        if ga.size != gb.size:
            ga.reasons.append(f"{what} joins spaces of {ga.size} and {gb.size} channels")
        ga.producers += gb.producers
        ga.companions += gb.companions
        ga.consumers += gb.consumers
        ga.reasons += gb.reasons

    def block(self, state: _State | None, reason: str) -> None:
        if state is not None:
            self.group(state).reasons.append(reason)

    # -- the walk --------------------------------------------------------------------------------------------
    def run(self) -> list[ChannelGroup]:
        for node in self.gm.graph.nodes:
            self.state[node] = self.visit(node)
        roots = {self.find(i) for i in range(len(self.parent))}
        return [self.groups[r] for r in sorted(roots)]

    def inputs(self, node: fx.Node) -> list[_State]:
        found = []
        for arg in node.all_input_nodes:
            st = self.state.get(arg)
            if st is not None:
                found.append(st)
        return found

    def visit(self, node: fx.Node) -> _State | None:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            for st in self.inputs(node):
                self.block(st, "reaches the model output")
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.modules[str(node.target)])
        target = node.target if node.op == "call_function" else str(node.target)
        return self.visit_function(node, target)

    def visit_module(self, node: fx.Node, module: nn.Module) -> _State | None:
        ins = self.inputs(node)
        x = ins[0] if ins else None
        name = str(node.target)
        if isinstance(module, SPARSIFIABLE):
            return self.visit_layer(name, module, x)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if x is None:
                return None
            if x.axis != 1:
                self.block(x, f"{name}: BatchNorm on a non-channel axis")
                return x
            if module.affine:
                self.group(x).companions += [(name, "weight"), (name, "bias")]
            else:
                self.block(x, f"{name}: BatchNorm without affine parameters shifts zero channels")
            act = getattr(module, "act", None)  # timm's BatchNormAct2d
            if act is not None and not isinstance(act, _ZERO_MODULES):
                self.block(x, f"{name}: activation {type(act).__name__} does not keep zeros")
            return x
        if isinstance(module, _ZERO_MODULES):
            return self.pooled(x, module) if x is not None else None
        if isinstance(module, nn.Flatten):
            return self.flatten(x, module.start_dim, name)
        for st in ins:
            self.block(st, f"{name}: {type(module).__name__} is not understood by the channel analysis")
        return None

    def visit_layer(self, name: str, module: nn.Module, x: _State | None) -> _State:
        is_conv = not isinstance(module, nn.Linear)
        out = module.out_channels if is_conv else module.out_features
        if is_conv and module.groups > 1:
            depthwise = module.groups == module.in_channels == module.out_channels
            if depthwise and x is not None and x.axis == 1:
                g = self.group(x)
                g.producers.append(name)
                if module.bias is not None:
                    g.companions.append((name, "bias"))
                return _State(x.space, 1, module.weight.dim())
            self.block(x, f"{name}: grouped convolution (groups={module.groups}) reads these channels")
            st = _State(self.new_space(out), 1, module.weight.dim())
            self.group(st).producers.append(name)
            self.block(st, f"{name}: output of a grouped convolution")
            return st
        if x is not None:
            ok = x.axis == 1 if is_conv else (x.axis == -1 or (x.ndim is not None and x.axis == x.ndim - 1))
            if ok:
                self.group(x).consumers.append(name)
            else:
                self.block(x, f"{name}: {type(module).__name__} reads a non-channel axis")
        st = _State(self.new_space(out), 1 if is_conv else -1, module.weight.dim() if is_conv else None)
        g = self.group(st)
        g.producers.append(name)
        if module.bias is not None:
            g.companions.append((name, "bias"))
        return st

    def pooled(self, x: _State, module: nn.Module | None = None, output_size: Any = None) -> _State:
        size = getattr(module, "output_size", output_size)
        one = size == 1 or (isinstance(size, tuple) and all(s == 1 for s in size))
        return _State(x.space, x.axis, x.ndim, x.spatial_one or one)

    def flatten(self, x: _State | None, start: int, where: str) -> _State | None:
        if x is None:
            return None
        if start == 1 and x.axis == 1 and x.spatial_one:
            return _State(x.space, -1, 2)
        self.block(x, f"{where}: flatten mixes channels with spatial positions")
        return None

    def visit_function(self, node: fx.Node, target: Any) -> _State | None:
        ins = self.inputs(node)
        if target in _META_METHODS or target is getattr:
            return None
        if not ins:
            return None
        x = ins[0]
        if target in _ZERO_FUNCS or target in _ZERO_METHODS:
            if target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.adaptive_avg_pool1d):
                size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
                return self.pooled(x, output_size=size)
            return x
        if target in (torch.flatten, "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self.flatten(x, start, f"{node.name}")
        if target in ("mean", torch.mean, "sum", torch.sum, "amax", torch.amax) and x.axis == 1:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keep = node.kwargs.get("keepdim", False)
            dims = (dims,) if isinstance(dims, int) else dims
            if isinstance(dims, (tuple, list)) and 1 not in dims and all(d != 0 for d in dims):
                if keep:
                    return _State(x.space, 1, x.ndim, True)
                ndim = None if x.ndim is None else x.ndim - len(dims)
                return _State(x.space, -1 if ndim == 2 else 1, ndim, True)
        if target in _ADD_OPS or target in _SCALE_OPS:
            return self.binary(node, target, ins)
        for st in ins:
            self.block(st, f"{node.name}: {getattr(target, '__name__', target)} is not understood")
        return None

    def binary(self, node: fx.Node, target: Any, ins: list[_State]) -> _State | None:
        x = ins[0]
        if len(ins) >= 2:
            for other in ins[1:]:
                if not (x.axis == other.axis or (x.ndim is not None and x.ndim == other.ndim)):
                    self.block(x, f"{node.name}: broadcast between different channel axes")
                self.union(x, other, node.name)
            return x
        operands = [a for a in list(node.args) + list(node.kwargs.values()) if a is not None]
        tensors = [a for a in operands if isinstance(a, fx.Node) and self.state.get(a) is None]
        scalars = [a for a in operands if isinstance(a, (int, float))]
        if target in _SCALE_OPS:
            if tensors:
                self.block(x, f"{node.name}: scaled by a tensor the channel analysis cannot slice")
            elif node.args and node.args[0] is not _first_node(node, self.state) and target in _DIV_OPS:
                self.block(x, f"{node.name}: divides by the channel tensor")
            return x
        if tensors or any(s != 0 for s in scalars):
            self.block(x, f"{node.name}: adds a tensor or constant that is not zero on removed channels")
        return x


def _first_node(node: fx.Node, state: dict[fx.Node, _State | None]) -> fx.Node | None:
    for a in node.args:
        if isinstance(a, fx.Node) and state.get(a) is not None:
            return a
    return None


_DIV_OPS = {operator.truediv, torch.div, "div", "div_"}


def channel_groups(model: nn.Module, gm: fx.GraphModule) -> list[ChannelGroup]:
    """The channel groups of a traced model (see the module docstring)."""
    groups = _Walker(model, gm).run()
    return [g for g in groups if g.producers]


__all__ = ["ChannelGroup", "channel_groups", "NORMS"]

"""Channel groups: the sets of layers that must lose the same output channel together.

A *channel space* is the set of channels one Conv/Linear (or block) produces. Walking the FX graph in
topological order, each tensor carries a *layout* along its channel axis: a list of segments, each a range of
one space's channels (``rep`` consecutive positions per channel after a flatten), or an opaque run whose origin
is unknown. Per-channel ops pass a layout through; ``cat`` on the channel axis concatenates layouts; ``split``
and slicing cut them; reshapes move the channel axis (a merge with the axes after it multiplies ``rep``); a
residual ``add`` or an element-wise product of two tensors merges their spaces (union-find); a depthwise conv
and the norms pass their input's layout through. Any op the walk does not understand *blocks* the spaces that
reach it, with a reason, so that later passes (gating, purge) stay correct by refusing them.

The walk also propagates, per position of the channel axis, whether the value is exactly zero. In *assume*
mode (default) every producer's channels are taken as zeroed, which decides :attr:`ChannelGroup.exact`:
zeroing a group's producers and companions makes its channels exactly zero wherever a consumer reads them.
In *real* mode (the purge) the zeros come from the weights of a baked model.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor, nn

from .binary_rules import BinaryVisitor
from .groups import ChannelAnalysis, ChannelGroup, Seg, State, Use
from .module_rules import ModuleVisitor, weight_support
from .op_rules import FunctionVisitor
from .rules import NORMS


class Walker(ModuleVisitor, FunctionVisitor, BinaryVisitor):
    """One pass over an FX graph (see the module docstring); ``real`` selects the value mode."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, real: bool = False) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.gm = gm
        self.real = real
        self.parent: list[int] = []
        self.groups: list[ChannelGroup] = []
        self.uses: list[Use] = []
        self.aliases: list[tuple[tuple[Seg, ...], tuple[Seg, ...]]] = []
        self.pinned: list[tuple[int, int, int]] = []  # (space, lo, hi) channel ranges a reason concerns
        self.state: dict[fx.Node, object] = {}

    # -- union-find over spaces ------------------------------------------------------------------------------
    def new_space(self, size: int, producer: str) -> int:
        self.parent.append(len(self.parent))
        self.groups.append(ChannelGroup(size=size, producers=[producer]))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def group(self, space: int) -> ChannelGroup:
        return self.groups[self.find(space)]

    def union_spaces(self, a: int, b: int, what: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        ga, gb = self.groups[ra], self.groups[rb]
        self.parent[rb] = ra
        if ga.size != gb.size:
            ga.reasons.append(f"{what} joins spaces of {ga.size} and {gb.size} channels")
            self.pinned += [(ra, 0, max(ga.size, gb.size))]
        ga.producers += gb.producers
        ga.companions += gb.companions
        ga.consumers += gb.consumers
        ga.reasons += gb.reasons

    def union(self, a: State, b: State, what: str) -> bool:
        """Merge two layouts position by position; blocks both when their segments do not line up."""
        same = len(a.segs) == len(b.segs) and all(
            (x.space is None) == (y.space is None) and x.hi - x.lo == y.hi - y.lo and x.rep == y.rep
            and (x.space is None or (x.lo == 0 and y.lo == 0 and x.hi == self.group(x.space).size
                                     and y.hi == self.group(y.space).size))
            for x, y in zip(a.segs, b.segs)
        )  # fmt: skip
        if not same and self.real and a.width == b.width and all(s.rep == 1 for s in a.segs + b.segs):
            self.aliases.append((a.segs, b.segs))  # tied position by position; the purge keeps them consistent
            return True
        if not same:
            self.block(a, f"{what}: combines tensors whose channel layouts differ")
            self.block(b, f"{what}: combines tensors whose channel layouts differ")
            return False
        for x, y in zip(a.segs, b.segs):
            if x.space is not None:
                self.union_spaces(x.space, y.space, what)
        return True

    def block(self, st: object, reason: str) -> None:
        """Mark every space of a state (or nested list of states) as not purgeable."""
        if isinstance(st, State):
            for s in st.segs:
                if s.space is not None:
                    self.group(s.space).reasons.append(reason)
                    self.pinned.append((s.space, s.lo, s.hi))
        elif isinstance(st, (list, tuple)):
            for x in st:
                self.block(x, reason)

    def use(self, module: str, role: str, st: State, **kw) -> None:
        self.uses.append(Use(module, role, st.segs, **kw))

    # -- shapes ----------------------------------------------------------------------------------------------
    @staticmethod
    def shape(node: object) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def fresh(self, space: int, size: int, node: fx.Node, axis: int, ndim: int | None, zero: Tensor) -> State:
        shape = self.shape(node)
        if shape is not None:
            ndim = len(shape)
            axis = axis % ndim
        return State((Seg(space, 0, size),), axis, ndim, zero)

    def ones(self, n: int) -> Tensor:
        return torch.ones(n, dtype=torch.bool)

    def zeros(self, n: int) -> Tensor:
        return torch.zeros(n, dtype=torch.bool)

    # -- the walk --------------------------------------------------------------------------------------------
    def run(self) -> ChannelAnalysis:
        for node in self.gm.graph.nodes:
            try:
                self.state[node] = self.visit(node)
            except Exception as exc:  # an analysis bug must never become a wrong purge: block what reaches it
                for arg in node.all_input_nodes:
                    self.block(self.state.get(arg), f"{node.name}: analysis failed ({type(exc).__name__}: {exc})")
                self.state[node] = None
        return self.finish()

    def finish(self) -> ChannelAnalysis:
        roots = sorted({self.find(i) for i in range(len(self.parent))})
        index = {r: i for i, r in enumerate(roots)}
        groups = [self.groups[r] for r in roots]
        for g in groups:
            g.reasons = list(dict.fromkeys(g.reasons))
            g.blocked = torch.zeros(g.size, dtype=torch.bool)
        for space, lo, hi in self.pinned:
            groups[index[self.find(space)]].blocked[lo:hi] = True

        def resolve(segs: tuple[Seg, ...]) -> tuple[Seg, ...]:
            return tuple(Seg(None if s.space is None else index[self.find(s.space)], s.lo, s.hi, s.rep) for s in segs)

        uses = [Use(u.module, u.role, resolve(u.segs), u.groups, u.param, u.dim, u.zero) for u in self.uses]
        if not self.real:
            self.check_exact(groups, uses)
        return ChannelAnalysis(groups, uses, [(resolve(a), resolve(b)) for a, b in self.aliases])

    @staticmethod
    def check_exact(groups: list[ChannelGroup], uses: list[Use]) -> None:
        """Assume mode: a group is exact only if its zeroed channels read as zero at every consumer."""
        for u in uses:
            if u.role != "in" or u.zero is None:
                continue
            pos = 0
            for s in u.segs:
                if s.space is not None and not bool(u.zero[pos : pos + s.width].all()):
                    groups[s.space].reasons.append(
                        f"{u.module} reads these channels through an op that does not keep zeros"
                    )
                pos += s.width

    def visit(self, node: fx.Node) -> object:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            for arg in node.all_input_nodes:
                self.block(self.state.get(arg), "reaches the model output")
            return None
        if node.op == "call_module":
            return self.visit_module(node, str(node.target), self.modules[str(node.target)])
        target = node.target if node.op == "call_function" else str(node.target)
        return self.visit_function(node, target)

    def arg_state(self, node: fx.Node, i: int = 0) -> State | None:
        a = node.args[i] if len(node.args) > i else None
        st = self.state.get(a) if isinstance(a, fx.Node) else None
        return st if isinstance(st, State) else None


def analyse_channels(model: nn.Module, gm: fx.GraphModule, real: bool = False) -> ChannelAnalysis:
    """Channel groups and uses of a traced model.

    Args:
        model: the model ``gm`` was traced from (its modules are looked up by name).
        gm: the FX graph; if its nodes carry ``tensor_meta`` (``ShapeProp``) the walk uses the shapes.
        real: compute exact zeros from the weights (purge) instead of assuming every producer zeroed.
    """
    return Walker(model, gm, real).run()


def channel_groups(model: nn.Module, gm: fx.GraphModule) -> list[ChannelGroup]:
    """The channel groups of a traced model (see the module docstring)."""
    return [g for g in analyse_channels(model, gm).groups if g.producers]


__all__ = [
    "ChannelGroup",
    "ChannelAnalysis",
    "Seg",
    "Use",
    "analyse_channels",
    "channel_groups",
    "weight_support",
    "NORMS",
]

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

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn

from . import dependency_rules as R
from .dependency_ops import FunctionVisitor
from .tracing import NORMS, SPARSIFIABLE


@dataclass(frozen=True)
class Seg:
    """Channels ``[lo, hi)`` of one space (``space=None``: an opaque run), ``rep`` positions per channel."""

    space: int | None
    lo: int
    hi: int
    rep: int = 1

    @property
    def width(self) -> int:
        return (self.hi - self.lo) * self.rep


@dataclass
class Use:
    """A tensor dimension of a module (or a module attribute) indexed by a layout's positions.

    Attributes:
        module: qualified module name (``""`` for the root).
        role: ``"out"`` (a producer's rows and bias), ``"in"`` (a consumer's input dimension), ``"dw"`` (a
            depthwise conv passing channels through), ``"norm"`` (a per-channel norm) or ``"param"`` (a
            per-channel tensor attribute ``param`` sliced along ``dim``).
        segs: the layout of the positions (``space`` is a group index once the walk is finished).
        groups: ``groups`` of a conv (``"in"``/``"out"``) or of a GroupNorm (``"norm"``).
        zero: which positions are exactly zero (value pass): of the tensor read (``"in"``), or of the
            output (``"out"``, ``"dw"``).
    """

    module: str
    role: str
    segs: tuple[Seg, ...]
    groups: int = 1
    param: str = ""
    dim: int = 0
    zero: Tensor | None = None


@dataclass
class ChannelGroup:
    """Channels that must be zeroed or removed together.

    Attributes:
        size: number of channels.
        producers: modules whose weight dim 0 indexes these channels (convs, Linears, depthwise convs).
        companions: ``(module, param)`` per-channel parameters zeroed with the channel (biases, norm affine).
        consumers: modules that read these channels on their input (weight dim 1).
        reasons: why the group is not exact or cannot be purged (empty when it can).
        blocked: which channels the reasons concern (bool per channel): an op that sees only a slice of the
            group pins that slice, the other channels may still be removed. ``None`` until the walk finishes.
    """

    size: int
    producers: list[str] = field(default_factory=list)
    companions: list[tuple[str, str]] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    blocked: Tensor | None = None

    @property
    def exact(self) -> bool:
        return not self.reasons


@dataclass
class ChannelAnalysis:
    """Groups plus every use of their channels (what the purge slices).

    ``aliases`` (real mode only) pairs two layouts of equal width combined position by position although their
    segments differ (e.g. a ``cat`` of two branches added to one wider tensor): the channels at each position
    must be kept or removed together, across groups.
    """

    groups: list[ChannelGroup]
    uses: list[Use]
    aliases: list[tuple[tuple[Seg, ...], tuple[Seg, ...]]] = field(default_factory=list)


@dataclass
class State:
    """What the walk knows about one tensor: its channel layout, axis and exact zeros."""

    segs: tuple[Seg, ...]
    axis: int  # non-negative when ndim is known, else 1 (N, C, ...) or -1 (..., C)
    ndim: int | None
    zero: Tensor
    spatial_one: bool = False  # spatial dims known to be 1 (after a global pool); used without shapes

    @property
    def width(self) -> int:
        return sum(s.width for s in self.segs)

    def with_(self, **kw) -> State:
        d = dict(segs=self.segs, axis=self.axis, ndim=self.ndim, zero=self.zero, spatial_one=self.spatial_one)
        d.update(kw)
        return State(**d)


class Walker(FunctionVisitor):
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

    # -- modules ---------------------------------------------------------------------------------------------
    def visit_module(self, node: fx.Node, name: str, module: nn.Module) -> object:
        x = self.arg_state(node)
        others = [self.state.get(a) for a in node.all_input_nodes[1:]]
        rule = R.BLOCK_RULES.get(type(module))
        if rule is not None and rule.applies(module) and not any(others):
            return self.visit_block(node, name, module, rule, x)
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if any(others) or (x is None and self.state.get(first) is not None):
            self.block([x, *others], f"{name}: {type(module).__name__} takes several channel tensors")
            return None
        if isinstance(module, SPARSIFIABLE):
            return self.visit_layer(node, name, module, x)
        if x is None:
            return None
        if isinstance(module, NORMS):
            return self.visit_norm(node, name, module, x)
        keep = R.is_zero_module(module)
        if keep is not None:
            return self.per_channel(node, x, keep, getattr(module, "output_size", None))
        if isinstance(module, nn.Flatten):
            return self.reshape(node, x, "flatten", [module.start_dim, module.end_dim], name)
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)) and module.dim is not None:
            return self.softmax(node, x, module.dim, name)
        self.block(x, f"{name}: {type(module).__name__} is not understood by the channel analysis")
        return None

    def conv_reads(self, module: nn.Module, x: State | None) -> bool:
        if x is None:
            return False
        if isinstance(module, nn.Linear):
            return x.axis == -1 or (x.ndim is not None and x.axis == x.ndim - 1)
        return x.axis == 1

    def visit_layer(self, node: fx.Node, name: str, module: nn.Module, x: State | None) -> State:
        is_conv = not isinstance(module, nn.Linear)
        cin = module.in_channels if is_conv else module.in_features
        cout = module.out_channels if is_conv else module.out_features
        groups = module.groups if is_conv else 1
        reads = self.conv_reads(module, x) and x.width == cin
        if x is not None and not reads:
            self.block(x, f"{name}: {type(module).__name__} reads a non-channel axis")
        if reads and is_conv and groups == cin == cout and groups > 1:
            return self.visit_depthwise(name, module, x)
        if reads:
            self.use(name, "in", x, groups=groups, zero=x.zero)
            for s in x.segs:
                if s.space is not None:
                    self.group(s.space).consumers.append(name)
        space = self.new_space(cout, name)
        if module.bias is not None:
            self.group(space).companions.append((name, "bias"))
        zero = self.layer_zero(module, x.zero if reads else None, cin, cout, groups) if self.real else self.ones(cout)
        out = self.fresh(space, cout, node, 1 if is_conv else -1, module.weight.dim() if is_conv else None, zero)
        if not is_conv and x is not None and x.ndim is not None and out.ndim is None:
            out.ndim, out.axis = x.ndim, x.ndim - 1
        self.use(name, "out", out, groups=groups, zero=zero)
        return out

    def visit_depthwise(self, name: str, module: nn.Module, x: State) -> State:
        single = len(x.segs) == 1 and x.segs[0].space is not None and x.segs[0].width == x.width
        for s in x.segs:
            if s.space is not None and single:
                g = self.group(s.space)
                g.producers.append(name)
                if module.bias is not None:
                    g.companions.append((name, "bias"))
        if self.real:
            w = module.weight.detach()
            zero = ~(w != 0).reshape(w.shape[0], -1).any(1) | x.zero
            if module.bias is not None:
                zero = zero & (module.bias.detach() == 0)
        else:
            zero = self.ones(x.width) if single else x.zero & (module.bias is None)
        self.use(name, "dw", x, zero=zero)
        return x.with_(zero=zero)

    @staticmethod
    def layer_zero(module: nn.Module, zin: Tensor | None, cin: int, cout: int, groups: int) -> Tensor:
        """Output channels that are exactly zero: no non-zero weight meets a non-zero input, and no bias."""
        with torch.no_grad():
            nz = weight_support(module)
            if zin is not None and zin.numel() == cin:
                alive = (~zin).reshape(groups, cin // groups).repeat_interleave(cout // groups, 0)
                nz = nz & alive
            zero = ~nz.any(1)
            if module.bias is not None:
                zero = zero & (module.bias.detach() == 0)
        return zero.cpu()

    def visit_norm(self, node: fx.Node, name: str, module: nn.Module, x: State) -> State | None:
        if isinstance(module, nn.LayerNorm):
            return self.visit_layernorm(node, name, module, x)
        if x.axis != 1:
            self.block(x, f"{name}: {type(module).__name__} normalises a non-channel axis")
            return None
        is_gn = isinstance(module, nn.GroupNorm)
        affine = bool(module.affine)
        groups = module.num_groups if is_gn else 1
        single = len(x.segs) == 1 and x.segs[0].space is not None and x.segs[0].width == x.width
        if affine and single:
            self.group(x.segs[0].space).companions += [(name, "weight"), (name, "bias")]
        self.use(name, "norm", x, groups=groups)
        zero = self.norm_zero(module, x.zero, groups) if self.real else x.zero & affine
        act = getattr(module, "act", None)  # timm's BatchNormAct2d / GroupNormAct
        if act is not None:
            keep = R.is_zero_module(act)
            if keep is None:
                self.block(x, f"{name}: activation {type(act).__name__} is not understood")
                return None
            zero = zero if keep else self.zeros(x.width)
        return x.with_(zero=zero)

    @staticmethod
    def norm_zero(module: nn.Module, zin: Tensor, groups: int) -> Tensor:
        with torch.no_grad():
            zero = zin.clone()
            if groups > 1 or isinstance(module, nn.GroupNorm):
                zero = zero.reshape(groups, -1).all(1, keepdim=True).expand(groups, zin.numel() // groups)
                zero = zero.reshape(-1).clone()
            if getattr(module, "bias", None) is not None:
                zero &= module.bias.detach().cpu() == 0
            rm = getattr(module, "running_mean", None)
            if rm is not None and not isinstance(module, nn.GroupNorm):
                scale = module.weight.detach().cpu() == 0 if module.weight is not None else torch.zeros_like(zero)
                zero &= scale | (rm.detach().cpu() == 0)
        return zero

    def visit_layernorm(self, node: fx.Node, name: str, module: nn.LayerNorm, x: State) -> State | None:
        k = len(module.normalized_shape)
        if type(module) is not nn.LayerNorm or x.ndim is None or x.axis >= x.ndim - k:
            self.block(x, f"{name}: LayerNorm normalises over the channel axis (its statistics count every channel)")
            return None
        if self.real:
            zero = x.zero & (module.bias is None or bool((module.bias == 0).all()))
        else:
            zero = x.zero & (module.bias is None)
        return x.with_(zero=zero)

    def visit_block(self, node: fx.Node, name: str, module: nn.Module, rule: R.BlockRule, x: State | None) -> State:
        ok = x is not None and (x.axis == -1 or (x.ndim is not None and x.axis == x.ndim - 1))
        if x is not None and not ok:
            self.block(x, f"{name}: {type(module).__name__} reads a non-channel axis")
        for sub in rule.inputs:
            layer = getattr(module, sub)
            if ok and x.width == layer.in_features:
                self.use(f"{name}.{sub}", "in", x, zero=x.zero)
                for s in x.segs:
                    if s.space is not None:
                        self.group(s.space).consumers.append(f"{name}.{sub}")
            elif ok:
                self.block(x, f"{name}.{sub}: width mismatch")
        proj = getattr(module, rule.output)
        pname = f"{name}.{rule.output}"
        space = self.new_space(proj.out_features, pname)
        if proj.bias is not None:
            self.group(space).companions.append((pname, "bias"))
        zero = self.layer_zero(proj, None, proj.in_features, proj.out_features, 1) if self.real else None
        zero = zero if zero is not None else self.ones(proj.out_features)
        out = self.fresh(space, proj.out_features, node, -1, x.ndim if x is not None else None, zero)
        self.use(pname, "out", out, zero=zero)
        return out


def weight_support(module: nn.Module) -> Tensor:
    """``(out, in / groups)`` bool: which (output, input) channel pairs of a Conv/Linear have a non-zero weight."""
    w = module.weight.detach()
    with torch.no_grad():
        return (torch.count_nonzero(w.reshape(w.shape[0], w.shape[1], -1), dim=2) > 0).cpu()


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


__all__ = ["ChannelGroup", "ChannelAnalysis", "Seg", "Use", "analyse_channels", "channel_groups", "NORMS"]

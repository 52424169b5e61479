"""How the channel walk (:mod:`sparsewrap.analysis.channels`) treats functions and tensor methods.

Split from the walker so that each file stays one concept: this one is the op-by-op rulebook (per-channel ops,
reshapes and permutes, ``cat``/``split``/slicing; the broadcasting binary ops are in :mod:`.binary_rules`).
Each rule returns the output's :class:`~sparsewrap.analysis.channels.State`, or blocks the spaces it cannot
follow and returns ``None``.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import rules as R
from .groups import Seg, State

_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax"}
_CLAMP = {torch.clamp, torch.clip, "clamp", "clamp_", "clip", "clamp_min", "clamp_min_", "clamp_max"}
_POW = {operator.pow, torch.pow, "pow", "pow_"}
_EXPAND = {"expand", "expand_as"}
_STACK = {torch.stack}


class _Each:
    """The state of every element of a tuple whose length the walk does not know (split without shapes)."""

    def __init__(self, state: State) -> None:
        self.state = state


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


class FunctionVisitor:
    """Mixin of :class:`~sparsewrap.analysis.channels.Walker` with the rules for ``call_function``/``call_method``."""

    def visit_function(self, node: fx.Node, target: Any) -> object:
        if target in R.META_METHODS or target is getattr:
            return None
        if target is operator.getitem:
            return self.getitem(node)
        if target in R.CAT_OPS or target in _STACK:
            return self.cat(node, target in _STACK)
        x = self.arg_state(node)
        if x is None:
            states = [self.state.get(a) for a in node.all_input_nodes]
            if any(s is not None for s in states) and target not in R.ADD_OPS | R.MUL_OPS | R.DIV_OPS:
                self.block(states, f"{node.name}: {_name(target)} is not understood")
                return None
        if target in R.ADD_OPS or target in R.MUL_OPS or target in R.DIV_OPS:
            return self.binary(node, target)
        if x is None:
            return None
        others = [self.state.get(a) for a in node.all_input_nodes[1:]]
        if any(s is not None for s in others):
            self.block([x, *others], f"{node.name}: {_name(target)} mixes several channel tensors")
            return None
        if target in R.ZERO_FUNCS or target in R.ZERO_METHODS:
            return self.per_channel(node, x, True, R.node_arg(node, 1, "output_size"))
        if target in R.NONZERO_FUNCS or target in R.NONZERO_METHODS:
            return self.per_channel(node, x, False)
        if target in _POW:
            exponent = R.node_arg(node, 1, "exponent")
            if not isinstance(exponent, (int, float)) or isinstance(exponent, bool):
                return self.refuse(node, x, target)
            return self.per_channel(node, x, exponent > 0)
        if target in _CLAMP:
            lo, hi = R.node_arg(node, 1, "min"), R.node_arg(node, 2, "max")
            if target in ("clamp_max",):
                lo, hi = None, R.node_arg(node, 1, "max")
            ok = all(v is None or isinstance(v, (int, float)) for v in (lo, hi))
            keeps = ok and (lo is None or lo <= 0) and (hi is None or hi >= 0)
            return self.per_channel(node, x, keeps) if ok else self.refuse(node, x, target)
        if target in _SOFTMAX:
            return self.softmax(node, x, R.node_arg(node, 1, "dim"), node.name)
        if target in R.PAD_OPS:
            return self.pad(node, x)
        if target in R.RESHAPE_OPS:
            return self.reshape(node, x, target, list(node.args[1:]), node.name)
        if target in R.PERMUTE_OPS:
            return self.permute(node, x, target)
        if target in R.SPLIT_OPS:
            return self.split(node, x, target)
        if _name(target) in R.REDUCE_OPS and (isinstance(target, str) or target is R.REDUCE_OPS[_name(target)]):
            return self.reduce(node, x)
        if target in _EXPAND:
            return self.expand(node, x)
        return self.refuse(node, x, target)

    def refuse(self, node: fx.Node, x: State, target: Any) -> None:
        self.block(x, f"{node.name}: {_name(target)} is not understood by the channel analysis")
        return None

    # -- per-channel ops -------------------------------------------------------------------------------------
    def per_channel(self, node: fx.Node, x: State, keeps_zero: bool, output_size: Any = None) -> State:
        one = output_size == 1 or (isinstance(output_size, (tuple, list)) and all(s == 1 for s in output_size))
        zero = x.zero if keeps_zero else self.zeros(x.width)
        shape = self.shape(node)
        if shape is not None and len(shape) != x.ndim:
            self.block(x, f"{node.name}: changes the number of dimensions")
            return None
        return x.with_(zero=zero, spatial_one=x.spatial_one or one)

    def softmax(self, node: fx.Node, x: State, dim: Any, where: str) -> State | None:
        if not isinstance(dim, int) or x.ndim is None or dim % x.ndim == x.axis % x.ndim:
            self.block(x, f"{where}: softmax over the channel axis (or an unknown axis)")
            return None
        return x.with_(zero=self.zeros(x.width))

    def pad(self, node: fx.Node, x: State) -> State | None:
        pads = R.node_arg(node, 1, "pad")
        value = R.node_arg(node, 3, "value", 0.0)
        mode = R.node_arg(node, 2, "mode", "constant")
        ok = isinstance(pads, (tuple, list)) and x.ndim is not None and x.axis < x.ndim - len(pads) // 2
        if not ok:
            self.block(x, f"{node.name}: pad touches the channel axis")
            return None
        keeps = mode in ("constant", "reflect", "replicate", "circular") and (mode != "constant" or value in (0, None))
        return x.with_(zero=x.zero if keeps else self.zeros(x.width))

    def reduce(self, node: fx.Node, x: State) -> State | None:
        dims = R.node_arg(node, 1, "dim")
        keep = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
        dims = (dims,) if isinstance(dims, int) else dims
        if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
            return self.refuse(node, x, node.target)
        if x.ndim is None:  # without shapes: only the classic global pool of an (N, C, ...) tensor
            if x.axis != 1 or any(d in (0, 1) or d < 0 for d in dims):
                return self.refuse(node, x, node.target)
            if keep:
                return x.with_(spatial_one=True)
            return x.with_(axis=1, spatial_one=True)
        dims = [d % x.ndim for d in dims]
        if x.axis in dims:
            self.block(x, f"{node.name}: reduces over the channel axis")
            return None
        axis = x.axis if keep else x.axis - sum(d < x.axis for d in dims)
        ndim = x.ndim if keep else x.ndim - len(set(dims))
        return x.with_(axis=axis, ndim=ndim)

    def expand(self, node: fx.Node, x: State) -> State | None:
        shape = self.shape(node)
        if shape is None or x.ndim is None or len(shape) != x.ndim or shape[x.axis] != x.width:
            return self.refuse(node, x, node.target)
        return x

    # -- reshapes --------------------------------------------------------------------------------------------
    def reshape(self, node: fx.Node, x: State, target: Any, args: list, where: str) -> State | None:
        src = self.shape(node.args[0]) if node.args else None
        dst = self.shape(node)
        if src is None or dst is None:
            return self.reshape_without_shapes(node, x, target, args, where)
        found = R.reshape_axis(src, dst, x.axis % len(src))
        if found is None:
            self.block(x, f"{where}: reshape splits the channel axis or mixes it with the axes before it")
            return None
        axis, rep = found
        sizes = R.shape_args(target, node.args)
        if sizes is not None and axis < len(sizes) and isinstance(sizes[axis], int) and sizes[axis] != -1:
            self.block(x, f"{where}: reshape to a hard-coded channel count ({sizes[axis]})")
            return None
        if rep == 1:
            return x.with_(axis=axis, ndim=len(dst))
        segs = tuple(replace(s, rep=s.rep * rep) for s in x.segs)
        return x.with_(segs=segs, axis=axis, ndim=len(dst), zero=x.zero.repeat_interleave(rep))

    def reshape_without_shapes(self, node: fx.Node, x: State, target: Any, args: list, where: str) -> State | None:
        start = args[0] if args else node.kwargs.get("start_dim", 0)
        if target in ("flatten", torch.flatten, "flatten_module") or where.endswith("flatten"):
            if start == 1 and x.axis == 1 and x.spatial_one:
                return x.with_(axis=-1, ndim=2)
        self.block(x, f"{where}: flatten/reshape mixes channels with other axes")
        return None

    def permute(self, node: fx.Node, x: State, target: Any) -> State | None:
        shape = self.shape(node)
        ndim = len(shape) if shape is not None else x.ndim
        if ndim is None:
            return self.refuse(node, x, target)
        axis = R.permute_axis(target, node.args, ndim, x.axis % ndim)
        if axis is None:
            return self.refuse(node, x, target)
        return x.with_(axis=axis, ndim=ndim)

    # -- cat / split / slicing -------------------------------------------------------------------------------
    def cat(self, node: fx.Node, stack: bool) -> State | None:
        parts = R.node_arg(node, 0, "tensors")
        dim = R.node_arg(node, 1, "dim", 0)
        if not isinstance(parts, (list, tuple)) or not isinstance(dim, int):
            return None
        states = [self.state.get(p) if isinstance(p, fx.Node) else None for p in parts]
        known = [s for s in states if isinstance(s, _state_type())]
        if not known:
            self.block(states, f"{node.name}: concatenation of untracked tensors")
            return None
        shape = self.shape(node)
        x = known[0]
        ndim = len(shape) if shape is not None else x.ndim
        if ndim is None:
            self.block(states, f"{node.name}: concatenation with unknown dimensions")
            return None
        axis = x.axis % (ndim - 1 if stack else ndim)
        if not stack and dim % ndim == axis:
            return self.cat_channels(node, parts, states, axis, ndim)
        if len(known) != len(states) or any(s.axis % (ndim - 1 if stack else ndim) != axis for s in known):
            self.block(states, f"{node.name}: concatenates a tensor the analysis cannot slice")
            return None
        for other in known[1:]:
            if not self.union(x, other, node.name):
                return None
        zero = x.zero
        for other in known[1:]:
            zero = zero & other.zero
        if stack and dim % ndim <= axis:
            axis += 1
        return x.with_(axis=axis, ndim=ndim, zero=zero)

    def cat_channels(self, node: fx.Node, parts: list, states: list, axis: int, ndim: int) -> State | None:

        segs, zeros = [], []
        for p, s in zip(parts, states):
            if s is not None and (s.axis % ndim != axis or s.ndim not in (None, ndim)):
                self.block(states, f"{node.name}: concatenates tensors with different channel axes")
                return None
            if s is None:
                shape = self.shape(p)
                if shape is None:
                    self.block(states, f"{node.name}: concatenates a tensor of unknown width")
                    return None
                segs.append(Seg(None, 0, shape[axis]))
                zeros.append(self.zeros(shape[axis]))
            else:
                segs.extend(s.segs)
                zeros.append(s.zero)
        first = next(s for s in states if s is not None)
        return first.with_(segs=tuple(segs), zero=torch.cat(zeros), axis=axis, ndim=ndim)

    def cut(self, x: State, start: int, stop: int) -> tuple | None:
        """The segments of positions ``[start, stop)``; ``None`` if the cut splits a channel's positions."""
        out, pos = [], 0
        for s in x.segs:
            a, b = max(start, pos), min(stop, pos + s.width)
            if a < b:
                if (a - pos) % s.rep or (b - pos) % s.rep:
                    return None
                lo = s.lo + (a - pos) // s.rep
                out.append(replace(s, lo=lo, hi=lo + (b - a) // s.rep))
            pos += s.width
        return tuple(out)

    def split(self, node: fx.Node, x: State, target: Any) -> object:
        name = _name(target)
        dim = R.node_arg(node, 1, "dim", 0) if name == "unbind" else R.node_arg(node, 2, "dim", 0)
        meta = node.meta.get("tensor_meta")
        if x.ndim is None or meta is None or not isinstance(meta, (tuple, list)) or not isinstance(dim, int):
            if isinstance(dim, int) and x.ndim is not None and dim % x.ndim != x.axis % x.ndim and name != "unbind":
                return _Each(x)
            return self.refuse(node, x, target)
        dim %= x.ndim
        if dim != x.axis:
            axis = x.axis - (1 if name == "unbind" and dim < x.axis else 0)
            ndim = x.ndim - (1 if name == "unbind" else 0)
            return [x.with_(axis=axis, ndim=ndim) for _ in meta]
        if name == "unbind":
            return self.refuse(node, x, target)
        widths = [m.shape[x.axis] for m in meta]
        if name != "chunk" or len(set(widths)) != 1:
            self.block(x, f"{node.name}: splits the channel axis at fixed sizes (they would not follow a purge)")
            return None
        self.use("", "chunk", x, groups=len(widths))  # chunk(n) stays aligned if every piece keeps as many
        outs, pos = [], 0
        for m in meta:
            width = m.shape[x.axis]
            segs = self.cut(x, pos, pos + width)
            if segs is None:
                self.block(x, f"{node.name}: split cuts through a flattened channel")
                return None
            outs.append(x.with_(segs=segs, zero=x.zero[pos : pos + width]))
            pos += width
        return outs

    def getitem(self, node: fx.Node) -> object:
        src, index = node.args[0], node.args[1]
        st = self.state.get(src) if isinstance(src, fx.Node) else None
        if st is None:
            return None
        if isinstance(st, _Each):
            return st.state
        if isinstance(st, list):
            return st[index] if isinstance(index, int) and -len(st) <= index < len(st) else self.block(st, "index")
        shape = self.shape(src)
        if shape is None or st.ndim is None:
            return self.refuse(node, st, "indexing")
        found = R.slice_index(index, shape, st.axis)
        if found is None or found[0] is None:
            self.block(st, f"{node.name}: indexing selects or reorders channels")
            return None
        axis, kept = found
        out_shape = self.shape(node)
        ndim = len(out_shape) if out_shape is not None else None
        if kept is None:
            return st.with_(axis=axis, ndim=ndim)
        self.block(st, f"{node.name}: slices the channel axis at fixed bounds (they would not follow a purge)")
        return None


def _state_type() -> type:

    return State

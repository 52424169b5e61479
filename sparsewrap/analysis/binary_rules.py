"""How the channel walk (:mod:`sparsewrap.analysis.channels`) treats broadcasting binary ops.

Split from :mod:`.op_rules` (the other functions and tensor methods) as one concept: ``add``/``sub``,
``mul`` and ``div`` between two channel tensors (a residual merges their spaces), with a number, with a tensor
broadcast over the channels, or with a per-channel parameter (a layer scale, which becomes a ``param`` use
sliced with the channels), and which positions of the result are exactly zero.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from . import rules as R
from .groups import State

_VIEW_CHAIN = {"view", "reshape", "unsqueeze", "to", "type_as", "float", "half", "double", "contiguous",
               torch.reshape, torch.unsqueeze, "squeeze", torch.squeeze}  # fmt: skip


class BinaryVisitor:
    """Mixin of :class:`~sparsewrap.analysis.channels.Walker` with the rules for broadcasting binary ops."""

    # -- binary ops ------------------------------------------------------------------------------------------
    def binary(self, node: fx.Node, target: Any) -> State | None:
        operands = [node.args[0] if node.args else node.kwargs.get("input"), R.node_arg(node, 1, "other")]
        states = [self.state.get(a) if isinstance(a, fx.Node) else None for a in operands]
        if any(s is not None and not isinstance(s, State) for s in states):
            self.block(states, f"{node.name}: arithmetic on a tuple")
            return None
        full = [s for s in states if s is not None]
        if not full:
            return None
        out_shape = self.shape(node)
        x = max(full, key=lambda s: s.width)
        ndim = len(out_shape) if out_shape is not None else x.ndim
        axis = x.axis % ndim if ndim is not None else x.axis
        if target in R.DIV_OPS and states[1] is not None:
            self.block(states, f"{node.name}: divides by the channel tensor")
            return None
        zeros = []
        for a, s in zip(operands, states):
            z = self.operand_zero(node, target, a, s, x, axis, ndim)
            if z is None:
                return None
            zeros.append(z)
        for s in full:
            if s is not x and s.width == x.width and not self.union(x, s, node.name):
                return None
        if target in R.MUL_OPS:
            zero = zeros[0] | zeros[1]
        elif target in R.DIV_OPS:
            zero = zeros[0]
        else:
            zero = zeros[0] & zeros[1]
        return x.with_(axis=axis, ndim=ndim, zero=zero)

    def operand_zero(self, node: fx.Node, target: Any, a: Any, s: State | None, x: State, axis: int,
                     ndim: int | None) -> torch.Tensor | None:  # fmt: skip
        """Exact zeros of one operand, per position of ``x``'s channel axis (``None``: blocked)."""
        width = x.width
        if s is not None:
            known = ndim is not None and s.ndim is not None
            if s.width == width and (ndim - s.ndim + s.axis % s.ndim == axis if known else s.axis == x.axis):
                return s.zero
            if ndim is not None and s.ndim is not None and s.width == 1:
                self.block(s, f"{node.name}: one channel broadcast over the channels of another tensor")
                return self.zeros(width)
            self.block([x, s], f"{node.name}: operands disagree on the channel axis")
            return None
        if isinstance(a, (int, float, bool)) or a is None:
            return self.ones(width) if a == 0 else self.zeros(width)
        if not isinstance(a, fx.Node) or a.meta.get("type") in (int, float, bool):
            return self.zeros(width)  # a number: the same effect on every channel
        shape = self.shape(a)
        if shape is not None and ndim is not None:
            k = axis - (ndim - len(shape))
            if k < 0 or shape[k] == 1:
                return self.broadcast_zero(a, width)  # the same effect on every channel
        return self.param_zero(node, target, a, x, width)

    def broadcast_zero(self, a: fx.Node, width: int) -> torch.Tensor:
        """A tensor broadcast over the channels: zero everywhere only if it is a parameter that is all zeros."""
        if self.real and a.op == "get_attr":
            owner, _, attr = str(a.target).rpartition(".")
            tensor = getattr(self.modules.get(owner), attr, None)
            if isinstance(tensor, torch.Tensor) and not bool(tensor.any()):
                return self.ones(width)
        return self.zeros(width)

    def param_zero(self, node: fx.Node, target: Any, a: fx.Node, x: State, width: int) -> torch.Tensor | None:
        """A per-channel parameter (layer scale, learned offset): becomes a ``param`` use, sliced with x."""
        src = a
        while src.op != "get_attr" and src.target in _VIEW_CHAIN and len(src.users) == 1:
            if not src.args or not isinstance(src.args[0], fx.Node):
                break
            src = src.args[0]
        if src.op != "get_attr" or len(src.users) != 1:
            self.block(x, f"{node.name}: combined with a tensor the analysis cannot slice")
            return None
        twins = [n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == src.target]
        owner, _, attr = str(src.target).rpartition(".")
        tensor = getattr(self.modules.get(owner), attr, None)
        if len(twins) != 1 or not isinstance(tensor, torch.Tensor) or tensor.numel() != width:
            self.block(x, f"{node.name}: combined with {src.target}, which is shared or not per-channel")
            return None
        dims = [d for d, n in enumerate(tensor.shape) if n != 1] or [0]
        self.use(owner, "param", x, param=attr, dim=dims[0])
        single = len(x.segs) == 1 and x.segs[0].space is not None and x.segs[0].width == width
        is_add = target in R.ADD_OPS
        if single and is_add and tensor.dim() == 1:
            self.group(x.segs[0].space).companions.append((owner, attr))
        if not self.real:
            return self.ones(width) if is_add else self.zeros(width)
        return (tensor.detach().reshape(-1) == 0).cpu()

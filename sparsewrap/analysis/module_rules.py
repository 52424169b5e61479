"""How the channel walk (:mod:`sparsewrap.analysis.channels`) treats modules: layers, norms and known blocks.

Conv/Linear layers open a new channel space (their output rows) and consume their input's channels; a
depthwise conv and the norms pass their input's layout through; a registered block (attention) reads with its
input layers and produces with its output layer. The value pass decides, from the weights (real mode) or by
assuming every producer zeroed, which output channels are exactly zero.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor, nn

from . import rules as R
from .groups import State
from .rules import NORMS, SPARSIFIABLE


class ModuleVisitor:
    """Mixin of :class:`~sparsewrap.analysis.channels.Walker` with the rules for ``call_module`` nodes."""

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
            zero = ~(w != 0).reshape(w.shape[0], -1).any(1).cpu() | x.zero
            if module.bias is not None:
                zero = zero & (module.bias.detach() == 0).cpu()
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
                zero = zero & (module.bias.detach() == 0).cpu()
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

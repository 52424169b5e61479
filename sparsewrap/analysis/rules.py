"""The tables and shape arithmetic behind the channel analysis (:mod:`sparsewrap.analysis.channels`).

An op is *per-channel* when output channel ``c`` depends only on input channel ``c`` (activations, pooling,
resizing, reductions over other axes): removing a channel from its input removes it from its output and
changes nothing else. It is *zero-preserving* when a channel that is exactly zero on input stays exactly zero
(``f(0) == 0``). Anything not listed here is not understood, and the analysis refuses to purge the channels
that reach it. Extend the tables (or :data:`BLOCK_RULES`) to teach the analysis a new op.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SPARSIFIABLE: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
)

# -- element-wise and per-channel ops ------------------------------------------------------------------------
ZERO_FUNCS: set[Any] = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.elu, F.mish, F.hardtanh, F.celu,
    F.selu, F.softshrink, F.hardshrink, F.tanhshrink, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample, F.upsample_nearest,
    F.upsample_bilinear,
    torch.relu, torch.relu_, torch.tanh, torch.neg, torch.abs, torch.square, torch.sqrt, torch.sin,
    torch.erf, torch.nn.functional.hardtanh_, operator.neg, torch.max_pool2d, torch.avg_pool1d,
}  # fmt: skip
ZERO_METHODS = {
    "relu", "relu_", "tanh", "tanh_", "neg", "abs", "square", "sqrt", "contiguous", "clone", "float", "half",
    "double", "bfloat16", "to", "type_as", "detach", "erf", "sin",
}  # fmt: skip
NONZERO_FUNCS: set[Any] = {
    torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, F.logsigmoid, torch.exp, torch.cos, torch.reciprocal,
    torch.rsqrt, torch.log, torch.log1p, torch.cosh,
}  # fmt: skip
NONZERO_METHODS = {"sigmoid", "sigmoid_", "exp", "exp_", "cos", "reciprocal", "rsqrt", "log", "log1p"}
ZERO_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.Mish, nn.Tanh, nn.Hardtanh,
    nn.CELU, nn.SELU, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.PReLU,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
)  # fmt: skip
NONZERO_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)
# nn.PReLU with one weight per channel indexes the channels; only its single-parameter form is listed as safe.

ADD_OPS = {operator.add, torch.add, operator.iadd, "add", "add_", operator.sub, torch.sub, operator.isub, "sub",
           "sub_"}  # fmt: skip
MUL_OPS = {operator.mul, torch.mul, operator.imul, "mul", "mul_"}
DIV_OPS = {operator.truediv, torch.div, operator.itruediv, "div", "div_"}
META_METHODS = {"size", "dim", "numel", "shape", "dtype", "device", "ndimension", "nelement", "is_contiguous"}
REDUCE_OPS = {"mean": torch.mean, "sum": torch.sum, "amax": torch.amax, "amin": torch.amin}
RESHAPE_OPS = {"view", "reshape", torch.reshape, "flatten", torch.flatten, "unflatten", torch.unflatten,
               "squeeze", torch.squeeze, "unsqueeze", torch.unsqueeze, "view_as", "reshape_as"}  # fmt: skip
PERMUTE_OPS = {"permute", torch.permute, "transpose", torch.transpose, "swapaxes", "movedim", torch.movedim}
CAT_OPS = {torch.cat, torch.concat, torch.concatenate}
SPLIT_OPS = {"split", torch.split, "chunk", torch.chunk, "unbind", torch.unbind, "tensor_split"}
PAD_OPS = {F.pad}


def _timm_activations() -> tuple[tuple[type[nn.Module], ...], tuple[type[nn.Module], ...]]:
    """timm's own activation modules (used inside leaf norm+act layers such as ``BatchNormAct2d``)."""
    try:
        from timm.layers import activations as a
        from timm.layers import activations_me as me
    except ImportError:  # pragma: no cover - timm is a dependency
        return (), ()
    zero = [a.GELU, a.GELUTanh, a.HardMish, a.HardSwish, a.Mish, a.QuickGELU, a.Swish, a.Tanh]
    zero += [me.HardMishMe, me.HardSwishMe, me.MishMe, me.SwishMe]
    return tuple(zero), (a.Sigmoid, a.HardSigmoid, me.HardSigmoidMe)


_TIMM_ZERO, _TIMM_NONZERO = _timm_activations()
ZERO_MODULES += _TIMM_ZERO
NONZERO_MODULES += _TIMM_NONZERO


def is_zero_module(module: nn.Module) -> bool | None:
    """``True``/``False`` for known per-channel modules (zero-preserving or not), ``None`` if unknown."""
    if isinstance(module, nn.PReLU):
        return module.num_parameters == 1
    if isinstance(module, ZERO_MODULES):
        return True
    if isinstance(module, NONZERO_MODULES):
        return False
    return None


# -- encapsulated blocks (leaf modules with a known channel interface) ----------------------------------------
@dataclass(frozen=True)
class BlockRule:
    """How a leaf module reads and writes channels: which sub-Linears read its input's last axis, and which
    sub-Linear produces its output. Its insides (e.g. attention heads) are handled by the purge's own rules.

    Attributes:
        inputs: attribute names of sub-layers whose input dimension is the block input's channel axis.
        output: attribute name of the sub-layer whose output rows are the block output's channels.
        accepts: extra check on an instance (e.g. "no normalisation across heads"); ``None`` accepts all.
    """

    inputs: tuple[str, ...]
    output: str
    accepts: Callable[[nn.Module], bool] | None = None

    def applies(self, module: nn.Module) -> bool:
        return self.accepts is None or self.accepts(module)


BLOCK_RULES: dict[type[nn.Module], BlockRule] = {}


def register_block(cls: type[nn.Module], rule: BlockRule) -> None:
    """Teach the analysis a leaf block (exact class match, so subclasses with other forwards are not assumed).

    Raises:
        ValueError: if ``cls`` is already registered.
    """
    if cls in BLOCK_RULES:
        raise ValueError(f"{cls.__name__} already has a block rule; registries reject duplicates")
    BLOCK_RULES[cls] = rule


def _timm_attention_ok(module: nn.Module) -> bool:
    return isinstance(getattr(module, "norm", None), nn.Identity) and getattr(module, "gate", None) is None


try:  # timm's standard multi-head attention (vision_transformer, deit, and many hybrids)
    from timm.layers.attention import Attention as _TimmAttention

    register_block(_TimmAttention, BlockRule(("qkv",), "proj", _timm_attention_ok))
except ImportError:  # pragma: no cover - timm is a dependency
    pass


# -- shape arithmetic -----------------------------------------------------------------------------------------
def node_arg(node: Any, i: int, key: str, default: Any = None) -> Any:
    """Argument ``i`` of an FX node, given by position or as keyword ``key`` (``default`` when absent)."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def reshape_axis(src: Sequence[int], dst: Sequence[int], axis: int) -> tuple[int, int] | None:
    """Where the channel axis of a ``src``-shaped tensor lands after a reshape to ``dst``.

    Returns ``(new_axis, rep)``: channel ``c`` occupies positions ``[c * rep, (c + 1) * rep)`` of ``new_axis``
    (``rep > 1`` when the channel axis is merged with the axes after it, as in ``flatten``); ``None`` when the
    channel axis is split or mixed with the axes before it.
    """
    prefix, size = math.prod(src[:axis]), src[axis]
    acc, j = 1, 0
    while j < len(dst) and acc < prefix:
        acc *= dst[j]
        j += 1
    if acc != prefix:
        return None
    while j < len(dst) and dst[j] == 1 and size != 1:
        j += 1
    if j >= len(dst):
        return None
    if dst[j] == size:
        return j, 1
    acc, k = size, axis + 1
    while acc < dst[j] and k < len(src):
        acc *= src[k]
        k += 1
    return (j, acc // size) if acc == dst[j] and size else None


def permute_axis(node_target: Any, args: Sequence[Any], ndim: int, axis: int) -> int | None:
    """The channel axis after ``permute``/``transpose``/``swapaxes``/``movedim`` (``None`` if not parsable)."""
    name = node_target if isinstance(node_target, str) else getattr(node_target, "__name__", "")
    rest = list(args[1:])
    if not all(isinstance(a, int) or (isinstance(a, (tuple, list)) and all(isinstance(b, int) for b in a))
               for a in rest):  # fmt: skip
        return None
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        dims = [d % ndim for d in dims]
        return dims.index(axis) if axis in dims else None
    if name in ("transpose", "swapaxes") and len(rest) == 2:
        a, b = (d % ndim for d in rest)
        return b if axis == a else a if axis == b else axis
    if name == "movedim" and len(rest) == 2 and all(isinstance(d, int) for d in rest):
        src, dst = (d % ndim for d in rest)
        order = [d for d in range(ndim) if d != src]
        order.insert(dst, src)
        return order.index(axis)
    return None


def shape_args(target: Any, args: Sequence[Any]) -> list[Any] | None:
    """The explicit size arguments of ``view``/``reshape`` (``None`` for other reshaping ops)."""
    if target in ("view", "reshape", torch.reshape):
        rest = list(args[1:])
        if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
            rest = list(rest[0])
        return rest
    return None


def slice_index(index: Any, shape: Sequence[int], axis: int) -> tuple[int | None, tuple[int, int] | None] | None:
    """Effect of ``x[index]`` on the channel axis.

    Returns ``(new_axis, (start, stop))`` where ``(start, stop)`` is the kept channel range (``None`` when the
    channel axis is untouched), ``(None, None)`` if the channel axis is indexed away, and ``None`` when the
    index is not a plain combination of ints, unit-step slices, ``None`` and ``...``.
    """
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (isinstance(i, (int, slice)) or i is None or i is Ellipsis) for i in items):
        return None
    if sum(i is Ellipsis for i in items) > 1:
        return None
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        e = items.index(Ellipsis)
        items = items[:e] + [slice(None)] * (len(shape) - used) + items[e + 1 :]
    items += [slice(None)] * (len(shape) - sum(1 for i in items if i is not None))
    src, dst, kept = 0, 0, None
    for it in items:
        if it is None:
            dst += 1
            continue
        if src == axis:
            if isinstance(it, int):
                return None, None
            start, stop, step = it.indices(shape[axis])
            if step != 1:
                return None
            kept = None if (start, stop) == (0, shape[axis]) else (start, max(start, stop))
            return dst, kept
        if isinstance(it, slice):
            dst += 1
        src += 1
    return None

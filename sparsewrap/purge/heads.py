"""Whole attention heads: which heads are exactly dead, and how to remove them (head count updated).

A head is dead when its value rows are zero (its output is ``softmax(q k^T) @ 0 = 0``) or when the output
projection's columns for it are zero: either way it adds nothing to the block output, whatever its queries
and keys. Removing it shrinks the ``qkv`` rows of its query, key and value, the projection's columns, and the
module's head count; the per-head scale (``head_dim ** -0.5``) is unchanged, so the result is exact.

Rules are keyed by exact class (a subclass may have another forward); add one with :func:`register_heads`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .tensors import ShrinkError, check_index, replace_tensor


@dataclass(frozen=True)
class HeadRule:
    """How to find and remove the dead heads of one attention class.

    Attributes:
        dead: ``module -> bool tensor (num_heads,)``, the heads that contribute exactly nothing.
        shrink: ``(module, kept head indices) -> None``, removes the others and updates the head count.
    """

    dead: Callable[[nn.Module], Tensor]
    shrink: Callable[[nn.Module, Tensor], None]


HEAD_RULES: dict[type[nn.Module], HeadRule] = {}


def register_heads(cls: type[nn.Module], rule: HeadRule) -> None:
    """Register the head rule of an attention class.

    Raises:
        ValueError: if ``cls`` already has one.
    """
    if cls in HEAD_RULES:
        raise ValueError(f"{cls.__name__} already has a head rule; registries reject duplicates")
    HEAD_RULES[cls] = rule


def head_rule(module: nn.Module) -> HeadRule | None:
    return HEAD_RULES.get(type(module))


def shrink_heads(module: nn.Module, kept: Tensor) -> None:
    """Keep the heads ``kept`` of an attention module.

    Raises:
        ShrinkError: if the module's class has no head rule or the indices are invalid.
    """
    rule = head_rule(module)
    if rule is None:
        raise ShrinkError(f"{type(module).__name__} has no head rule; register one with register_heads")
    rule.shrink(module, kept)


# -- timm's Attention (qkv Linear of 3 * heads * head_dim rows, proj Linear) ----------------------------------
def _qkv_rows(heads: int, head_dim: int, kept: Tensor) -> Tensor:
    per = (kept[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    return torch.cat([per + s * heads * head_dim for s in range(3)])


def _timm_dead(module: nn.Module) -> Tensor:
    h, d = module.num_heads, module.head_dim
    with torch.no_grad():
        v = module.qkv.weight[2 * h * d : 3 * h * d].reshape(h, -1)
        dead_v = ~(v != 0).any(1)
        if module.qkv.bias is not None:
            dead_v &= ~(module.qkv.bias[2 * h * d : 3 * h * d].reshape(h, d) != 0).any(1)
        cols = module.proj.weight.reshape(module.proj.out_features, h, d)
        dead_proj = ~(cols != 0).any(2).any(0)
    return (dead_v | dead_proj).cpu()


def _timm_shrink(module: nn.Module, kept: Tensor) -> None:
    h, d = module.num_heads, module.head_dim
    kept = check_index(kept, h, f"{type(module).__name__} heads")
    rows = _qkv_rows(h, d, kept)
    qkv, proj = module.qkv, module.proj
    replace_tensor(qkv, "weight", qkv.weight.index_select(0, rows.to(qkv.weight.device)))
    if qkv.bias is not None:
        replace_tensor(qkv, "bias", qkv.bias.index_select(0, rows.to(qkv.bias.device)))
    qkv.out_features = rows.numel()
    cols = (kept[:, None] * d + torch.arange(d)).reshape(-1)
    replace_tensor(proj, "weight", proj.weight.index_select(1, cols.to(proj.weight.device)))
    proj.in_features = cols.numel()
    module.num_heads = kept.numel()
    if hasattr(module, "attn_dim"):
        module.attn_dim = kept.numel() * d


try:
    from timm.layers.attention import Attention as _TimmAttention

    register_heads(_TimmAttention, HeadRule(_timm_dead, _timm_shrink))
except ImportError:  # pragma: no cover - timm is a dependency
    pass

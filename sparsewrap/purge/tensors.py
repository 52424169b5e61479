"""Checked slicing of module tensors, shared by the shrink functions and the attention-head rules."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError


class ShrinkError(ConfigError):
    """A plan cannot be applied to a module (wrong type, indices out of range, inconsistent groups)."""


def check_index(index: Tensor, size: int, what: str) -> Tensor:
    """``index`` as a long tensor, checked to be strictly increasing positions within ``[0, size)``.

    Raises:
        ShrinkError: naming ``what`` when it is not.
    """
    index = torch.as_tensor(index, dtype=torch.long)
    if index.dim() != 1 or index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= size:
        raise ShrinkError(
            f"{what}: kept indices must be a non-empty 1-D list within [0, {size}), got {index.tolist()[:8]}"
        )
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise ShrinkError(f"{what}: kept indices must be strictly increasing")
    return index


def replace_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    """Replace a parameter or buffer by a new tensor of the same kind (a fresh ``Parameter`` keeps grad flag)."""
    old = getattr(module, name)
    value = value.detach()  # always a fresh tensor (index_select, cat): the original is never written to
    if isinstance(old, nn.Parameter):
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        setattr(module, name, value)

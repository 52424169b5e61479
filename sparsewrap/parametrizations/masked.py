"""The *masked* parametrization: ``w_eff = w * mask``."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SparseParametrization


class Masked(SparseParametrization):
    """Multiply the weight by a mask buffer.

    The mask has the weight's shape (one entry per weight) or a broadcastable shape such as
    ``(C_out, 1, 1, 1)`` (one entry per output channel). It is a buffer in the weight's dtype, so
    ``model.to(...)`` moves it and ``state_dict`` saves it; methods update it in place under ``no_grad``.
    Hard 0/1 masks (magnitude, GMP) and soft masks in [0, 1] use the same class.

    Args:
        mask_shape: shape of the mask, broadcastable to the weight.
        like: a tensor whose dtype and device the mask takes.
    """

    def __init__(self, mask_shape: tuple[int, ...], like: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(mask_shape, dtype=like.dtype, device=like.device))

    def forward(self, original: Tensor) -> Tensor:
        return original * self.mask

    def extra_repr(self) -> str:
        return f"mask_shape={tuple(self.mask.shape)}"

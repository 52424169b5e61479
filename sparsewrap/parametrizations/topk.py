"""The *top-k* parametrization of DNW: keep the ``k`` largest ``|w|`` at every forward, straight-through backward.

Unlike :class:`~sparsewrap.parametrizations.masked.Masked`, nothing is stored but ``k``: the mask is a function
of the current weights, recomputed at each read of the weight, and pruned weights keep their values (they still
receive gradients and may come back).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SparseParametrization


def keep_largest(scores: Tensor, keep: int) -> Tensor:
    """A bool mask (same shape) keeping exactly ``keep`` of the largest ``scores``.

    Ties at the threshold are broken by position: the earliest tied entries are dropped first (the rule of
    :func:`sparsewrap.methods.allocation.drop_lowest`). One ``kthvalue`` and one cumulative count, and no transfer of a
    value to the host, so it does not synchronise a GPU stream.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if keep >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    drop = n - keep
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # kthvalue is not implemented for every half type on every device
    threshold = flat.kthvalue(drop).values
    below = flat < threshold
    ties = flat == threshold
    need = drop - below.sum()  # how many entries equal to the threshold are dropped (at least 1)
    counts = torch.cumsum(ties, 0, dtype=torch.int32 if n < 2**31 else torch.int64)  # int32: half the traffic
    dropped = below | (ties & (counts <= need))
    return (~dropped).reshape(scores.shape)


class TopMagnitude(SparseParametrization):
    """``w_eff = w * topk_mask(|w|)`` in the forward; the gradient reaches every weight unchanged (straight-through).

    DNW (Wortsman et al. 2019, https://arxiv.org/abs/1906.00586): the forward value is exactly ``w * mask``
    with the ``keep`` largest ``|w|`` kept, and the backward treats the mask as the identity, so that pruned
    weights keep learning and can re-enter. Computed as ``w - w.detach().masked_fill(mask, 0)``: exact zeros where
    pruned (``x - x == 0``), ``w`` itself where kept, and the identity as the gradient, with no custom autograd
    function (the model still traces and compiles).

    Args:
        keep: how many weights to keep.
    """

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = int(keep)

    def mask(self, original: Tensor) -> Tensor:
        """The current keep-mask (bool) of ``original``."""
        with torch.no_grad():
            return keep_largest(original.detach().abs(), self.keep)

    def forward(self, original: Tensor) -> Tensor:
        if self.keep >= original.numel():
            return original
        return original - original.detach().masked_fill(self.mask(original), 0)

    def bake(self, original: Tensor) -> Tensor:
        with torch.no_grad():
            return (original * self.mask(original)).detach().clone()

    def extra_repr(self) -> str:
        return f"keep={self.keep}"

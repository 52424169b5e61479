"""The *tied* parametrization of HashedNet: ``w_eff = bank[index] * sign``.

The original tensor is a small *bank* of trainable values (registered with torch's ``unsafe=True``, so the
parameter the optimizer sees is the bank itself); a fixed map ``index`` (a buffer of the weight's shape) sends
each weight position to a bank entry, and an optional ``sign`` buffer of +-1 multiplies it (HashedNet's sign
hash). Autograd's backward of the gather is the scatter-add of the effective weight's gradient (times the sign)
into the bank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SparseParametrization


def coverage_index(shape: tuple[int, ...], bank_size: int, generator: torch.Generator) -> Tensor:
    """A random map of ``shape`` onto ``range(bank_size)`` that uses every entry ``floor`` or ``ceil(n / m)``
    times: ``arange(n) % m``, shuffled with ``generator`` (the pattern of the DSR repository's tied tensors).
    """
    n = 1
    for d in shape:
        n *= d
    order = torch.randperm(n, generator=generator)
    return (torch.arange(n) % bank_size)[order].reshape(shape)


class Hashed(SparseParametrization):
    """Weights tied to a bank: ``forward(bank) = bank[index] * sign``.

    Args:
        index: int64 tensor of the weight's shape, values in ``range(bank_size)``, every value used.
        sign: a tensor of +-1 of the weight's shape (the sign hash), or ``None`` for none.
        like: the weight (its dtype and device).
        bank_size: the number of bank values.
    """

    def __init__(self, index: Tensor, sign: Tensor | None, like: Tensor, bank_size: int) -> None:
        super().__init__()
        self.bank_size = bank_size
        self.register_buffer("index", index.to(device=like.device, dtype=torch.int64))
        ones = torch.ones(index.shape) if sign is None else sign
        self.register_buffer("sign", ones.to(device=like.device, dtype=like.dtype))
        self.signed = sign is not None  # without the sign hash the forward skips the product with ones

    def forward(self, bank: Tensor) -> Tensor:
        tied = bank[self.index]
        return tied * self.sign if self.signed else tied

    @torch.no_grad()
    def right_inverse(self, weight: Tensor) -> Tensor:
        """The initial bank: entry ``j`` takes the (signed) weight at the first position mapped to ``j``, so the
        bank keeps the distribution of the layer's initialisation."""
        n = weight.numel()
        flat = self.index.reshape(-1)
        first = torch.full((self.bank_size,), n, dtype=torch.int64, device=flat.device)
        first.scatter_reduce_(0, flat, torch.arange(n, device=flat.device), reduce="amin")
        return (weight.reshape(-1)[first] * self.sign.reshape(-1)[first]).detach().clone()

    def extra_repr(self) -> str:
        return f"bank_size={self.bank_size}, weight_shape={tuple(self.index.shape)}"

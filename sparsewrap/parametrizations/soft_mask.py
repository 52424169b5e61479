"""The *soft-mask* parametrization of Continuous Sparsification: ``w * c * sigmoid(beta * s)``.

Savarese et al. 2020 (https://arxiv.org/abs/1912.04427): a mask score ``s`` per weight (the weight's shape),
initialised to ``s0``, and ``c = 1 / sigmoid(s0)`` so that the effective weight starts at ``w`` when ``beta = 1``.
The search uses the soft mask at the current temperature ``beta``; the ticket is the hard mask ``w * c * 1[keep]``
(the scaling ``c`` stays on the ticket, as in the authors' code: export writes ``w * c`` where kept).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import SparseParametrization
from .projection import EvalProjection


def scale_of(mask_init: float) -> float:
    """``c = 1 / sigmoid(mask_init)``, the constant that makes the soft mask start at 1 when ``beta = 1``."""
    return 1.0 + math.exp(-mask_init)


def hard_masked(original: Tensor, keep: Tensor, scale: float) -> Tensor:
    """``original * scale`` where ``keep`` (bool, the weight's shape) is set, exact zeros elsewhere."""
    return torch.where(keep, original * scale, original.new_zeros(()))


class SoftMask(SparseParametrization):
    """``w_eff = w * c * sigmoid(beta * s)`` during the search, ``w * c * 1[ticket]`` once the ticket is drawn.

    ``s`` is a parameter of the weight's shape (in the model's ``state_dict``); ``ticket`` a bool buffer, used
    once :attr:`hard` is set by the method. ``beta`` is set by the method before each step (a plain attribute:
    the method's state restores it). In eval mode during the search the forward is the method's ticket
    projection (:attr:`final`), so that what one evaluates is what export writes.

    Args:
        like: the weight (``s`` takes its shape, dtype and device).
        mask_init: the initial score ``s0``.
    """

    def __init__(self, like: Tensor, mask_init: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.full(like.shape, float(mask_init), dtype=like.dtype, device=like.device))
        self.register_buffer("ticket", torch.zeros(like.shape, dtype=torch.bool, device=like.device))
        self.scale = scale_of(mask_init)
        self.beta = 1.0
        self.hard = False
        self.final: EvalProjection | None = None  # the method's ticket projection, applied in eval mode

    def soft_mask(self) -> Tensor:
        """``sigmoid(beta * s)`` (differentiable in ``s``)."""
        return torch.sigmoid(self.beta * self.s)

    def learned(self) -> Tensor:
        """The hard rule of the search, ``s > 0`` (bool), or the ticket once it is drawn."""
        return self.ticket if self.hard else self.s.detach() > 0

    def forward(self, original: Tensor) -> Tensor:
        if self.hard:
            return hard_masked(original, self.ticket, self.scale)
        if self.final is not None and not self.training:
            keep = self.final.factors(self)  # what one evaluates is what export writes
            if keep is not None:
                return hard_masked(original, keep, self.scale)
        return original * (self.scale * self.soft_mask())

    def bake(self, original: Tensor) -> Tensor:
        """The learned hard form ``w * c * 1[s > 0]`` (or the ticket); export's projection is the method's."""
        with torch.no_grad():
            return hard_masked(original, self.learned(), self.scale).detach().clone()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.s.shape)}, scale={self.scale:.4g}, beta={self.beta:.4g}, hard={self.hard}"

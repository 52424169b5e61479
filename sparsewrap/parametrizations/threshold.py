"""The *soft-threshold* parametrization of STR: ``S(w, s) = sign(w) * relu(|w| - sigmoid(s))``.

One threshold parameter ``s`` per layer, used in training and in evaluation alike (Kusupati et al. 2020,
https://arxiv.org/abs/2002.03231). Weights at or below the threshold ``sigmoid(s)`` are exactly zero, the others
are shrunk towards zero by it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import SparseParametrization
from .projection import EvalProjection


def shrink_kept(original: Tensor, kept: Tensor, threshold: Tensor) -> Tensor:
    """``S(w, threshold)`` where ``kept`` (bool, the weight's shape) is set, else zero (differentiable in ``w``)."""
    t = threshold.to(original.dtype)
    return torch.where(kept, original - torch.clamp(original, -t, t), original.new_zeros(()))


class _Shrink(torch.autograd.Function):
    """``S(w, s)`` with the paper's gradients: one pass over ``w`` forward on the CPU (``softshrink``; elsewhere
    two, without reading the threshold on the host), four backward.

    The backward reads the output ``S`` alone: ``sign(S) = sign(w) * 1[|w| > t]`` (``S`` is zero exactly where
    ``|w| <= t`` and has ``w``'s sign elsewhere), so ``dL/ds = -t (1 - t) * <grad, sign(S)>`` (one dot product)
    and ``dL/dw = grad`` where ``S != 0``."""

    @staticmethod
    def forward(ctx: Any, original: Tensor, s: Tensor) -> Tensor:
        t = torch.sigmoid(s).to(original.dtype)
        if original.device.type == "cpu" and original.dtype in (torch.float32, torch.float64):
            out = F.softshrink(original, float(t))  # w -/+ t rounded once where |w| > t, else 0: the same bits
        else:
            out = original - torch.clamp(original, -t, t)
        ctx.save_for_backward(out, t)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        out, t = ctx.saved_tensors
        sign = torch.sign(out)
        grad_s = -torch.dot(grad.reshape(-1), sign.reshape(-1)) * (t * (1 - t))
        grad_w = torch.where(sign != 0, grad, 0)  # relu'(0) = 0: nothing at |w| == t
        return grad_w, grad_s


class SoftThreshold(SparseParametrization):
    """``S(w, s) = sign(w) * relu(|w| - sigmoid(s))`` with a learnable scalar ``s``.

    The forward computes ``w - clamp(w, -t, t)`` with ``t = sigmoid(s)``, which has the same values bit for bit
    (for ``|w| > t`` both are ``w -/+ t`` rounded once; otherwise ``w - w = 0``); the backward gives the
    formula's gradients (with ``relu'(0) = 0``, also where ``|w| == t``):

    - ``dS/dw = 1[|w| > t]``: pruned weights receive no task gradient (they still feel weight decay);
    - ``dS/ds = -sign(w) * 1[|w| > t] * sigmoid'(s)``.

    ``s`` is a 0-dimensional parameter in the weight's dtype, registered here so that it lives in the model's
    ``state_dict``.

    Args:
        like: the weight (the parameter takes its dtype and device).
        s_init: the initial value of ``s``.
    """

    def __init__(self, like: Tensor, s_init: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.full((), float(s_init), dtype=like.dtype, device=like.device))
        self.final: EvalProjection | None = None  # the method's export projection, applied in eval mode

    def threshold(self) -> Tensor:
        """``sigmoid(s)``, the magnitude below which weights are zero (differentiable in ``s``)."""
        return torch.sigmoid(self.s)

    def forward(self, original: Tensor) -> Tensor:
        if self.final is not None and not self.training:
            cut = self.final.factors(self)  # what one evaluates is what export writes
            if cut is not None:
                return shrink_kept(original, *cut)
        return _Shrink.apply(original, self.s)

    def bake(self, original: Tensor) -> Tensor:
        """``S(original, s)``, the learned form (export's projection is the method's, see ``final``)."""
        with torch.no_grad():
            return _Shrink.apply(original, self.s).detach().clone()

    def zeros(self, original: Tensor) -> Tensor:
        """How many entries of ``S(original, s)`` are zero (a 0-dimensional int64 tensor, no host transfer)."""
        with torch.no_grad():  # a count of the kept entries: far cheaper than a sum over bools
            kept = torch.count_nonzero(original.abs() > torch.sigmoid(self.s).to(original.dtype))
            return original.numel() - kept

    def extra_repr(self) -> str:
        s = self.s.detach()
        return f"s={float(s):.4g}, threshold={float(torch.sigmoid(s)):.4g}"

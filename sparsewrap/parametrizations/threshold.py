"""The *soft-threshold* parametrization of STR: ``S(w, s) = sign(w) * relu(|w| - sigmoid(s))``.

One threshold parameter ``s`` per layer, used in training and in evaluation alike (Kusupati et al. 2020,
https://arxiv.org/abs/2002.03231). Weights at or below the threshold ``sigmoid(s)`` are exactly zero, the others
are shrunk towards zero by it.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import native, switches
from .base import SparseParametrization
from .gated_weight import Scratch
from .projection import EvalProjection


def shrink_kept(original: Tensor, kept: Tensor, threshold: Tensor) -> Tensor:
    """``S(w, threshold)`` where ``kept`` (bool, the weight's shape) is set, else zero (differentiable in ``w``)."""
    t = threshold.to(original.dtype)
    return torch.where(kept, original - torch.clamp(original, -t, t), original.new_zeros(()))


NATIVE_MIN_NUMEL = 1 << 15  # below this the eager path is as fast


def native_for(original: Tensor):
    """The native library when it applies to ``original`` (float32, CPU, contiguous, large enough), else None."""
    return native.kernels_for(original, min_numel=NATIVE_MIN_NUMEL)


class _Shrink(torch.autograd.Function):
    """``S(w, s)`` with the paper's gradients, and the count of its non-zeros (the entries kept).

    On float32 CPU weights the native kernels (``sparsewrap/native/shrink.c``) make one pass forward (``S`` and
    the count) and one backward (``dL/dw`` and the dot product below, in double); otherwise the forward is
    ``softshrink`` on the CPU (one pass, the same bits) or the clamp form elsewhere, and the count one more pass
    when ``count`` asks for it (a training forward; -1 otherwise).

    The backward reads the output ``S`` alone: ``sign(S) = sign(w) * 1[|w| > t]`` (``S`` is zero exactly where
    ``|w| <= t`` and has ``w``'s sign elsewhere), so ``dL/ds = -t (1 - t) * <grad, sign(S)>`` (one dot product)
    and ``dL/dw = grad`` where ``S != 0``."""

    @staticmethod
    def forward(ctx: Any, original: Tensor, s: Tensor, scratch: Scratch | None, count: bool) -> tuple[Tensor, Tensor]:
        t = torch.sigmoid(s).to(original.dtype)
        lib = native_for(original)
        ctx.lib, ctx.scratch = lib, scratch
        if lib is not None:
            out = scratch.out.take(original) if scratch is not None else torch.empty_like(original)
            kept = ctypes.c_int64(0)
            lib.sw_shrink_forward(native.ptr(original), native.ptr(out), original.numel(), float(t), ctypes.byref(kept))
            kept = torch.tensor(kept.value, dtype=torch.int64)
        else:
            if original.device.type == "cpu" and original.dtype in (torch.float32, torch.float64):
                out = F.softshrink(original, float(t))  # w -/+ t rounded once where |w| > t, else 0: the same bits
            else:
                out = original - torch.clamp(original, -t, t)
            # one more pass, only where the count is read (a training forward): -1 stands for "not counted"
            kept = torch.count_nonzero(out) if count else torch.full((), -1, dtype=torch.int64)
        ctx.save_for_backward(out, t)
        ctx.mark_non_differentiable(kept)
        return out, kept

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_count: Tensor | None) -> tuple[Tensor, Tensor, None, None]:
        out, t = ctx.saved_tensors
        if ctx.lib is not None:
            g = grad.contiguous()
            grad_w = ctx.scratch.grad.take(g) if ctx.scratch is not None else torch.empty_like(g)
            dot = ctypes.c_double(0.0)
            ctx.lib.sw_shrink_backward(native.ptr(g), native.ptr(out), native.ptr(grad_w), g.numel(), ctypes.byref(dot))
            grad_s = -torch.tensor(dot.value, dtype=t.dtype) * (t * (1 - t))
            return grad_w, grad_s, None, None
        sign = torch.sign(out)
        grad_s = -torch.dot(grad.reshape(-1), sign.reshape(-1)) * (t * (1 - t))
        grad_w = torch.where(sign != 0, grad, 0)  # relu'(0) = 0: nothing at |w| == t
        return grad_w, grad_s, None, None


class SoftThreshold(SparseParametrization):
    """``S(w, s) = sign(w) * relu(|w| - sigmoid(s))`` with a learnable scalar ``s``.

    The forward computes ``w - clamp(w, -t, t)`` with ``t = sigmoid(s)``, which has the same values bit for bit
    (for ``|w| > t`` both are ``w -/+ t`` rounded once; otherwise ``w - w = 0``), in one pass on the CPU (a native
    kernel for float32, see :class:`_Shrink`); the backward gives the formula's gradients (with
    ``relu'(0) = 0``, also where ``|w| == t``):

    - ``dS/dw = 1[|w| > t]``: pruned weights receive no task gradient (they still feel weight decay);
    - ``dS/ds = -sign(w) * 1[|w| > t] * sigmoid'(s)``.

    ``s`` is a 0-dimensional parameter in the weight's dtype, registered here so that it lives in the model's
    ``state_dict``. A training forward also counts the entries it kept (free in the native kernel): STR's
    controller reads it with :meth:`trained_zeros` instead of a pass of its own.

    Args:
        like: the weight (the parameter takes its dtype and device).
        s_init: the initial value of ``s``.
    """

    def __init__(self, like: Tensor, s_init: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.full((), float(s_init), dtype=like.dtype, device=like.device))
        self.final: EvalProjection | None = None  # the method's export projection, applied in eval mode
        self.trained_kept: Tensor | None = None  # the count of the last training forward (see trained_zeros)
        self._scratch = Scratch()

    def threshold(self) -> Tensor:
        """``sigmoid(s)``, the magnitude below which weights are zero (differentiable in ``s``)."""
        return torch.sigmoid(self.s)

    def forward(self, original: Tensor) -> Tensor:
        if self.final is not None and not self.training:
            cut = self.final.factors(self)  # what one evaluates is what export writes
            if cut is not None:
                return shrink_kept(original, *cut)
        # no backward: nothing to keep
        scratch = self._scratch if torch.is_grad_enabled() and switches.REUSE_BUFFERS else None
        training = self.training and torch.is_grad_enabled()
        out, kept = _Shrink.apply(original, self.s, scratch, training)
        if training:
            self.trained_kept = kept
        return out

    def bake(self, original: Tensor) -> Tensor:
        """``S(original, s)``, the learned form (export's projection is the method's, see ``final``)."""
        with torch.no_grad():
            return _Shrink.apply(original, self.s, None, False)[0].detach().clone()

    def zeros(self, original: Tensor) -> Tensor:
        """How many entries of ``S(original, s)`` are zero (a 0-dimensional int64 tensor, no host transfer)."""
        with torch.no_grad():  # a count of the kept entries: far cheaper than a sum over bools
            kept = torch.count_nonzero(original.abs() > torch.sigmoid(self.s).to(original.dtype))
            return original.numel() - kept

    def trained_zeros(self, original: Tensor) -> Tensor:
        """The zeros of ``S(w, s)`` as the last training forward computed them (taken once), without a pass.

        That forward ran on the weights and threshold of its step, before the optimizer moved them: the count
        is one update behind :meth:`zeros`, which is what it returns when no training forward (with gradients)
        ran since the last call.
        """
        kept, self.trained_kept = self.trained_kept, None
        if kept is None:
            return self.zeros(original)
        return original.numel() - kept

    def extra_repr(self) -> str:
        s = self.s.detach()
        return f"s={float(s):.4g}, threshold={float(torch.sigmoid(s)):.4g}"

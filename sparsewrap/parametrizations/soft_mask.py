"""The *soft-mask* parametrization of Continuous Sparsification: ``w * c * sigmoid(beta * s)``.

Savarese et al. 2020 (https://arxiv.org/abs/1912.04427): a mask score ``s`` per weight (the weight's shape),
initialised to ``s0``, and ``c = 1 / sigmoid(s0)`` so that the effective weight starts at ``w`` when ``beta = 1``.
The search uses the soft mask at the current temperature ``beta``; the ticket is the hard mask ``w * c * 1[keep]``
(the scaling ``c`` stays on the ticket, as in the authors' code: export writes ``w * c`` where kept).

The search's training forward is one autograd function (:class:`SoftMaskMul`) whose outputs are the masked weight,
the differentiable sum ``sum(sigmoid(beta * s))`` (the method's penalty uses it: no second pass over the scores)
and the count of ``s > 0`` (the method's driven coefficient reads it); its backward writes both gradients, the
sum's folded into the scores'. Float32 CPU tensors of :data:`NATIVE_MIN_NUMEL` entries or more run on the C
kernels of ``sparsewrap/native/softmask.c`` (one pass per direction, reused output buffers); the rest (and
``SPARSEWRAP_NATIVE=0``, no compiler) run the eager path of the same math.
"""

from __future__ import annotations

import ctypes
import math
import weakref

import torch
from torch import Tensor, nn

from .. import native, switches, torch_compat
from .base import SparseParametrization, version_key
from .gated_weight import Scratch
from .projection import EvalProjection

NATIVE_MIN_NUMEL = 1 << 15  # below this the eager path is as fast


def scale_of(mask_init: float) -> float:
    """``c = 1 / sigmoid(mask_init)``, the constant that makes the soft mask start at 1 when ``beta = 1``."""
    return 1.0 + math.exp(-mask_init)


def hard_masked(original: Tensor, keep: Tensor, scale: float) -> Tensor:
    """``original * scale`` where ``keep`` (bool, the weight's shape) is set, exact zeros elsewhere."""
    return torch.where(keep, original * scale, original.new_zeros(()))


class Pass:
    """What one training forward of the search left for the method: the differentiable sum of the soft mask (until
    the penalty takes it or a backward through it ran), the count of ``s > 0`` (until the method's step reads
    it), and the scores' version and temperature it was computed at. Never copied or saved (a copy is empty)."""

    __slots__ = ("total", "positive", "key", "backward_ran", "__weakref__")

    def __init__(self, total: Tensor | None = None, positive: Tensor | None = None, key: object = None) -> None:
        self.total, self.positive, self.key, self.backward_ran = total, positive, key, False

    def __reduce__(self) -> tuple:
        return (Pass, ())


class SoftMaskMul(torch.autograd.Function):
    """``(w * c * sigmoid(beta * s), sum sigmoid(beta * s), #(s > 0))``, differentiated by hand in one backward:
    ``dL/dw = g c m``, ``dL/ds = beta m (1 - m) (g w c + dL/dsum)`` with ``m = sigmoid(beta * s)``.

    The sum is accumulated in float64 and returned in the scores' dtype; the count (int64) is not
    differentiable. ``scratch`` lends reusable buffers (the masked weight, the scores' gradient), ``record`` is
    marked when the backward runs (the sum's graph is then spent). Without ``measure`` the eager path spends no
    pass on the sum and the count (0 and -1 stand for them; the native pass computes them for free).
    """

    @staticmethod
    def forward(ctx, w: Tensor, s: Tensor, scale: float, beta: float, scratch: Scratch | None = None,  # type: ignore[override]
                record: Pass | None = None, measure: bool = True) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        # a weak reference: the record holds the sum, whose graph holds ctx (no reference cycle to wait for the GC)
        ctx.scale, ctx.beta, ctx.scratch = scale, beta, scratch
        ctx.record = weakref.ref(record) if record is not None else None
        ctx.set_materialize_grads(False)
        lib = native_for(w, s)
        ctx.native = lib is not None
        if lib is not None:
            out = scratch.out.take(w) if scratch is not None else torch.empty_like(w)
            total, positive = ctypes.c_double(0.0), ctypes.c_int64(0)
            lib.sw_sm_forward(native.ptr(w), native.ptr(s), native.ptr(out), s.numel(), scale, beta,
                              ctypes.byref(total), ctypes.byref(positive))  # fmt: skip
            ctx.save_for_backward(w, s)
            count = torch.tensor(positive.value, dtype=torch.int64)
            ctx.mark_non_differentiable(count)
            return out, torch.tensor(total.value, dtype=s.dtype), count
        m = torch.mul(s, beta).sigmoid_()
        if measure:  # a training forward: the method reads the sum and the count
            total, count = m.sum(dtype=torch.float64).to(s.dtype), torch.count_nonzero(s > 0)
        else:  # not read: no passes for them
            total, count = s.new_zeros(()), torch.full((), -1, dtype=torch.int64)
        ctx.save_for_backward(w, m)
        ctx.mark_non_differentiable(count)
        return w * (scale * m), total, count

    @staticmethod
    def backward(ctx, grad: Tensor | None, grad_total: Tensor | None,  # type: ignore[override]
                 grad_count: Tensor | None) -> tuple[Tensor | None, ...]:  # fmt: skip
        record = ctx.record() if ctx.record is not None else None
        if record is not None:
            record.backward_ran = True
        needs_w = ctx.needs_input_grad[0] and grad is not None
        needs_s = ctx.needs_input_grad[1] and (grad is not None or grad_total is not None)
        if ctx.native:
            return (*_native_backward(ctx, grad, grad_total, needs_w, needs_s), None, None, None, None, None)
        w, m = ctx.saved_tensors
        grad_w = grad * (ctx.scale * m) if needs_w else None
        grad_s = None
        if needs_s:
            coef = grad * w * ctx.scale if grad is not None else m.new_zeros(())
            if grad_total is not None:
                coef = coef + grad_total.to(m.dtype)
            grad_s = torch.ops.aten.sigmoid_backward(coef.expand_as(m), m).mul_(ctx.beta)
        return grad_w, grad_s, None, None, None, None, None


def native_for(w: Tensor, s: Tensor):
    """The native library when it applies to these tensors (float32, CPU, contiguous, the same shape, at least
    :data:`NATIVE_MIN_NUMEL` entries), else ``None``."""
    return native.kernels_for(s, w, min_numel=NATIVE_MIN_NUMEL)


def _native_backward(ctx, grad: Tensor | None, grad_total: Tensor | None, needs_w: bool,
                     needs_s: bool) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    w, s = ctx.saved_tensors
    g = grad.contiguous() if grad is not None else None
    grad_w = None
    if needs_w:
        # the masked weight's gradient is a fresh tensor owned by autograd: the weight gradient overwrites it
        grad_w = g if (g is grad and torch_compat.owns_memory(grad)) else torch.empty_like(g)
    grad_s = None
    if needs_s:
        scratch = ctx.scratch
        grad_s = scratch.grad.take(s) if scratch is not None else torch.empty_like(s)
    if grad_w is None and grad_s is None:
        return None, None
    gtotal = float(grad_total) if grad_total is not None else 0.0
    ptrs = tuple(native.ptr(t) for t in (g, w, s, grad_w, grad_s))
    native.kernels().sw_sm_backward(*ptrs, s.numel(), ctx.scale, ctx.beta, gtotal)
    return grad_w, grad_s


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
        self.last = Pass()  # what the last training forward of the search left (see mask_sum, take_positive)
        self._scratch = Scratch()

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
        training = self.training and torch.is_grad_enabled()
        record = Pass() if training else None
        scratch = self._scratch if torch.is_grad_enabled() and switches.REUSE_BUFFERS else None
        out, total, positive = SoftMaskMul.apply(original, self.s, self.scale, self.beta, scratch, record, training)
        if record is not None:
            record.positive, record.key = positive, (version_key(self.s), self.beta)
            if total.requires_grad:
                record.total = total
            self.last = record
        return out

    def mask_sum(self) -> Tensor:
        """``sum(sigmoid(beta * s))`` (differentiable in ``s``): this step's training forward's sum when it is still
        usable (the scores and ``beta`` unchanged since, no backward through it yet, gradients on; taken once),
        else computed now."""
        last = self.last
        if (
            last.total is not None
            and not last.backward_ran
            and torch.is_grad_enabled()
            and last.key == (version_key(self.s), self.beta)
        ):
            total, last.total = last.total, None
            return total
        return self.soft_mask().sum(dtype=torch.float64).to(self.s.dtype)

    def take_positive(self) -> Tensor | None:
        """The count of ``s > 0`` that the last training forward saw (int64 tensor), once; ``None`` when no
        training forward of the search ran since the last call."""
        positive, self.last.positive = self.last.positive, None
        return positive

    def bake(self, original: Tensor) -> Tensor:
        """The learned hard form ``w * c * 1[s > 0]`` (or the ticket); export's projection is the method's."""
        with torch.no_grad():
            return hard_masked(original, self.learned(), self.scale).detach().clone()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.s.shape)}, scale={self.scale:.4g}, beta={self.beta:.4g}, hard={self.hard}"

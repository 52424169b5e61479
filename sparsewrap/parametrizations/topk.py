"""The *top-k* parametrization of DNW: keep the ``k`` largest ``|w|`` at every forward, straight-through backward.

Unlike :class:`~sparsewrap.parametrizations.masked.Masked`, nothing is stored but ``k``: the mask is a function
of the current weights, recomputed at each read of the weight, and pruned weights keep their values (they still
receive gradients and may come back).
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor

from .. import native, switches
from .base import SparseParametrization
from .gated_weight import Scratch


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


def keep_largest_near(
    scores: Tensor, keep: int, guess: float | None, width: float = 0.05
) -> tuple[Tensor, float | None]:
    """:func:`keep_largest`'s mask, found faster on the CPU when ``guess`` is close to its threshold.

    DNW recomputes the mask at every forward, and the threshold moves little from one step to the next: the
    entries in ``[guess * (1 - width), guess * (1 + width))`` are selected (two comparisons and two counts), and
    ``kthvalue`` runs on those alone when the threshold lies among them (otherwise on all entries, as
    :func:`keep_largest`). When no tie at the threshold needs the tie rule (the common case for float scores),
    the mask is ``scores > threshold``, one comparison and one count instead of the rule's cumulative count. The
    counts are read on the host, so on other devices (where that would synchronise a stream), under
    ``torch.compile``, for other dtypes and when ties need the rule, this returns :func:`keep_largest` itself:
    the mask is the same in every case.

    Args:
        scores: the scores (any shape).
        keep: how many of the largest to keep.
        guess: the threshold of the previous call (``None``: not known).
        width: the relative half-width of the band around ``guess``.

    Returns:
        The bool mask (``scores``' shape) and the threshold, the guess for the next call (``None`` when not
        computed here).
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if (
        flat.device.type != "cpu"
        or flat.dtype not in (torch.float32, torch.float64)
        or not 0 < keep < n
        or torch.compiler.is_compiling()  # host reads would break the graph
    ):
        return keep_largest(scores, keep), None
    drop = n - keep
    threshold = None
    if guess is not None and math.isfinite(guess) and guess > 0:
        low = flat < guess * (1 - width)
        below_low = int(torch.count_nonzero(low))
        if below_low < drop:
            high = flat < guess * (1 + width)
            if int(torch.count_nonzero(high)) >= drop:  # the drop-th smallest lies in the band
                threshold = flat[high ^ low].kthvalue(drop - below_low).values
    if threshold is None:
        threshold = flat.kthvalue(drop).values
    kept = flat > threshold
    if int(torch.count_nonzero(kept)) == keep:  # every entry equal to the threshold is dropped, as the tie rule
        return kept.reshape(scores.shape), float(threshold)
    return keep_largest(scores, keep), float(threshold)


NATIVE_MIN_NUMEL = 1 << 15  # below this the eager path is as fast
BAND_CAPACITY = 8  # the native band holds up to numel / BAND_CAPACITY values (more: the eager path)


def native_topk_for(original: Tensor, keep: int):
    """The native library when it applies to ``original`` and ``keep`` (float32, CPU, contiguous, large enough,
    ``0 < keep < numel``, not under ``torch.compile``), else None."""
    if not 0 < keep < original.numel() or torch.compiler.is_compiling():
        return None
    return native.kernels_for(original, min_numel=NATIVE_MIN_NUMEL)


def native_largest_near(
    original: Tensor, keep: int, guess: float | None, out: Tensor | None = None, width: float = 0.05
) -> tuple[Tensor, float] | None:
    """``original * keep_largest(|original|, keep)`` and the threshold, in two native passes (``topk.c``).

    The first pass counts the ``|w|`` below ``guess * (1 - width)`` and gathers those in the band up to
    ``guess * (1 + width)``; ``kthvalue`` on the band alone gives the threshold; the second pass writes ``w``
    where ``|w|`` is above it and ``+0`` elsewhere (the values of ``w - w``), counting the kept entries. Without a
    usable guess, or when the threshold is not in the band, the threshold comes from ``kthvalue`` over every
    ``|w|``; when ties at the threshold need :func:`keep_largest`'s tie rule, the mask is that rule's. The
    result equals ``original * keep_largest(original.abs(), keep)`` in every case.

    Args:
        original: the weight (float32, on the CPU, contiguous).
        keep: how many of the largest ``|w|`` to keep, ``0 < keep < numel``.
        guess: the threshold of the previous call (``None``: not known).
        out: where to write the result (``original``'s shape), or ``None`` for a new tensor.
        width: the relative half-width of the band around ``guess``.

    Returns:
        The masked weight and its threshold, or ``None`` when the native kernels do not apply (another device
        or dtype, a small or non-contiguous tensor, no compiler, ``keep`` out of range).
    """
    lib = native_topk_for(original, keep)
    if lib is None:
        return None
    n = original.numel()
    w = original.detach()
    drop = n - keep
    threshold = None
    if guess is not None and math.isfinite(guess) and guess > 0:
        cap = max(n // BAND_CAPACITY, 1)
        parts = max(torch.get_num_threads(), 1)
        band = torch.empty(cap + parts, dtype=torch.float32)
        result = torch.empty(2, dtype=torch.int64)
        lo, hi = guess * (1 - width), guess * (1 + width)
        lib.sw_topk_band(native.ptr(w), n, lo, hi, native.ptr(band), cap, parts, native.ptr(result))
        below, inside = result.tolist()
        if inside >= 0 and below < drop <= below + inside:  # the drop-th smallest |w| lies in the band
            threshold = float(band[:inside].kthvalue(drop - below).values)
    if threshold is None:
        threshold = float(w.abs().reshape(-1).kthvalue(drop).values)
    if out is None:
        out = torch.empty_like(w)
    kept = ctypes.c_int64(0)
    lib.sw_topk_apply(native.ptr(w), native.ptr(out), n, threshold, ctypes.byref(kept))
    if kept.value != keep:  # ties at the threshold: the tie rule decides which of them stay
        torch.where(keep_largest(w.abs(), keep), w, w.new_zeros(()), out=out)  # +0 where dropped, as w - w
    return out, threshold


class _KeepLargest(torch.autograd.Function):
    """The masked weight of :func:`native_largest_near` with the straight-through gradient: the backward hands
    the incoming gradient on unchanged (no pass over it)."""

    @staticmethod
    def forward(ctx, original: Tensor, masked: Tensor) -> Tensor:  # type: ignore[override]
        return masked

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


class TopMagnitude(SparseParametrization):
    """``w_eff = w * topk_mask(|w|)`` in the forward; the gradient reaches every weight unchanged (straight-through).

    DNW (Wortsman et al. 2019, https://arxiv.org/abs/1906.00586): the forward value is exactly ``w * mask``
    with the ``keep`` largest ``|w|`` kept, and the backward treats the mask as the identity, so that pruned
    weights keep learning and can re-enter. On float32 CPU weights of at least ``NATIVE_MIN_NUMEL`` entries the
    native kernels write the masked weight in two passes (:func:`native_largest_near`) and the backward hands
    the incoming gradient on as it is. Elsewhere (and under ``torch.compile``) it is computed as
    ``w - where(mask, 0, w.detach())``: exact zeros where pruned (``x - x == +0``), ``w`` itself where kept, and
    the identity as the gradient, with no custom autograd function (the model still compiles). Both give the
    same values bit for bit.

    Args:
        keep: how many weights to keep.
    """

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = int(keep)
        self.guess: float | None = None  # the last threshold (a hint for the next one, see keep_largest_near)
        self._scratch = Scratch()

    def mask(self, original: Tensor) -> Tensor:
        """The current keep-mask (bool) of ``original``."""
        with torch.no_grad():
            mask, self.guess = keep_largest_near(original.detach().abs(), self.keep, self.guess)
            return mask

    def forward(self, original: Tensor) -> Tensor:
        if self.keep >= original.numel():
            return original
        if native_topk_for(original, self.keep) is not None:
            reuse = torch.is_grad_enabled() and switches.REUSE_BUFFERS  # no backward: nothing to keep
            out = self._scratch.out.take(original) if reuse else None
            found = native_largest_near(original, self.keep, self.guess, out)
            if found is not None:
                masked, self.guess = found
                return _KeepLargest.apply(original, masked)
        return original - torch.where(self.mask(original), 0, original.detach())

    def bake(self, original: Tensor) -> Tensor:
        with torch.no_grad():
            return (original * self.mask(original)).detach().clone()

    def extra_repr(self) -> str:
        return f"keep={self.keep}"

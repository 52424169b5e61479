"""The *masked* parametrization: ``w_eff = w * mask``.

Hard (0/1) masks take a fast path that keeps the original zero wherever the mask is, so that the forward
needs no product at all and the backward only zeroes the pruned gradient entries; see :class:`Masked` for
the rules that keep this exact.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import native, switches, torch_compat
from .base import SparseParametrization, version_key
from .projection import EvalProjection

Key = tuple[int, int]  # a version_key
# float32 CPU masks (full-size or per output channel) of weights with at least this many entries are also kept
# packed one bit per entry, and pruned entries are zeroed by the native kernels (sparsewrap/native/masks.c)
# instead of a multiply by the mask
NATIVE_MIN_NUMEL = 16384


class _MaskGrad(torch.autograd.Function):
    """Identity in forward (a view, no copy); multiplies the gradient by the mask in backward.

    The fallback of :class:`Masked` for an original that requires a gradient but is not a leaf (where no
    accumulation hook can be registered); used only when the original is already zero wherever the mask is,
    so that the forward value equals ``original * mask`` and so does the gradient.
    """

    @staticmethod
    def forward(ctx: Any, original: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return original.view_as(original)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class Masked(SparseParametrization):
    """Multiply the weight by a mask buffer.

    The mask has the weight's shape (one entry per weight) or a broadcastable shape such as
    ``(C_out, 1, 1, 1)`` (one entry per output channel). It is a buffer in the weight's dtype, so
    ``model.to(...)`` moves it and ``state_dict`` saves it; methods update it in place under ``no_grad``.

    **Hard masks** (``hard=True``, values 0 and 1 only: magnitude, GMP, rewiring) do not build
    ``original * mask``. The original is kept zero wherever the mask is, and the forward returns the
    original itself; a hook that runs each time autograd accumulates into ``original.grad`` zeroes the
    pruned entries of the gradient in place (before optimizers, gradient clipping or DDP's reducer see it).
    The effective weights and ``original.grad`` are exactly those of ``original * mask``. What keeps the
    original clean:

    - ``sp.step()`` (:meth:`settle`) zeroes the pruned entries in place after each optimizer step, and the
      forward does whenever the original or the mask has changed since it was last known clean (tensor
      version counters tell; one in-place pass), so any writer (an optimizer, gradient clipping or noise,
      ``load_state_dict``) is covered.

    The hook masks every gradient that reaches ``original.grad``, also from a loss term that reads the
    original directly, so pruned weights stay frozen at zero. ``torch.autograd.grad`` with respect to the
    original, which accumulates nothing, returns the unmasked gradient: multiply it by the mask, or use
    ``hard=False``. An original that requires a gradient but is not a leaf (``torch.func.functional_call``)
    takes an autograd function that masks the gradient on its way back instead.

    Pruned entries are set to zero (``masked_fill_`` with the pruned entries as a boolean tensor, kept until the
    mask changes), not multiplied by the mask: a pruned gradient entry is exactly 0 even where the incoming
    gradient is NaN or infinite (the product would give NaN there). On the CPU, a float32 mask (full-size or
    per output channel) of a large weight is kept packed one bit per entry instead, and native kernels
    (:mod:`sparsewrap.native`) zero the pruned entries: an eighth of a byte of mask per weight, and a channel
    mask writes zeros into the pruned channels only, reading nothing.

    Writes through ``.data`` bypass the version counter: call :meth:`project` after them. A pruned weight's
    original value is not kept, so a weight that is un-pruned later restarts from zero (as in RigL and SET).
    Soft masks (values strictly between 0 and 1) need ``hard=False``: the plain product.

    Args:
        mask_shape: shape of the mask, broadcastable to the weight.
        like: a tensor whose dtype and device the mask takes.
        hard: the mask holds only 0 and 1 (see above).
    """

    def __init__(self, mask_shape: tuple[int, ...], like: Tensor, hard: bool = True) -> None:
        super().__init__()
        self.hard = hard and switches.HARD_MASKS
        self.register_buffer("mask", torch.ones(mask_shape, dtype=like.dtype, device=like.device))
        self._clean: tuple[Key, Key] | None = None  # (original, mask) keys at which the original was clean
        self._original: weakref.ref | None = None
        self._hooked = False  # the accumulation hook is on the tracked original
        self._bits: tuple[Tensor, int] | None = None  # the packed mask (see _packed) of the bound call
        # (key, bound native call or None, the pruned entries as booleans or None): see _zero_pruned
        self._call: tuple[tuple, Callable[[int], None] | None, Tensor | None] | None = None
        self.final: EvalProjection | None = None  # the method's final projection, applied in eval mode (below)

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, original: Tensor) -> Tensor:
        mask = self.mask
        if self.final is not None and not self.training:
            # what one evaluates is what export writes: a method whose export projects the masks (a gradual
            # schedule exported before its end) hands its final mask here; None when it equals the live mask
            final = self.final.factors(self)
            if final is not None:
                return original * final
        if not self.hard or torch.compiler.is_compiling():
            # torch.compile cannot trace the bookkeeping below (weak references, data pointers, hooks): the product
            # gives the same values and, through autograd, the same masked gradient, in one traceable graph
            return original * mask
        tracked, hooked = self._original, self._hooked
        if tracked is None or tracked() is not original or (not hooked and original.requires_grad and original.is_leaf):
            self._track(original)  # a new original, or one unfrozen since it was tracked
            hooked = self._hooked
        if self.changed_since_clean(original):
            self.project(original)
        if hooked or not original.requires_grad:
            return original  # already original * mask; a gradient is masked where it accumulates
        return _MaskGrad.apply(original, mask)

    def settle(self, original: Tensor) -> None:
        """Zero ``original`` at pruned entries if anything wrote to it since it was last known clean (hard masks).

        The controller's ``step()`` calls it after each optimizer step, so that pruned weights are exactly zero
        between steps whatever the optimizer did.
        """
        if self.hard and self.changed_since_clean(original):
            self.project(original)

    def changed_since_clean(self, original: Tensor) -> bool:
        """Whether ``original`` may be non-zero at pruned entries: it or the mask changed since it was last
        clean. Where torch has no version counters (:mod:`sparsewrap.torch_compat`) the values tell instead (a
        read pass), so that a clean original is never written in place again (it may be saved for a backward)."""
        mask = self.mask
        if torch_compat.version(original) is None or torch_compat.version(mask) is None:
            with torch.no_grad():
                return bool(torch.logical_and(original.ne(0), mask.eq(0)).any())
        return (version_key(original), version_key(mask)) != self._clean

    def project(self, original: Tensor) -> None:
        """Zero ``original`` in place wherever the mask is zero (hard masks)."""
        with torch.no_grad():
            self._zero_pruned(original)
        self._clean = (version_key(original), version_key(self.mask))

    def _zero_pruned(self, t: Tensor) -> None:
        """Zero ``t`` in place at the pruned entries of a hard mask (exact zeros, also where ``t`` is not finite).

        On the hot path (each weight gradient, right after autograd wrote it) this runs while the backward's
        convolutions keep the caches full, where every Python operation costs ten times what it costs in a
        loop: the kernel call is prepared once per mask change (:meth:`_native_call`), and a call checks only
        the mask's version and the tensor's layout.
        """
        mask = self.mask
        key = (version_key(mask), t.shape)
        call = self._call
        if call is None or call[0] != key:
            self._bits = self._packed(t)  # kept here while the call bound to its address is in use
            zero = self._native_call(self._bits, t.numel())
            call = self._call = (key, zero, mask.eq(0) if zero is None else None)
        zero = call[1]
        if zero is not None and t.dtype == torch.float32 and t.is_cpu and t.is_contiguous():
            zero(t.data_ptr())
            torch.autograd.graph.increment_version(t)  # a write autograd did not see; its saved-tensor checks must
        else:
            t.masked_fill_(call[2] if call[2] is not None else mask.eq(0), 0)

    @staticmethod
    def _native_call(packed: tuple[Tensor, int] | None, numel: int) -> Callable[[int], None] | None:
        """The native kernel that zeroes ``numel`` float32 entries at the pruned entries of the packed mask
        ``(bits, row)``, its mask arguments bound (called with the tensor's address), or None without one."""
        if packed is None:
            return None
        bits, row = packed
        lib = native.kernels()
        if row == 1:
            return functools.partial(lib.sw_mask_zero, bits.data_ptr(), numel)
        return functools.partial(lib.sw_mask_zero_rows, bits.data_ptr(), numel // row, row)

    def _packed(self, like: Tensor) -> tuple[Tensor, int] | None:
        """``(bits, row)``: the mask packed one bit per entry (int64 words) for the native kernels, each entry
        covering ``row`` contiguous weights of ``like`` (1 for a full-size mask; a per-output-channel mask of
        shape ``(C, 1, ...)`` covers ``like.numel() // C``), or None where the kernels do not apply: a mask
        that is not float32 on the CPU, a weight of fewer than :data:`NATIVE_MIN_NUMEL` entries, or a build
        without a vector path. :meth:`_zero_pruned` calls it once per mask change."""
        mask = self.mask
        if mask.shape == like.shape:
            row = 1
        elif like.dim() >= 1 and mask.shape == (like.shape[0],) + (1,) * (like.dim() - 1):
            row = like.numel() // max(like.shape[0], 1)
        else:
            return None
        if (
            like.numel() < NATIVE_MIN_NUMEL
            or mask.dtype != torch.float32
            or mask.device.type != "cpu"
            or not mask.is_contiguous()
        ):
            return None
        lib = native.kernels()
        if lib is None or not lib.sw_mask_vectorized():
            return None
        bits = torch.empty((mask.numel() + 63) // 64, dtype=torch.int64)
        lib.sw_mask_pack(native.ptr(mask), native.ptr(bits), mask.numel())
        return bits, row

    def bake(self, original: Tensor) -> Tensor:
        with torch.no_grad():
            return (original * self.mask).detach().clone()  # does not touch the live original

    # -- bookkeeping for the fast path ------------------------------------------------------------------------
    def _track(self, original: Tensor) -> None:
        self._original = weakref.ref(original)
        self._clean = None
        me = weakref.ref(self)
        self._hooked = original.requires_grad and original.is_leaf
        if self._hooked:

            def mask_accumulated(p: Tensor) -> None:
                owner = me()
                if owner is not None and owner._original is not None and owner._original() is p:
                    owner._mask_grad(p)

            original.register_post_accumulate_grad_hook(mask_accumulated)

    def _mask_grad(self, p: Tensor) -> None:
        """Zero ``p.grad`` at the pruned entries, in place, right after autograd accumulated into it."""
        grad = p.grad
        if grad is None:
            return
        if grad.requires_grad:  # a gradient with a graph (create_graph=True): zeroed in place, not recorded
            with torch.no_grad():
                self._zero_pruned(grad)
        else:
            self._zero_pruned(grad)

    def __getstate__(self) -> dict[str, Any]:
        # copies (deepcopy, pickle) start untracked: the bookkeeping refers to this instance's tensors
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state.update(_clean=None, _original=None, _hooked=False)
        state.update(_bits=None, _call=None)
        return state

    def extra_repr(self) -> str:
        return f"mask_shape={tuple(self.mask.shape)}, hard={self.hard}"

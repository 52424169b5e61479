"""The *masked* parametrization: ``w_eff = w * mask``.

Hard (0/1) masks take a fast path that keeps the original zero wherever the mask is, so that the forward
needs no product at all; see :class:`Masked` for the rules that keep this exact.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import (
    Optimizer,
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from .base import SparseParametrization, version_key

Key = tuple[int, int]  # a version_key

# optimizers whose update of a weight is zero when the weight, its gradient and its per-weight state are zero
# there (element-wise rules; weight decay multiplies the weight). Exact types only: a subclass may override step.
ZERO_PRESERVING: tuple[type[Optimizer], ...] = tuple(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam")
    if hasattr(torch.optim, name)
)

_TRACKED: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # id(original) -> (original, its Masked)
_STATE_MASKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> {id(param): mask key}
_hooks_installed = False


def _tracked(p: Tensor) -> Masked | None:
    entry = _TRACKED.get(id(p))
    if entry is None:
        return None
    param, owner = entry[0](), entry[1]()
    if param is not p or owner is None:
        return None
    return owner


def _before_step(opt: Optimizer, args: Any, kwargs: Any) -> None:
    if not _TRACKED:
        return
    fast = type(opt) in ZERO_PRESERVING
    for group in opt.param_groups:
        for p in group["params"]:
            owner = _tracked(p)
            if owner is not None:
                owner._stays_clean = fast and owner._ready_for_step(opt, p)


def _after_step(opt: Optimizer, args: Any, kwargs: Any) -> None:
    if not _TRACKED:
        return
    for group in opt.param_groups:
        for p in group["params"]:
            owner = _tracked(p)
            if owner is not None and owner._stays_clean:
                owner._clean = (version_key(p), version_key(owner.mask))
                owner._stays_clean = False


def _install_hooks() -> None:
    global _hooks_installed
    if not _hooks_installed:
        register_optimizer_step_pre_hook(_before_step)
        register_optimizer_step_post_hook(_after_step)
        _hooks_installed = True


class _MaskGrad(torch.autograd.Function):
    """Identity in forward (a view, no copy); multiplies the gradient by the mask in backward.

    Used only when the original is already zero wherever the mask is (see :class:`Masked`), so that the
    forward value equals ``original * mask`` and so does the gradient.
    """

    @staticmethod
    def forward(ctx: Any, original: Tensor, mask: Tensor, owner: Masked) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.owner = weakref.ref(owner)
        return original.view_as(original)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        owner = ctx.owner()
        if owner is not None:
            owner._before_accumulate()
        # the weight gradient of a conv/linear is a fresh dense tensor owned by autograd: mask it in place
        # (no new full-size tensor); anything else (expanded, a view) gets an out-of-place product. A hook on
        # the effective weight that keeps the gradient tensor itself must clone it.
        if grad._base is None and grad.is_contiguous():
            return grad.mul_(mask), None, None
        return grad * mask, None, None


class Masked(SparseParametrization):
    """Multiply the weight by a mask buffer.

    The mask has the weight's shape (one entry per weight) or a broadcastable shape such as
    ``(C_out, 1, 1, 1)`` (one entry per output channel). It is a buffer in the weight's dtype, so
    ``model.to(...)`` moves it and ``state_dict`` saves it; methods update it in place under ``no_grad``.

    **Hard masks** (``hard=True``, values 0 and 1 only: magnitude, GMP, rewiring) do not build
    ``original * mask``. The original is kept zero wherever the mask is, and the forward returns it as is
    (a view), through an autograd function that multiplies the gradient by the mask in place. Values and
    gradients are exactly those of ``original * mask``. What keeps the original clean:

    - the forward zeroes the pruned entries in place whenever the original or the mask has changed since it
      was last known clean (tensor version counters tell; one in-place pass);
    - after a step of a :data:`ZERO_PRESERVING` optimizer (SGD, Adam, AdamW, ...) the original is still
      clean when it was clean before the step, its gradient came only through this function, and the
      optimizer's per-weight state is zero at the pruned entries (zeroed once, in place, whenever the mask
      changes). The forward then needs no pass at all. Any other writer (another optimizer, gradient
      clipping or scaling, ``load_state_dict``) just costs the in-place pass at the next forward.

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
        self.hard = hard
        self.register_buffer("mask", torch.ones(mask_shape, dtype=like.dtype, device=like.device))
        self._clean: tuple[Key, Key] | None = None  # (original, mask) keys at which the original was clean
        self._grad_clean: Key | None = None  # key of original.grad when it held only masked gradients
        self._grad_pending = False
        self._stays_clean = False
        self._original: weakref.ref | None = None

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, original: Tensor) -> Tensor:
        if not self.hard:
            return original * self.mask
        if self._original is None or self._original() is not original:
            self._track(original)
        if (version_key(original), version_key(self.mask)) != self._clean:
            self.project(original)
        return _MaskGrad.apply(original, self.mask, self)

    def project(self, original: Tensor) -> None:
        """Zero ``original`` in place wherever the mask is zero (hard masks)."""
        with torch.no_grad():
            original.mul_(self.mask)
        self._clean = (version_key(original), version_key(self.mask))

    def bake(self, original: Tensor) -> Tensor:
        with torch.no_grad():
            return (original * self.mask).detach().clone()  # does not touch the live original

    # -- bookkeeping for the fast path ------------------------------------------------------------------------
    def _track(self, original: Tensor) -> None:
        _install_hooks()
        self._original = weakref.ref(original)
        self._clean = self._grad_clean = None
        me = weakref.ref(self)
        _TRACKED[id(original)] = (self._original, me)
        weakref.finalize(original, _TRACKED.pop, id(original), None)
        if original.requires_grad and original.is_leaf:

            def after_accumulate(p: Tensor) -> None:
                owner = me()
                if owner is not None and owner._original is not None and owner._original() is p:
                    owner._grad_clean = version_key(p.grad) if owner._grad_pending and p.grad is not None else None

            original.register_post_accumulate_grad_hook(after_accumulate)

    def _before_accumulate(self) -> None:
        """Called in backward, before autograd adds the masked gradient to ``original.grad``."""
        p = self._original() if self._original is not None else None
        self._grad_pending = p is not None and (p.grad is None or version_key(p.grad) == self._grad_clean)

    def _ready_for_step(self, opt: Optimizer, p: Tensor) -> bool:
        """Whether a zero-preserving step leaves ``p`` clean; zeroes the optimizer state at pruned entries
        once per mask change."""
        done = _STATE_MASKED.setdefault(opt, {})
        clean = (version_key(p), version_key(self.mask)) == self._clean
        if not clean or (p.grad is not None and version_key(p.grad) != self._grad_clean):
            # this step may write non-zeros into the state at pruned entries (an unmasked gradient, or weight
            # decay of a non-zero pruned entry): zero the state again before the next clean step
            done.pop(id(p), None)
            return False
        state = opt.state.get(p, {})
        tensors = [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
        # redone when the mask changed or the state tensors were replaced (optimizer.load_state_dict)
        record = (version_key(self.mask), tuple(v.data_ptr() for v in tensors))
        if done.get(id(p)) != record:
            if any(v.shape != p.shape for v in tensors):
                return False  # per-weight state of a layout we do not know
            with torch.no_grad():
                for v in tensors:
                    v.mul_(self.mask)
            done[id(p)] = (version_key(self.mask), tuple(v.data_ptr() for v in tensors))
        return True

    def __getstate__(self) -> dict[str, Any]:
        # copies (deepcopy, pickle) start untracked: the bookkeeping refers to this instance's tensors
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state.update(_clean=None, _grad_clean=None, _grad_pending=False, _stays_clean=False, _original=None)
        return state

    def extra_repr(self) -> str:
        return f"mask_shape={tuple(self.mask.shape)}, hard={self.hard}"

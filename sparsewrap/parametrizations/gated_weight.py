"""The *gated* parametrization with one hard-concrete gate per weight (:class:`GatedWeight`).

Per-weight gates use one autograd function (``GatedMul``) whose expected L0 count is a second output, so its
gradient joins the gate gradient in one buffer; the backward needs only the weight, the sample and
``log_alpha`` (``dz/dlog_alpha = (z - gamma)(zeta - z) / ((zeta - gamma) beta)`` inside the clamp). Float32 CPU
tensors of ``NATIVE_MIN_NUMEL`` weights or more run on the C kernels of :mod:`sparsewrap.native` (one pass per
direction, counter-based noise, reused output buffers); the rest run eager in-place kernels (noise from NumPy's
PCG64 on the CPU, seeded from torch's generator). Both are tested against the reference math
of :mod:`.hard_concrete`.
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor, nn

from .. import native, switches, torch_compat
from .base import SparseParametrization, version_key
from .hard_concrete import (
    BETA,
    GAMMA,
    STRETCH,
    ZETA,
    eval_gates,
    expected_count,
    hard_concrete_,
    init_log_alpha,
    through_gate,
    uniform_noise,
    wide,
)
from .projection import EvalProjection


# -- the fused per-weight path --------------------------------------------------------------------------------
def gate_shift(beta: float) -> float:
    return -beta * math.log(-GAMMA / ZETA)  # P(z != 0) = sigmoid(log_alpha + shift)


class GatedMul(torch.autograd.Function):
    """``(w * z, sum P(z != 0))`` with ``z`` a fresh hard-concrete sample, differentiated by hand.

    The noise buffer becomes ``z`` in place; the backward needs only ``w``, ``z`` and ``P(z != 0)``. The expected
    count is a second output so that its gradient joins the gate gradient in the same buffer. It is the
    unclamped ``sum(sigmoid(log_alpha + shift))``, equal to :func:`prob_nonzero`'s sum while ``|log_alpha| <= 12``
    (where the ``eps`` clamp cannot bind); the L0 method keeps ``log_alpha`` in that range.
    """

    @staticmethod
    def forward(ctx, w: Tensor, log_alpha: Tensor, beta: float,  # type: ignore[override]
                scratch: Scratch | None = None, bound: float = 0.0) -> tuple[Tensor, Tensor]:  # fmt: skip
        # bound > 0: first project log_alpha onto [-bound, bound] in place (GatedWeight's lazy clamp)
        ctx.beta = beta
        ctx.set_materialize_grads(False)
        lib = _native_for(w, log_alpha)
        ctx.keys = None
        if lib is not None:
            out, z, count, ctx.keys = _native_forward(lib, w, log_alpha, beta, scratch, bound)
            ctx.scratch = scratch
            if bound > 0:
                torch.autograd.graph.increment_version(log_alpha)  # the kernel wrote it through a pointer
            ctx.save_for_backward(w, z, log_alpha)
            return out, count
        if bound > 0:
            log_alpha.clamp_(-bound, bound)  # grad mode is off inside forward
        la = wide(log_alpha)  # the sample and the statistics in float32 at least (see wide)
        z = hard_concrete_(uniform_noise(la), la, beta)
        p = torch.add(la, gate_shift(beta)).sigmoid_()
        count = p.sum()
        ctx.save_for_backward(w, z, p)
        ctx.la_dtype = log_alpha.dtype
        return w * (z if z.dtype == w.dtype else z.to(w.dtype)), count

    @staticmethod
    def backward(ctx, grad: Tensor | None, grad_count: Tensor | None) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        if ctx.keys is not None:
            w, z, log_alpha = ctx.saved_tensors
            grads = _native_backward(grad, grad_count, w, z, log_alpha, ctx.beta, ctx.needs_input_grad, ctx.scratch)
            return (*grads, None, None, None)
        w, z, p = ctx.saved_tensors
        grad_la, scratch = None, None
        if ctx.needs_input_grad[1] and grad is not None:
            # dz/dlog_alpha = (z - gamma)(zeta - z) / ((zeta - gamma) beta) inside the clamp
            scale = torch.zeros((), dtype=z.dtype, device=grad.device)
            g, wz = (grad, w) if grad.dtype == z.dtype else (grad.to(z.dtype), w.to(z.dtype))
            scratch = torch.addcmul(scale, g, wz, value=1.0 / (STRETCH * ctx.beta))
            grad_la = through_gate(scratch, z)
        if ctx.needs_input_grad[1] and grad_count is not None:
            g = grad_count.to(p.dtype)
            if scratch is None:
                grad_la = torch.ops.aten.sigmoid_backward(g, p)  # g p (1 - p)
            else:
                grad_la.add_(torch.ops.aten.sigmoid_backward.grad_input(g, p, grad_input=scratch))
        if grad_la is not None and grad_la.dtype != ctx.la_dtype:
            grad_la = grad_la.to(ctx.la_dtype)
        grad_w = None
        if ctx.needs_input_grad[0] and grad is not None:
            grad_w = grad * (z if z.dtype == grad.dtype else z.to(grad.dtype))
        return grad_w, grad_la, None, None, None


# -- native kernels (sparsewrap/native/hardconcrete.c): the same math in one pass per direction -----------------
NATIVE_MIN_NUMEL = 1 << 15  # below this the eager kernels are as fast


def _native_for(w: Tensor, log_alpha: Tensor):
    """The native library when it applies to these tensors (float32, CPU, contiguous, large enough), else None."""
    return native.kernels_for(log_alpha, w, min_numel=NATIVE_MIN_NUMEL)


def native_keys() -> tuple[int, int]:
    """The two 32-bit keys of one native sample, drawn from torch's default generator (so seeded and resumable)."""
    k = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    return int(k[0]), int(k[1])


def _three_halves(beta: float) -> int:
    return int(abs(beta - 2.0 / 3.0) < 1e-12)  # the kernels use q sqrt(q) for q^(1/beta)


class _Buffer:
    """A buffer handed out again only when no tensor but this one refers to its memory.

    Each step of a per-weight gate writes three full-size tensors (the sample, kept for backward, the gated
    weight, and in backward the gate gradient); fresh ones every step cost as much in page faults as the kernel
    that fills them. The buffer is lent out as a view; it is reused when its storage has no other user (the
    graph that saved it has run its backward or was dropped, no one kept the gated weight, ``zero_grad``
    dropped the gradient), and a new one is taken while anything still refers to it (gradient accumulation
    over several forwards, ``retain_graph=True``, ``parametrize.cached``).
    Reuse also bumps the version counter, so autograd would refuse a stale saved copy rather than use it.
    Where torch does not give the storage's use count (:func:`sparsewrap.torch_compat.storage_use_count`), every
    call takes a new buffer.
    """

    __slots__ = ("buf", "storage")

    def __init__(self) -> None:
        self.buf: Tensor | None = None
        self.storage = None

    def __deepcopy__(self, memo: dict) -> _Buffer:
        return _Buffer()

    def take(self, like: Tensor) -> Tensor:
        buf = self.buf
        if (
            buf is None
            or buf.shape != like.shape
            or buf.dtype != like.dtype
            or buf.device != like.device
            or torch_compat.storage_use_count(self.storage) != 2  # this buffer and its storage object: nothing else
        ):
            buf = torch.empty_like(like, memory_format=torch.contiguous_format)
            if torch_compat.storage_use_count(buf.untyped_storage()) is None:
                return buf
            self.buf, self.storage = buf, buf.untyped_storage()
        else:
            torch.autograd.graph.increment_version(buf)
        return buf.view_as(buf)


class Scratch:
    """The reusable buffers of one gated tensor: the sample, the gated weight and the gate gradient."""

    __slots__ = ("sample", "out", "grad")

    def __init__(self) -> None:
        self.sample, self.out, self.grad = _Buffer(), _Buffer(), _Buffer()

    def __deepcopy__(self, memo: dict) -> Scratch:
        return Scratch()


def _native_forward(lib, w: Tensor, log_alpha: Tensor, beta: float, scratch: Scratch | None,
                    bound: float = 0.0) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:  # fmt: skip
    if scratch is not None:
        out, z = scratch.out.take(w), scratch.sample.take(log_alpha)
    else:
        out, z = torch.empty_like(w), torch.empty_like(log_alpha)
    keys = native_keys()
    ptrs = (native.ptr(w), native.ptr(log_alpha), native.ptr(out), native.ptr(z))
    args = (*keys, 1.0 / beta, gate_shift(beta), _three_halves(beta), float(bound))

    total = ctypes.c_double(0.0)
    lib.sw_hc_forward(*ptrs, 0, log_alpha.numel(), *args, ctypes.byref(total))
    return out, z, torch.tensor(total.value, dtype=log_alpha.dtype), keys


def _native_backward(grad: Tensor | None, grad_count: Tensor | None, w: Tensor, z: Tensor, log_alpha: Tensor,
                     beta: float, needs: tuple[bool, ...],
                     scratch: Scratch | None = None) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    g = grad.contiguous() if grad is not None else None
    grad_w = None
    if g is not None and needs[0]:
        # the gated weight's gradient is a fresh tensor owned by autograd: the weight gradient overwrites it
        grad_w = g if (g is grad and torch_compat.owns_memory(grad)) else torch.empty_like(g)
    if not needs[1]:
        return (torch.mul(g, z, out=grad_w) if grad_w is not None else None), None
    # the gate gradient goes to log_alpha.grad (stolen by autograd when that is None): its buffer comes back
    # for reuse once the optimizer's zero_grad(set_to_none=True) has dropped it
    grad_la = scratch.grad.take(log_alpha) if scratch is not None else torch.empty_like(log_alpha)
    gcount = float(grad_count) if grad_count is not None else 0.0
    ptrs = tuple(native.ptr(t) for t in (g, w, z, log_alpha, grad_w, grad_la))
    args = (1.0 / beta, gate_shift(beta), gcount)
    lib = native.kernels()
    lib.sw_hc_backward(*ptrs, 0, log_alpha.numel(), *args)
    return grad_w, grad_la


def native_sample(log_alpha: Tensor, beta: float, keys: tuple[int, int]) -> Tensor:
    """The gate sample the native kernels use for ``keys`` (float32 CPU ``log_alpha``; tests and fallbacks)."""
    lib = native.kernels()
    la = log_alpha.detach().contiguous()
    z = torch.empty_like(la)
    args = (*keys, 1.0 / beta, _three_halves(beta))
    lib.sw_hc_sample(native.ptr(la), native.ptr(z), 0, la.numel(), *args)
    return z


def native_uniform(n: int, keys: tuple[int, int]) -> Tensor:
    """The ``n`` uniforms in ``(eps, 1 - eps)`` behind :func:`native_sample` for ``keys`` (for tests)."""
    u = torch.empty(n)
    native.kernels().sw_hc_uniform(native.ptr(u), 0, n, *keys)
    return u


def gated_mul(w: Tensor, log_alpha: Tensor, beta: float = BETA) -> Tensor:
    """``w * z`` with a fresh hard-concrete sample ``z`` per entry of ``log_alpha`` (same shape as ``w``)."""
    return GatedMul.apply(w, log_alpha, beta)[0]


class PerForward:
    """A tensor tied to one forward (a sample, an expected count), never deep-copied or saved."""

    __slots__ = ("value", "seen", "version")

    def __init__(self) -> None:
        self.value: Tensor | None = None
        self.seen: set[int] = set()
        self.version: object = -1  # what the owner compares to tell that its tensor changed

    def __deepcopy__(self, memo: dict) -> PerForward:
        return PerForward()


def _clamp_before_saving(module: GatedWeight, prefix: str, keep_vars: bool) -> None:
    module.ensure_clamped()


class GatedWeight(SparseParametrization):
    """One hard-concrete gate per weight: ``w * z`` (a sample in train mode, the median gate in eval mode).

    A training forward also computes the expected number of open gates; :meth:`expected_count` returns it
    (differentiable) until ``log_alpha`` changes, so the penalty costs no second pass over the gates.

    With ``bound``, ``log_alpha`` is kept in ``[-bound, bound]`` (the projection after each optimizer step), lazily:
    whenever it is *used* after a change (its version counter tells), it is clamped in place first: by the
    native forward kernel in the same pass (no separate pass over the gates), otherwise by
    :meth:`ensure_clamped`, which eval, :meth:`expected_count` and ``state_dict`` call. The values every
    forward, gradient and optimizer step see are those of clamping right after the step.

    In eval mode the weight is multiplied by the final gates that ``final`` supplies (the method's projection onto
    its budget, exactly what export multiplies in), or by the median gate when there is none.

    Args:
        like: the weight (gives shape, device and, float32 at least, dtype of ``log_alpha``).
        droprate_init: initial drop rate ``d`` (``log_alpha`` starts at ``log((1 - d) / d)``).
        beta: temperature.
        bound: the clamp of ``log_alpha``, or ``None``.
        final: where the eval-mode gates come from (``None``: the median gates).
    """

    def __init__(self, like: Tensor, droprate_init: float = 0.5, beta: float = BETA,
                 bound: float | None = None, final: EvalProjection | None = None) -> None:  # fmt: skip
        super().__init__()
        self.beta = beta
        self.bound = bound
        self.final = final
        self.log_alpha = nn.Parameter(init_log_alpha(tuple(like.shape), droprate_init, like))
        self._count = PerForward()
        self._scratch = Scratch()
        self._clamped_at: tuple[int, int] | None = None  # (data_ptr, version) of log_alpha when last projected
        self.register_state_dict_pre_hook(_clamp_before_saving)

    def needs_clamp(self) -> bool:
        """Whether ``log_alpha`` may be outside ``[-bound, bound]``: it changed since it was last clamped. Where
        torch has no version counters (:mod:`sparsewrap.torch_compat`) its values tell instead (a read pass), so
        that a clamped ``log_alpha`` is never written in place again (a forward may have saved it)."""
        if self.bound is None:
            return False
        if torch_compat.version(self.log_alpha) is None:
            with torch.no_grad():
                return bool(self.log_alpha.abs().max() > self.bound)
        return version_key(self.log_alpha) != self._clamped_at

    def ensure_clamped(self) -> None:
        """Clamp ``log_alpha`` to ``[-bound, bound]`` in place if it changed since it was last clamped."""
        if self.needs_clamp():
            with torch.no_grad():
                self.log_alpha.clamp_(-self.bound, self.bound)
            self._clamped_at = version_key(self.log_alpha)

    def forward(self, original: Tensor) -> Tensor:
        if not self.training:
            return self._deterministic(original, self.final.factors(self) if self.final is not None else None)
        # no backward: nothing to keep
        scratch = self._scratch if torch.is_grad_enabled() and switches.REUSE_BUFFERS else None
        dirty = self.needs_clamp()
        out, count = GatedMul.apply(original, self.log_alpha, self.beta, scratch, self.bound if dirty else 0.0)
        if dirty:
            self._clamped_at = version_key(self.log_alpha)
        if count.requires_grad:
            self._count.value, self._count.version = count, version_key(self.log_alpha)
        return out

    def _deterministic(self, original: Tensor, z: Tensor | None = None) -> Tensor:
        if z is None:
            self.ensure_clamped()
            z = eval_gates(self.log_alpha, self.beta)
        return original * (z if z.dtype == original.dtype else z.to(original.dtype))

    def bake(self, original: Tensor) -> Tensor:
        """The *learned* deterministic tensor: the weight times its median gates, without the method's projection
        (the report's figures "now", beside the exported ones; export takes the method's own ``bake``)."""
        with torch.no_grad():
            return self._deterministic(original).detach().clone()

    def expected_count(self) -> Tensor:
        """``sum(P(z != 0))`` (differentiable), from this step's forward when it ran with gradients."""
        kept = self._count
        if kept.value is not None and kept.version == version_key(self.log_alpha) and torch.is_grad_enabled():
            value, kept.value = kept.value, None  # used once: a second call recomputes
            return value
        self.ensure_clamped()
        return expected_count(self.log_alpha, self.beta)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_clamped_at"] = None  # a copy has other tensors: it clamps again at first use
        return state

    def extra_repr(self) -> str:
        return f"shape={tuple(self.log_alpha.shape)}, beta={self.beta:.4g}"

"""The *gated* parametrization: stochastic hard-concrete L0 gates (Louizos et al. 2018,
https://arxiv.org/abs/1712.01312), one per weight or one per channel shared by a whole channel group.

Hard concrete with stretch limits ``gamma = -0.1``, ``zeta = 1.1`` and temperature ``beta`` (2/3 by default):

    train:  u ~ U(eps, 1 - eps),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
            z = clamp(s * (zeta - gamma) + gamma, 0, 1)                     (one sample per gate per forward)
    eval:   z = clamp(sigmoid(log_alpha / beta) * (zeta - gamma) + gamma, 0, 1)
    P(z != 0) = 1 - clamp(sigmoid(beta * log(-gamma / zeta) - log_alpha), eps, 1 - eps)

The eval gate divides by ``beta`` as in Gallego-Posada et al. 2022 (the gate is open when
``log_alpha > beta * log(1/11) = -1.5986``); fractional eval gates are kept and folded into the weights. In eval
mode a parametrization given an :class:`~sparsewrap.parametrizations.projection.EvalProjection` multiplies the
method's final gates instead (its exact projection onto the budget: what export writes).

``log_alpha`` is float32 at least (a half-precision weight gets float32 gates), and the samples, ``P(z != 0)`` and
the expected counts are computed in float32 at least whatever its dtype: a float16 sum of a layer's probabilities
overflows.

Per-weight gates use one autograd function (``_GatedMul``) whose expected L0 count is a second output, so its
gradient joins the gate gradient in one buffer; the backward needs only the weight, the sample and
``log_alpha`` (``dz/dlog_alpha = (z - gamma)(zeta - z) / ((zeta - gamma) beta)`` inside the clamp). Float32 CPU
tensors of ``NATIVE_MIN_NUMEL`` weights or more run on the C kernels of :mod:`sparsewrap.native` (one pass per
direction, counter-based noise, reused output buffers); the rest run eager in-place kernels (noise from NumPy's
PCG64 on the CPU, seeded from torch's generator). Both are tested against the reference math below.

Channel gates (:class:`ChannelGate`) are shared by every tensor of a channel group: the producers' weights
(dim 0), their biases and the BatchNorm affine terms after them (the role of the paper's L0BatchNorm), so a
closed channel is exactly zero downstream. All members see the same sample within one forward: the gate takes
a new sample when a member asks for a second time, i.e. when the next forward starts. The gates of one model
share a :class:`GateBank`, which draws the samples of all of them in one go (one autograd node,
:class:`_HardConcrete`), instead of a dozen small operations per gate.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import math
import threading
import weakref

import numpy as np
import torch
from torch import Tensor, nn

from .. import native
from .base import SparseParametrization, version_key
from .projection import EvalProjection

GAMMA, ZETA, EPS = -0.1, 1.1, 1e-6
BETA = 2.0 / 3.0
WIDE = (torch.float32, torch.float64)  # gate statistics are computed in these; half-precision gates are widened
_STRETCH = ZETA - GAMMA
if abs(ZETA + GAMMA - 1.0) > 1e-12:  # the fused backward below relies on it
    raise ImportError("hard-concrete limits must satisfy zeta + gamma = 1")


# -- the reference math (plain autograd; the fused paths are tested against these) ---------------------------
_CHUNK = 1 << 20  # uniforms per independently seeded NumPy stream


def _fill_chunks(flat: np.ndarray, base: int, chunks: range) -> None:
    for i in chunks:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([base, i])))
        rng.random(out=flat[i * _CHUNK : (i + 1) * _CHUNK], dtype=flat.dtype)


def uniform_noise(like: Tensor) -> Tensor:
    """``u = eps + (1 - 2 eps) U(0, 1)``, fresh, with ``like``'s shape, dtype and device.

    On the CPU the uniforms come from NumPy's PCG64, several times faster than torch's Mersenne twister and
    run on ``torch.get_num_threads()`` threads (NumPy releases the GIL): one stream per chunk of 2^20 values,
    all seeded by one draw from torch's default generator, so ``torch.manual_seed`` fixes them whatever the
    thread count. Elsewhere (CUDA) torch's own generator is used.
    """
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    if out.device.type != "cpu" or out.dtype not in (torch.float32, torch.float64) or out.numel() < 4096:
        return out.uniform_(EPS, 1.0 - EPS)
    base = int(torch.randint(0, 2**62, (1,)).item())
    flat = out.numpy().reshape(-1)
    n_chunks = -(-flat.size // _CHUNK)
    workers = max(1, min(torch.get_num_threads(), n_chunks))
    threads = [threading.Thread(target=_fill_chunks, args=(flat, base, range(k, n_chunks, workers)))
               for k in range(1, workers)]  # fmt: skip
    for t in threads:
        t.start()
    _fill_chunks(flat, base, range(0, n_chunks, workers))
    for t in threads:
        t.join()
    return out.mul_(1.0 - 2.0 * EPS).add_(EPS)


def sample_gates(log_alpha: Tensor, beta: float = BETA, u: Tensor | None = None) -> Tensor:
    """A hard-concrete sample ``z`` in [0, 1] (differentiable in ``log_alpha``); ``u`` is drawn if not given."""
    u = uniform_noise(log_alpha) if u is None else u
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / beta)
    return torch.clamp(s * _STRETCH + GAMMA, 0.0, 1.0)


def eval_gates(log_alpha: Tensor, beta: float = BETA) -> Tensor:
    """The deterministic (median) gate used in eval mode and at export."""
    return torch.clamp(torch.sigmoid(log_alpha / beta) * _STRETCH + GAMMA, 0.0, 1.0)


def prob_nonzero(log_alpha: Tensor, beta: float = BETA) -> Tensor:
    """``P(z != 0)``: the expected L0 contribution of each gate (differentiable)."""
    return 1.0 - torch.clamp(torch.sigmoid(beta * math.log(-GAMMA / ZETA) - log_alpha), EPS, 1.0 - EPS)


def open_threshold(beta: float = BETA) -> float:
    """The ``log_alpha`` above which the eval gate is non-zero (and ``P(z != 0) > 1/2``): ``beta * log(1/11)``.

    ``sigmoid(a / beta) (zeta - gamma) + gamma > 0``  iff  ``sigmoid(a / beta) > -gamma / (zeta - gamma) = 1/12``.
    """
    p = -GAMMA / _STRETCH
    return beta * math.log(p / (1.0 - p))


def mean_gates(log_alpha: Tensor, beta: float = BETA, points: int = 256) -> Tensor:
    """``E[z]`` of each gate, by the midpoint rule over ``u`` (the sample is monotone in ``u``)."""
    u = (torch.arange(points, dtype=torch.float64, device=log_alpha.device) + 0.5) / points
    u = EPS + (1.0 - 2.0 * EPS) * u
    la = log_alpha.detach().double().reshape(-1, 1)
    z = sample_gates(la, beta, u.view(1, -1).expand(la.shape[0], -1))
    return z.mean(1).view_as(log_alpha).to(log_alpha.dtype)


class _ExpectedCount(torch.autograd.Function):
    """``sum(P(z != 0))`` without keeping a full-size tensor for the backward (it is recomputed there)."""

    @staticmethod
    def forward(ctx, log_alpha: Tensor, beta: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(log_alpha)
        ctx.beta = beta
        return _clamped_p(wide(log_alpha), beta).sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (log_alpha,) = ctx.saved_tensors
        p = _clamped_p(wide(log_alpha), ctx.beta)
        inside = torch.ops.aten.hardtanh_backward(grad.to(p.dtype).expand_as(p), p, EPS, 1.0 - EPS)
        out = torch.ops.aten.sigmoid_backward.grad_input(inside, p, grad_input=inside)
        return out.to(log_alpha.dtype), None


def wide(t: Tensor) -> Tensor:
    """``t`` itself when float32/float64, else ``t`` in float32: a float16 sum of gate probabilities overflows at
    65504 (a layer of 131 K gates at P = 1/2) and bfloat16's 8-bit mantissa rounds it, so statistics are taken in
    float32 whatever the gates' dtype."""
    return t if t.dtype in WIDE else t.float()


def _clamped_p(log_alpha: Tensor, beta: float) -> Tensor:
    # 1 - clamp(sigmoid(c - a), eps, 1 - eps) == clamp(sigmoid(a - c), eps, 1 - eps) with c = beta log(-gamma/zeta)
    return torch.sub(log_alpha, beta * math.log(-GAMMA / ZETA)).sigmoid_().clamp_(EPS, 1.0 - EPS)


def expected_count(log_alpha: Tensor, beta: float = BETA) -> Tensor:
    """``sum(prob_nonzero(log_alpha))``, the expected number of open gates, with a lean backward (float32 at
    least: see :func:`wide`)."""
    return _ExpectedCount.apply(log_alpha, beta)


def _hard_concrete_(u: Tensor, log_alpha: Tensor, beta: float) -> Tensor:
    """The uniforms ``u`` turned into the hard-concrete sample of ``log_alpha``, in place (no autograd)."""
    u.logit_().add_(log_alpha).div_(beta).sigmoid_()  # logistic noise log u - log(1 - u), then the sigmoid
    return u.mul_(_STRETCH).add_(GAMMA).clamp_(0.0, 1.0)


def _through_gate(g: Tensor, z: Tensor) -> Tensor:
    """The gradient that reaches ``log_alpha`` through the sample ``z``, for ``g`` already divided by
    ``(zeta - gamma) beta``: ``g (z - gamma)(zeta - z)`` inside the clamp, 0 where it is active (with
    ``zeta + gamma = 1``, ``(z - gamma)(zeta - z) = z (1 - z) - gamma zeta``: fused kernels, in place)."""
    out = torch.ops.aten.sigmoid_backward(g, z)  # g z (1 - z)
    out.add_(g, alpha=-GAMMA * ZETA)
    return torch.ops.aten.hardtanh_backward.grad_input(out, z, 0.0, 1.0, grad_input=out)


class _HardConcrete(torch.autograd.Function):
    """:func:`sample_gates` (same noise stream, in-place kernels) as one autograd node: the channel gates' sample.
    The backward needs only the sample (:func:`_through_gate`)."""

    @staticmethod
    def forward(ctx, log_alpha: Tensor, beta: float) -> Tensor:  # type: ignore[override]
        z = _hard_concrete_(uniform_noise(log_alpha), log_alpha, beta)
        ctx.save_for_backward(z)
        ctx.beta = beta
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return _through_gate(grad * (1.0 / (_STRETCH * ctx.beta)), z), None


def sample_gates_fused(log_alpha: Tensor, beta: float = BETA) -> Tensor:
    """:func:`sample_gates` in one autograd node (the same values up to rounding, the same noise)."""
    return _HardConcrete.apply(log_alpha, beta)


def init_log_alpha(shape: tuple[int, ...], droprate_init: float, like: Tensor) -> Tensor:
    """``log_alpha ~ N(log((1 - d) / d), 0.01^2)`` as in the papers' code, on ``like``'s device, in its dtype if that
    is float32 or float64, else in float32 (the gates of a half-precision model stay float32, as a master copy
    would: their optimizer moments and the expected-density statistics need the range)."""
    mean = math.log((1.0 - droprate_init) / droprate_init)
    dtype = like.dtype if like.dtype in WIDE else torch.float32
    return torch.empty(shape, dtype=dtype, device=like.device).normal_(mean, 1e-2)


# -- the fused per-weight path --------------------------------------------------------------------------------
def _shift(beta: float) -> float:
    return -beta * math.log(-GAMMA / ZETA)  # P(z != 0) = sigmoid(log_alpha + shift)


class _GatedMul(torch.autograd.Function):
    """``(w * z, sum P(z != 0))`` with ``z`` a fresh hard-concrete sample, differentiated by hand.

    The noise buffer becomes ``z`` in place; the backward needs only ``w``, ``z`` and ``P(z != 0)``. The expected
    count is a second output so that its gradient joins the gate gradient in the same buffer. It is the
    unclamped ``sum(sigmoid(log_alpha + shift))``, equal to :func:`prob_nonzero`'s sum while ``|log_alpha| <= 12``
    (where the ``eps`` clamp cannot bind); the L0 method keeps ``log_alpha`` in that range.
    """

    @staticmethod
    def forward(ctx, w: Tensor, log_alpha: Tensor, beta: float,  # type: ignore[override]
                scratch: _Scratch | None = None, bound: float = 0.0) -> tuple[Tensor, Tensor]:  # fmt: skip
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
        z = _hard_concrete_(uniform_noise(la), la, beta)
        p = torch.add(la, _shift(beta)).sigmoid_()
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
            scratch = torch.addcmul(scale, g, wz, value=1.0 / (_STRETCH * ctx.beta))
            grad_la = _through_gate(scratch, z)
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
    if (
        w.device.type != "cpu"
        or w.dtype != torch.float32
        or log_alpha.dtype != torch.float32
        or log_alpha.numel() < NATIVE_MIN_NUMEL
        or w.shape != log_alpha.shape
        or not (w.is_contiguous() and log_alpha.is_contiguous())
    ):
        return None
    return native.kernels()


def native_keys() -> tuple[int, int]:
    """The two 32-bit keys of one native sample, drawn from torch's default generator (so seeded and resumable)."""
    k = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    return int(k[0]), int(k[1])


def _three_halves(beta: float) -> int:
    return int(abs(beta - 2.0 / 3.0) < 1e-12)  # the kernels use q sqrt(q) for q^(1/beta)


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)  # absent: buffers are not reused


class _Buffer:
    """A buffer handed out again only when no tensor but this one refers to its memory.

    Each step of a per-weight gate writes three full-size tensors (the sample, kept for backward, the gated
    weight, and in backward the gate gradient); fresh ones every step cost as much in page faults as the kernel
    that fills them. The buffer is lent out as a view; it is reused when its storage has no other user (the
    graph that saved it has run its backward or was dropped, no one kept the gated weight, ``zero_grad``
    dropped the gradient), and a new one is taken while anything still refers to it (gradient accumulation
    over several forwards, ``retain_graph=True``, ``parametrize.cached``).
    Reuse also bumps the version counter, so autograd would refuse a stale saved copy rather than use it.
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
            or _storage_use_count(self.storage._cdata) != 2  # this buffer and its storage object: nothing else
        ):
            buf = torch.empty_like(like, memory_format=torch.contiguous_format)
            if _storage_use_count is None:
                return buf
            self.buf, self.storage = buf, buf.untyped_storage()
        else:
            torch.autograd.graph.increment_version(buf)
        return buf.view_as(buf)


class _Scratch:
    """The reusable buffers of one gated tensor: the sample, the gated weight and the gate gradient."""

    __slots__ = ("sample", "out", "grad")

    def __init__(self) -> None:
        self.sample, self.out, self.grad = _Buffer(), _Buffer(), _Buffer()

    def __deepcopy__(self, memo: dict) -> _Scratch:
        return _Scratch()


def _native_forward(lib, w: Tensor, log_alpha: Tensor, beta: float, scratch: _Scratch | None,
                    bound: float = 0.0) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:  # fmt: skip
    if scratch is not None:
        out, z = scratch.out.take(w), scratch.sample.take(log_alpha)
    else:
        out, z = torch.empty_like(w), torch.empty_like(log_alpha)
    keys = native_keys()
    ptrs = (native.ptr(w), native.ptr(log_alpha), native.ptr(out), native.ptr(z))
    args = (*keys, 1.0 / beta, _shift(beta), _three_halves(beta), float(bound))

    total = ctypes.c_double(0.0)
    lib.sw_hc_forward(*ptrs, 0, log_alpha.numel(), *args, ctypes.byref(total))
    return out, z, torch.tensor(total.value, dtype=log_alpha.dtype), keys


def _native_backward(grad: Tensor | None, grad_count: Tensor | None, w: Tensor, z: Tensor, log_alpha: Tensor,
                     beta: float, needs: tuple[bool, ...],
                     scratch: _Scratch | None = None) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    g = grad.contiguous() if grad is not None else None
    grad_w = None
    if g is not None and needs[0]:
        # the gated weight's gradient is a fresh tensor owned by autograd: the weight gradient overwrites it
        grad_w = g if (g is grad and grad._base is None) else torch.empty_like(g)
    if not needs[1]:
        return (torch.mul(g, z, out=grad_w) if grad_w is not None else None), None
    # the gate gradient goes to log_alpha.grad (stolen by autograd when that is None): its buffer comes back
    # for reuse once the optimizer's zero_grad(set_to_none=True) has dropped it
    grad_la = scratch.grad.take(log_alpha) if scratch is not None else torch.empty_like(log_alpha)
    gcount = float(grad_count) if grad_count is not None else 0.0
    ptrs = tuple(native.ptr(t) for t in (g, w, z, log_alpha, grad_w, grad_la))
    args = (1.0 / beta, _shift(beta), gcount)
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
    return _GatedMul.apply(w, log_alpha, beta)[0]


class _Kept:
    """A tensor tied to one forward (a sample, an expected count), never deep-copied or saved."""

    __slots__ = ("value", "seen", "version")

    def __init__(self) -> None:
        self.value: Tensor | None = None
        self.seen: set[int] = set()
        self.version = -1

    def __deepcopy__(self, memo: dict) -> _Kept:
        return _Kept()


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
        self._count = _Kept()
        self._scratch = _Scratch()
        self._clamped_at: tuple[int, int] | None = None  # (data_ptr, version) of log_alpha when last projected
        self.register_state_dict_pre_hook(_clamp_before_saving)

    def ensure_clamped(self) -> None:
        """Clamp ``log_alpha`` to ``[-bound, bound]`` in place if it changed since it was last clamped."""
        if self.bound is not None and version_key(self.log_alpha) != self._clamped_at:
            with torch.no_grad():
                self.log_alpha.clamp_(-self.bound, self.bound)
            self._clamped_at = version_key(self.log_alpha)

    def forward(self, original: Tensor) -> Tensor:
        if not self.training:
            return self._deterministic(original, self.final.factors(self) if self.final is not None else None)
        scratch = self._scratch if torch.is_grad_enabled() else None  # no backward: nothing to keep
        dirty = self.bound is not None and version_key(self.log_alpha) != self._clamped_at
        out, count = _GatedMul.apply(original, self.log_alpha, self.beta, scratch, self.bound if dirty else 0.0)
        if dirty:
            self._clamped_at = version_key(self.log_alpha)
        if count.requires_grad:
            self._count.value, self._count.version = count, self.log_alpha._version
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
        if kept.value is not None and kept.version == self.log_alpha._version and torch.is_grad_enabled():
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


# -- channel gates shared by a group ------------------------------------------------------------------------------
class GateBank:
    """Draws the samples of many channel gates at once: one ``log_alpha`` vector, one sample, one split.

    Per gate, a sample costs about ten small operations forward and as many autograd nodes backward, run between
    the layers with cold caches: on ResNet-18 (a dozen gates) that was several milliseconds per step. A bank draws
    for all of its gates together the first time one of them needs a fresh sample, and each gate takes its own
    piece of that draw once. A gate whose piece is gone (it used it in the previous forward), whose ``log_alpha``
    changed since the draw, or whose piece lacks the gradient it needs, triggers the next draw. A draw's pieces
    also expire once its backward has run, so a gate left out of one forward never gets a sample whose graph is
    already freed. Each gate still sees a fresh, independent sample for every forward of its own.
    """

    def __init__(self) -> None:
        self.gates: list[ChannelGate] = []
        self.pieces: dict[ChannelGate, Tensor] = {}
        self.versions: dict[ChannelGate, int] = {}
        self.draws = 0

    def __deepcopy__(self, memo: dict) -> GateBank:
        new = GateBank()
        memo[id(self)] = new
        new.gates = [copy.deepcopy(g, memo) for g in self.gates]  # a copy's gates, without this bank's samples
        return new

    def __getstate__(self) -> dict:
        return {"gates": self.gates, "pieces": {}, "versions": {}, "draws": 0}

    def add(self, gate: ChannelGate) -> None:
        if self.gates and gate.beta != self.gates[0].beta:
            raise ValueError(f"a gate bank samples at one temperature: {gate.beta} != {self.gates[0].beta}")
        self.gates.append(gate)

    def take(self, gate: ChannelGate) -> Tensor:
        """A fresh sample of ``gate`` (its piece of the current draw, or of a new one)."""
        piece = self.pieces.pop(gate, None)
        if (
            piece is None
            or self.versions[gate] != gate.log_alpha._version
            or (torch.is_grad_enabled() and gate.log_alpha.requires_grad and not piece.requires_grad)
        ):
            self.draw()
            piece = self.pieces.pop(gate)
        return piece

    def draw(self) -> None:
        las = [g.log_alpha for g in self.gates]
        z = sample_gates_fused(torch.cat(las) if len(las) > 1 else las[0], self.gates[0].beta)
        self.draws += 1
        self.pieces = dict(zip(self.gates, torch.split(z, [la.numel() for la in las])))
        self.versions = {g: g.log_alpha._version for g in self.gates}
        if z.grad_fn is not None:
            z.grad_fn.register_hook(functools.partial(_expire, weakref.ref(self), self.draws))


def _expire(bank_ref: weakref.ref, draw: int, *_grads: object) -> None:
    bank = bank_ref()
    if bank is not None and bank.draws == draw:  # this draw's graph has run backward: its pieces are spent
        bank.pieces = {}


class ChannelGate(nn.Module):
    """One hard-concrete gate per channel of a channel group, shared by every tensor of the group.

    Args:
        size: number of channels.
        like: a tensor giving dtype and device.
        droprate_init: initial drop rate.
        beta: temperature.
        bank: the :class:`GateBank` that draws this gate's samples together with other gates' (``None``: alone).
    """

    def __init__(self, size: int, like: Tensor, droprate_init: float = 0.5, beta: float = BETA,
                 bank: GateBank | None = None) -> None:  # fmt: skip
        super().__init__()
        self.beta = beta
        self.log_alpha = nn.Parameter(init_log_alpha((size,), droprate_init, like))
        self._sample = _Kept()
        self._members = 0
        self._bank = bank
        if bank is not None:
            bank.add(self)

    def new_member(self) -> int:
        """An id for a tensor gated by this gate (used to detect the start of the next forward)."""
        self._members += 1
        return self._members

    def gates(self, member: int, stochastic: bool) -> Tensor:
        """The gate vector for ``member``: the shared sample of this forward, or the eval gate."""
        if not stochastic:
            return eval_gates(self.log_alpha, self.beta)
        s = self._sample
        stale = (
            s.value is None
            or member in s.seen
            or s.version != self.log_alpha._version
            or (torch.is_grad_enabled() and self.log_alpha.requires_grad and not s.value.requires_grad)
        )
        if stale:
            value = self._bank.take(self) if self._bank is not None else sample_gates_fused(self.log_alpha, self.beta)
            s.value, s.seen, s.version = value, set(), self.log_alpha._version
        s.seen.add(member)
        return s.value

    def extra_repr(self) -> str:
        return f"channels={self.log_alpha.numel()}, beta={self.beta:.4g}"


def _along(v: Tensor, dim: int, ndim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.view(shape)


InSeg = tuple["ChannelGate | None", int, int, int]  # (gate or None for ungated inputs, lo, hi, columns each)


class ChannelGated(SparseParametrization):
    """Multiply a tensor by its channel gate along dim 0, and (eval only) zero input slices of closed channels.

    ``out_gate`` gates dim 0 (a producer's output channels, a bias, a norm's affine terms; a tensor with one
    entry per channel in any broadcastable shape is gated entry-wise). ``in_segs`` describe the input dimension
    (dim 1) of a layer that reads gated channels: consecutive segments ``(gate, lo, hi, rep)``, channels
    ``lo..hi-1`` of ``gate`` each spanning ``rep`` columns (``rep > 1`` after a flatten), ``gate=None`` for
    inputs that are not gated. Those inputs are already exactly zero when their gate is closed, so the input
    mask only matters for counting and export; it is applied in eval mode only, as a 0/1 mask.

    With ``mask_only`` dim 0 is multiplied by the 0/1 eval keep-mask only (identity in train mode): for a layer
    followed by a BatchNorm that carries the gate, whose normalization would cancel any scale anyway.

    In eval mode, when ``final`` supplies them, the gate values and the input mask are the method's final ones
    (its projection onto the budget, exactly what export applies) instead of the eval gates.

    Args:
        out_gate: gate of dim 0, or ``None``.
        in_segs: layout of the input dimension (empty: no input mask).
        owner: whether this parametrization holds ``out_gate`` in its ``state_dict`` (exactly one per gate).
        mask_only: scale dim 0 by the keep-mask (eval) instead of the gate.
        final: where the eval-mode ``(gate values, input mask)`` come from (``None``: the eval gates).
    """

    def __init__(self, out_gate: ChannelGate | None, in_segs: tuple[InSeg, ...] = (), owner: bool = False,
                 mask_only: bool = False, final: EvalProjection | None = None) -> None:  # fmt: skip
        super().__init__()
        self.final = final
        if owner and out_gate is not None:
            self.gate = out_gate
        self._gates = (out_gate, tuple(in_segs))  # a tuple: not registered, so a shared gate is saved once
        self.mask_only = bool(mask_only)
        self.member = out_gate.new_member() if out_gate is not None and not mask_only else 0

    @property
    def out_gate(self) -> ChannelGate | None:
        return self._gates[0]

    @property
    def in_segs(self) -> tuple[InSeg, ...]:
        return self._gates[1]

    def forward(self, original: Tensor) -> Tensor:
        if not self.training and self.final is not None:
            factors = self.final.factors(self)
            if factors is not None:
                return self.apply_gates(original, *factors)
        return self._gated(original, self.training)

    def _gated(self, original: Tensor, training: bool) -> Tensor:
        out_gate, in_segs = self._gates
        z = None
        if out_gate is not None and not self.mask_only:
            z = out_gate.gates(self.member, training)
        elif out_gate is not None and not training:
            z = out_gate.gates(0, False) > 0
        keep = None
        if in_segs and not training:
            keep = self.input_keep({g: g.gates(0, False) > 0 for g, *_ in in_segs if g is not None})
        return self.apply_gates(original, z, keep)

    def bake(self, original: Tensor) -> Tensor:
        """The *learned* deterministic tensor: the eval gates, without the method's projection (the report's
        figures "now", beside the exported ones; export takes the method's own ``bake``)."""
        with torch.no_grad():
            return self._gated(original, False).detach().clone()

    def input_keep(self, keeps: dict[ChannelGate, Tensor]) -> Tensor:
        """The 0/1 mask of dim 1 given a keep vector per gate."""
        parts = []
        for gate, lo, hi, rep in self.in_segs:
            k = keeps[gate][lo:hi] if gate is not None else torch.ones(hi - lo, dtype=torch.bool)
            parts.append(k.repeat_interleave(rep) if rep > 1 else k)
        device = next((k.device for k in keeps.values()), None)
        return torch.cat([p.to(device) for p in parts])

    @staticmethod
    def apply_gates(x: Tensor, z: Tensor | None, keep_in: Tensor | None) -> Tensor:
        """``x`` scaled by gate values ``z`` along dim 0 and by the 0/1 input mask ``keep_in`` along dim 1."""
        if z is not None:
            z = z if z.dtype == x.dtype else z.to(x.dtype)
            if x.shape == z.shape:  # a bias or norm term (the common case): no reshaping
                x = x * z
            else:
                per_channel_param = x.shape[0] != z.numel() and x.numel() == z.numel()  # e.g. a (1, C, 1, 1) scale
                x = x * (z.view(x.shape) if per_channel_param else _along(z, 0, x.dim()))
        if keep_in is not None and x.dim() >= 2:
            x = x * _along(keep_in.to(x.dtype), 1, x.dim())
        return x

    def extra_repr(self) -> str:
        parts = []
        if self.out_gate is not None:
            parts.append(f"out={self.out_gate.log_alpha.numel()}")
        if self.in_segs:
            parts.append(f"in={sum((hi - lo) * rep for _g, lo, hi, rep in self.in_segs)}")
        return ", ".join(parts)

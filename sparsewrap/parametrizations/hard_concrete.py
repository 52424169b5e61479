"""The hard-concrete distribution of L0 gates (Louizos et al. 2018, https://arxiv.org/abs/1712.01312): the
reference math, in plain autograd, that the gated parametrizations (:mod:`.gated_weight`, :mod:`.gated`) use
and against which their fused paths are tested.

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
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from torch import Tensor

GAMMA, ZETA, EPS = -0.1, 1.1, 1e-6
BETA = 2.0 / 3.0
WIDE = (torch.float32, torch.float64)  # gate statistics are computed in these; half-precision gates are widened
STRETCH = ZETA - GAMMA
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
    return torch.clamp(s * STRETCH + GAMMA, 0.0, 1.0)


def eval_gates(log_alpha: Tensor, beta: float = BETA) -> Tensor:
    """The deterministic (median) gate used in eval mode and at export."""
    return torch.clamp(torch.sigmoid(log_alpha / beta) * STRETCH + GAMMA, 0.0, 1.0)


def prob_nonzero(log_alpha: Tensor, beta: float = BETA) -> Tensor:
    """``P(z != 0)``: the expected L0 contribution of each gate (differentiable)."""
    return 1.0 - torch.clamp(torch.sigmoid(beta * math.log(-GAMMA / ZETA) - log_alpha), EPS, 1.0 - EPS)


def open_threshold(beta: float = BETA) -> float:
    """The ``log_alpha`` above which the eval gate is non-zero (and ``P(z != 0) > 1/2``): ``beta * log(1/11)``.

    ``sigmoid(a / beta) (zeta - gamma) + gamma > 0``  iff  ``sigmoid(a / beta) > -gamma / (zeta - gamma) = 1/12``.
    """
    p = -GAMMA / STRETCH
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


def hard_concrete_(u: Tensor, log_alpha: Tensor, beta: float) -> Tensor:
    """The uniforms ``u`` turned into the hard-concrete sample of ``log_alpha``, in place (no autograd)."""
    u.logit_().add_(log_alpha).div_(beta).sigmoid_()  # logistic noise log u - log(1 - u), then the sigmoid
    return u.mul_(STRETCH).add_(GAMMA).clamp_(0.0, 1.0)


def through_gate(g: Tensor, z: Tensor) -> Tensor:
    """The gradient that reaches ``log_alpha`` through the sample ``z``, for ``g`` already divided by
    ``(zeta - gamma) beta``: ``g (z - gamma)(zeta - z)`` inside the clamp, 0 where it is active (with
    ``zeta + gamma = 1``, ``(z - gamma)(zeta - z) = z (1 - z) - gamma zeta``: fused kernels, in place)."""
    out = torch.ops.aten.sigmoid_backward(g, z)  # g z (1 - z)
    out.add_(g, alpha=-GAMMA * ZETA)
    return torch.ops.aten.hardtanh_backward.grad_input(out, z, 0.0, 1.0, grad_input=out)


class _HardConcrete(torch.autograd.Function):
    """:func:`sample_gates` (same noise stream, in-place kernels) as one autograd node: the channel gates' sample.
    The backward needs only the sample (:func:`through_gate`)."""

    @staticmethod
    def forward(ctx, log_alpha: Tensor, beta: float) -> Tensor:  # type: ignore[override]
        z = hard_concrete_(uniform_noise(log_alpha), log_alpha, beta)
        ctx.save_for_backward(z)
        ctx.beta = beta
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return through_gate(grad * (1.0 / (STRETCH * ctx.beta)), z), None


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

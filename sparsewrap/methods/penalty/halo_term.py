"""HALO's penalty as one autograd function: ``ξ Σ_j |w_j| / λ_j² + ψ R(λ)``, ``R = |Σ_j |λ_j| − p|`` (or squared).

Autograd on the plain expression keeps ``|w|``, ``λ²`` and their quotient for the backward and makes a dozen
passes over every weight and coefficient. :class:`HaloTerm` makes one:

    dL/dw_j = g ξ sign(w_j) / λ_j²
    dL/dλ_j = −2 g ξ |w_j| / λ_j³ + g ψ R′ sign(λ_j),   R′ = sign(Σ|λ| − p)  (squared: 2 (Σ|λ| − p))

(``sign(0) = 0``: the subgradient autograd gives ``|x|`` at 0). On float32 CPU tensors
(``sparsewrap/native/halo.c``, sums in double precision) the forward's one pass also writes both gradients for
an incoming gradient ``g = 1``, with ``R′`` taken from a :class:`SlopeHint` (the slope the previous call found:
``R′`` needs the sum over every layer, known only at the end of the pass); the backward returns them as they are
when ``g = 1`` and the hint was right (the common case: with the default ``p = 0``, ``R′ = 1`` throughout), and
otherwise corrects them (one more pass). Elsewhere, or without a C compiler, an eager path computes the sums
forward and the gradients backward. Both paths first keep ``|λ|`` at or above ``floor`` (in place, sign kept),
so that ``|w| / λ²`` stays finite: the clamp rides on the pass that reads ``λ`` anyway.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ... import native


@dataclass
class SlopeHint:
    """``R′`` as the last forward found it, the next forward's guess (a method keeps one per penalty)."""

    slope: float = 1.0


def _eager_sums(w: Tensor, lam: Tensor) -> tuple[float, float, Tensor | None, Tensor | None]:
    return (w.abs() / lam.square()).sum(), lam.abs().sum(), None, None


def _pass(w: Tensor, lam: Tensor, xi: float, c: float, floor: float, grad: bool):
    """Clamp ``λ``, then ``Σ |w| / λ²``, ``Σ |λ|`` and (``grad``, native path) the gradients for ``g = 1`` and
    ``R′ ψ = c``; the eager path returns the sums as 0-d tensors and no gradients."""
    lib = native.kernels_for(w, lam)
    if lib is None:
        if floor > 0:
            clamp_magnitude(lam, floor)
        return _eager_sums(w, lam)
    out = (ctypes.c_double * 3)()
    gw = glam = None
    if grad:
        gw, glam = torch.empty_like(w), torch.empty_like(lam)
        lib.sw_halo_forward_grad(w.data_ptr(), lam.data_ptr(), gw.data_ptr(), glam.data_ptr(), w.numel(), xi, c,
                                 floor, out)  # fmt: skip
    else:
        lib.sw_halo_forward(w.data_ptr(), lam.data_ptr(), w.numel(), floor, out)
    if out[2]:
        torch.autograd.graph.increment_version(lam)  # a write autograd did not see (as an in-place op would)
    return out[0], out[1], gw, glam


def _grads(w: Tensor, lam: Tensor, a: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``a sign(w) / λ²`` and ``−2 a |w| / λ³ + c sign(λ)`` (``a``, ``c``: 0-d tensors), eagerly."""
    r = lam.reciprocal()
    ar2 = r.square().mul_(a)
    gw = torch.sign(w).mul_(ar2)
    glam = w.abs().mul_(ar2).mul_(r).mul_(-2).add_(torch.sign(lam).mul_(c))
    return gw, glam


def _total(values: list) -> Tensor:
    """The sum of per-pair sums (host floats from the kernels, 0-d tensors from the eager path) as a tensor."""
    if all(isinstance(v, float) for v in values):
        return torch.tensor(math.fsum(values), dtype=torch.float64)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values]).sum()


class HaloTerm(torch.autograd.Function):
    """``HaloTerm.apply(xi, psi, p, squared, floor, hint, ahead, w_1, λ_1, w_2, λ_2, ...)``: the penalty over every
    pair (see the module docstring); ``squared`` selects ``R = (Σ|λ| − p)²``; ``floor`` the least ``|λ|`` (0: no
    clamp); ``hint`` a :class:`SlopeHint` or ``None``; ``ahead``: compute the gradients in the forward where the
    native path allows (only when a backward will want them: ``needs_input_grad`` does not tell under no_grad)."""

    @staticmethod
    def forward(ctx, xi: float, psi: float, p: float, squared: bool, floor: float, hint: SlopeHint | None,
                ahead: bool, *tensors: Tensor) -> Tensor:  # noqa: D102  # fmt: skip
        guess = hint.slope if hint is not None else 1.0
        dtype, device = tensors[0].dtype, tensors[0].device
        parts = [_pass(w, lam, xi, psi * guess, floor, ahead) for w, lam in zip(tensors[0::2], tensors[1::2])]
        lasso = _total([part[0] for part in parts])
        excess = _total([part[1] for part in parts]) - p
        slope = 2 * excess if squared else torch.sign(excess)
        if hint is not None and excess.is_cpu:  # a host value (elsewhere, reading it would wait for the device)
            hint.slope = float(slope)
        ctx.save_for_backward(*tensors)
        ctx.xi, ctx.psi, ctx.slope, ctx.guess = xi, psi, slope, guess
        ctx.precomputed = [part[2:] for part in parts]
        value = xi * lasso + psi * (excess.square() if squared else excess.abs())
        return value.to(device, dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        tensors = ctx.saved_tensors
        g = g.detach().to("cpu", torch.float64)
        slope = ctx.slope.to("cpu", torch.float64)
        grads: list[Tensor | None] = []
        # the forward's gradients serve the first backward alone (they become the .grad); a later one (retained
        # graph) computes them again
        ahead, ctx.precomputed = ctx.precomputed, None
        for i, (w, lam) in enumerate(zip(tensors[0::2], tensors[1::2])):
            gw, glam = ahead[i] if ahead is not None else (None, None)
            if gw is None:
                a, c = g * ctx.xi, g * ctx.psi * slope
                gw, glam = _grads(w, lam, a.to(w.device, w.dtype), c.to(w.device, w.dtype))
            else:  # computed forward for g = 1 and R' = the hint's guess
                miss = ctx.psi * (float(slope) - ctx.guess)
                if miss != 0.0:
                    glam.add_(torch.sign(lam), alpha=miss)
                if float(g) != 1.0:
                    gw.mul_(float(g))
                    glam.mul_(float(g))
            grads += [gw, glam]
        needs = ctx.needs_input_grad[7:]
        return (None,) * 7 + tuple(gr if need else None for gr, need in zip(grads, needs))


def halo_term(xi: float, psi: float, p: float, squared: bool, pairs: list[tuple[Tensor, Tensor]],
              floor: float = 0.0, hint: SlopeHint | None = None) -> Tensor:  # fmt: skip
    """HALO's penalty over ``pairs`` of (tensor, its coefficients), through :class:`HaloTerm`; ``|λ|`` is first
    clamped at ``floor`` in place (0: not clamped); ``hint`` carries ``R′`` from call to call (native path)."""
    flat = [t for pair in pairs for t in pair]
    ahead = torch.is_grad_enabled() and any(t.requires_grad for t in flat)
    return HaloTerm.apply(float(xi), float(psi), float(p), bool(squared), float(floor), hint, ahead, *flat)


def clamp_magnitude(lam: Tensor, floor: float) -> None:
    """``λ ← copysign(max(|λ|, floor), λ)`` in place (no gradient recorded): one pass, writing only where
    ``|λ| < floor`` on the native path."""
    with torch.no_grad():
        lib = native.kernels_for(lam)
        if lib is None:
            lam.copy_(torch.copysign(lam.abs().clamp_min(floor), lam))
            return
        lib.sw_halo_clamp(lam.data_ptr(), lam.numel(), float(floor))
        torch.autograd.graph.increment_version(lam)  # a write autograd did not see (as an in-place op would)

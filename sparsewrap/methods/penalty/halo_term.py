"""HALO's penalty as one autograd function: ``ξ Σ_j |w_j| / λ_j² + ψ R(λ)``, ``R = |Σ_j |λ_j| − p|`` (or squared).

Autograd on the plain expression keeps ``|w|``, ``λ²`` and their quotient for the backward and makes a dozen
passes over every weight and coefficient. :class:`HaloTerm` computes both sums in one pass and, in the
backward, both gradients in one more, keeping nothing but its inputs:

    dL/dw_j = g ξ sign(w_j) / λ_j²
    dL/dλ_j = −2 g ξ |w_j| / λ_j³ + g ψ R′ sign(λ_j),   R′ = sign(Σ|λ| − p)  (squared: 2 (Σ|λ| − p))

(``sign(0) = 0``: the subgradient autograd gives ``|x|`` at 0). On float32 CPU tensors each pass is a native
kernel (``sparsewrap/native/halo.c``, sums in double precision); elsewhere, or without a C compiler, an eager
path with the same math. :func:`clamp_magnitude` keeps ``|λ|`` at or above its floor after each step in one
pass the same way.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ... import native


def _kernel_ready(*tensors: Tensor) -> ctypes.CDLL | None:
    """The native library when every tensor is a contiguous float32 CPU tensor of one shape, else None."""
    first = tensors[0]
    if not all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() and t.shape == first.shape for t in tensors):
        return None
    return native.kernels()


def _sums(w: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """``Σ |w| / λ²`` and ``Σ |λ|`` as 0-d tensors of ``w``'s dtype."""
    lib = _kernel_ready(w, lam)
    if lib is None:
        return (w.abs() / lam.square()).sum(), lam.abs().sum()
    out = (ctypes.c_double * 2)()
    lib.sw_halo_forward(w.data_ptr(), lam.data_ptr(), w.numel(), out)
    return torch.tensor(out[0], dtype=w.dtype), torch.tensor(out[1], dtype=w.dtype)


def _grads(w: Tensor, lam: Tensor, a: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``a sign(w) / λ²`` and ``−2 a |w| / λ³ + c sign(λ)`` (``a``, ``c``: 0-d tensors)."""
    lib = _kernel_ready(w, lam)
    if lib is None:
        r = lam.reciprocal()
        ar2 = r.square().mul_(a)
        gw = torch.sign(w).mul_(ar2)
        glam = w.abs().mul_(ar2).mul_(r).mul_(-2).add_(torch.sign(lam).mul_(c))
        return gw, glam
    gw, glam = torch.empty_like(w), torch.empty_like(lam)
    lib.sw_halo_backward(w.data_ptr(), lam.data_ptr(), gw.data_ptr(), glam.data_ptr(), w.numel(), float(a), float(c))
    return gw, glam


class HaloTerm(torch.autograd.Function):
    """``HaloTerm.apply(xi, psi, p, squared, w_1, λ_1, w_2, λ_2, ...)``: the penalty over every pair (see the
    module docstring); ``squared`` selects ``R = (Σ|λ| − p)²``."""

    @staticmethod
    def forward(ctx, xi: float, psi: float, p: float, squared: bool, *tensors: Tensor) -> Tensor:  # noqa: D102
        sums = [_sums(w, lam) for w, lam in zip(tensors[0::2], tensors[1::2])]
        lasso = torch.stack([s[0] for s in sums]).sum()
        excess = torch.stack([s[1] for s in sums]).sum() - p
        reg = excess.square() if squared else excess.abs()
        ctx.save_for_backward(*tensors)
        ctx.xi, ctx.psi, ctx.squared, ctx.excess = xi, psi, squared, excess
        return (xi * lasso + psi * reg).to(tensors[0].device)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        tensors = ctx.saved_tensors
        g = g.detach().to("cpu", torch.float64)
        slope = (2 * ctx.excess if ctx.squared else torch.sign(ctx.excess)).to("cpu", torch.float64)
        a, c = g * ctx.xi, g * ctx.psi * slope  # 0-d CPU tensors, moved to each pair's device and dtype below
        grads: list[Tensor | None] = []
        for w, lam in zip(tensors[0::2], tensors[1::2]):
            gw, glam = _grads(w, lam, a.to(w.device, w.dtype), c.to(w.device, w.dtype))
            grads += [gw, glam]
        needs = ctx.needs_input_grad[4:]
        return (None, None, None, None, *(gr if need else None for gr, need in zip(grads, needs)))


def halo_term(xi: float, psi: float, p: float, squared: bool, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """HALO's penalty over ``pairs`` of (tensor, its coefficients), through :class:`HaloTerm`."""
    return HaloTerm.apply(float(xi), float(psi), float(p), bool(squared), *(t for pair in pairs for t in pair))


def clamp_magnitude(lam: Tensor, floor: float) -> None:
    """``λ ← copysign(max(|λ|, floor), λ)`` in place (no gradient recorded): one pass, writing only where
    ``|λ| < floor`` on the native path."""
    with torch.no_grad():
        lib = _kernel_ready(lam)
        if lib is None:
            lam.copy_(torch.copysign(lam.abs().clamp_min(floor), lam))
            return
        lib.sw_halo_clamp(lam.data_ptr(), lam.numel(), float(floor))
        torch.autograd.graph.increment_version(lam)  # a write autograd did not see (as an in-place op would)

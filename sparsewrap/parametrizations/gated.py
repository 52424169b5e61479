"""The *gated* parametrization with hard-concrete gates per channel, shared by a whole channel group.

Channel gates (:class:`ChannelGate`) are shared by every tensor of a channel group: the producers' weights
(dim 0), their biases and the BatchNorm affine terms after them (the role of the paper's L0BatchNorm), so a
closed channel is exactly zero downstream. All members see the same sample within one forward: the gate takes
a new sample when a member asks for a second time, i.e. when the next forward starts. The gates of one model
share a :class:`GateBank`, which draws the samples of all of them in one go (one autograd node,
:func:`~.hard_concrete.sample_gates_fused`), instead of a dozen small operations per gate.

The hard-concrete math is in :mod:`.hard_concrete`; one gate per weight is :mod:`.gated_weight`.
"""

from __future__ import annotations

import copy
import functools
import weakref

import torch
from torch import Tensor, nn

from .. import torch_compat
from .base import SparseParametrization
from .gated_weight import PerForward
from .hard_concrete import BETA, eval_gates, init_log_alpha, sample_gates_fused
from .projection import EvalProjection


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
            or self.versions[gate] != torch_compat.version(gate.log_alpha)
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
        self.versions = {g: torch_compat.version(g.log_alpha) for g in self.gates}
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
        self._sample = PerForward()
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
            or s.version != torch_compat.version(self.log_alpha)
            or (torch.is_grad_enabled() and self.log_alpha.requires_grad and not s.value.requires_grad)
        )
        if stale:
            value = self._bank.take(self) if self._bank is not None else sample_gates_fused(self.log_alpha, self.beta)
            s.value, s.seen, s.version = value, set(), torch_compat.version(self.log_alpha)
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

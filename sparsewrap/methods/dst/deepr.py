"""Deep Rewiring (Bellec et al. 2018, https://arxiv.org/abs/1711.05136), as in the DSR repository's baseline.

During the update window, at every step:

- the loss gets ``l1 * sum |w|`` over the active weights and a noise term ``sum xi * w`` with
  ``xi ~ N(0, 2 * eta * T)`` drawn fresh for the active weights, so the gradient of the active weights
  receives Gaussian noise of std ``sqrt(2 * eta * T)`` (``sp.penalty()`` returns both);
- after the optimizer step (``sp.step()``), the active weights whose sign flipped since the previous step are
  dropped and as many are regrown at random among the positions inactive before the drop, at zero. A weight
  regrown at zero has no sign yet: its first sign is not a flip.

The temperature ``T`` starts at ``temperature`` and follows ``anneal``, a list of ``[step, T]`` pairs (steps as
counts or fractions of the run; the default is the paper's 1e-5 -> 1e-8 -> 1e-12 -> 1e-15 at epochs 25, 80
and 140 of 200, i.e. 0.125, 0.4 and 0.7 of the run).

Every step touches the active weights alone: the method keeps, per layer, the flat indices of the active
positions (ascending, refreshed when it moves connections, and from the mask whenever anything else wrote to
it: tensor version counters tell) and the signs of those weights. The noise is drawn for the active entries
only (``randn`` of the active count per layer, in the order of their positions: a draw the size of the
active set, not of the layer), the sign check reads the active weights, and the growth draws positions at
random over the layer and rejects the taken ones (:func:`~.selection.random_free`) rather than shuffling
every free position. The draws depend on the active counts alone, the same on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError
from ...parametrizations.base import version_key
from ..base import register_method
from ..run import reset_optimizer_state_at
from ..schedules import StepSpec, check_steps
from .base import DynamicSparse, check_common
from .selection import random_free, random_growth

FEW_CHANGES = 1024  # a layer's update with at most this many drops and growths is merged by slices


def _anneal_default() -> list[list[float]]:
    return [[0.125, 1e-8], [0.4, 1e-12], [0.7, 1e-15]]


def _non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"{name}={value!r} must be a float >= 0")


def signs_at(weight: Tensor, index: Tensor) -> Tensor:
    """The signs (-1, 0, 1) of ``weight`` at the flat (row-major) positions ``index``, as int8."""
    return torch.sign(weight.detach().reshape(-1).index_select(0, index)).to(torch.int8)


def replace_sorted(index: Tensor, values: Tensor, slots: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """Remove the entries at ``slots`` (ascending) from the ascending ``index`` and from ``values`` (one per
    entry of ``index``), and insert the positions ``new`` (none of them in ``index``) with a value of 0.

    With few changes (at most :data:`FEW_CHANGES`) the result is one concatenation of slices of ``index``
    (a copy, no pass that reads every entry); otherwise a bool mask and :func:`insert_sorted`.

    Returns:
        The new ascending index and its values.
    """
    new = new.sort().values
    if slots.numel() + new.numel() > FEW_CHANGES:
        keep = torch.ones(index.numel(), dtype=torch.bool, device=index.device)
        keep[slots] = False
        return insert_sorted(index[keep], values[keep], new)
    at = torch.searchsorted(index, new).tolist()  # each new position goes before index[at]
    # (slot, 0: insert new[j] before it | 1: remove it, j): an insertion before a removed entry comes first
    events = sorted([(p, 0, j) for j, p in enumerate(at)] + [(q, 1, 0) for q in slots.tolist()])
    zero = values.new_zeros(1)
    pieces, kept, start = [], [], 0
    for q, kind, j in events:
        pieces.append(index[start:q])
        kept.append(values[start:q])
        if kind == 0:
            pieces.append(new[j : j + 1])
            kept.append(zero)
            start = q
        else:
            start = q + 1
    pieces.append(index[start:])
    kept.append(values[start:])
    return torch.cat(pieces), torch.cat(kept)


def insert_sorted(index: Tensor, values: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """Insert the positions ``new`` (none of them in ``index``) into the ascending ``index``, with a 0 in
    ``values`` (one per entry of ``index``) at each; returns the merged index and values."""
    new = new.sort().values
    n = index.numel() + new.numel()
    # each old entry moves up by the number of new positions below it, each new one by the old entries below it
    old_at = torch.arange(index.numel(), device=index.device) + torch.searchsorted(new, index)
    new_at = torch.arange(new.numel(), device=index.device) + torch.searchsorted(index, new)
    merged = torch.empty(n, dtype=index.dtype, device=index.device)
    merged[old_at], merged[new_at] = index, new
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    out[old_at] = values
    return merged, out


def fill_at(t: Tensor, index: Tensor, value: float) -> Tensor:
    """Write ``value`` into ``t`` at the flat (row-major) positions ``index``, in place; returns ``t``.

    A contiguous tensor is written at those positions alone; another layout (``channels_last``) through a bool
    tensor the size of ``t``.
    """
    if t.is_contiguous():
        t.view(-1).index_fill_(0, index, value)
    else:
        where = torch.zeros(t.numel(), dtype=torch.bool, device=t.device).index_fill_(0, index, True)
        t.masked_fill_(where.reshape(t.shape), value)
    return t


@dataclass
class DeepRConfig:
    """Options of ``method="deepr"``.

    Attributes:
        distribution: initial per-layer budget (``"uniform"``, ``"erk"``, ``"global"``).
        every: steps between rewirings (1: every step, as the paper).
        start: first step of the rewiring window (step count or fraction of the run).
        end: last step of the rewiring window (0.95 of the run).
        eta: ``eta`` of the noise std ``sqrt(2 * eta * T)`` (0.01, the DSR experiments' value).
        temperature: the initial temperature ``T``.
        anneal: ``[[step, T], ...]``: from each step on, the temperature is ``T``.
        l1: coefficient of the L1 term on the active weights.
        seed: seed of the random draws (initial mask, noise, growth).
    """

    distribution: str = "uniform"
    every: int = 1
    start: StepSpec = 0
    end: StepSpec = 0.95
    eta: float = 0.01
    temperature: float = 1e-5
    anneal: list = field(default_factory=_anneal_default)
    l1: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        check_common("deepr", self.every, self.start, self.end, self.distribution, self.seed)
        for name in ("eta", "temperature", "l1"):
            _non_negative(name, getattr(self, name))
        if not isinstance(self.anneal, (list, tuple)):
            raise ConfigError(f"anneal={self.anneal!r} must be a list of [step, temperature] pairs, or []")
        for pair in self.anneal:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ConfigError(f"anneal entry {pair!r} must be a [step, temperature] pair, e.g. [0.4, 1e-12]")
            check_steps(pair[0], "anneal step")
            _non_negative("anneal temperature", pair[1])
        self.anneal = [list(p) for p in self.anneal]


@register_method
class DeepR(DynamicSparse):
    """Deep Rewiring (see the module docstring)."""

    name = "deepr"
    description = "DeepR: noisy L1-regularised steps; weights whose sign flips are dropped, as many regrown at random."
    Config = DeepRConfig

    def attach(self) -> None:
        super().attach()
        self.next_step = 0  # the t of the coming sp.step()
        n = len(self.targets)
        self.index: list[Tensor | None] = [None] * n  # flat active positions per layer (see active_index)
        self.keys: list[tuple[int, int] | None] = [None] * n  # the mask's version key the index was read at
        self.pending: list[Tensor | None] = [None] * n  # signs loaded by load_state_dict, read at next use
        self.signs: list[Tensor] = [self.current_signs(i) for i in range(n)]

    def on_start(self) -> None:
        super().on_start()
        if self.next_step == 0:  # the signs training starts from (weights loaded after sparsify included)
            self.pending = [None] * len(self.targets)
            self.signs = [self.current_signs(i) for i in range(len(self.targets))]

    def active_index(self, i: int) -> Tensor:
        """The flat positions (row-major, ascending, int64) of layer ``i``'s active connections.

        Read again from the mask when the mask changed since (``load_state_dict``, a distributed sync, a call
        of :meth:`apply`); the signs of the positions still active are carried over, and a newly active
        position has no sign yet (0).
        """
        mask = self.masks[i].mask
        key = version_key(mask)
        if self.keys[i] != key:
            new = mask.detach().reshape(-1).nonzero().reshape(-1)
            old = self.index[i]
            if old is not None and self.pending[i] is None:
                full = torch.zeros(mask.numel(), dtype=torch.int8, device=mask.device)
                full[old.to(mask.device)] = self.signs[i].to(mask.device)
                self.signs[i] = full[new]
            self.index[i], self.keys[i] = new, key
        if self.pending[i] is not None:
            self.signs[i] = self.loaded_signs(i, self.pending[i], self.index[i])
            self.pending[i] = None
        return self.index[i]

    def loaded_signs(self, i: int, signs: Tensor, index: Tensor) -> Tensor:
        """Layer ``i``'s signs from a saved state: one per active position, or (older checkpoints) one per
        position of the layer; a state that fits neither gives the signs of the current weights."""
        signs = signs.to(device=index.device, dtype=torch.int8)
        if signs.dim() == 1 and signs.numel() == index.numel():
            return signs
        if tuple(signs.shape) == tuple(self.masks[i].mask.shape):
            return signs.reshape(-1).index_select(0, index)
        return signs_at(self.targets[i].original, index)

    def current_signs(self, i: int) -> Tensor:
        """The signs (-1, 0, 1) of layer ``i``'s active weights as int8, in the order of :meth:`active_index`."""
        return signs_at(self.targets[i].original, self.active_index(i))

    def temperature(self, t: int) -> float:
        """``T`` at step ``t`` (the last ``anneal`` entry at or before ``t``)."""
        value = float(self.config.temperature)
        for step, temp in sorted((self.resolve_steps(s, "anneal step"), float(v)) for s, v in self.config.anneal):
            if t >= step:
                value = temp
        return value

    def in_window(self, t: int) -> bool:
        """Whether step ``t`` lies in the rewiring window."""
        start, end = self.window()
        return start <= t <= end

    def noise_std(self, t: int) -> float:
        """``sqrt(2 * eta * T)`` at step ``t``, 0 outside the window."""
        return math.sqrt(2 * self.config.eta * self.temperature(t)) if self.in_window(t) else 0.0

    def penalty(self) -> Tensor | None:
        std = self.noise_std(self.next_step)
        terms = []
        for i, target in enumerate(self.targets):
            index = self.active_index(i)
            w = target.module.weight.reshape(-1).index_select(0, index)  # the active weights, in position order
            with torch.no_grad():  # the gradient of l1 * |w| + xi * w with respect to w
                coef = torch.sign(w)
                if std > 0:
                    noise = torch.randn(index.numel(), generator=self.generator).mul_(std)
                    coef = noise.to(w.device, w.dtype).add_(coef, alpha=self.config.l1)
                else:
                    coef.mul_(self.config.l1)
            terms.append(torch.dot(coef, w))
        return torch.stack(terms).sum() if terms else None

    def moves(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Layer ``i``'s update: ``(slots, signs, grow)``.

        ``slots`` are the places in :meth:`active_index` (ascending) of the active weights whose sign flipped
        since the signs were last recorded (the drop set), ``signs`` the current signs of the active weights,
        and ``grow`` the flat positions (int64) of as many connections drawn at random among those inactive
        before the drop (:func:`random_growth`'s rule; a just-dropped position only where too few others are
        free).
        """
        index = self.active_index(i)
        original = self.targets[i].original
        signs = signs_at(original, index)
        slots = ((self.signs[i] * signs) < 0).nonzero().reshape(-1)
        k = slots.numel()
        grow = random_free(original.numel(), index, k, self.generator)
        if grow is None:  # few free positions: the bool-tensor draw, with its fallback to just-dropped ones
            active = self.masks[i].mask.detach().reshape(-1) != 0
            drop = torch.zeros_like(active).index_fill_(0, index[slots], True)
            grow = random_growth(active, drop, k, self.generator).nonzero().reshape(-1)
        return slots, signs, grow.to(index.device)

    def rewire(self, t: int) -> tuple[list[Tensor], list[Tensor]]:
        drops, grows = [], []
        for i, mask in enumerate(self.masks):
            slots, _, grow = self.moves(i)
            empty = torch.zeros(mask.mask.numel(), dtype=torch.bool, device=mask.mask.device)
            drops.append(empty.clone().index_fill_(0, self.index[i][slots], True).reshape(mask.mask.shape))
            grows.append(empty.index_fill_(0, grow, True).reshape(mask.mask.shape))
        return drops, grows

    def step(self, t: int) -> None:
        self.next_step = t + 1
        if self.is_update_step(t):
            with torch.no_grad():
                self.move(t)  # records the signs after the move
        elif self.in_window(t + 1):  # after the window no sign is compared again: skip the read
            self.signs = [self.current_signs(i) for i in range(len(self.targets))]

    @torch.no_grad()
    def move(self, t: int) -> None:
        """The update of step ``t`` on the active positions (what :meth:`rewire` and :meth:`apply` do), writing
        only the positions that move, then the signs of the new active set (the regrown at 0)."""
        moved = 0
        for i, (target, mask) in enumerate(zip(self.targets, self.masks)):
            index = self.active_index(i)
            slots, signs, grow = self.moves(i)
            if slots.numel() == 0:
                self.signs[i] = signs
                continue
            dropped = index[slots]
            back = torch.isin(grow, dropped)  # just-dropped positions regrown (too few free): they stay as they were
            if back.any():
                slots, grow = slots[~torch.isin(dropped, grow)], grow[~back]
            original, flags = target.original, mask.mask
            leave = index[slots]
            fill_at(original, torch.cat([leave, grow]), 0)
            fill_at(fill_at(flags, leave, 0), grow, 1)
            self.index[i], self.signs[i] = replace_sorted(index, signs, slots, grow)
            self.keys[i] = version_key(flags)
            if grow.numel():
                reset_optimizer_state_at(self.run.require_optimizer(self.name), original, grow)
            moved += grow.numel()
        self.updates += 1
        self.last_moved = moved
        self.moved_total += moved
        self.record(t, moved)

    def active_counts(self) -> list[int]:
        return [self.active_index(i).numel() for i in range(len(self.targets))]

    def summary(self) -> dict[str, float]:
        try:
            return super().summary() | {"temperature": self.temperature(self.next_step)}
        except ConfigError:  # an anneal step given as a fraction of a run of unknown length
            return super().summary()

    def state_dict(self) -> dict[str, Any]:
        # one sign per active position (in the order of the positions); the tensors are replaced, never written
        signs = [self.signs[i] if self.pending[i] is None else self.pending[i] for i in range(len(self.targets))]
        return super().state_dict() | {"next_step": self.next_step, "signs": signs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.next_step = int(state.get("next_step", self.next_step))
        for i, (s, mine) in enumerate(zip(state.get("signs", []), self.signs)):
            if s is not mine:  # read at the next use, against the masks then in place
                self.pending[i] = s.detach()

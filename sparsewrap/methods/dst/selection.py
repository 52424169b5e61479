"""Exact drop and grow sets on one layer (pure functions of tensors, tested on hand-built weights).

Ties are broken by position (row-major index, lowest first), so the sets are deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..allocation import drop_lowest
from .distribution import random_positions


def smallest_active(weight: Tensor, active: Tensor, k: int) -> Tensor:
    """The ``k`` active positions of smallest ``|w|`` (bool, shaped like ``weight``)."""
    k = min(k, int(active.sum()))
    scores = torch.where(active, weight.detach().abs().float(), torch.inf)
    return ~drop_lowest(scores, k)


def largest_inactive(score: Tensor, candidates: Tensor, k: int) -> Tensor:
    """The ``k`` candidate positions of largest ``score`` (bool, shaped like ``score``)."""
    k = min(k, int(candidates.sum()))
    neg = torch.where(candidates, -score.detach().float(), torch.inf)
    return ~drop_lowest(neg, k)


def random_growth(active: Tensor, dropped: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``k`` positions drawn at random among those inactive before the drop (never the ones just dropped).

    Where fewer than ``k`` such positions exist, the rest is drawn among the just-dropped ones, so that the
    layer's budget stays exact.
    """
    fresh = ~active & ~dropped
    grow = random_positions(fresh, k, generator)
    short = k - int(grow.sum())
    if short > 0:
        grow |= random_positions(dropped, short, generator)
    return grow


def random_free(numel: int, taken: Tensor, k: int, generator: torch.Generator) -> Tensor | None:
    """``k`` distinct flat positions of ``[0, numel)`` outside ``taken``, drawn uniformly at random (int64, CPU).

    Rejection sampling: positions are drawn uniformly from the whole range, and those in ``taken`` or drawn
    before are skipped, which makes every ``k``-subset of the free positions equally likely (the distribution
    of :func:`random_positions` on the free positions, another random stream). It reads ``taken`` alone, not a
    tensor the size of the layer, so it costs in proportion to ``k``, not to the layer.

    Args:
        numel: the number of positions.
        taken: the positions that may not be drawn, sorted ascending, without repeats.
        k: how many to draw.
        generator: the CPU generator the draws come from.

    Returns:
        The positions in the order drawn, or ``None`` when fewer than ``k`` or fewer than half the positions
        are free (rejection would waste most draws: use :func:`random_positions` on a bool tensor then).
    """
    free = numel - taken.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    if free < k or 2 * free < numel:
        return None
    taken = taken.cpu()
    stream = torch.empty(0, dtype=torch.int64)  # accepted draws in order, repeats included
    while True:
        need = k * numel // free + 16  # enough for the k of them most of the time
        draws = torch.randint(numel, (need,), generator=generator, dtype=torch.int64)
        if taken.numel():
            at = torch.searchsorted(taken, draws).clamp_(max=taken.numel() - 1)
            draws = draws[taken[at] != draws]
        stream = torch.cat([stream, draws])
        unique, inverse = torch.unique(stream, return_inverse=True)
        if unique.numel() >= k:
            break
    first = torch.full((unique.numel(),), stream.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(stream.numel()), "amin")
    return stream[first.sort().values[:k]]

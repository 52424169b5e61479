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

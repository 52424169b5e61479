"""How a sparsity budget is split over layers, and exact selection of what to drop.

Layer-wise distributions follow JaxPruner/RigL: *uniform* (every layer at the target) and *ERK*
(Evci et al. 2020: a layer's density is proportional to ``sum(shape) / prod(shape)``, capped at 1, the scale
chosen so the total matches). Counts are rounded with the largest-remainder rule so that the total number
of dropped units equals ``round(target * total)`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, choices

ALLOCATIONS = ("global", "uniform", "erk")


def erk_densities(shapes: Sequence[tuple[int, ...]], density: float) -> list[float]:
    """Per-layer densities of the Erdős–Rényi-Kernel distribution with overall density ``density``.

    Raises:
        ConfigError: if ``density`` is outside (0, 1].
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        free = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        eps = budget / free if free > 0 else 0.0
        over = {i for i in range(len(sizes)) if i not in dense and eps * raw[i] > 1.0}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(sizes))]
        dense |= over


def layer_sparsities(allocation: str, shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[float]:
    """Per-layer sparsities for a non-global allocation.

    Raises:
        ConfigError: on an unknown allocation name.
    """
    if allocation == "uniform":
        return [sparsity] * len(shapes)
    if allocation == "erk":
        return [1.0 - d for d in erk_densities(shapes, 1.0 - sparsity)]
    raise ConfigError(f"allocation={allocation!r} is unknown; valid: {choices(ALLOCATIONS)}")


def largest_remainder(quotas: Sequence[float], total: int, caps: Sequence[int]) -> list[int]:
    """Integers ``k_i <= caps[i]`` close to ``quotas`` that sum exactly to ``total`` (if the caps allow)."""
    ks = [min(int(math.floor(q)), c) for q, c in zip(quotas, caps)]
    rest = total - sum(ks)
    order = sorted(range(len(quotas)), key=lambda i: quotas[i] - math.floor(quotas[i]), reverse=True)
    while rest > 0 and any(ks[i] < caps[i] for i in order):
        for i in order:
            if rest == 0:
                break
            if ks[i] < caps[i]:
                ks[i] += 1
                rest -= 1
    while rest < 0:
        for i in reversed(order):
            if rest == 0:
                break
            if ks[i] > 0:
                ks[i] -= 1
                rest += 1
    return ks


def drop_lowest(scores: Tensor, k: int) -> Tensor:
    """A keep-mask (bool, same shape) with exactly the ``k`` lowest scores dropped; ties broken by index.

    O(n): one ``kthvalue`` plus a cumulative count over the entries equal to the threshold.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.zeros_like(scores, dtype=torch.bool)
    thr = flat.float().kthvalue(k).values.to(flat.dtype)
    below = flat < thr
    need = k - int(below.sum())
    ties = flat == thr
    drop_ties = ties & (torch.cumsum(ties.to(torch.int64), 0) <= need)
    return (~(below | drop_ties)).reshape(scores.shape)

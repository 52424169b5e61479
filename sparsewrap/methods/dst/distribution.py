"""The initial budget of dynamic sparse training: how many connections each layer holds, and which.

- ``"erk"``: Erdős–Rényi-Kernel (Evci et al. 2020): a layer's density is proportional to
  ``sum(shape) / prod(shape)``; a layer whose share would exceed its size stays dense and the rest is
  redistributed over the others (:func:`sparsewrap.methods.allocation.erk_densities`).
- ``"uniform"``: every layer at the target density.
- ``"global"``: one random draw of the whole budget over the pooled weights of every layer, so each weight is
  equally likely to be active and the per-layer counts are whatever the draw gives.

Per-layer quotas are rounded with the largest-remainder rule (ties to the earlier layer), so the total number of
active connections is exactly ``round((1 - target) * total)``. Positions are drawn from a ``torch.Generator``
given by the caller, so that every rank of a distributed run draws the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ...errors import ConfigError, choices
from ..allocation import erk_densities, largest_remainder

DISTRIBUTIONS = ("erk", "uniform", "global")


def check_distribution(name: str, method: str) -> None:
    """Raise a one-line :class:`ConfigError` unless ``name`` is a known distribution.

    Raises:
        ConfigError: naming the valid distributions.
    """
    if name not in DISTRIBUTIONS:
        raise ConfigError(
            f"distribution={name!r} is unknown for method {method!r}; valid: {choices(DISTRIBUTIONS)}, e.g. "
            "distribution='erk'"
        )


def budget(sizes: Sequence[int], target: float) -> int:
    """The number of active connections for sparsity ``target`` over layers of ``sizes`` entries."""
    return round((1.0 - target) * sum(sizes))


def layer_counts(distribution: str, shapes: Sequence[tuple[int, ...]], target: float) -> list[int] | None:
    """Active connections per layer (summing to :func:`budget` exactly), or ``None`` for ``"global"``.

    Args:
        distribution: ``"erk"`` or ``"uniform"`` (``"global"`` has no per-layer quota: ``None``).
        shapes: the weight shapes, in the targets' order.
        target: the overall sparsity in (0, 1).

    Raises:
        ConfigError: on an unknown distribution.
    """
    sizes = [math.prod(s) for s in shapes]
    total = budget(sizes, target)
    if distribution == "global":
        return None
    if distribution == "uniform":
        densities = [1.0 - target] * len(shapes)
    elif distribution == "erk":
        densities = erk_densities(shapes, 1.0 - target)
    else:
        check_distribution(distribution, "dst")
    return largest_remainder([d * n for d, n in zip(densities, sizes)], total, sizes)


def random_positions(candidates: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """A bool tensor shaped like ``candidates`` with ``k`` of its True entries drawn uniformly at random.

    The draw runs on the CPU from ``generator`` (the same on every device and rank); ``k`` is capped by the
    number of candidates.
    """
    flat = candidates.reshape(-1).cpu()
    idx = flat.nonzero().reshape(-1)
    k = min(k, idx.numel())
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        chosen[idx[torch.randperm(idx.numel(), generator=generator)[:k]]] = True
    return chosen.reshape(candidates.shape).to(candidates.device)


def initial_masks(
    distribution: str, shapes: Sequence[tuple[int, ...]], target: float, generator: torch.Generator
) -> list[Tensor]:
    """Random bool masks, one per shape, with the distribution's counts (exact total).

    Raises:
        ConfigError: on an unknown distribution.
    """
    counts = layer_counts(distribution, shapes, target)
    if counts is None:
        sizes = [math.prod(s) for s in shapes]
        pooled = random_positions(torch.ones(sum(sizes), dtype=torch.bool), budget(sizes, target), generator)
        return [m.reshape(s) for m, s in zip(pooled.split(sizes), shapes)]
    return [random_positions(torch.ones(s, dtype=torch.bool), k, generator) for s, k in zip(shapes, counts)]

"""Per-layer budgets for the methods that prune each layer to its own count (DNW, STR's export projection).

A budget is the number of weights each layer drops. It comes from one overall sparsity split over the layers
(``"uniform"`` or ``"erk"``, :mod:`sparsewrap.methods.allocation`), from a ``{layer pattern: sparsity}`` dict, or, for
STR, from the per-layer densities the training learned, rescaled to the requested total.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Sequence

from ..analysis.targets import Target
from ..errors import ConfigError, NoTargetsError, choices
from .allocation import largest_remainder, layer_sparsities

LAYER_ALLOCATIONS = ("uniform", "erk")


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether a layer pattern (a glob on the full name, or ``"re:<regex>"``) matches the layer ``name``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def layer_drop_counts(targets: list[Target], target: float | dict[str, float],
                      allocation: str) -> tuple[list[Target], list[int]]:  # fmt: skip
    """The targets to prune and how many weights each one drops.

    A float ``target`` is split by ``allocation`` (``"uniform"``: every layer at the target, ``"erk"``: the
    Erdős–Rényi-Kernel distribution) and rounded with the largest-remainder rule, so that the layers drop
    exactly ``round(target * total)`` weights. A dict ``{pattern: sparsity}`` gives each layer the sparsity of
    the first pattern matching its name (``round(sparsity * numel)`` weights); layers that no pattern matches
    are left dense and dropped from the returned targets.

    Raises:
        ConfigError: on an allocation other than ``"uniform"`` or ``"erk"``.
        NoTargetsError: if a pattern of a dict target matches no targeted layer (the message lists the nearest
            layer names).
    """
    if allocation not in LAYER_ALLOCATIONS:
        raise ConfigError(
            f"allocation={allocation!r} is unknown for a per-layer method; valid: {choices(LAYER_ALLOCATIONS)} "
            "(or give target= as a {layer pattern: sparsity} dict)"
        )
    sizes = [t.numel for t in targets]
    if not isinstance(target, dict):
        per_layer = layer_sparsities(allocation, [t.shape for t in targets], float(target))
        total = round(float(target) * sum(sizes))
        return list(targets), largest_remainder([s * n for s, n in zip(per_layer, sizes)], total, sizes)
    names = [t.name for t in targets]
    for pattern in target:
        if not any(pattern_matches(pattern, n) for n in names):
            near = difflib.get_close_matches(pattern, names, n=4, cutoff=0.0)
            raise NoTargetsError(
                f"layer-wise target pattern {pattern!r} matches no targeted layer; nearest layer names: "
                f"{', '.join(near)} (globs match the full name; use 're:<regex>' for a regular expression)"
            )
    kept, counts = [], []
    for t in targets:
        sparsity = next((s for p, s in target.items() if pattern_matches(p, t.name)), None)
        if sparsity is not None:
            kept.append(t)
            counts.append(round(sparsity * t.numel))
    return kept, counts


def rescaled_keep_counts(kept: Sequence[int], sizes: Sequence[int], total_keep: int) -> list[int]:
    """Per-layer numbers of weights to keep, proportional to ``kept`` and summing exactly to ``total_keep``.

    Every layer's learned density is multiplied by the same factor (``total_keep / sum(kept)``), a layer at
    density 1 is capped there and its surplus shared by the others in proportion to their own counts, and the
    result is rounded with the largest-remainder rule. Layers that kept nothing stay empty unless the others
    are all full; when nothing was kept at all the budget is spread in proportion to the layers' sizes.
    ``total_keep`` is clipped to ``[0, sum(sizes)]``.
    """
    total_keep = min(max(int(total_keep), 0), sum(sizes))
    weights = [float(k) for k in kept] if sum(kept) > 0 else [float(n) for n in sizes]
    quotas = [0.0] * len(sizes)
    free = [i for i in range(len(sizes)) if weights[i] > 0]
    budget = float(total_keep)
    while free and budget > 0:
        scale = budget / sum(weights[i] for i in free)
        full = [i for i in free if weights[i] * scale >= sizes[i]]
        if not full:
            for i in free:
                quotas[i] = weights[i] * scale
            break
        for i in full:
            quotas[i] = float(sizes[i])
            budget -= sizes[i]
        free = [i for i in free if i not in full]
    rest = total_keep - sum(math.floor(q) for q in quotas)
    if rest > 0 and not free:  # every learned layer is full: the remainder goes to the empty ones
        empty = [i for i in range(len(sizes)) if quotas[i] < sizes[i]]
        room = sum(sizes[i] - quotas[i] for i in empty)
        for i in empty:
            quotas[i] += rest * (sizes[i] - quotas[i]) / room
    return largest_remainder(quotas, total_keep, list(sizes))

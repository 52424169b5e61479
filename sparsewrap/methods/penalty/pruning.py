"""The single pruning of a penalty method, and the ξ controller that steers the near-zero fraction."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..allocation import drop_lowest, largest_remainder

# the seed logs the fraction of weights with |w| below each of these during training
REPORT_TOLERANCES = (1e-5, 1e-4, 1e-3, 1e-2)
# the controller's gain (log ξ moves by GAIN x the shortfall of the near-zero fraction), the most one update may
# multiply or divide ξ by, and how far ξ may go from its initial value either way
GAIN = 4.0
MAX_FACTOR = 2.0
MAX_RANGE = 1e4


def keep_at_target(weights: Sequence[Tensor], sparsity: float, layerwise: bool = False) -> list[Tensor]:
    """Keep-masks (bool, one per weight) dropping exactly ``round(sparsity * N)`` of the ``N`` weights.

    The dropped ones are those of smallest ``|w|`` over all weights together (the seed's "prune at percent"),
    or, with ``layerwise``, within each layer, the layers' counts rounded so that the total stays exact. The
    sparsity counts over all weights, zeros included: weights that are already exactly zero are dropped first
    (the seed took the percent of the *non-zero* weights instead). Ties are broken by position.

    Args:
        weights: the penalized weights.
        sparsity: the fraction of them to drop, in [0, 1].
        layerwise: rank within each layer instead of globally.
    """
    sizes = [w.numel() for w in weights]
    total = round(sparsity * sum(sizes))
    with torch.no_grad():
        if not layerwise:
            device = weights[0].device
            flat = torch.cat([w.detach().abs().reshape(-1).float().to(device) for w in weights])
            keep = drop_lowest(flat, total).split(sizes)
            return [k.view(w.shape).to(w.device) for k, w in zip(keep, weights)]
        counts = largest_remainder([sparsity * n for n in sizes], total, sizes)
        return [drop_lowest(w.detach().abs(), k) for w, k in zip(weights, counts)]


def near_zero_counts(weights: Sequence[Tensor], tolerances: Sequence[float]) -> list[int]:
    """How many entries of ``weights`` have ``|w| <= tol``, for each ``tol`` (one device sync in all)."""
    with torch.no_grad():
        per_tol = [torch.stack([(w.detach().abs() <= tol).sum() for w in weights]).sum() for tol in tolerances]
        return [int(c) for c in torch.stack(per_tol).tolist()]


def planned_fraction(t: int, prune_step: int | None, target: float) -> float:
    """The near-zero fraction the controller aims at after step ``t``: a cubic ramp (Zhu & Gupta's schedule)
    from 0 at step 0 to ``target`` at ``prune_step``; the target itself when the run's length is unknown."""
    if prune_step is None or prune_step <= 0:
        return target
    done = min(max((t + 1) / prune_step, 0.0), 1.0)
    return target * (1.0 - (1.0 - done) ** 3)


def steer_xi(xi: float, xi_init: float, near_zero: float, planned: float) -> float:
    """The next ξ: multiplied by ``exp(GAIN * (planned - near_zero))``, at most :data:`MAX_FACTOR` either way
    and within :data:`MAX_RANGE` of ``xi_init``. Too few near-zero weights raise ξ (a stronger pull to zero),
    too many lower it."""
    factor = min(max(math.exp(GAIN * (planned - near_zero)), 1.0 / MAX_FACTOR), MAX_FACTOR)
    return min(max(xi * factor, xi_init / MAX_RANGE), xi_init * MAX_RANGE)

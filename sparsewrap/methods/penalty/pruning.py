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
MAX_RANGE = 100.0


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


def steer_xi(xi: float, xi_init: float, near_zero: float, planned: float, ceiling: float | None = None) -> float:
    """The next ξ: multiplied by ``exp(GAIN * (planned - near_zero))``, at most :data:`MAX_FACTOR` either way,
    within :data:`MAX_RANGE` of ``xi_init`` and at most ``max(ceiling, xi_init)``. Too few near-zero weights
    raise ξ (a stronger pull to zero), too many lower it."""
    factor = min(max(math.exp(GAIN * (planned - near_zero)), 1.0 / MAX_FACTOR), MAX_FACTOR)
    high = xi_init * MAX_RANGE if ceiling is None else min(xi_init * MAX_RANGE, max(ceiling, xi_init))
    return min(max(xi * factor, xi_init / MAX_RANGE), high)


def sgd_xi_ceiling(optimizer: torch.optim.Optimizer | None, tol: float, lam_sq: float) -> float | None:
    """The largest ξ whose pull on a weight in one SGD step, ``lr · ξ / (λ² (1 - momentum))`` with the
    momentum's steady-state gain (``lam_sq``: the λ² the method divides by), stays within ``tol``.

    Beyond it a weight pulled to zero jumps over it by more than ``tol``, so a larger ξ cannot make more weights
    near zero, only shake them (free to grow 10⁴-fold, ξ made a 4-epoch MNIST run diverge). ``None`` for another
    optimizer (or none), whose step does not scale so with ξ.
    """
    if type(optimizer) is not torch.optim.SGD:
        return None
    group = next((g for g in optimizer.param_groups if g.get("name") == "weights"), optimizer.param_groups[0])
    lr, momentum = float(group["lr"]), float(group.get("momentum", 0.0) or 0.0)
    if lr <= 0 or momentum >= 1:
        return None
    return tol * lam_sq * (1.0 - momentum) / lr

"""Dynamic Sparse Reparameterization (Mostafa & Wang 2019, https://arxiv.org/abs/1902.05967).

Every ``every`` steps of the update window:

1. drop, in every layer, the active weights with ``|w| < H`` (one global threshold ``H``); a layer that would
   lose every active weight keeps its largest one. ``K_l`` dropped in layer ``l``, ``K = sum K_l``;
2. reallocate the ``K`` freed connections across layers in proportion to their surviving counts ``N_l``:
   quotas ``K * N_l / sum N``, rounded with the largest-remainder rule (ties to the earlier layer) so that the
   total is exactly ``K``, each capped by the layer's positions that were inactive before the drop (should the
   caps leave some unplaced, they go back to just-dropped positions, proportionally again);
3. grow that many in each layer at random positions inactive before the drop, at zero;
4. adapt ``H``: halved if ``K > (1 + tolerance) * n_prune``, doubled if ``K < (1 - tolerance) * n_prune``.

The total budget is constant; the per-layer budgets move (the report's history shows them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError
from ..allocation import largest_remainder
from ..base import register_method
from ..schedules import StepSpec
from .base import DynamicSparse, check_common
from .selection import random_growth

N_PRUNE_SHARE = 0.1  # the default n_prune, as a share of the budget (the paper's runs; see DSRConfig)


@dataclass
class DSRConfig:
    """Options of ``method="dsr"``.

    Attributes:
        distribution: initial per-layer budget (``"uniform"``, the paper's; ``"erk"``, ``"global"``).
        every: steps between reallocations (the paper's first rewire period, 100).
        start: first step of the update window (step count or fraction of the run).
        end: last step of the update window (0.95 of the run, as the paper's 190 of 200 epochs).
        n_prune: the number of connections each reallocation aims to move. ``None`` (default): a tenth of the
            budget (``N_PRUNE_SHARE``), the share the paper's runs move (20 000 of WRN-28-2's ~150 000 active
            weights at 0.9, 400 000 of ResNet-50's 2.5–5 M); the code's argparse default, 600, is a count for
            one model size (on LeNet-300-100 at 0.9 it moves 2 % of the budget, and the run ends 0.3 points worse).
        threshold: the initial global threshold ``H`` on ``|w|``.
        tolerance: ``H`` is adapted when the dropped count leaves ``n_prune * (1 +- tolerance)``.
        seed: seed of the random draws (initial mask, growth).
    """

    distribution: str = "uniform"
    every: int = 100
    start: StepSpec = 0
    end: StepSpec = 0.95
    n_prune: int | None = None
    threshold: float = 1e-3
    tolerance: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        check_common("dsr", self.every, self.start, self.end, self.distribution, self.seed)
        if self.n_prune is not None and (
            isinstance(self.n_prune, bool) or not isinstance(self.n_prune, int) or self.n_prune < 1
        ):
            raise ConfigError(
                f"n_prune={self.n_prune!r} must be an int >= 1 (connections to move per update), or None for a "
                "tenth of the budget"
            )
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not self.threshold > 0:
            raise ConfigError(f"threshold={self.threshold!r} must be a positive float (the initial H), e.g. 1e-3")
        if (
            isinstance(self.tolerance, bool)
            or not isinstance(self.tolerance, (int, float))
            or not 0 < self.tolerance < 1
        ):
            raise ConfigError(f"tolerance={self.tolerance!r} is outside (0, 1), e.g. tolerance=0.1")


def reallocate(dropped: list[int], survivors: list[int], fresh: list[int], room: list[int]) -> list[int]:
    """Connections to grow per layer: ``sum(dropped)`` in proportion to ``survivors``, exact in total.

    Args:
        dropped: ``K_l``, connections dropped per layer.
        survivors: ``N_l``, active connections per layer after the drop.
        fresh: positions per layer inactive before the drop (the first cap).
        room: positions per layer inactive after the drop (the cap of the remainder, if any).

    Returns:
        The grow counts, summing to ``sum(dropped)`` (the caps allow it: ``room`` holds every dropped position).
    """
    total = sum(dropped)
    alive = sum(survivors)
    quotas = [total * n / alive if alive else total / len(survivors) for n in survivors]
    counts = largest_remainder(quotas, total, fresh)
    short = total - sum(counts)
    if short > 0:
        extra = largest_remainder(quotas, short, [r - c for r, c in zip(room, counts)])
        counts = [c + e for c, e in zip(counts, extra)]
    return counts


def adapt_threshold(threshold: float, dropped: int, n_prune: int, tolerance: float) -> float:
    """``H`` halved when ``dropped > (1 + tolerance) n_prune``, doubled when ``dropped < (1 - tolerance) n_prune``."""
    if dropped > (1 + tolerance) * n_prune:
        return threshold / 2
    if dropped < (1 - tolerance) * n_prune:
        return threshold * 2
    return threshold


@register_method
class DSR(DynamicSparse):
    """Dynamic Sparse Reparameterization (see the module docstring)."""

    name = "dsr"
    description = "DSR: global adaptive |w| threshold, freed budget reallocated by surviving counts, random growth."
    Config = DSRConfig

    def attach(self) -> None:
        super().attach()
        self.threshold = float(self.config.threshold)
        budget = sum(self.active_counts())
        self.n_prune = self.config.n_prune or max(1, round(N_PRUNE_SHARE * budget))

    def rewire(self, t: int) -> tuple[list[Tensor], list[Tensor]]:
        drops = []
        for target, active in zip(self.targets, self.active()):
            mag = target.original.detach().abs()
            drop = active & (mag < self.threshold)
            if bool(drop.any()) and torch.equal(drop, active):  # keep the largest one
                keep = torch.where(active, mag, -1.0).reshape(-1).argmax()
                drop.view(-1)[keep] = False
            drops.append(drop)
        actives = self.active()
        dropped = [int(d.sum()) for d in drops]
        survivors = [int(a.sum()) - k for a, k in zip(actives, dropped)]
        fresh = [a.numel() - int(a.sum()) for a in actives]
        room = [a.numel() - n for a, n in zip(actives, survivors)]
        counts = reallocate(dropped, survivors, fresh, room)
        grows = [random_growth(a, d, k, self.generator) for a, d, k in zip(actives, drops, counts)]
        self.threshold = adapt_threshold(self.threshold, sum(dropped), self.n_prune, self.config.tolerance)
        return drops, grows

    def summary(self) -> dict[str, float]:
        return super().summary() | {"threshold H": self.threshold, "n_prune": self.n_prune}

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"threshold": self.threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.threshold = float(state.get("threshold", self.threshold))

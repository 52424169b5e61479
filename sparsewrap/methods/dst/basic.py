"""Static sparse training, SET and RigL: per-layer budgets, drop by magnitude, grow at random or by gradient.

- ``static``: the initial random mask, never updated (the baseline of every DST paper).
- ``set`` (Mocanu et al. 2018, https://arxiv.org/abs/1707.04780): per layer, drop the ``floor(f * n_active)``
  active weights of smallest ``|w|``; regrow as many at random among the positions that were inactive before
  the drop.
- ``rigl`` (Evci et al. 2020, https://arxiv.org/abs/1911.11134): drop as SET; grow the same count where the
  dense gradient's magnitude is largest among the positions inactive after the drop (a just-dropped position
  may win and then keeps its weight, as RigL's ``reinit_when_same=False``). The dense gradient is that of the
  backward before the update step (``dense_grad_step``), averaged over the ranks by the controller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ...errors import ConfigError
from ..base import register_method
from ..schedules import StepSpec
from .base import DSTConfig, DynamicSparse
from .distribution import check_distribution
from .selection import largest_inactive, random_growth, smallest_active


@dataclass
class StaticConfig:
    """Options of ``method="static"``.

    Attributes:
        distribution: initial per-layer budget: ``"erk"``, ``"uniform"`` or ``"global"``.
        seed: seed of the random mask.
    """

    distribution: str = "erk"
    seed: int = 0

    def __post_init__(self) -> None:
        check_distribution(self.distribution, "static")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} must be an int (the seed of the random mask)")


@register_method
class Static(DynamicSparse):
    """A random sparse mask fixed for the whole run."""

    name = "static"
    description = "Static sparse training: a random ERK/uniform mask drawn at sparsify, never updated."
    Config = StaticConfig
    rewires = False

    def summary(self) -> dict[str, float]:
        return {}


@dataclass
class SETConfig(DSTConfig):
    """Options of ``method="set"`` (see :class:`DSTConfig`; defaults: ERK, every 100 steps until 0.95 of the
    run, ``fraction=0.3`` constant, as SET's zeta: the shared defaults)."""

    method_name = "set"


def drop_count(fraction: float, active: int, size: int) -> int:
    """``floor(fraction * active)``, capped by the inactive positions (``size - active``) to regrow into."""
    return min(math.floor(fraction * active), size - active)


@register_method
class SET(DynamicSparse):
    """Sparse Evolutionary Training (see the module docstring)."""

    name = "set"
    description = "SET: drop the smallest |w| of each layer every `every` steps, regrow as many at random."
    Config = SETConfig

    def rewire(self, t: int) -> tuple[list[Tensor], list[Tensor]]:
        f = self.drop_fraction(t)
        drops, grows = [], []
        for target, active in zip(self.targets, self.active()):
            k = drop_count(f, int(active.sum()), active.numel())
            drop = smallest_active(target.original, active, k)
            drops.append(drop)
            grows.append(random_growth(active, drop, k, self.generator))
        return drops, grows


@dataclass
class RigLConfig(DSTConfig):
    """Options of ``method="rigl"`` (see :class:`DSTConfig`; defaults from the paper: ERK, every 100 steps until
    0.75 of the run, ``fraction=0.3`` with the cosine decay)."""

    end: StepSpec = 0.75
    decay: str = "cosine"

    method_name = "rigl"


@register_method
class RigL(DynamicSparse):
    """Rigging the Lottery (see the module docstring)."""

    name = "rigl"
    description = "RigL: drop the smallest |w|, grow where the dense gradient is largest, every `every` steps."
    Config = RigLConfig

    def dense_grad_step(self, t: int) -> bool:
        try:
            return self.is_update_step(t)
        except ConfigError:  # the run's length is not known yet: step(t) names the fix
            return False

    def rewire(self, t: int) -> tuple[list[Tensor], list[Tensor]]:
        f = self.drop_fraction(t)
        grads = self.dense_grads()
        drops, grows = [], []
        for target, active in zip(self.targets, self.active()):
            grad = grads.get((target.name, "weight"))
            if grad is None:
                raise ConfigError(
                    f"method 'rigl' found no dense gradient for layer {target.name!r} at step {t}; run a backward "
                    "through the model before each sp.step()"
                )
            k = math.floor(f * int(active.sum()))  # the candidates (inactive after the drop) are always enough
            drop = smallest_active(target.original, active, k)
            drops.append(drop)
            grows.append(largest_inactive(grad.abs(), ~active | drop, k))
        return drops, grows

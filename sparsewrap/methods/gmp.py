"""``method="gmp"``: gradual magnitude pruning under the name the STR repository uses.

An alias of ``magnitude`` with ``schedule="cubic"`` and a per-layer rate (``allocation="uniform"``), for users
of that repository (``GMPConv``). The rate at step ``t`` is Zhu & Gupta's cubic (:mod:`sparsewrap.methods.schedules`):

    s_t = s_f * (1 - (1 - k/n)^3),     k = floor((t - start) / every),  n = (end - start) / every

so that ``s_end = s_f`` exactly. The seed code's ``E = final - init + 1`` stops at ``s_f * (1 - (1/E)^3)``
and stays there; this alias reaches the target at ``end`` (and export projects onto it in any case).

Departures from the seed code, all inherited from ``magnitude``: the masks are recomputed at the prune events
(every ``every`` steps), not at every forward, and from ``|w * mask|``, so a pruned weight stays pruned (the
seed recomputes from ``|w|`` and a weight pruned earlier may return); the rate moves in steps, not epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import register_method
from .magnitude import Magnitude, MagnitudeConfig


@dataclass
class GMPConfig(MagnitudeConfig):
    """Options of ``method="gmp"``: those of ``magnitude`` with the STR repository's defaults.

    Attributes:
        schedule: always ``"cubic"`` (use ``method="magnitude"`` for the others).
        start: first prune step (a step count, or a fraction of the run).
        end: the step at which the target is reached exactly (required, ``> start``; a count or a fraction).
        every: steps between prune events (must divide ``end - start``).
        allocation: ``"uniform"`` (every layer at the rate, the seed's), ``"erk"`` or ``"global"``.
        granularity: ``"weight"`` or ``"channel"``, as for ``magnitude``.
    """

    schedule: str = "cubic"
    allocation: str = "uniform"

    def __post_init__(self) -> None:
        if self.schedule != "cubic":
            raise ConfigError(
                f"schedule={self.schedule!r} is not available for method 'gmp', which is cubic; "
                "use method='magnitude' for other schedules"
            )
        if type(self.start) is type(self.end) and self.end <= self.start:
            raise ConfigError(
                f"method 'gmp' needs 0 <= start < end, got start={self.start}, end={self.end}; give the step "
                "numbers, e.g. start=0, end=1000, every=100"
            )
        super().__post_init__()


@register_method
class GMP(Magnitude):
    """Gradual magnitude pruning, the STR repository's ``GMPConv`` semantics (see the module docstring)."""

    name = "gmp"
    description = "Gradual magnitude pruning (alias of magnitude, cubic, per-layer rate), reaching the target at end."
    Config = GMPConfig

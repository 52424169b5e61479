"""Sparsity schedules: the sparsity a method should have reached at training step ``t``.

Zhu & Gupta (2017, https://arxiv.org/abs/1710.01878), cubic:

    s_t = s_f + (s_i - s_f) * (1 - k/n)^3,     k = floor((t - start) / every),  n = (end - start) / every

applied at ``start, start + every, ..., end``. Exponential (the iterative schedule of Mostafa & Wang 2019):
each of the n prune events removes the same fraction ``1 - (1 - s_f)^(1/n)`` of the remaining weights, so the
density after k events is ``(1 - s_f)^(k/n)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError, choices

SCHEDULES = ("oneshot", "cubic", "exponential")


@dataclass(frozen=True)
class Schedule:
    """A sparsity schedule from ``initial`` sparsity to ``final`` between steps ``start`` and ``end``.

    Raises:
        ConfigError: on an unknown kind or inconsistent steps.
    """

    kind: str = "oneshot"
    start: int = 0
    end: int = 0
    every: int = 1
    initial: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ConfigError(f"schedule={self.kind!r} is unknown; valid: {choices(SCHEDULES)}")
        if self.kind == "oneshot":
            return
        if self.start < 0 or self.end <= self.start:
            raise ConfigError(
                f"schedule {self.kind!r} needs 0 <= start < end, got start={self.start}, end={self.end}; "
                "give the step numbers, e.g. start=0, end=1000, every=100"
            )
        if self.every <= 0 or (self.end - self.start) % self.every:
            raise ConfigError(f"every={self.every} must be positive and divide end - start = {self.end - self.start}")

    @property
    def events(self) -> int:
        """Number of prune events after the first (n in the formula)."""
        return 0 if self.kind == "oneshot" else (self.end - self.start) // self.every

    def is_update_step(self, t: int) -> bool:
        """Whether masks should be recomputed at step ``t``."""
        if self.kind == "oneshot":
            return False
        return self.start <= t <= self.end and (t - self.start) % self.every == 0

    def sparsity(self, t: int, final: float) -> float:
        """Scheduled sparsity at step ``t`` (held constant between prune events and after ``end``)."""
        if self.kind == "oneshot":
            return final
        if t < self.start:
            return self.initial
        k = min((t - self.start) // self.every, self.events)
        frac = k / self.events
        if self.kind == "cubic":
            return final + (self.initial - final) * (1.0 - frac) ** 3
        density = (1.0 - self.initial) * math.exp(frac * math.log((1.0 - final) / (1.0 - self.initial)))
        return 1.0 - density

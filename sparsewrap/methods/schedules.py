"""Sparsity schedules: the sparsity a method should have reached at training step ``t``.

Zhu & Gupta (2017, https://arxiv.org/abs/1710.01878), cubic:

    s_t = s_f + (s_i - s_f) * (1 - k/n)^3,     k = floor((t - start) / every),  n = (end - start) / every

applied at ``start, start + every, ..., end``. Exponential (the iterative schedule of Mostafa & Wang 2019):
each of the n prune events removes the same fraction ``1 - (1 - s_f)^(1/n)`` of the remaining weights, so the
density after k events is ``(1 - s_f)^(k/n)``.

Step options of any method (``start``, ``end``, a rewiring's last step, a fine-tune's first) are a
:data:`StepSpec`: an ``int`` is a step count, a ``float`` in ``[0, 1]`` a fraction of the run, resolved by
:func:`resolve_steps` once the controller knows the run's length (``sp.start(total_steps=...)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import ConfigError, choices

SCHEDULES = ("oneshot", "cubic", "exponential")

StepSpec = int | float  # a step count (int >= 0) or a fraction of the run (float in [0, 1])
START_FIX = (
    "call sp.start(total_steps=N, optimizer=opt) before training (sw.fit and `sparsewrap train` do it for a train "
    "loader with a len())"
)


def check_steps(value: StepSpec, name: str) -> None:
    """Validate a step option when the method's config is built (before the run's length is known).

    Raises:
        ConfigError: unless ``value`` is an int >= 0 or a float in [0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} must be a step count (int >= 0) or a fraction of the run in [0, 1]")
    if isinstance(value, int) and value < 0:
        raise ConfigError(f"{name}={value} is negative; give a step count >= 0 or a fraction of the run in [0, 1]")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ConfigError(
            f"{name}={value!r} is a float outside [0, 1]; a float is a fraction of the run (e.g. {name}=0.75), "
            f"an int a step count (e.g. {name}={round(value) if math.isfinite(value) and value > 1 else 1000})"
        )


def resolve_steps(value: StepSpec, total_steps: int | None, name: str, method: str) -> int:
    """The step number a :data:`StepSpec` names: the int itself, or ``fraction * total_steps`` rounded half up
    (at most ``total_steps - 1``, the last step: ``1.0`` names it).

    Args:
        value: a step count (int) or a fraction of the run (float in [0, 1]).
        total_steps: the run's length known by the controller (``None`` if it was never given).
        name: the option's name, for error messages.
        method: the method's name, for error messages.

    Raises:
        ConfigError: on an invalid value, or a fraction when the run's length is unknown.
    """
    check_steps(value, name)
    if isinstance(value, int):
        return value
    if total_steps is None:
        raise ConfigError(
            f"{name}={value!r} is a fraction of the run, but method {method!r} was not told the run's length; "
            f"{START_FIX}, or give {name} as a step count"
        )
    return min(math.floor(value * total_steps + 0.5), total_steps - 1)  # steps are numbered 0 .. total_steps - 1


@dataclass(frozen=True)
class Schedule:
    """A sparsity schedule from ``initial`` sparsity to ``final`` between steps ``start`` and ``end``.

    ``start`` and ``end`` may be fractions of the run (floats in [0, 1], see :data:`StepSpec`); such a schedule
    is checked for its kind and ranges only, and :meth:`resolved` turns it into step numbers once the run's
    length is known (its ``end`` then drops to the last whole ``every`` interval after ``start``).

    Raises:
        ConfigError: on an unknown kind or inconsistent steps.
    """

    kind: str = "oneshot"
    start: StepSpec = 0
    end: StepSpec = 0
    every: int = 1
    initial: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ConfigError(f"schedule={self.kind!r} is unknown; valid: {choices(SCHEDULES)}")
        if self.kind == "oneshot":
            return
        check_steps(self.start, "start")
        check_steps(self.end, "end")
        if self.fractional:
            if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every <= 0:
                raise ConfigError(f"every={self.every!r} must be a positive step count")
            if type(self.start) is type(self.end) and self.end < self.start:
                raise ConfigError(f"schedule {self.kind!r} needs start <= end, got start={self.start}, end={self.end}")
            return
        if self.start < 0 or self.end < self.start:
            raise ConfigError(
                f"schedule {self.kind!r} needs 0 <= start <= end, got start={self.start}, end={self.end}; "
                "give the step numbers, e.g. start=0, end=1000, every=100"
            )
        if self.every <= 0 or (self.end - self.start) % self.every:
            raise ConfigError(f"every={self.every} must be positive and divide end - start = {self.end - self.start}")

    @property
    def fractional(self) -> bool:
        """Whether ``start`` or ``end`` is a fraction of the run (call :meth:`resolved` before using it)."""
        return isinstance(self.start, float) or isinstance(self.end, float)

    def resolved(self, total_steps: int | None, method: str) -> Schedule:
        """This schedule in step numbers (itself when it already is).

        Raises:
            ConfigError: if a fraction needs the run's length and ``total_steps`` is ``None``, or the resolved
                steps leave no prune event.
        """
        if self.kind == "oneshot" or not self.fractional:
            return self
        start = resolve_steps(self.start, total_steps, "start", method)
        end = resolve_steps(self.end, total_steps, "end", method)
        if end < start:
            raise ConfigError(
                f"schedule {self.kind!r} of method {method!r}: start={self.start!r} and end={self.end!r} give "
                f"steps {start} and {end} of a {total_steps}-step run; end must not come before start"
            )
        if end > start:
            end = start + max((end - start) // self.every, 1) * self.every
        return replace(self, start=start, end=end)

    @property
    def events(self) -> int:
        """Number of prune events after the first (n in the formula)."""
        return 0 if self.kind == "oneshot" else (self.end - self.start) // self.every

    def _require_steps(self) -> None:
        if self.fractional:
            raise ConfigError(
                f"schedule {self.kind!r} has start={self.start!r}, end={self.end!r} as fractions of the run; "
                "use schedule.resolved(total_steps, method) first"
            )

    def is_update_step(self, t: int) -> bool:
        """Whether masks should be recomputed at step ``t``."""
        if self.kind == "oneshot":
            return False
        self._require_steps()
        return self.start <= t <= self.end and (t - self.start) % self.every == 0

    def sparsity(self, t: int, final: float) -> float:
        """Scheduled sparsity at step ``t`` (held constant between prune events and after ``end``)."""
        if self.kind == "oneshot":
            return final
        self._require_steps()
        if t < self.start:
            return self.initial
        if self.events == 0:  # start == end: a single prune event, straight to the target
            return final
        k = min((t - self.start) // self.every, self.events)
        frac = k / self.events
        if self.kind == "cubic":
            return final + (self.initial - final) * (1.0 - frac) ** 3
        density = (1.0 - self.initial) * math.exp(frac * math.log((1.0 - final) / (1.0 - self.initial)))
        return 1.0 - density

"""What the dynamic-sparse-training methods share: a fixed budget of connections that moves during training.

Each targeted weight gets a hard 0/1 mask (:class:`sparsewrap.parametrizations.Masked`, the *rewired*
parametrization of the design): the weights under a 0 are exactly zero, so a connection that is regrown starts
at zero. The initial mask is drawn at random with the counts of ``distribution`` (:mod:`.distribution`). Then,
on update steps, a method chooses a *drop* set among the active connections and a *grow* set among the inactive
ones (:meth:`DynamicSparse.rewire`); :meth:`DynamicSparse.apply` moves them, zeroes the weights that leave or
arrive and resets the optimizer state (momentum, Adam moments) of the arrivals. A position in both sets (RigL
may regrow a connection it just dropped) is left as it was: its weight and optimizer state are kept.

Update steps: ``t`` with ``start <= t <= end`` and ``(t - start) % every == every - 1`` (``every`` steps of
training before each update); ``start`` and ``end`` are step counts or fractions of the run
(docs/methods-api.md). The drop fraction at step ``t`` is ``fraction`` (``decay="constant"``) or RigL's cosine
``fraction / 2 * (1 + cos(pi * (t - start) / (end - start)))`` (``decay="cosine"``).

Random draws come from one ``torch.Generator`` seeded with ``seed`` and saved in the method's state, so every
rank of a distributed run, and a resumed run, draws the same positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError, choices
from ...parametrizations import Masked, attach
from ...report import BudgetUpdate
from ..base import Method
from ..run import OPTIMIZER_STATE
from ..schedules import StepSpec, check_steps
from .distribution import check_distribution, initial_masks

DECAYS = ("constant", "cosine")
HISTORY_LIMIT = 256  # entries kept in the per-update history; beyond it, every other one is dropped


def check_common(method: str, every: int, start: StepSpec, end: StepSpec, distribution: str, seed: int) -> None:
    """Validate the options every DST method shares (one-line :class:`ConfigError` each).

    Raises:
        ConfigError: on ``every < 1``, a bad step option, ``end`` before ``start``, an unknown distribution or a
            seed that is not an int.
    """
    check_distribution(distribution, method)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"every={every!r} must be a step count >= 1 (steps between updates), e.g. every=100")
    check_steps(start, "start")
    check_steps(end, "end")
    if type(start) is type(end) and end <= start:
        raise ConfigError(f"end={end!r} comes before start={start!r}; the updates need start < end, e.g. end=0.75")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an int (the seed of the growth's random draws)")


def check_fraction(fraction: float, decay: str | None = None) -> None:
    """Validate the drop fraction (in (0, 1)) and its decay.

    Raises:
        ConfigError: naming the bad value and the valid range or names.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ConfigError(
            f"fraction={fraction!r} is outside (0, 1); it is the share of active connections dropped per update, "
            "e.g. fraction=0.3"
        )
    if decay is not None and decay not in DECAYS:
        raise ConfigError(f"decay={decay!r} is unknown; valid: {choices(DECAYS)}")


@dataclass
class DSTConfig:
    """Options shared by the DST methods (with SET's defaults; a method redeclares those it changes).

    Attributes:
        distribution: initial per-layer budget: ``"erk"``, ``"uniform"`` or ``"global"``.
        every: steps between updates.
        start: first step of the update window (step count or fraction of the run).
        end: last step of the update window (step count or fraction of the run).
        fraction: share of active connections dropped per update (SET, RigL).
        decay: ``"constant"`` or ``"cosine"`` (RigL's decay of ``fraction`` over the update window).
        seed: seed of the random draws (initial mask, random growth).
    """

    distribution: str = "erk"
    every: int = 100
    start: StepSpec = 0
    end: StepSpec = 0.95
    fraction: float = 0.3
    decay: str = "constant"
    seed: int = 0

    method_name = "dst"

    def __post_init__(self) -> None:
        check_common(self.method_name, self.every, self.start, self.end, self.distribution, self.seed)
        check_fraction(self.fraction, self.decay)


class DynamicSparse(Method):
    """Base class of the DST methods: initial random masks, the update window, moving connections, state.

    Subclasses implement :meth:`rewire` (and may override :meth:`is_update_step`).
    """

    rewires = True  # False for "static"

    # -- setup --------------------------------------------------------------------------------------------------
    def attach(self) -> None:
        if not isinstance(self.target, float):
            raise ConfigError(
                f"method {self.name!r} takes one overall sparsity, got target={self.target!r}; use include=/exclude= "
                "to choose layers"
            )
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.masks: list[Masked] = [attach(t.module, "weight", Masked(t.shape, t.original)) for t in self.targets]
        keep = initial_masks(self.config.distribution, [t.shape for t in self.targets], self.target, self.generator)
        for mask, k in zip(self.masks, keep):
            mask.mask.copy_(k.to(mask.mask.device))
        self.updates = 0
        self.moved_total = 0
        self.last_moved = 0
        self.history: list[list[Any]] = []  # [step, moved, [active per layer]] per recorded update
        self.stride = 1  # record one update in `stride` (doubled whenever the history is thinned)

    def on_start(self) -> None:
        if self.rewires:
            self.window()  # a bad start/end fails now rather than mid-run
            opt = self.run.optimizer
            if opt is not None and type(opt) not in OPTIMIZER_STATE:
                raise ConfigError(
                    f"method {self.name!r} resets the optimizer state of regrown connections and cannot reset that of "
                    f"{type(opt).__name__}; use one of {choices(t.__name__ for t in OPTIMIZER_STATE)}"
                )

    def window(self) -> tuple[int, int]:
        """``(start, end)`` of the update window as step numbers.

        Raises:
            ConfigError: if a fraction needs the run's length and it is unknown, or end does not come after start.
        """
        start = self.resolve_steps(self.config.start, "start")
        end = self.resolve_steps(self.config.end, "end")
        if end <= start:
            raise ConfigError(
                f"method {self.name!r}: start={self.config.start!r} and end={self.config.end!r} give steps {start} "
                f"and {end}; end must come after start"
            )
        return start, end

    def is_update_step(self, t: int) -> bool:
        """Whether connections move after step ``t``."""
        if not self.rewires:
            return False
        start, end = self.window()
        return start <= t <= end and (t - start) % self.config.every == self.config.every - 1

    def drop_fraction(self, t: int) -> float:
        """The drop fraction at step ``t``: constant, or RigL's cosine decay over the update window."""
        if self.config.decay == "constant":
            return self.config.fraction
        start, end = self.window()
        return self.config.fraction / 2 * (1 + math.cos(math.pi * (t - start) / (end - start)))

    def active(self) -> list[Tensor]:
        """The current masks as bool tensors."""
        return [m.mask.bool() for m in self.masks]

    def active_counts(self) -> list[int]:
        """Active connections per layer (a device sync per layer)."""
        return [int(m.mask.sum()) for m in self.masks]

    # -- the update ---------------------------------------------------------------------------------------------
    def step(self, t: int) -> None:
        if not self.is_update_step(t):
            return
        with torch.no_grad():
            drops, grows = self.rewire(t)
            self.apply(drops, grows, t)

    def rewire(self, t: int) -> tuple[list[Tensor], list[Tensor]]:
        """The drop and grow sets of this update, one bool tensor per target (subclasses)."""
        raise NotImplementedError

    @torch.no_grad()
    def apply(self, drops: list[Tensor], grows: list[Tensor], t: int) -> None:
        """Move the connections: drop ``drops``, grow ``grows`` at zero with a fresh optimizer state.

        A position in both sets keeps its weight and state (it did not move).
        """
        moved = 0
        arrivals = []
        for target, mask, drop, grow in zip(self.targets, self.masks, drops, grows):
            leave, arrive = drop & ~grow, grow & ~drop
            new = (mask.mask.bool() & ~leave) | arrive
            original = target.original
            original.masked_fill_(leave | arrive, 0)
            mask.mask.copy_(new.to(mask.mask.dtype))
            arrivals.append((original, arrive))
            moved += int(arrive.sum())
        if moved:  # the optimizer is needed only when something arrives
            for original, arrive in arrivals:
                self.reset_optimizer_state(original, arrive)
        self.updates += 1
        self.last_moved = moved
        self.moved_total += moved
        self.record(t, moved)

    def record(self, t: int, moved: int) -> None:
        """Keep ``[step, moved, active per layer]`` for the report, thinning the history past its limit."""
        if (self.updates - 1) % self.stride:
            return
        self.history.append([t, moved, self.active_counts()])
        if len(self.history) > HISTORY_LIMIT:
            self.history = self.history[::2]
            self.stride *= 2

    # -- report and state ---------------------------------------------------------------------------------------
    def summary(self) -> dict[str, float]:
        return {
            "updates": float(self.updates),
            "connections moved (last update)": float(self.last_moved),
            "connections moved (total)": float(self.moved_total),
        }

    def budget_history(self) -> list[BudgetUpdate]:
        return [BudgetUpdate(int(step), int(moved), [int(c) for c in active]) for step, moved, active in self.history]

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "updates": self.updates,
            "moved_total": self.moved_total,
            "last_moved": self.last_moved,
            "history": [list(h) for h in self.history],
            "stride": self.stride,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"].detach().cpu().to(torch.uint8).clone())
        self.updates = int(state.get("updates", self.updates))
        self.moved_total = int(state.get("moved_total", self.moved_total))
        self.last_moved = int(state.get("last_moved", self.last_moved))
        self.history = [[int(h[0]), int(h[1]), [int(c) for c in h[2]]] for h in state.get("history", self.history)]
        self.stride = int(state.get("stride", self.stride))

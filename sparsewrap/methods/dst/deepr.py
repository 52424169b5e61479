"""Deep Rewiring (Bellec et al. 2018, https://arxiv.org/abs/1711.05136), as in the DSR repository's baseline.

During the update window, at every step:

- the loss gets ``l1 * sum |w|`` over the active weights and a noise term ``sum xi * w`` with
  ``xi ~ N(0, 2 * eta * T)`` drawn fresh for the active weights, so the gradient of the active weights
  receives Gaussian noise of std ``sqrt(2 * eta * T)`` (``sp.penalty()`` returns both);
- after the optimizer step (``sp.step()``), the active weights whose sign flipped since the previous step are
  dropped and as many are regrown at random among the positions inactive before the drop, at zero. A weight
  regrown at zero has no sign yet: its first sign is not a flip.

The temperature ``T`` starts at ``temperature`` and follows ``anneal``, a list of ``[step, T]`` pairs (steps as
counts or fractions of the run; the default is the paper's 1e-5 -> 1e-8 -> 1e-12 -> 1e-15 at epochs 25, 80
and 140 of 200, i.e. 0.125, 0.4 and 0.7 of the run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError
from ..base import register_method
from ..schedules import StepSpec, check_steps
from .base import DynamicSparse, check_common
from .selection import random_growth


def _anneal_default() -> list[list[float]]:
    return [[0.125, 1e-8], [0.4, 1e-12], [0.7, 1e-15]]


def _non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"{name}={value!r} must be a float >= 0")


@dataclass
class DeepRConfig:
    """Options of ``method="deepr"``.

    Attributes:
        distribution: initial per-layer budget (``"uniform"``, ``"erk"``, ``"global"``).
        every: steps between rewirings (1: every step, as the paper).
        start: first step of the rewiring window (step count or fraction of the run).
        end: last step of the rewiring window (0.95 of the run).
        eta: ``eta`` of the noise std ``sqrt(2 * eta * T)`` (0.01, the DSR experiments' value).
        temperature: the initial temperature ``T``.
        anneal: ``[[step, T], ...]``: from each step on, the temperature is ``T``.
        l1: coefficient of the L1 term on the active weights.
        seed: seed of the random draws (initial mask, noise, growth).
    """

    distribution: str = "uniform"
    every: int = 1
    start: StepSpec = 0
    end: StepSpec = 0.95
    eta: float = 0.01
    temperature: float = 1e-5
    anneal: list = field(default_factory=_anneal_default)
    l1: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        check_common("deepr", self.every, self.start, self.end, self.distribution, self.seed)
        for name in ("eta", "temperature", "l1"):
            _non_negative(name, getattr(self, name))
        if not isinstance(self.anneal, (list, tuple)):
            raise ConfigError(f"anneal={self.anneal!r} must be a list of [step, temperature] pairs, or []")
        for pair in self.anneal:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ConfigError(f"anneal entry {pair!r} must be a [step, temperature] pair, e.g. [0.4, 1e-12]")
            check_steps(pair[0], "anneal step")
            _non_negative("anneal temperature", pair[1])
        self.anneal = [list(p) for p in self.anneal]


@register_method
class DeepR(DynamicSparse):
    """Deep Rewiring (see the module docstring)."""

    name = "deepr"
    description = "DeepR: noisy L1-regularised steps; weights whose sign flips are dropped, as many regrown at random."
    Config = DeepRConfig

    def attach(self) -> None:
        super().attach()
        self.next_step = 0  # the t of the coming sp.step()
        self.signs = [self.current_signs(i) for i in range(len(self.targets))]

    def on_start(self) -> None:
        super().on_start()
        if self.next_step == 0:  # the signs training starts from (weights loaded after sparsify included)
            self.signs = [self.current_signs(i) for i in range(len(self.targets))]

    def current_signs(self, i: int) -> Tensor:
        """The signs (-1, 0, 1) of layer ``i``'s active weights, as int8."""
        return torch.sign(self.targets[i].original.detach() * self.masks[i].mask).to(torch.int8)

    def temperature(self, t: int) -> float:
        """``T`` at step ``t`` (the last ``anneal`` entry at or before ``t``)."""
        value = float(self.config.temperature)
        for step, temp in sorted((self.resolve_steps(s, "anneal step"), float(v)) for s, v in self.config.anneal):
            if t >= step:
                value = temp
        return value

    def in_window(self, t: int) -> bool:
        """Whether step ``t`` lies in the rewiring window."""
        start, end = self.window()
        return start <= t <= end

    def noise_std(self, t: int) -> float:
        """``sqrt(2 * eta * T)`` at step ``t``, 0 outside the window."""
        return math.sqrt(2 * self.config.eta * self.temperature(t)) if self.in_window(t) else 0.0

    def penalty(self) -> Tensor | None:
        std = self.noise_std(self.next_step)
        terms = []
        for target, mask in zip(self.targets, self.masks):
            w = target.module.weight  # the masked weight
            term = self.config.l1 * w.abs().sum()
            if std > 0:
                xi = torch.randn(w.shape, generator=self.generator).to(w.device, w.dtype) * std
                term = term + (xi * mask.mask * w).sum()
            terms.append(term)
        return torch.stack(terms).sum() if terms else None

    def rewire(self, t: int) -> tuple[list[Tensor], list[Tensor]]:
        drops, grows = [], []
        for i, active in enumerate(self.active()):
            drop = active & (self.signs[i].to(torch.int16) * self.current_signs(i).to(torch.int16) < 0)
            drops.append(drop)
            grows.append(random_growth(active, drop, int(drop.sum()), self.generator))
        return drops, grows

    def step(self, t: int) -> None:
        super().step(t)
        self.next_step = t + 1
        if self.in_window(t + 1):  # after the window no sign is compared again: skip the pass
            self.signs = [self.current_signs(i) for i in range(len(self.targets))]

    def summary(self) -> dict[str, float]:
        try:
            return super().summary() | {"temperature": self.temperature(self.next_step)}
        except ConfigError:  # an anneal step given as a fraction of a run of unknown length
            return super().summary()

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"next_step": self.next_step, "signs": [s.clone() for s in self.signs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.next_step = int(state.get("next_step", self.next_step))
        if "signs" in state:
            self.signs = [
                s.to(device=m.mask.device, dtype=torch.int8).clone() for s, m in zip(state["signs"], self.masks)
            ]

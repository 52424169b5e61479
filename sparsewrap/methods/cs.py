"""Continuous Sparsification (Savarese et al. 2020, https://arxiv.org/abs/1912.04427), ``method="cs"``.

Each targeted weight becomes ``w * c * sigmoid(beta * s)`` with a score ``s`` per weight, initialised to
``mask_init`` (``s0``), and ``c = 1 / sigmoid(s0)``
(:class:`~sparsewrap.parametrizations.soft_mask.SoftMask`). The run is laid out over its length
(``sp.start(total_steps=...)``; ``sw.fit`` does it):

- **search**, steps ``[0, ticket_start)``, in ``rounds`` rounds of equal length. Within each round the
  temperature rises geometrically, ``beta = final_temp ** (k / (L - 1))`` at the round's ``k``-th step of ``L``.
  Between rounds the scores are reset, ``s <- min(s, s0)`` (the authors' code, which resets ``beta`` to 1
  before it: a slightly negative score can recover in the next round; the paper's ``min(beta_T * s, s0)`` would
  remove it for good), and the optimizer's state of the reset scores is zeroed. The loss term is
  ``lambda_t * sum sigmoid(beta * s)`` over every masked entry; the scores form their own optimizer group
  (``"mask_scores"``, no weight decay).
- **rewind point**: the model's weights (every parameter and buffer but the scores and tickets) are saved after
  ``rewind`` steps (a fraction of the first round, or a step count within it; 0 = the initial weights).
- **ticket**, from ``ticket_start`` on: the hard mask is drawn, the weights are rewound to the saved ones (bit for
  bit) with a fresh optimizer state, the masks are frozen, and training goes on with ``w * c * 1[ticket]``.

**The target.** The paper has none (the sparsity follows ``s0``, ``lambda`` and ``final_temp``). Here the ticket keeps
the top-scored entries, exactly ``N - round(target * N)`` of them (globally by default, per layer with
``allocation="uniform"``/``"erk"`` or a ``{layer pattern: sparsity}`` dict), so the target is exact at export.
By default (``lmbda`` not given) the search is driven towards it: ``lambda_t = lmbda_init * exp(I_t)`` with
``I_t <- I_t + drive * e_t``, where ``d_t`` is the hard density (fraction of ``s > 0``), ``g = 1 - target`` and
``e_t = d_t - g`` above the goal, ``(d_t - g) / g`` below it: ``lambda`` grows slowly while too many scores are
positive (a score pushed far below 0 at a high temperature gets no gradient and does not come back, so an
overshoot is permanent) and falls fast once the density is below the goal; the learned ticket is then already
close to the target. ``lmbda=`` gives the paper's fixed penalty; without a target the ticket is then ``1[s > 0]``.

**A step late.** The soft mask's training forward (:class:`~sparsewrap.parametrizations.soft_mask.SoftMaskMul`)
also returns ``sum sigmoid(beta * s)``, which the penalty uses (no second pass over the scores; computed again when
the scores or ``beta`` changed since, a backward already went through it, or no training forward ran), and the
count of ``s > 0``, which the driven coefficient reads at ``sp.step()``: ``d_t`` is then the density of the scores
step ``t``'s forward used, before step ``t``'s optimizer update, one update behind the scores ``sp.step()`` sees (a
layer with no training forward since the last step is counted then). The drive moves ``lambda`` by a small gain
a step, so a step's delay changes nothing of note; what is read is the density the step's loss was taken at.

Eval mode during the search shows the ticket the export would draw now (``w * c`` on the kept entries), so what one
evaluates is what one exports; export writes ``w * c * 1[ticket]`` (the scaling ``c`` stays on the ticket, as in
the authors' code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, choices
from ..parametrizations import attach
from ..parametrizations.base import version_key
from ..parametrizations.projection import EvalProjection
from ..parametrizations.soft_mask import SoftMask, hard_masked
from ..parametrizations.topk import keep_largest
from .base import Method, register_method
from .layer_budgets import LAYER_ALLOCATIONS, layer_drop_counts
from .run import OPTIMIZER_STATE
from .schedules import StepSpec, check_steps

CS_ALLOCATIONS = ("global",) + LAYER_ALLOCATIONS


def _finite(name: str, value: Any, example: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number, e.g. {name}={example}")


@dataclass
class CSConfig:
    """Options of ``method="cs"``.

    Attributes:
        mask_init: initial score ``s0`` of every weight (0.0 in the paper; lower starts sparser).
        final_temp: the temperature ``beta`` reached at the end of each round (> 1; 200 in the paper).
        rounds: number of search rounds (>= 1), the scores reset to ``min(s, s0)`` between them.
        rewind: when the weights the ticket is rewound to are saved: a fraction of the first round (float in
            [0, 1]) or a step count within it (int); 0 saves the initial weights.
        ticket_start: the step the ticket phase starts (int, or float fraction of the run); ``None`` gives
            ``rounds / (rounds + 1)`` of the run (each round as long as the ticket phase, as in the paper).
        lmbda: a fixed penalty coefficient (the paper's behaviour, 1e-8 in its configs); ``None`` drives the
            coefficient towards the target instead.
        lmbda_init: the driven coefficient's initial value.
        drive: gain of the driven coefficient (its log moves by ``drive * (density - goal)`` a step above the goal
            density, ``drive * (density - goal) / goal`` below it).
        allocation: how the ticket's budget is split: ``"global"`` (one ranking of the scores), ``"uniform"`` or
            ``"erk"`` (per layer). A dict target is per layer.
    """

    mask_init: float = 0.0
    final_temp: float = 200.0
    rounds: int = 3
    rewind: StepSpec = 0.025
    ticket_start: StepSpec | None = None
    lmbda: float | None = None
    lmbda_init: float = 1e-8
    drive: float = 0.1
    allocation: str = "global"

    def __post_init__(self) -> None:
        _finite("mask_init", self.mask_init, 0.0)
        _finite("final_temp", self.final_temp, 200)
        if self.final_temp <= 1:
            raise ConfigError(f"final_temp={self.final_temp} must be > 1 (the temperature rises from 1), e.g. 200")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds!r} must be an int >= 1 (search rounds), e.g. rounds=3")
        check_steps(self.rewind, "rewind")
        if self.ticket_start is not None:
            check_steps(self.ticket_start, "ticket_start")
        if self.lmbda is not None:
            _finite("lmbda", self.lmbda, 1e-8)
            if self.lmbda < 0:
                raise ConfigError(f"lmbda={self.lmbda} is negative; give a penalty coefficient >= 0, e.g. 1e-8")
        _finite("lmbda_init", self.lmbda_init, 1e-8)
        if self.lmbda_init <= 0:
            raise ConfigError(f"lmbda_init={self.lmbda_init} must be > 0 (the driven coefficient is exp-scaled)")
        _finite("drive", self.drive, 0.1)
        if self.drive < 0:
            raise ConfigError(f"drive={self.drive} is negative; give a gain >= 0 (0 keeps lambda at lmbda_init)")
        if self.allocation not in CS_ALLOCATIONS:
            raise ConfigError(f"allocation={self.allocation!r} is unknown for method 'cs'; valid: "
                              f"{choices(CS_ALLOCATIONS)}")  # fmt: skip
        if isinstance(self.ticket_start, int):  # step counts: the layout is known now
            check_rewind(self.rewind, self.ticket_start, self.rounds)


def round_len(ticket_start: int, rounds: int) -> int:
    """The length of a search round (the last one also takes the remainder).

    Raises:
        ConfigError: if the search is shorter than one step per round.
    """
    if ticket_start < rounds:
        raise ConfigError(
            f"ticket_start={ticket_start} leaves fewer steps than rounds={rounds}; give ticket_start >= rounds "
            "(or fewer rounds, or a longer run)"
        )
    return ticket_start // rounds


def check_rewind(rewind: StepSpec, ticket_start: int, rounds: int) -> int:
    """The rewind point as a number of steps taken (at most the first round's length).

    Raises:
        ConfigError: if a step count lies past the first round.
    """
    first = round_len(ticket_start, rounds)
    if isinstance(rewind, float):
        return min(math.floor(rewind * first + 0.5), first)
    if rewind > first:
        raise ConfigError(
            f"rewind={rewind} is past the first round ({first} steps); give a step count <= {first} or a "
            "fraction of the first round, e.g. rewind=0.025"
        )
    return rewind


@register_method
class ContinuousSparsification(Method):
    """Continuous Sparsification (see the module docstring)."""

    name = "cs"
    description = "Continuous Sparsification: soft masks w*c*sigmoid(beta*s) in rounds, then a rewound ticket."
    Config = CSConfig
    needs_target = False

    def attach(self) -> None:
        cfg = self.config
        if self.target is None and cfg.lmbda is None:
            raise ConfigError("method 'cs' needs target= (the ticket's sparsity) or lmbda= (the paper's fixed "
                              "penalty, ticket = 1[s > 0]); give e.g. target=0.9")  # fmt: skip
        self.counts: list[int] | None = None  # per-layer numbers of weights the ticket keeps
        if isinstance(self.target, dict) or (self.target is not None and cfg.allocation != "global"):
            allocation = "uniform" if cfg.allocation == "global" else cfg.allocation
            kept, drops = layer_drop_counts(self.targets, self.target, allocation)
            self.targets[:] = kept
            self.counts = [t.numel - d for t, d in zip(kept, drops)]
        self.layers = [attach(t.module, "weight", SoftMask(t.original, cfg.mask_init)) for t in self.targets]
        self.numel = sum(t.numel for t in self.targets)
        self.eval_projection = EvalProjection()
        self.eval_projection.bind(self.final_masks, self.state_key)
        for p in self.layers:
            p.final = self.eval_projection
        own = {id(x) for p in self.layers for x in (p.s, p.ticket)}
        self.snapshot = self._weights(own)
        self.own = own
        self.log_gain = torch.zeros((), dtype=torch.float64)  # I_t of the driven coefficient
        self.phase = "search"
        self.plan: tuple[int, int, int] | None = None  # (ticket_start, round length, rewind), resolved lazily
        self.search_sparsity: float | None = None  # the sparsity of 1[s > 0] when the ticket was drawn

    # -- the run's layout -------------------------------------------------------------------------------------
    def on_start(self) -> None:
        self.plan = None
        self.layout()
        total = self.run.total_steps
        if total is not None and self.plan[0] >= total:
            raise ConfigError(
                f"ticket_start={self.config.ticket_start!r} is step {self.plan[0]} of a {total}-step run: the "
                "ticket phase would never start; give an earlier step or a fraction"
            )
        optimizer = self.run.optimizer
        if optimizer is not None and type(optimizer) not in OPTIMIZER_STATE:
            names = choices(t.__name__ for t in OPTIMIZER_STATE)
            raise ConfigError(
                f"method 'cs' resets optimizer state between rounds and cannot for {type(optimizer).__name__}; "
                f"use one of {names}"
            )

    def layout(self) -> tuple[int, int, int]:
        """``(ticket_start, round length, rewind point)`` in steps (resolved once the run's length is known)."""
        if self.plan is None:
            cfg = self.config
            spec = cfg.ticket_start if cfg.ticket_start is not None else cfg.rounds / (cfg.rounds + 1)
            start = self.resolve_steps(spec, "ticket_start")
            self.plan = (start, round_len(start, cfg.rounds), check_rewind(cfg.rewind, start, cfg.rounds))
        return self.plan

    def temperature(self, t: int) -> float:
        """``beta`` of step ``t``'s forward: ``final_temp ** (k / (L - 1))`` at step ``k`` of a round of ``L``."""
        start, length, _ = self.layout()
        last = self.config.rounds - 1
        r = min(t // length, last)
        size = length if r < last else start - last * length
        k = t - r * length
        return float(self.config.final_temp ** (min(k, size - 1) / (size - 1))) if size > 1 else self.config.final_temp

    # -- the weights the ticket rewinds to --------------------------------------------------------------------
    def _weights(self, own: set[int]) -> dict[str, Tensor]:
        state = self.model.state_dict(keep_vars=True)
        return {k: v.detach().clone() for k, v in state.items() if id(v) not in own}

    def rewind_weights(self) -> None:
        """Copy the saved weights back into the model, bit for bit, and zero their optimizer state."""
        state = self.model.state_dict(keep_vars=True)
        optimizer = self.run.optimizer
        held = {id(p) for g in optimizer.param_groups for p in g["params"]} if optimizer is not None else set()
        with torch.no_grad():
            for key, saved in self.snapshot.items():
                state[key].copy_(saved)
                if id(state[key]) in held:
                    self.reset_optimizer_state(state[key], torch.ones_like(saved, dtype=torch.bool))

    # -- the steps --------------------------------------------------------------------------------------------
    def hard_density(self) -> Tensor:
        """The fraction of scores ``s > 0`` (a tensor; no host transfer)."""
        kept = sum((p.s.detach() > 0).sum(dtype=torch.float64) for p in self.layers)
        return kept / max(self.numel, 1)

    def step_density(self) -> Tensor:
        """The hard density the driven coefficient reads at a step: per layer, the count of ``s > 0`` that the step's
        training forward took (the scores before this step's optimizer update: a step late), or counted now for a
        layer with no training forward since the last step."""
        kept = []
        for p in self.layers:
            positive = p.take_positive()
            kept.append((p.s.detach() > 0).sum() if positive is None else positive.to(p.s.device))
        return sum(k.to(torch.float64) for k in kept) / max(self.numel, 1)

    def coefficient(self) -> Tensor:
        """``lambda_t``: the fixed ``lmbda``, or the driven coefficient."""
        if self.config.lmbda is not None:
            return torch.tensor(self.config.lmbda, dtype=torch.float64)
        return self.config.lmbda_init * torch.exp(self.log_gain)

    def penalty(self) -> Tensor | None:
        if self.phase != "search":
            return None
        total = sum(p.mask_sum() for p in self.layers)  # the forward's sums when they are still usable
        return self.coefficient().to(device=total.device, dtype=total.dtype) * total

    def step(self, t: int) -> None:
        self.eval_projection.reset()
        if self.phase != "search":
            return
        start, length, rewind = self.layout()
        done = t + 1  # steps taken
        with torch.no_grad():
            if self.config.lmbda is None and self.target is not None:
                goal = 1.0 - self.requested_sparsity()
                density = self.step_density().to(self.log_gain.device)
                # up slowly (absolute gap: a score pushed far below 0 at a high temperature does not come back),
                # down fast (relative gap: stop pruning as soon as the density falls below the goal)
                gap = torch.where(density > goal, density - goal, (density - goal) / goal)
                self.log_gain = self.log_gain + self.config.drive * gap
            if done == rewind:
                self.snapshot = self._weights(self.own)
            if done >= start:
                self.draw_ticket()
                return
            if done % length == 0 and done // length < self.config.rounds:
                self.reset_scores()
            for p in self.layers:
                p.beta = self.temperature(done)

    def reset_scores(self) -> None:
        """``s <- min(s, s0)`` between rounds, and a fresh optimizer state for the scores that changed."""
        s0 = self.config.mask_init
        for p in self.layers:
            changed = p.s > s0
            p.s.clamp_(max=s0)
            if self.run.optimizer is not None:
                self.reset_optimizer_state(p.s, changed)

    def draw_ticket(self) -> None:
        """Freeze the masks at the ticket and rewind the weights (the search is over)."""
        keep = self.ticket_masks()
        self.search_sparsity = 1.0 - float(self.hard_density())  # what the search learned, before the projection
        for p in self.layers:
            p.ticket.copy_(keep[p])
            p.hard = True
        self.rewind_weights()
        self.phase = "ticket"
        self.eval_projection.reset()

    def ticket_masks(self) -> dict[nn.Module, Tensor]:
        """The ticket the scores give now: the top-scored entries at the target, or ``s > 0`` without one."""
        with torch.no_grad():
            if self.target is None:
                return {p: p.s.detach() > 0 for p in self.layers}
            if self.counts is not None:
                return {p: keep_largest(p.s.detach(), k) for p, k in zip(self.layers, self.counts)}
            flat = torch.cat([p.s.detach().reshape(-1) for p in self.layers])
            keep = keep_largest(flat, self.numel - round(self.target * self.numel))
            keep = keep.split([t.numel for t in self.targets])
            return {p: k.view_as(p.s) for p, k in zip(self.layers, keep)}

    # -- export -----------------------------------------------------------------------------------------------
    def state_key(self) -> tuple:
        """What the final masks are computed from (the phase, the counts, every score by version)."""
        return (self.phase, self.counts and tuple(self.counts), tuple(version_key(p.s) for p in self.layers))

    def final_masks(self) -> dict[nn.Module, Tensor]:
        """What eval mode and export apply: the ticket the scores give now (empty once it is drawn)."""
        return {} if self.phase != "search" else self.ticket_masks()

    def bake(self) -> dict[tuple[str, str], Tensor]:
        keep = self.final_masks() or {p: p.ticket for p in self.layers}
        with torch.no_grad():
            return {(t.name, "weight"): hard_masked(t.original, keep[p], p.scale).detach().clone()
                    for t, p in zip(self.targets, self.layers)}  # fmt: skip

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"name": "mask_scores", "params": [p.s for p in self.layers], "weight_decay": 0.0}]

    # -- report and state -------------------------------------------------------------------------------------
    def requested_sparsity(self) -> float | None:
        if self.target is None or self.counts is None:
            return self.target
        return 1.0 - sum(self.counts) / max(self.numel, 1)

    def learned_sparsity(self) -> float:
        """The sparsity of the hard rule ``s > 0`` before the ticket's projection: now during the search, as it was
        when the ticket was drawn afterwards (the ticket itself is at the target by construction)."""
        if self.phase == "ticket" and self.search_sparsity is not None:
            return self.search_sparsity
        return 1.0 - float(self.hard_density()) if self.numel else 0.0

    def summary(self) -> dict[str, float]:
        out = {
            "learned sparsity": self.learned_sparsity(),
            "ticket phase": float(self.phase == "ticket"),
            "temperature": self.layers[0].beta if self.layers else 1.0,
            "lambda": float(self.coefficient()),
        }
        if self.target is not None:
            out["gap to target"] = out["learned sparsity"] - self.requested_sparsity()
        return out

    def state_dict(self) -> dict[str, Any]:
        beta = self.layers[0].beta if self.layers else 1.0
        state = {"phase": self.phase, "beta": beta, "log_gain": float(self.log_gain), "snapshot": dict(self.snapshot)}
        if self.search_sparsity is not None:
            state["search_sparsity"] = self.search_sparsity
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase = state.get("phase", self.phase)
        self.log_gain = torch.tensor(float(state.get("log_gain", 0.0)), dtype=torch.float64)
        self.search_sparsity = state.get("search_sparsity", self.search_sparsity)
        for p in self.layers:
            p.beta = float(state.get("beta", p.beta))
            p.hard = self.phase == "ticket"
        if "snapshot" in state:
            self.snapshot = {k: v.detach().clone() for k, v in state["snapshot"].items()}
        self.eval_projection.reset()

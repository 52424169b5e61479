"""Constrained L0: hard-concrete gates per weight or per channel group, with the exact target at export.

Gallego-Posada, Ramirez, Dehghani, Lacoste-Julien, "Controlled Sparsity via Constrained Optimization",
NeurIPS 2022 (https://arxiv.org/abs/2208.04425), on the gates of Louizos et al. 2018
(https://arxiv.org/abs/1712.01312); see :mod:`sparsewrap.parametrizations.gated` for the gate formulas.

- **Constrained** (``target=`` or ``density=``): minimize the task loss subject to
  ``E[density_k] - d_k <= 0`` for each constraint ``k``, through the Lagrangian
  ``L = loss + sum_k lambda_k (E[density_k] - d_k)``: the primal step descends it (``sp.penalty()`` is the
  multiplier term), ``sp.step()`` ascends it (:class:`sparsewrap.methods.dual.DualAscent`, dual restarts on by
  default) and clamps ``log_alpha`` to ``[-log_alpha_max, log_alpha_max]``. One model-wise constraint for a
  float target; one per layer for ``{pattern: sparsity}`` (the first matching pattern wins; unmatched layers
  are not sparsified).
- **Penalized** (``lmbda=``, no target): ``loss + lmbda * E[density]``, the papers' baseline.
- ``E[density]`` counts what the user gets: per weight ``sum P(z != 0) / numel``; per channel the expected
  kept weights including the cascade (a closed channel removes the consumers' input slices too); with
  ``budget="macs"`` every weight is weighted by its layer's output positions (expected MACs of the targeted
  layers of the exported model; needs ``input_shape``). Note: ``target`` is a *sparsity*; the papers'
  "target density 0.1" is ``target=0.9``.
- Export folds the deterministic gates into the weights (fractional gates kept), then projects exactly onto
  the budget (:mod:`.l0_projection`); ``sp.report()`` says how far the learned gates were from it, and adds a
  note when the expected density ends far from the requested one. The eval-mode forward applies the same
  final gates (recomputed only after a step or a change of the gates or weights), so the model one evaluates
  is the model one exports, at any point of training.
- ``granularity="channel"`` gates the exact channel groups of the traced graph whose producers are all
  targeted (see :mod:`.l0_layout`); give ``input_shape`` (timm models know theirs) so that flatten -> Linear
  is analysed. A conv whose only use is a gated BatchNorm is gated through the BatchNorm (``z * BN(x)``) and
  its rows are only masked, which spares scaling the conv weight in every step. Layers that no gate touches
  are dropped from the targets and listed in ``sp.report().notes``.

Settings that worked on MNIST (``bench/l0_mnist.py``, 10 epochs, batch 128): Adam,
``sp.param_groups(lr=1e-3)``, the defaults here (``gate_lr=0.05``, ``dual_lr=0.05``, ``droprate_init=0.5``,
``log_alpha_max=log(1000)``). The gates' group has its own learning rate because the weights' (say 1e-3 with
Adam) moves ``log_alpha`` by about that much per step: far too slowly to close gates in a few epochs. On a
pretrained model use ``droprate_init <= 0.15`` so that every learned eval gate starts at exactly 1.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigError, NoTargetsError, choices
from ...parametrizations import wrapped_tensors
from ...parametrizations.base import version_key
from ...parametrizations.gated_weight import GatedWeight
from ...parametrizations.hard_concrete import BETA, eval_gates, prob_nonzero
from ...parametrizations.projection import EvalProjection
from ..base import Method, register_method
from ..dual import DualAscent
from .constraints import check_floor, constraint_name, constraints, layer_costs
from .layout import ExpectedCost, GatedLayer, attach_channel_gates, attach_weight_gates
from .projection import Final, project_channels, project_weights

GRANULARITIES = ("weight", "channel")
BUDGETS = ("params", "macs")
FAR = 0.2  # the report notes an expected density more than 20 % (relative) away from the requested one


@dataclass
class L0Config:
    """Options of ``method="l0"``.

    Attributes:
        granularity: ``"weight"`` (one gate per weight) or ``"channel"`` (one gate per channel group).
        lmbda: penalized mode: weight of ``E[density]`` in the loss (give it instead of a target).
        budget: ``"params"`` (weights) or ``"macs"`` (multiply-accumulates, needs ``input_shape``).
        input_shape: one input's shape without the batch dim, e.g. ``[3, 224, 224]`` (for ``budget="macs"``).
        dual_lr: learning rate of the multipliers' projected gradient ascent.
        dual_restarts: reset a multiplier to 0 when its constraint is satisfied.
        gate_lr: learning rate of the gates' optimizer group, whatever the weights' (``None``: the weights').
            The default 0.05 is for Adam-type optimizers, whose step is about the learning rate whatever the
            gradient's scale; with SGD the gates' gradients are small (per-weight gates: divided by the number of
            weights) and the papers use 1 to 6.
        droprate_init: initial drop rate ``d`` of the gates (``log_alpha = log((1 - d) / d)``).
        temperature: hard-concrete temperature ``beta``.
        log_alpha_max: ``log_alpha`` is clamped to ``[-log_alpha_max, log_alpha_max]`` after each step. The
            papers clamp at ``log(100)``, where a closed gate still counts ``P(z != 0) = 4.7 %`` in the expected
            density: at 90 % sparsity that floor is half the budget, so the expected and the deterministic
            densities part ways. The default ``log(1000)`` lowers the floor to 0.5 %.

    Raises:
        ConfigError: for an unknown granularity or budget, a negative learning rate or ``lmbda``, values out of
            range, or ``budget="macs"`` without ``input_shape``.
    """

    granularity: str = "weight"
    lmbda: float | None = None
    budget: str = "params"
    input_shape: list[int] | None = None
    dual_lr: float = 0.05
    dual_restarts: bool = True
    gate_lr: float | None = 0.05
    droprate_init: float = 0.5
    temperature: float = BETA
    log_alpha_max: float = math.log(1000.0)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity={self.granularity!r} is unknown; valid: {choices(GRANULARITIES)}")
        if self.budget not in BUDGETS:
            raise ConfigError(f"budget={self.budget!r} is unknown; valid: {choices(BUDGETS)}")
        for name in ("dual_lr", "gate_lr", "lmbda"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ConfigError(
                    f"{name}={value!r} must be a number >= 0 (a learning rate or weight cannot be negative)"
                )
        if not 0.0 < self.droprate_init < 1.0:
            raise ConfigError(f"droprate_init={self.droprate_init!r} must be in (0, 1), e.g. 0.5")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature!r} must be > 0 (the papers use 2/3)")
        if not 0 < self.log_alpha_max <= 12:
            raise ConfigError(
                f"log_alpha_max={self.log_alpha_max!r} must be in (0, 12] (the papers use log(100) = 4.605; beyond 12 "
                "P(z != 0) is saturated anyway)"
            )
        if self.input_shape is not None:
            if not all(isinstance(d, int) and d > 0 for d in self.input_shape):
                raise ConfigError(f"input_shape={self.input_shape!r} must be positive ints, e.g. [3, 224, 224]")
            self.input_shape = [int(d) for d in self.input_shape]
        if self.budget == "macs" and self.input_shape is None:
            raise ConfigError("budget='macs' needs input_shape= (one input without the batch dim, e.g. [1, 28, 28])")


@register_method
class L0(Method):
    """Constrained (or penalized) L0 with hard-concrete gates (see the module docstring)."""

    name = "l0"
    description = "Constrained L0: hard-concrete gates per weight or channel group; Lagrangian hits the target."
    Config = L0Config
    needs_target = False

    # -- set-up -----------------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Attach the gates, set up the constraints and check that the target is reachable.

        Raises:
            ConfigError: for ``target`` and ``lmbda`` together (or neither), or a target below the floor the
                ``log_alpha`` clamp allows.
            NoTargetsError: for a layer-wise pattern matching no (gateable) layer, or no gateable layer at all.
            TraceError: for ``granularity="channel"`` on a model that could not be traced.
        """
        cfg = self.config
        if cfg.lmbda is not None and self.target is not None:
            raise ConfigError(
                f"give either target= (constrained) or lmbda= (penalized), not both (got target={self.target!r}, "
                f"lmbda={cfg.lmbda})"
            )
        if cfg.lmbda is None and self.target is None:
            raise ConfigError("method 'l0' needs target= (or density=) for the constrained form, or lmbda= to penalize")
        constraint_of, self.densities = constraints(self.target, self.targets, cfg.granularity == "channel")
        self.targets[:] = [t for t in self.targets if t.name in constraint_of]
        costs = layer_costs(self.model, self.targets, cfg.budget, cfg.input_shape)
        self.notes_: list[str] = []
        self.plan = None
        self.eval_projection = EvalProjection()  # the parametrizations' eval forward asks it for final_factors()
        self._final: tuple[tuple, Final] | None = None
        self.steps = 0
        if cfg.granularity == "weight":
            gates = attach_weight_gates(self.targets, cfg.droprate_init, cfg.temperature, cfg.log_alpha_max,
                                        self.eval_projection)  # fmt: skip
            self.layers = [GatedLayer(t, constraint_of[t.name], costs[t.name], weight_gate=g)
                           for t, g in zip(self.targets, gates)]  # fmt: skip
        else:
            self.plan = attach_channel_gates(self.model, self.graph, self.targets, cfg.droprate_init,
                                             cfg.temperature, cfg.input_shape, self.eval_projection)  # fmt: skip
            self.notes_ += self.plan.notes
            gated = set(self.plan.out_gates) | set(self.plan.in_segs)
            if not gated:
                why = "; ".join(self.plan.notes)
                raise NoTargetsError(
                    f"no targeted layer of {type(self.model).__name__} can be channel-gated ({why}); "
                    "use granularity='weight'"
                )
            self.targets[:] = [t for t in self.targets if t.name in gated]  # the others are not sparsified at all
            # a layer-wise pattern may now match nothing
            constraint_of, self.densities = constraints(self.target, self.targets, channel=True)
            self.layers = [self._channel_layer(t, constraint_of[t.name], costs[t.name]) for t in self.targets]
        self.totals = [0.0] * len(self.densities)
        for layer in self.layers:
            self.totals[layer.constraint] += layer.cost * layer.numel
        if any(t <= 0 for t in self.totals):
            raise ConfigError("a constraint covers layers that never run on input_shape (zero MACs); exclude them")
        self._expected = ExpectedCost(self.layers, self.totals)
        self._clamp()  # the initial log_alpha too: the fused expected count relies on |log_alpha| <= 12
        self.p_min = float(prob_nonzero(torch.tensor(-cfg.log_alpha_max, dtype=torch.float64), cfg.temperature))
        self.duals = DualAscent(len(self.densities), cfg.dual_lr, cfg.dual_restarts)
        self._defect: Tensor | None = None
        self.last_projection: dict[str, float] = {}
        if cfg.lmbda is None:
            check_floor(self.layers, self.densities, self.totals, self.p_min, cfg.log_alpha_max)
        if cfg.budget == "macs":
            self.notes_.append("budget='macs': the requested sparsity is a fraction of the targeted layers' MACs")
        self.eval_projection.bind(self.final_factors)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "eval_projection" in state:  # a copy (deepcopy, pickle): its parametrizations ask this copy
            self.eval_projection.bind(self.final_factors)

    def _channel_layer(self, target: Any, constraint: int, cost: float) -> GatedLayer:
        return GatedLayer(target, constraint, cost, out_gate=self.plan.out_gates.get(target.name),
                          in_segs=self.plan.in_segs.get(target.name, ()))  # fmt: skip

    # -- training hooks ---------------------------------------------------------------------------------------
    def gate_parameters(self) -> list[torch.nn.Parameter]:
        if self.plan is not None:
            return [g.log_alpha for g in self.plan.gates]
        return [la.weight_gate.log_alpha for la in self.layers if la.weight_gate is not None]

    def expected_densities(self) -> Tensor:
        """``E[density_k]`` per constraint, in budget units (differentiable in the gates; float32 at least)."""
        like = next(iter(self.gate_parameters()), None)
        like = like if like is not None else self.zero(self.model)
        return self._expected(like.device).to(torch.promote_types(like.dtype, torch.float32))

    def _requested_densities(self, like: Tensor) -> Tensor:
        return torch.tensor([d if d is not None else 0.0 for d in self.densities], dtype=like.dtype, device=like.device)

    def penalty(self) -> Tensor:
        dens = self.expected_densities()
        if self.config.lmbda is not None:
            return self.config.lmbda * (dens * dens.new_tensor(self.totals)).sum() / sum(self.totals)
        defect = dens - self._requested_densities(dens)
        self._defect = defect.detach()
        return self.duals.term(defect)

    def step(self, t: int) -> None:
        if self.config.lmbda is None:
            if self._defect is None:
                with torch.no_grad():
                    dens = self.expected_densities()
                    self._defect = dens - self._requested_densities(dens)
            self.duals.update(self._defect)
            self._defect = None
        # fused optimizers (gates={"fused": True}) do not bump the gates' version counters: bump them for
        # the lazy clamp, the forward's cached expected count (not for a penalty written before the next forward)
        for p in self.gate_parameters():  # and the eval projection
            torch.autograd.graph.increment_version(p)
        self.eval_projection.reset()
        self.steps = t + 1
        self._clamp(lazy=True)

    def _clamp(self, lazy: bool = False) -> None:
        """Project the gates' ``log_alpha`` onto ``[-log_alpha_max, log_alpha_max]``. With ``lazy``, per-weight
        gates are left to clamp themselves at their next use (GatedWeight: inside the forward kernel's pass)."""
        bound = self.config.log_alpha_max
        with torch.no_grad():
            if self.plan is None:
                if not lazy:
                    for layer in self.layers:
                        layer.weight_gate.ensure_clamped()
                return
            for p in self.gate_parameters():
                p.clamp_(-bound, bound)

    def parameter_groups(self) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"name": "gates", "params": self.gate_parameters(), "weight_decay": 0.0}
        if self.config.gate_lr is not None:
            group["lr"] = self.config.gate_lr
        return [group]

    # -- export ---------------------------------------------------------------------------------------------
    def final_factors(self) -> dict[torch.nn.Module, Any]:
        """What export multiplies into each gated tensor, per parametrization (see :class:`.l0_projection.Final`):
        the projection onto the budget, recomputed only when a gate or a targeted weight changed (the scores'
        tie-breaks read the weights). The parametrizations' eval-mode forward uses it too."""
        with torch.no_grad():
            if self.plan is None:
                self._clamp()
            key = tuple(version_key(p) for p in self.gate_parameters()) + tuple(
                version_key(t.original) for t in self.targets
            )
            if self._final is None or self._final[0] != key:
                budgets, beta = [self._budget(k) for k in range(len(self.densities))], self.config.temperature
                final = (project_weights(self.layers, budgets, beta) if self.plan is None else
                         project_channels(self.model, self.plan, self.layers, budgets, self.totals, beta))  # fmt: skip
                self._final, total = (key, final), sum(self.totals)
                self.last_projection = {"learned density (before projection)": final.learned / total,
                                        "exported density": final.final / total}  # fmt: skip
        return self._final[1].factors

    def bake(self) -> dict[tuple[str, str], Tensor]:
        factors = self.final_factors()
        out = {}
        with torch.no_grad():
            for mname, module, tname, p in wrapped_tensors(self.model):
                original, f = module.parametrizations[tname].original, factors[p]
                value = original * f.to(original.dtype) if isinstance(p, GatedWeight) else p.apply_gates(original, *f)
                out[(mname, tname)] = value.detach().clone()
        return out

    def _budget(self, k: int) -> float | None:
        d = self.densities[k]
        return None if d is None or self.config.lmbda is not None else d * self.totals[k]

    # -- reporting and state ----------------------------------------------------------------------------------
    def deterministic_density(self) -> float:
        """Overall density (budget units) of the eval-mode gates, without the final projection."""
        beta = self.config.temperature
        if self.plan is not None:
            keep = {g: eval_gates(g.log_alpha, beta) > 0 for g in self.plan.gates}
            return sum(la.cost * la.count_for(keep) for la in self.layers) / sum(self.totals)
        self._clamp()
        kept = sum(la.cost * int((eval_gates(la.weight_gate.log_alpha, beta) > 0).sum()) for la in self.layers)
        return kept / sum(self.totals)

    def on_start(self) -> None:
        optimizer = self.run.optimizer
        if optimizer is None or self.config.granularity != "weight" or type(optimizer) is not torch.optim.SGD:
            return
        lrs = [g["lr"] for g in optimizer.param_groups if g.get("name") == "gates"]
        if lrs and lrs[0] < 1.0:
            warnings.warn(
                f"l0: per-weight gates under plain SGD at gate_lr={lrs[0]:g} barely move (the constraint's gradient "
                "per gate is the multiplier over the number of gates); use Adam (sw.fit's default) or a gate_lr of "
                "1 or more",
                UserWarning,
                stacklevel=2,
            )

    def summary(self) -> dict[str, float]:
        with torch.no_grad():
            dens = self.expected_densities().double().cpu()
        total = sum(self.totals)
        out = {"expected density": float((dens * torch.tensor(self.totals, dtype=torch.float64)).sum() / total),
               "deterministic density": self.deterministic_density()}  # fmt: skip
        if self.config.lmbda is None:
            requested = sum(d * t for d, t in zip(self.densities, self.totals)) / total
            out["requested density"] = requested
            for k, lam in enumerate(self.duals.value.tolist()):
                key = "multiplier" if len(self.densities) == 1 else f"multiplier[{constraint_name(self.layers, k)}]"
                out[key] = lam
        out.update(self.last_projection)
        return out

    def notes(self) -> list[str]:
        out = list(self.notes_)
        if self.config.lmbda is not None or self.steps == 0:
            return out
        with torch.no_grad():
            expected = self.expected_densities().double().cpu().tolist()
        for k, (e, d) in enumerate(zip(expected, self.densities)):
            if abs(e - d) > FAR * d:
                where = "" if len(self.densities) == 1 else f" of {constraint_name(self.layers, k)}"
                out.append(
                    f"expected density{where} {e:.3f} is far from the requested {d:.3f} after {self.steps} steps: "
                    "the gates have not converged, and export's projection changes the model the more; train "
                    "longer, or raise the gates' learning rate (param_groups(gates={'lr': ...}), default 0.05 "
                    "for Adam) or dual_lr"
                )
        return out

    def requested_sparsity(self) -> float | None:
        if self.config.lmbda is not None:
            return None
        if isinstance(self.target, float):
            return self.target
        total = sum(self.totals)
        return 1.0 - sum(d * t for d, t in zip(self.densities, self.totals)) / total

    def state_dict(self) -> dict[str, Any]:
        return {**self.duals.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "multipliers" in state:
            self.duals.load_state_dict(state)
        steps = state.get("steps", self.steps)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"method state steps={steps!r} must be an int >= 0, as state_dict() saves it")
        self.steps = steps

"""Penalty methods: plain L1, soft weight sharing (``sws``) and HALO (Seto et al. 2021, hierarchical adaptive lasso,
https://arxiv.org/abs/2008.10183).

Each adds a loss term and trains the model as it is; the weights are pruned once, to the exact target, by
global magnitude (``layerwise=True``: within each layer), at export or, with ``finetune``, at a step of the run
followed by training of the masked model. ``docs/methods/penalty.md`` gives the formulas and the choices made
where the seed's code departs from its paper.

- ``l1``:   ``ξ Σ|w|``
- ``sws``:  ``ξ Σ|w| / λ² + ψ λ²`` with one learned ``λ`` shared by every weight
- ``halo``: ``ξ Σ_j |w_j| / λ_j² + ψ R(λ)``, one learned ``λ_j`` per weight, ``R = |Σ|λ_j| - p|`` (or squared)

ξ is steered during training (:func:`~sparsewrap.methods.penalty.pruning.steer_xi`), ψ by the same factor, so
that the fraction of weights with ``|w| <= tol`` follows a ramp to the target by the pruning step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...parametrizations import attach
from ...parametrizations.base import version_key
from ...parametrizations.projection import EvalProjection
from ..base import Method, register_method
from ..schedules import START_FIX
from .coefficients import Penalized
from .config import HaloConfig, L1Config, SWSConfig
from .halo_term import SlopeHint, clamp_magnitude, halo_term
from .pruning import (
    REPORT_TOLERANCES,
    keep_at_target,
    near_zero_counts,
    planned_fraction,
    sgd_xi_ceiling,
    steer_xi,
)

# |λ| is kept at or above LAMBDA_FLOOR x |lambda_init| (sign kept), so that |w| / λ² stays finite: after each step,
# or, for halo, by the penalty's own pass before λ is used (halo_term.py)
LAMBDA_FLOOR = 1e-4


class PenaltyMethod(Method):
    """What ``l1``, ``sws`` and ``halo`` share: the parametrizations, the pruning, the controller, the state.

    Subclasses set ``coefficients_kind`` (``"none"``, ``"shared"`` or ``"per-weight"``) and :meth:`term`.
    """

    Config: ClassVar[type] = L1Config
    coefficients_kind: ClassVar[str] = "none"
    clamps_in_term: ClassVar[bool] = False  # the term clamps |λ| itself (step() does otherwise)

    # -- set-up -------------------------------------------------------------------------------------------------
    def attach(self) -> None:
        if not isinstance(self.target, float):
            raise ConfigError(
                f"method {self.name!r} takes one overall sparsity, got target={self.target!r}; choose layers with "
                "include=/exclude=, and give layerwise=True to prune each layer to the target"
            )
        cfg = self.config
        init = float(getattr(cfg, "lambda_init", 1.0))
        self.layers: list[Penalized] = []
        for i, t in enumerate(self.targets):
            bias = self.bias_of(t.module)
            lam = {"per-weight": t.shape, "shared": () if i == 0 else None}.get(self.coefficients_kind)
            lam_bias = tuple(bias.shape) if bias is not None and self.coefficients_kind == "per-weight" else None
            self.layers.append(attach(t.module, "weight", Penalized(t.original, lam, lam_bias, init)))
        self.xi = float(cfg.xi)
        self.pruned = False
        self.steps_done = 0
        self.near_zero: float | None = None  # the fraction the controller last measured
        self.removed_not_near_zero: int | None = None  # counted when pruning during the run
        self.learned_at_prune: float | None = None  # the near-zero fraction (|w| <= tol) just before that pruning
        self._keep: tuple[tuple, list[Tensor]] | None = None  # (weights' versions, keep-masks at the target)
        self.eval_projection = EvalProjection()  # eval mode shows what export writes
        self.eval_projection.bind(self.final_masks)
        for p in self.layers:
            p.final = self.eval_projection

    def bias_of(self, module: nn.Module) -> Tensor | None:
        """The bias the penalty covers (``penalize_bias``), or ``None``."""
        bias = getattr(module, "bias", None)
        return bias if self.config.penalize_bias and isinstance(bias, Tensor) and bias.requires_grad else None

    def coefficients(self) -> list[nn.Parameter]:
        """Every learned coefficient λ (empty for ``l1``)."""
        return [c for p in self.layers for c in p.coefficients()]

    def parameter_groups(self) -> list[dict[str, Any]]:
        lam = self.coefficients()
        # "scheduled": sw.fit's lr schedule applies to them as to the weights (the seed's: one optimizer, one rate)
        return [{"name": "lambdas", "params": lam, "scheduled": True}] if lam else []

    # -- the run --------------------------------------------------------------------------------------------------
    def prune_step(self) -> int | None:
        """The step after which the model is pruned (``finetune > 0``), else ``None`` (pruned at export).

        Raises:
            ConfigError: if ``finetune > 0`` and the run's length is unknown.
        """
        if not self.config.finetune:
            return None
        total = self.run.total_steps
        if total is None:
            raise ConfigError(
                f"finetune={self.config.finetune!r} is a fraction of the run, but method {self.name!r} was not told "
                f"the run's length; {START_FIX}"
            )
        return min(int((1.0 - self.config.finetune) * total + 0.5), total - 1)

    def steer_every(self) -> int | None:
        """Steps between controller updates, or ``None`` when not steering (off, or a fraction of an unknown run)."""
        cfg = self.config
        if not cfg.steer or (isinstance(cfg.steer_every, float) and self.run.total_steps is None):
            return None
        return max(1, self.resolve_steps(cfg.steer_every, "steer_every"))

    def psi(self) -> float:
        """ψ at the current step: ``reg_schedule`` applied, and scaled by the controller's factor on ξ
        (``ξ / xi``), so that steering scales the whole penalty and leaves the coefficients' optimum
        ``λ*`` (a function of ``ξ / ψ``) where it is."""
        cfg = self.config
        steered = self.xi / float(cfg.xi) if cfg.xi > 0 else 1.0
        if cfg.reg_schedule is None:
            return float(cfg.psi) * steered
        factor, every = cfg.reg_schedule
        return (
            float(cfg.psi) * steered * factor ** (self.steps_done // max(1, self.resolve_steps(every, "reg_schedule")))
        )

    def on_start(self) -> None:
        self.prune_step()
        self.steer_every()
        if getattr(self.config, "reg_schedule", None) is not None:
            self.psi()
        if self.run.optimizer is not None:
            self.share_weight_settings(self.run.optimizer)

    def share_weight_settings(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the ``lambdas`` group the weights group's momentum and weight decay, as the seed does, where the
        lambdas group has the optimizer's default (``sw.fit`` passes ``weight_decay`` to the weights only)."""
        groups = {g.get("name"): g for g in optimizer.param_groups}
        lam, weights = groups.get("lambdas"), groups.get("weights")
        if lam is None or weights is None:
            return
        for key in ("momentum", "weight_decay"):
            if key in weights and lam.get(key) == optimizer.defaults.get(key):
                lam[key] = weights[key]

    # -- the penalty ------------------------------------------------------------------------------------------
    def penalized(self) -> list[tuple[Tensor, Tensor | None]]:
        """``(tensor, its coefficients or None)`` for every penalized weight and bias."""
        out: list[tuple[Tensor, Tensor | None]] = []
        for t, p in zip(self.targets, self.layers):
            out.append((t.original, p.lam))
            bias = self.bias_of(t.module)
            if bias is not None:
                out.append((bias, p.lam_bias))
        return out

    def term(self, xi: float) -> Tensor:
        """The loss term at ξ = ``xi`` (before pruning)."""
        raise NotImplementedError

    def lambda_floor(self) -> float:
        """The least ``|λ|``: ``LAMBDA_FLOOR × |lambda_init|``."""
        return LAMBDA_FLOOR * abs(float(getattr(self.config, "lambda_init", 1.0)))

    def lambda_square(self) -> float:
        """The λ² a weight's ``ξ |w|`` is divided by, for the controller's ceiling on ξ: 1 for ``l1``, the shared
        λ² for ``sws``, ``lambda_init²`` for ``halo`` (whose λ_j differ from weight to weight)."""
        return 1.0

    def penalty(self) -> Tensor | None:
        if not self.pruned:
            return self.term(self.xi)
        lam = self.coefficients()
        # zero once pruned, but the coefficients stay in the graph: DDP expects a gradient for every parameter
        return torch.stack([x.sum() for x in lam]).sum() * 0.0 if lam else None

    # -- steps ----------------------------------------------------------------------------------------------------
    def step(self, t: int) -> None:
        self.steps_done = t + 1
        if self.pruned:
            return
        if not self.clamps_in_term:
            for lam in self.coefficients():
                clamp_magnitude(lam, self.lambda_floor())
        every, prune = self.steer_every(), self.prune_step()
        if every is not None and (t + 1) % every == 0:
            weights = [x.original for x in self.targets]
            (count,) = near_zero_counts(weights, [self.config.tol])
            self.near_zero = count / max(1, sum(w.numel() for w in weights))
            end = prune if prune is not None else (self.run.total_steps - 1 if self.run.total_steps else None)
            ceiling = sgd_xi_ceiling(self.run.optimizer, self.config.tol, self.lambda_square())
            planned = planned_fraction(t, end, self.target)
            self.xi = steer_xi(self.xi, float(self.config.xi), self.near_zero, planned, ceiling)
        if prune is not None and t >= prune:
            self.prune()
        self.eval_projection.reset()

    def keep_masks(self) -> list[Tensor]:
        """The keep-masks at the target on the current weights (cached until a weight changes)."""
        weights = [t.original for t in self.targets]
        key = tuple(version_key(w) for w in weights)
        if self._keep is None or self._keep[0] != key:
            self._keep = (key, keep_at_target(weights, self.target, self.config.layerwise))
        return self._keep[1]

    def prune(self) -> None:
        """Prune to the target now: the hard masks take the keep-masks and hold from here on."""
        keep = self.keep_masks()
        weights = [t.original for t in self.targets]
        self.removed_not_near_zero = self.count_removed_not_near_zero(weights, keep)
        self.learned_at_prune = self.near_zero_fraction()
        with torch.no_grad():
            for w, p, k in zip(weights, self.layers, keep):
                p.mask.copy_(k)
                p.pruned = True
                p.project(w)
        if self.run.optimizer is not None:  # pruned weights start the fine-tuning with no momentum left
            for w, k in zip(weights, keep):
                self.reset_optimizer_state(w, k == 0)
        self.pruned = True
        self._keep = None

    def near_zero_fraction(self) -> float:
        """The fraction of the targeted weights with ``|w| <= tol`` now."""
        weights = [t.original for t in self.targets]
        (count,) = near_zero_counts(weights, [self.config.tol])
        return count / max(1, sum(w.numel() for w in weights))

    def learned_sparsity(self) -> float:
        """What training learned before the projection to the target: the near-zero fraction ``|w| <= tol`` now,
        or just before the pruning once pruned (``finetune``)."""
        if self.pruned and self.learned_at_prune is not None:
            return self.learned_at_prune
        return self.near_zero_fraction()

    def count_removed_not_near_zero(self, weights: list[Tensor], keep: list[Tensor]) -> int:
        """How many weights the projection removes that are not near zero (``|w| > tol``)."""
        with torch.no_grad():
            return int(sum(((~k) & (w.detach().abs() > self.config.tol)).sum() for w, k in zip(weights, keep)))

    def final_masks(self) -> dict[nn.Module, Tensor]:
        """``{parametrization: keep-mask}`` that the eval forward applies; empty once pruned (the live masks)."""
        if self.pruned:
            return {}
        return {p: k.to(p.mask.dtype) for p, k in zip(self.layers, self.keep_masks())}

    def bake(self) -> dict[tuple[str, str], Tensor]:
        out = {}
        with torch.no_grad():
            keep = [p.mask for p in self.layers] if self.pruned else self.keep_masks()
            for t, k in zip(self.targets, keep):
                out[(t.name, "weight")] = (t.original * k.to(t.original.dtype)).detach().clone()
        return out

    # -- report and state -----------------------------------------------------------------------------------------
    def summary(self) -> dict[str, float]:
        weights = [t.original for t in self.targets]
        total = max(1, sum(w.numel() for w in weights))
        counts = near_zero_counts(weights, REPORT_TOLERANCES)
        out = {"learned sparsity": self.learned_sparsity()}
        out |= {f"near zero (|w| <= {tol:g})": c / total for tol, c in zip(REPORT_TOLERANCES, counts)}
        out["xi"] = self.xi
        if hasattr(self.config, "psi"):
            schedule = self.config.reg_schedule
            known = schedule is None or isinstance(schedule[1], int) or self.run.total_steps is not None
            out["psi"] = self.psi() if known else float(self.config.psi)
        lam = self.coefficients()
        if lam:
            with torch.no_grad():
                flat = torch.cat([x.detach().abs().reshape(-1).float() for x in lam])
                out |= {"|lambda| mean": float(flat.mean()), "|lambda| min": float(flat.min()),
                        "|lambda| max": float(flat.max())}  # fmt: skip
        removed = self.removed_not_near_zero
        if removed is None:
            removed = self.count_removed_not_near_zero(weights, self.keep_masks())
        out["removed, not near zero"] = float(removed)
        out["pruned"] = float(self.pruned)
        return out

    def notes(self) -> list[str]:
        weights = [t.original for t in self.targets]
        total = sum(w.numel() for w in weights)
        zeros = sum(int((w == 0).sum()) for w in weights)
        if zeros > round(self.target * total):
            return [f"{zeros} of {total} targeted weights are already zero, more than the target: export keeps them "
                    "zero, so the exported sparsity is above the target"]  # fmt: skip
        return []

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"xi": self.xi, "pruned": self.pruned, "steps": self.steps_done}
        if self.run.total_steps is not None:  # a loaded run knows its length (reports, fractions) until start()
            state["total_steps"] = self.run.total_steps
        if self.near_zero is not None:
            state["near_zero"] = self.near_zero
        if self.removed_not_near_zero is not None:
            state["removed_not_near_zero"] = self.removed_not_near_zero
        if self.learned_at_prune is not None:
            state["learned_at_prune"] = self.learned_at_prune
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.xi = float(state.get("xi", self.xi))
        self.pruned = bool(state.get("pruned", self.pruned))
        self.steps_done = int(state.get("steps", self.steps_done))
        if self.run.total_steps is None and state.get("total_steps") is not None:
            self.run.total_steps = int(state["total_steps"])
        self.near_zero = state.get("near_zero", self.near_zero)
        self.removed_not_near_zero = state.get("removed_not_near_zero", self.removed_not_near_zero)
        self.learned_at_prune = state.get("learned_at_prune", self.learned_at_prune)
        for p in self.layers:
            p.pruned = self.pruned
        self._keep = None
        self.eval_projection.reset()


@register_method
class L1(PenaltyMethod):
    """Plain L1: ``ξ Σ|w|``."""

    name = "l1"
    description = "L1 penalty xi*sum|w|, pruned once to the target by global magnitude (HALO's baseline)."
    Config = L1Config

    def term(self, xi: float) -> Tensor:
        return xi * torch.stack([x.abs().sum() for x, _ in self.penalized()]).sum()


@register_method
class SWS(PenaltyMethod):
    """Soft weight sharing: ``ξ Σ|w| / λ² + ψ λ²`` with one learned λ."""

    name = "sws"
    description = "Shared-coefficient lasso xi*sum|w|/lam^2 + psi*lam^2, pruned once to the target (HALO's baseline)."
    Config = SWSConfig
    coefficients_kind = "shared"

    def lambda_square(self) -> float:
        return float(self.layers[0].lam.detach().square())

    def term(self, xi: float) -> Tensor:
        lam = self.layers[0].lam
        l1 = torch.stack([x.abs().sum() for x, _ in self.penalized()]).sum()
        return xi * l1 / lam.square() + self.psi() * lam.square()


@register_method
class HALO(PenaltyMethod):
    """Hierarchical adaptive lasso: ``ξ Σ_j |w_j| / λ_j² + ψ R(λ)``."""

    name = "halo"
    description = "HALO: adaptive lasso with one learned coefficient per weight, pruned once to the target."
    Config = HaloConfig
    coefficients_kind = "per-weight"
    clamps_in_term = True

    def attach(self) -> None:
        super().attach()
        self.hint = SlopeHint()  # R' of the last penalty, the next one's guess (halo_term.py)

    def lambda_square(self) -> float:
        return float(self.config.lambda_init) ** 2

    def term(self, xi: float) -> Tensor:
        # one pass over each weight and its coefficients: |λ| clamped, the sums and the gradients (halo_term.py)
        squared = self.config.hierarchy != "l1"
        return halo_term(xi, self.psi(), self.config.p, squared, self.penalized(), self.lambda_floor(), self.hint)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"slope_hint": self.hint.slope}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.hint.slope = float(state.get("slope_hint", self.hint.slope))

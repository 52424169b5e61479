"""Soft Threshold Reparameterization (Kusupati et al. 2020, https://arxiv.org/abs/2002.03231), ``method="str"``.

Each targeted weight becomes ``S(w, s_l) = sign(w) * relu(|w| - sigmoid(s_l))`` with one learnable scalar
``s_l`` per layer (:class:`~sparsewrap.parametrizations.threshold.SoftThreshold`), in training and evaluation.
The thresholds sit in their own optimizer group (``"thresholds"``, weight decay ``s_weight_decay``) and are
trained by the weights' optimizer, so that momentum acts on them as in the paper.

**Driving to the target** (``drive > 0``, the default; the paper has no target, its sparsity follows
``s_init`` and the weight decay, tuned per run). The controller owns the thresholds' common level; of the
differences between layers that the optimizer teaches them, it keeps the share ``learn``. After each
optimizer step it

1. takes back the optimizer's moves of the ``s_l`` since the controller's last step (task gradient and decay
   alike), all but the share ``learn`` of their differences: with ``m_l = s_l - s_l^last`` and ``m`` their
   mean, ``s_l <- s_l^last + learn * (m_l - m)``;
2. reads the sparsity ``z_t`` (the fraction of zeros of ``S(w, s)`` over the targeted layers) as the step's
   training forward counted it, at no extra pass over the weights: the weights and thresholds the step trained
   on, one optimizer update behind the current ones (a layer with no training forward since the last
   controller step is counted exactly, on its current weights; :meth:`STR.zeros` is always that exact count);
3. moves every ``s_l`` by the same amount, ``s_l <- s_l + drive * (g_t - z_t)``,

where ``g_t`` is the goal: the target, or with ``end > start`` a cubic ramp from 0 at ``start`` to the target
at ``end`` (as ``gmp``). Step 3 is an integral controller on the common level (without step 1 an optimizer
that keeps lowering the thresholds, as Adam's normalised steps do, would leave a lasting gap of
``lr / drive``). With ``learn=0`` (the default) every layer keeps the one threshold ``sigmoid(s)`` that the
controller sets, and the per-layer budgets are those this threshold cuts from the trained weights (non-uniform:
a layer of larger weights keeps more). With ``learn=1`` the layers keep the differences the task gradient
teaches, as in the paper; for ``s_l << 0``, ``sigmoid(s_l) ~ exp(s_l)``, so the common shift multiplies every
layer's threshold by the same factor and those differences stay. On LeNet-300-100 (MNIST, 10 epochs, five
seeds at 0.9) the learned differences cost accuracy at every target measured (docs/methods/learned.md), hence
the default. ``drive=0`` turns all of this off: the paper's behaviour, thresholds trained by the optimizer alone.

**Export** writes the shrunk weights ``S(w, s)``, projected exactly onto the target: every layer's learned
density is scaled by the same factor (:func:`~sparsewrap.methods.layer_budgets.rescaled_keep_counts`), and
each layer keeps its largest ``|w|``. A layer that must drop more keeps ``S(w, s_l)`` on its survivors; one
that must keep more lowers its threshold to just below the largest ``|w|`` it drops, so its survivors are
``S(w, s'_l)`` with ``sigmoid(s'_l) < sigmoid(s_l)``. The report gives each layer's learned sparsity (the live
model) next to the exported one, and ``summary()`` the learned overall sparsity and its gap to the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..parametrizations import attach
from ..parametrizations.base import version_key
from ..parametrizations.projection import EvalProjection
from ..parametrizations.threshold import SoftThreshold, shrink_kept
from ..parametrizations.topk import keep_largest
from .base import Method, register_method
from .layer_budgets import rescaled_keep_counts
from .schedules import Schedule, StepSpec


@dataclass
class STRConfig:
    """Options of ``method="str"``.

    Attributes:
        s_init: initial value of every layer's threshold parameter (the threshold is ``sigmoid(s_init)``). The
            default -20 (a threshold of 2e-9) starts training on the dense model's trajectory and leaves the
            controller to raise it as the goal asks; -10 (4.5e-5) shrinks every weight from the first step, which
            tipped LeNet-5 at lr 0.1 into a slow start on one seed of two (docs/methods/learned.md). The paper's
            ImageNet configs use -3200, where ``sigmoid'`` is exactly 0 in float32 and only weight decay moves
            ``s`` at first.
        s_weight_decay: weight decay of the thresholds' optimizer group (the paper uses the weights' decay;
            decay pulls ``s`` towards 0, i.e. raises the thresholds).
        drive: gain of the controller that steers the measured sparsity to the target (``s`` units per unit of
            sparsity gap per step; 0.5 reaches the target from ``s_init=-20`` in a few dozen steps and then
            tracks it within a fraction of a point); 0 turns the controller off (the paper's behaviour).
        start: with ``end > start``, the controller's goal ramps (cubic) from 0 at step ``start``...
        end: ...to the target at step ``end``; with ``end=0`` the goal is the target from the first step. Both
            are step counts or fractions of the run (``end=0.75``), resolved when ``sp.start`` gives its length.
        learn: with ``drive > 0``, the share of the optimizer's per-layer moves of the thresholds that is kept
            (the differences between layers that the task gradient teaches): 0, the default, keeps none, so every
            layer shares the controller's one threshold and the per-layer budgets follow the trained weights'
            magnitudes; 1 keeps them all, as the paper learns them. Measured on MNIST (docs/methods/learned.md):
            0 is ahead of 1 at every target.
    """

    s_init: float = -20.0
    s_weight_decay: float = 0.0
    drive: float = 0.5
    start: StepSpec = 0
    end: StepSpec = 0
    learn: float = 0.0

    def __post_init__(self) -> None:
        for name in ("s_init", "s_weight_decay", "drive", "learn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name}={value!r} must be a finite number, e.g. {name}={STRConfig.__dict__[name]}")
        if self.s_weight_decay < 0:
            raise ConfigError(f"s_weight_decay={self.s_weight_decay} is negative; give a decay >= 0, e.g. 5e-4")
        if self.drive < 0:
            raise ConfigError(f"drive={self.drive} is negative; give a gain >= 0 (0 turns the controller off)")
        if not 0 <= self.learn <= 1:
            raise ConfigError(
                f"learn={self.learn} is outside [0, 1]; give the share of the optimizer's per-layer moves of the "
                "thresholds to keep (0: one common threshold, 1: the paper's learned ones)"
            )
        if self.end != 0 or self.start != 0:
            Schedule("cubic", self.start, self.end, 1)


@register_method
class STR(Method):
    """Soft Threshold Reparameterization (see the module docstring)."""

    name = "str"
    description = "STR: soft threshold sign(w)*relu(|w|-sigmoid(s)) per layer, driven to the target."
    Config = STRConfig

    def attach(self) -> None:
        if not isinstance(self.target, float):
            raise ConfigError(
                f"method 'str' learns its own per-layer budgets and takes one overall sparsity, got "
                f"target={self.target!r}; give a float, or use method='dnw' with a per-layer dict"
            )
        cfg = self.config
        self.layers = [attach(t.module, "weight", SoftThreshold(t.original, cfg.s_init)) for t in self.targets]
        self.eval_projection = EvalProjection()  # eval mode shows export's projection (recomputed after changes)
        self.eval_projection.bind(self.final_factors, self.state_key)
        for p in self.layers:
            p.final = self.eval_projection
        self.requested_goal = Schedule("cubic", cfg.start, cfg.end, 1) if cfg.end > cfg.start else None
        self.goal = self.requested_goal  # in step numbers once the run's length is known (on_start)
        self.numel = sum(t.numel for t in self.targets)
        self.shift = torch.zeros((), dtype=torch.float64)  # the controller's accumulated shift of every s_l
        self.last = self.levels()  # the s_l as the controller left them (the optimizer's moves are measured from)

    # -- the controller -------------------------------------------------------------------------------------------
    def zeros(self) -> Tensor:
        """The number of zeros of ``S(w, s)`` over the targeted layers (a tensor; no host transfer)."""
        return sum(p.zeros(t.original).to(torch.float64) for t, p in zip(self.targets, self.layers))

    def trained_zeros(self) -> Tensor:
        """The zeros of ``S(w, s)`` as the last training forward of each layer counted them (no pass over the
        weights; one optimizer update behind :meth:`zeros`, whose exact count stands in for a layer without one)."""
        return sum(p.trained_zeros(t.original).to(torch.float64) for t, p in zip(self.targets, self.layers))

    def levels(self) -> Tensor:
        """Every layer's ``s_l`` (float64, one vector)."""
        return torch.stack([p.s.detach().to(torch.float64) for p in self.layers])

    def on_start(self) -> None:
        if self.requested_goal is not None and self.requested_goal.fractional:
            self.goal = self.requested_goal.resolved(self.total_steps(), self.name)

    def step(self, t: int) -> None:
        self.eval_projection.reset()
        if self.goal is not None and self.goal.fractional:  # sp.start(total_steps=...) was not called
            self.on_start()  # raises, naming the fix
        if self.config.drive == 0:
            return
        goal = self.goal.sparsity(t, self.target) if self.goal is not None else self.target
        with torch.no_grad():
            s = self.levels()
            last = self.last.to(s.device)
            move = s - last  # the optimizer's moves since the controller's last step
            self._set(last + self.config.learn * (move - move.mean()))  # of their differences, the share `learn`
            delta = self.config.drive * (goal - self.trained_zeros().to(s.device) / self.numel)
            self._set(self.levels() + delta)
            self.last = self.levels()  # as stored (in the parameters' dtype)
            self.shift = self.shift.to(s.device) + delta  # tensors stay on the device: no synchronisation per step

    def _set(self, values: Tensor) -> None:
        for p, value in zip(self.layers, values):
            p.s.copy_(value)

    def parameter_groups(self) -> list[dict]:
        params = [p.s for p in self.layers]
        # "scheduled": sw.fit's lr schedule decays them with the weights (the paper trains them as weights; at a
        # constant rate, late in a cosine run they keep following the task gradient while the weights stand
        # still, and the learned sparsity falls short at 0.98: docs/methods/learned.md)
        return [{"name": "thresholds", "params": params, "weight_decay": self.config.s_weight_decay,
                 "scheduled": True}]  # fmt: skip

    # -- export ---------------------------------------------------------------------------------------------------
    def state_key(self) -> tuple:
        """What export's projection is computed from (every weight and threshold, by version): evaluation
        forwards in a row on unchanged weights reuse one projection."""
        return tuple((version_key(t.original), version_key(p.s)) for t, p in zip(self.targets, self.layers))

    def final_factors(self) -> dict[nn.Module, tuple[Tensor, Tensor]]:
        """Export's projection, per layer whose learned count of kept weights it changes: ``(kept, threshold)``,
        with ``kept`` the ``keep`` largest ``|w|`` (bool) and the threshold ``S`` applies to them."""
        with torch.no_grad():
            kept = [t.numel - int(p.zeros(t.original)) for t, p in zip(self.targets, self.layers)]
            sizes = [t.numel for t in self.targets]
            counts = rescaled_keep_counts(kept, sizes, self.numel - round(self.target * self.numel))
            return {
                p: self._cut(t.original, p, keep, learned)
                for t, p, learned, keep in zip(self.targets, self.layers, kept, counts)
                if keep != learned
            }

    def bake(self) -> dict[tuple[str, str], Tensor]:
        cuts = self.final_factors()
        with torch.no_grad():
            return {
                (t.name, "weight"): shrink_kept(t.original, *cuts[p]) if p in cuts else p.bake(t.original)
                for t, p in zip(self.targets, self.layers)
            }

    @staticmethod
    def _cut(w: Tensor, p: SoftThreshold, keep: int, learned: int) -> tuple[Tensor, Tensor]:
        """The ``keep`` largest ``|w|`` of one layer and the threshold for them (see the module docstring)."""
        mask = keep_largest(w.abs(), keep)
        t = p.threshold().detach().to(w.dtype)
        if keep > learned:  # lower the threshold to just below the largest dropped |w| (0 when nothing is dropped)
            dropped = w.abs().masked_fill(mask, 0)
            largest = dropped.max() if keep < w.numel() else torch.zeros((), dtype=w.dtype, device=w.device)
            t = torch.nextafter(largest, torch.zeros_like(largest))
        return mask, t

    # -- report ---------------------------------------------------------------------------------------------------
    def learned_sparsity(self) -> float:
        """The overall sparsity of ``S(w, s)`` now, before the export's projection."""
        return float(self.zeros()) / self.numel if self.numel else 0.0

    def summary(self) -> dict[str, float]:
        learned = self.learned_sparsity()
        return {"learned sparsity": learned, "gap to target": learned - self.target,
                "threshold shift": float(self.shift)}  # fmt: skip

    def state_dict(self) -> dict[str, float | list[float]]:
        return {"shift": float(self.shift), "last": self.last.tolist(), "learn": self.config.learn}

    def load_state_dict(self, state: dict) -> None:
        self.shift = torch.tensor(float(state.get("shift", 0.0)), dtype=torch.float64)
        if "last" in state:
            self.last = torch.tensor(state["last"], dtype=torch.float64)
            # the share the run trained with; a checkpoint from before the option kept every difference (learn=1)
            self.config.learn = float(state.get("learn", 1.0))

"""Magnitude pruning: one-shot or gradual, unstructured or by output channel.

- Unstructured: drop the weights of smallest ``|w|`` (Han et al. 2015), globally or per layer (uniform, ERK).
- ``granularity="channel"``: drop whole output channels of smallest L1 norm (Li et al. 2017,
  https://arxiv.org/abs/1608.08710). A channel is a unit of a *channel group* (layers whose outputs are added
  or that follow depthwise), so every member loses it together, with its biases and BatchNorm affine terms:
  the channel is then exactly zero downstream and the purge can remove it. The score is the mean ``|w|`` of
  the channel's rows; with ``allocation="global"`` it is divided by its group's mean score so that groups of
  different scale compete fairly.
- Gradual (Zhu & Gupta 2017, https://arxiv.org/abs/1710.01878): ``schedule="cubic"`` or ``"exponential"``
  between steps ``start`` and ``end``, masks recomputed every ``every`` steps from ``|w * mask|`` (pruned
  weights stay pruned).

Export always projects onto the requested target, so the exported sparsity is exact (to one weight, or to
one channel) even if training stopped before ``end``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError, choices
from ..parametrizations import Masked, attach, wrapped_tensors
from ..parametrizations.base import version_key
from ..parametrizations.projection import EvalProjection
from .allocation import ALLOCATIONS, drop_lowest, largest_remainder, layer_sparsities
from .base import Method, register_method
from .layer_budgets import layer_drop_counts
from .schedules import SCHEDULES, Schedule, StepSpec

GRANULARITIES = ("weight", "channel")


@dataclass
class MagnitudeConfig:
    """Options of ``method="magnitude"``.

    Attributes:
        schedule: ``"oneshot"`` (prune at :func:`sparsify`), ``"cubic"`` or ``"exponential"`` (gradual).
        start: first prune step of a gradual schedule: a step count, or a fraction of the run (float in [0, 1]).
        end: last prune step (the target is reached here): a step count or a fraction of the run.
        every: steps between prune events.
        allocation: ``"global"`` (one ranking over all layers), ``"uniform"`` or ``"erk"`` (per layer).
        granularity: ``"weight"`` (unstructured) or ``"channel"`` (output channels by L1 norm).
    """

    schedule: str = "oneshot"
    start: StepSpec = 0
    end: StepSpec = 0
    every: int = 1
    allocation: str = "global"
    granularity: str = "weight"

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation={self.allocation!r} is unknown; valid: {choices(ALLOCATIONS)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity={self.granularity!r} is unknown; valid: {choices(GRANULARITIES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is unknown; valid: {choices(SCHEDULES)}")
        Schedule(self.schedule, self.start, self.end, self.every)


@dataclass(eq=False)
class _Unit:
    """One channel group restricted to what the method masks: the masks sharing its keep-vector."""

    size: int
    weights: list[tuple[Tensor, Masked]]  # (original weight, its mask) of targeted layers
    companions: list[Masked]  # biases and BN affine terms

    @property
    def row_numel(self) -> int:
        return sum(w.numel() // w.shape[0] for w, _ in self.weights)


@register_method
class Magnitude(Method):
    """Magnitude pruning (see the module docstring)."""

    name = "magnitude"
    description = "Magnitude pruning: one-shot or gradual (cubic/exponential), per weight or per channel (L1)."
    Config = MagnitudeConfig

    def attach(self) -> None:
        cfg = self.config
        self.layer_drops: list[int] | None = None  # per-layer counts of a {layer pattern: sparsity} target
        self.final = self.target  # the plan's end: the target, or 1.0 (every layer's full count) for a dict
        if isinstance(self.target, dict):
            if cfg.granularity != "weight":
                raise ConfigError(
                    f"method {self.name!r} takes a per-layer dict target with granularity='weight' only, got "
                    f"granularity={cfg.granularity!r}; give one overall sparsity for channels"
                )
            kept, self.layer_drops = layer_drop_counts(self.targets, self.target, "uniform")
            self.targets[:] = kept  # layers the dict does not name stay dense
            self.final = 1.0
        meta = next((t.name for t in self.targets if t.original.is_meta), None)
        if meta is not None:
            raise ConfigError(
                f"layer {meta!r} is on the meta device (it has no values) and method 'magnitude' ranks weights by "
                "|w|; materialize the model first (model.to_empty(device='cpu'), then load its weights)"
            )
        self.check_finite("at sparsify")
        self.requested_schedule = Schedule(cfg.schedule, cfg.start, cfg.end, cfg.every)
        self.schedule = self.requested_schedule  # in step numbers once the run's length is known (on_start)
        self.current = 0.0
        if cfg.granularity == "channel":
            self.units = self._attach_channels()
        else:
            self.masks = [attach(t.module, "weight", Masked(t.shape, t.original)) for t in self.targets]
        if self.schedule.kind == "oneshot":
            self._apply(self.final)
        self.eval_projection = EvalProjection()  # eval mode shows the export until the schedule has reached it
        self.eval_projection.bind(self.final_masks, self.state_key)
        for m in self._all_masks():
            m.final = self.eval_projection

    def _attach_channels(self) -> list[_Unit]:
        self.graph.require_traced("granularity='channel'")
        modules = dict(self.model.named_modules())
        by_name = {t.name: t for t in self.targets}
        units, covered = [], set()
        groups = [(g.size, g.producers, g.companions) for g in self.graph.groups]
        groups += [(t.shape[0], [t.name], [(t.name, "bias")]) for t in self.targets]  # leaf-internal layers
        for size, producers, companions in groups:
            mine = [p for p in producers if p in by_name and p not in covered]
            if not mine:
                continue
            covered.update(mine)
            weights = []
            for p in mine:
                t = by_name[p]
                shape = (t.shape[0],) + (1,) * (len(t.shape) - 1)
                weights.append((t.original, attach(t.module, "weight", Masked(shape, t.original))))
            comps = []
            for mname, pname in companions:
                mod = modules[mname]
                tensor = getattr(mod, pname, None)
                is_norm = not hasattr(mod, "out_channels") and not hasattr(mod, "out_features")
                if tensor is None or (mname not in mine and not is_norm) or tensor.shape != (size,):
                    continue
                comps.append(attach(mod, pname, Masked((size,), tensor)))
            units.append(_Unit(size, weights, comps))
        return units

    # -- selection --------------------------------------------------------------------------------------------
    def check_finite(self, when: str) -> None:
        """Refuse to rank weights that are NaN or infinite: every mask computed from them would be arbitrary.

        Args:
            when: where the check runs, for the message (``"at sparsify"``, ``"at step 12"``, ``"at export"``).

        Raises:
            ConfigError: naming the first layer whose weights are not all finite.
        """
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(t.original).all() for t in self.targets])
            if bool(finite.all()):  # one device sync for every layer
                return
        name = self.targets[int((~finite).nonzero()[0])].name
        fix = (
            "load finite weights before sparsify"
            if when == "at sparsify"
            else "training diverged: lower the learning rate or resume from an earlier checkpoint"
        )
        raise ConfigError(
            f"layer {name!r} has non-finite weights (NaN or inf) {when}; method 'magnitude' cannot rank them by |w|: "
            f"{fix}"
        )

    def _plan(self, sparsity: float) -> list[Tensor]:
        """Keep-masks at ``sparsity``: one per target (unstructured) or one (C,) vector per unit (channel)."""
        with torch.no_grad():
            if self.config.granularity == "channel":
                return self._plan_channels(sparsity)
            return self._plan_weights(sparsity)

    def _plan_weights(self, sparsity: float) -> list[Tensor]:
        # already-pruned weights score -1: they stay pruned whatever the ties among live weights
        scores = [torch.where(m.mask == 0, -1.0, t.original.abs()) for t, m in zip(self.targets, self.masks)]
        sizes = [s.numel() for s in scores]
        if self.layer_drops is not None:  # a dict target: each layer its own count, scaled by the schedule
            return [drop_lowest(s, round(sparsity * d)) for s, d in zip(scores, self.layer_drops)]
        total = round(sparsity * sum(sizes))
        if self.config.allocation == "global":
            flat = torch.cat([s.reshape(-1).float() for s in scores])
            keep = drop_lowest(flat, total).split(sizes)
            return [k.view_as(s) for k, s in zip(keep, scores)]
        per_layer = layer_sparsities(self.config.allocation, [t.shape for t in self.targets], sparsity)
        counts = largest_remainder([s * n for s, n in zip(per_layer, sizes)], total, sizes)
        return [drop_lowest(s, k) for s, k in zip(scores, counts)]

    def _channel_scores(self, unit: _Unit) -> Tensor:
        rows = sum((w * m.mask).abs().reshape(unit.size, -1).sum(1).float() for w, m in unit.weights)
        score = rows / unit.row_numel
        pruned = unit.weights[0][1].mask.reshape(-1) == 0
        if self.config.allocation == "global" and not pruned.all():
            score = score / score[~pruned].mean().clamp_min(torch.finfo(score.dtype).tiny)
        return torch.where(pruned, -1.0, score)  # pruned channels first, and always kept pruned

    def _plan_channels(self, sparsity: float) -> list[Tensor]:
        goal = sparsity * sum(t.numel for t in self.targets)
        scores = [self._channel_scores(u) for u in self.units]
        if self.config.allocation == "global":
            counts = self._global_channel_counts(scores, goal)
        else:
            shapes = [tuple(u.weights[0][0].shape) for u in self.units]
            per_unit = layer_sparsities(self.config.allocation, shapes, sparsity)
            counts = self._rounded_channel_counts([s * u.size for s, u in zip(per_unit, self.units)], goal)
        return [drop_lowest(s, c) for s, c in zip(scores, counts)]

    def _global_channel_counts(self, scores: list[Tensor], goal: float) -> list[int]:
        flat = torch.cat(scores)
        owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
        counts, removed = [0] * len(scores), 0
        order = torch.argsort(flat, stable=True)
        flat_sorted = flat[order]
        for j, i in enumerate(owner[order].tolist()):
            unit = self.units[i]
            forced = bool(flat_sorted[j] < 0)
            if forced or (counts[i] < unit.size - 1 and removed + unit.row_numel / 2 < goal):
                counts[i] += 1
                removed += unit.row_numel
        return counts

    def _rounded_channel_counts(self, quotas: list[float], goal: float) -> list[int]:
        counts = [min(math.floor(q), u.size - 1) for q, u in zip(quotas, self.units)]
        removed = sum(c * u.row_numel for c, u in zip(counts, self.units))
        order = sorted(range(len(quotas)), key=lambda i: quotas[i] - math.floor(quotas[i]), reverse=True)
        for i in order:
            unit = self.units[i]
            # at most its quota rounded up: a layer-wise allocation stays layer-wise (within one channel)
            if counts[i] < min(math.ceil(quotas[i]), unit.size - 1) and removed + unit.row_numel / 2 < goal:
                counts[i] += 1
                removed += unit.row_numel
        done = [int((u.weights[0][1].mask == 0).sum()) for u in self.units]
        return [max(c, d) for c, d in zip(counts, done)]  # pruned channels stay pruned

    def _apply(self, sparsity: float) -> None:
        keep = self._plan(sparsity)
        with torch.no_grad():
            if self.config.granularity == "channel":
                for unit, k in zip(self.units, keep):
                    for m in [m for _, m in unit.weights] + unit.companions:
                        m.mask.copy_(k.view(m.mask.shape))
            else:
                for m, k in zip(self.masks, keep):
                    m.mask.copy_(k)
        self.current = sparsity

    def _all_masks(self) -> list[Masked]:
        if self.config.granularity == "channel":
            return [m for unit in self.units for m in [m for _, m in unit.weights] + unit.companions]
        return list(self.masks)

    def state_key(self) -> tuple:
        """What the final masks are computed from (the schedule's point, every weight and mask by version):
        evaluation forwards in a row on unchanged weights reuse one plan."""
        return (self.current, tuple(version_key(t.original) for t in self.targets),
                tuple(version_key(m.mask) for m in self._all_masks()))  # fmt: skip

    def final_masks(self) -> dict[nn.Module, Tensor]:
        """The masks export applies (the plan at the target on the current weights), keyed by parametrization;
        empty once the schedule has reached the target, where they are the live masks."""
        if self.current == self.final:
            return {}
        keep = self._plan(self.final)
        out: dict[nn.Module, Tensor] = {}
        if self.config.granularity == "channel":
            for unit, k in zip(self.units, keep):
                for m in [m for _, m in unit.weights] + unit.companions:
                    out[m] = k.view(m.mask.shape).to(m.mask.dtype)
        else:
            for m, k in zip(self.masks, keep):
                out[m] = k.to(m.mask.dtype)
        return out

    # -- hooks ------------------------------------------------------------------------------------------------
    def on_start(self) -> None:
        if self.requested_schedule.fractional:
            self.schedule = self.requested_schedule.resolved(self.total_steps(), self.name)

    def step(self, t: int) -> None:
        if self.schedule.fractional:  # fractions of the run, and sp.start(total_steps=...) was not called
            self.on_start()  # raises, naming the fix
        if self.schedule.is_update_step(t):
            self.check_finite(f"at step {t}")
            self._apply(self.schedule.sparsity(t, self.final))
        self.eval_projection.reset()

    def bake(self) -> dict[tuple[str, str], Tensor]:
        self.check_finite("at the final projection (export, report)")
        keep = self._plan(self.final)
        names = {id(p): (m, t) for m, _mod, t, p in wrapped_tensors(self.model)}
        out: dict[tuple[str, str], Tensor] = {}
        with torch.no_grad():
            if self.config.granularity == "channel":
                for unit, k in zip(self.units, keep):
                    for w, m in unit.weights:
                        out[names[id(m)]] = w * k.view(m.mask.shape).to(w.dtype)
                    for m in unit.companions:
                        mname, tname = names[id(m)]
                        orig = self.model.get_submodule(mname).parametrizations[tname].original
                        out[(mname, tname)] = orig * k.to(orig.dtype)
            else:
                for t, m, k in zip(self.targets, self.masks, keep):
                    out[names[id(m)]] = t.original * k.to(t.original.dtype)
        return {key: v.detach().clone() for key, v in out.items()}

    def requested_sparsity(self) -> float | None:
        """The target, or the overall sparsity of a dict target's per-layer counts."""
        if self.layer_drops is None:
            return super().requested_sparsity()
        return sum(self.layer_drops) / max(sum(t.numel for t in self.targets), 1)

    def summary(self) -> dict[str, float]:
        return {"scheduled sparsity": self.current}

    def state_dict(self) -> dict[str, float]:
        return {"current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.current = float(state.get("current", self.current))

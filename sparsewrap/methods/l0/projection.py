"""The final projection of the L0 method: from the learned deterministic gates to the exact requested budget.

The eval-mode gates keep a unit (a weight, or a channel) when ``log_alpha > beta * log(1/11)``. Their kept
count rarely equals the budget (the expected density that the constraint controls is not the deterministic
one), so export keeps the units of highest ``log_alpha`` until the budget is met: per weight, the top units
whose cost sums closest to the budget (exact to one weight); per channel, a greedy pass that drops the kept
channels of lowest score while that brings every constraint closer to its budget, then restores dropped
channels of highest score likewise, counting the cascade (a channel also removes its consumers' input slices).
Every channel group keeps at least one channel. The result (:class:`Final`) gives, per gated tensor, the factors
that export multiplies in; the parametrizations' eval-mode forward multiplies the same ones, so that the model one
evaluates is the model one exports.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...parametrizations import wrapped_tensors
from ...parametrizations.gated import ChannelGate, ChannelGated
from ...parametrizations.hard_concrete import eval_gates, mean_gates
from .layout import ChannelPlan, GatedLayer, channel_scores


def weight_scores(weight: Tensor, log_alpha: Tensor) -> Tensor:
    """``log_alpha`` of each weight, ties (clamped gates) broken by ``|w|`` relative to the layer's largest."""
    w = weight.detach().abs().double()
    return log_alpha.detach().double() + 1e-9 * w / w.max().clamp_min(1e-30)


def top_by_cost(scores: list[Tensor], costs: list[float], budget: float) -> list[Tensor]:
    """Keep-masks selecting the highest scores whose summed cost is closest to ``budget``."""
    sizes = [s.numel() for s in scores]
    flat = torch.cat([s.reshape(-1) for s in scores])
    if len(set(costs)) == 1:
        keep = _top_k(flat, min(max(round(budget / costs[0]), 0), flat.numel()))
        return [k.view_as(s) for k, s in zip(keep.split(sizes), scores)]
    order = torch.argsort(flat, descending=True, stable=True)  # exact in float64 (the tie-breaks are ~1e-9)
    cost = torch.cat([torch.full((n,), float(c), dtype=torch.float64) for n, c in zip(sizes, costs)])
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(cost[order.cpu()], 0)])
    j = min(int(torch.searchsorted(cum, torch.tensor([budget], dtype=torch.float64)).item()), cum.numel() - 1)
    if j > 0 and abs(cum[j - 1] - budget) <= abs(cum[j] - budget):
        j -= 1
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[order[:j]] = True
    return [k.view_as(s) for k, s in zip(keep.split(sizes), scores)]


def _top_k(flat: Tensor, k: int) -> Tensor:
    """Keep-mask of exactly the ``k`` highest scores (ties: lower index first), in O(n) and in the scores' dtype."""
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full_like(flat, k >= n, dtype=torch.bool)
    thr = flat.kthvalue(n - k + 1).values  # the k-th largest
    keep = flat > thr
    ties = flat == thr
    return keep | (ties & (torch.cumsum(ties.to(torch.int64), 0) <= k - int(keep.sum())))


class ChannelProjection:
    """Greedy exact projection of channel keep-masks onto per-constraint budgets (see the module docstring).

    Args:
        layers: every targeted layer (channel-gated or not).
        budgets: budget (in cost units) per constraint.
        totals: total cost per constraint (normalizes the deviations of different constraints).
    """

    def __init__(self, layers: list[GatedLayer], budgets: list[float], totals: list[float]) -> None:
        self.layers = layers
        self.budgets = budgets
        self.totals = totals
        self.out_layers: dict[ChannelGate, list[GatedLayer]] = defaultdict(list)
        self.in_refs: dict[ChannelGate, list[tuple[GatedLayer, int, int, int]]] = defaultdict(list)
        for layer in layers:
            if layer.out_gate is not None:
                self.out_layers[layer.out_gate].append(layer)
            for g, lo, hi, rep in layer.in_segs:
                if g is not None:
                    self.in_refs[g].append((layer, lo, hi, rep))

    def _counts(self, layer: GatedLayer) -> int:
        out = self.kept_out.get(layer.out_gate) if layer.out_gate is not None else None
        return layer.count(out, self.kept_in.get(id(layer)))

    def _toggle(self, gate: ChannelGate, i: int, step: int) -> None:
        self.kept_out[gate] += step
        for layer, lo, hi, rep in self.in_refs[gate]:
            if lo <= i < hi:
                self.kept_in[id(layer)] += step * rep

    def _delta(self, gate: ChannelGate, i: int, step: int) -> dict[int, float]:
        affected = {id(la): la for la in self.out_layers[gate]}
        affected.update({id(la): la for la, lo, hi, _r in self.in_refs[gate] if lo <= i < hi})
        before = {k: self._counts(la) for k, la in affected.items()}
        self._toggle(gate, i, step)
        out: dict[int, float] = defaultdict(float)
        for k, la in affected.items():
            out[la.constraint] += la.cost * (self._counts(la) - before[k])
        self._toggle(gate, i, -step)
        return out

    def _gain(self, delta: dict[int, float]) -> float:
        used, b, t = self.used, self.budgets, self.totals
        return sum((abs(used[k] + d - b[k]) - abs(used[k] - b[k])) / max(t[k], 1e-30) for k, d in delta.items())

    def spent(self, keeps: dict[ChannelGate, Tensor]) -> list[float]:
        """Cost used per constraint for the given keep vectors."""
        used = [0.0] * len(self.budgets)
        for layer in self.layers:
            used[layer.constraint] += layer.cost * layer.count_for(keeps)
        return used

    def run(self, scores: dict[ChannelGate, Tensor], keep0: dict[ChannelGate, Tensor]) -> dict[ChannelGate, Tensor]:
        """Final keep-masks (bool, one per gate) from the learned ones ``keep0``."""
        keep = {g: k.detach().clone().cpu() for g, k in keep0.items()}
        cpu_scores = {g: s.detach().cpu() for g, s in scores.items()}
        for g, k in keep.items():
            if not k.any():
                k[int(cpu_scores[g].argmax())] = True
        self.kept_out = {g: int(k.sum()) for g, k in keep.items()}
        self.kept_in = {id(la): la.input_kept(keep) for la in self.layers if la.in_segs}
        self.used = self.spent(keep)
        gates = list(cpu_scores)
        units = sorted((float(s[i]), n, i) for n, s in enumerate(cpu_scores.values()) for i in range(s.numel()))
        for step, candidates in ((-1, units), (+1, reversed(units))):
            for _score, n, i in candidates:
                g = gates[n]
                if bool(keep[g][i]) != (step < 0) or (step < 0 and self.kept_out[g] <= 1):
                    continue
                delta = self._delta(g, i, step)
                if self._gain(delta) < 0:
                    keep[g][i] = step > 0
                    self._toggle(g, i, step)
                    for k, d in delta.items():
                        self.used[k] += d
        return {g: k.to(keep0[g].device) for g, k in keep.items()}


# -- the final gates: what export multiplies in, and what the eval-mode forward uses --------------------------------
def final_gates(log_alpha: Tensor, keep: Tensor, beta: float) -> Tensor:
    """The final gate values: the eval gate where ``keep``, 0 elsewhere; a unit the projection restored (kept,
    but with an eval gate of 0) gets its mean gate ``E[z]`` instead."""
    z = eval_gates(log_alpha, beta)
    restored = keep & (z <= 0)
    z = torch.where(keep, z, torch.zeros_like(z))
    if restored.any():
        z[restored] = mean_gates(log_alpha[restored], beta)
    return z


@dataclass
class Final:
    """The result of a final projection.

    Attributes:
        factors: per gated parametrization, what export multiplies in: the gate tensor (per weight) or the pair
            ``(gate values or keep-mask along dim 0, input keep-mask)`` of :meth:`ChannelGated.apply_gates`.
        learned: budget units the eval-mode gates keep (before the projection).
        final: budget units kept after it.
    """

    factors: dict[nn.Module, Any]
    learned: float
    final: float


def project_weights(layers: list[GatedLayer], budgets: list[float | None], beta: float) -> Final:
    """Per-weight gates: per constraint, the units of highest score whose cost is closest to its budget (``None``:
    no projection, the eval gates' own choice)."""
    keeps: dict[int, Tensor] = {}
    for k, budget in enumerate(budgets):
        mine = [la for la in layers if la.constraint == k]
        if budget is None:
            chosen = [eval_gates(la.weight_gate.log_alpha, beta) > 0 for la in mine]
        else:
            scores = [weight_scores(la.target.original, la.weight_gate.log_alpha) for la in mine]
            chosen = top_by_cost(scores, [la.cost for la in mine], budget)
        keeps.update({id(la): c for la, c in zip(mine, chosen)})
    factors: dict[nn.Module, Any] = {}
    learned, final = 0.0, 0.0
    for la in layers:
        log_alpha = la.weight_gate.log_alpha
        factors[la.weight_gate] = final_gates(log_alpha, keeps[id(la)], beta)
        learned += la.cost * int((eval_gates(log_alpha, beta) > 0).sum())
        final += la.cost * int(keeps[id(la)].sum())
    return Final(factors, learned, final)


def project_channels(model: nn.Module, plan: ChannelPlan, layers: list[GatedLayer], budgets: list[float | None],
                     totals: list[float], beta: float) -> Final:  # fmt: skip
    """Channel gates: the greedy :class:`ChannelProjection` onto the budgets (when every constraint has one)."""
    keep0 = {g: eval_gates(g.log_alpha, beta) > 0 for g in plan.gates}
    keep = keep0
    if all(b is not None for b in budgets):
        scores = channel_scores(plan, dict(model.named_modules()))
        keep = ChannelProjection(layers, budgets, totals).run(scores, keep0)
    z = {g: final_gates(g.log_alpha, keep[g], beta) for g in plan.gates}
    factors: dict[nn.Module, Any] = {}
    for _mname, _module, _tname, p in wrapped_tensors(model):
        if isinstance(p, ChannelGated):
            zo = (keep if p.mask_only else z)[p.out_gate] if p.out_gate is not None else None
            factors[p] = (zo, p.input_keep(keep) if p.in_segs else None)

    def spent(keeps: dict[ChannelGate, Tensor]) -> float:
        return sum(la.cost * la.count_for(keeps) for la in layers)

    return Final(factors, spent(keep0), spent(keep))

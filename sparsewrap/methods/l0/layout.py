"""Where the L0 method puts its gates, and what each gated layer costs (in expectation and for real).

Per weight: one :class:`GatedWeight` per targeted weight. Per channel: one :class:`ChannelGate` per *exact*
channel group whose producers are all targeted, shared by the producers' weights (dim 0), their biases and
the BatchNorm affine terms of the group; each targeted layer that reads gated channels (through concatenations and
flattens, as laid out by :func:`sparsewrap.analysis.channels.analyse_channels`) also counts them on its input,
because removing a channel removes the consumer's input slice too (the cascade). A layer with output gate
probabilities ``p`` (``C_out`` channels) and input columns kept with probabilities ``q`` (``D_in`` columns) has

    E[kept weights] = numel * mean(p) * mean(q)                                   (independent gates)
    E[kept weights] = numel / C^2 * ((sum p)^2 - sum p^2 + sum p)                 (same gate on both sides)

and, deterministically, ``numel * K_out * K_in / (C_out * D_in)`` with ``K`` the kept channels and columns. Costs are
in *budget units* per weight: 1 for ``budget="params"``, the layer's output positions for ``budget="macs"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from ...analysis.channels import ChannelAnalysis, ChannelGroup, analyse_channels
from ...analysis.targets import Target
from ...analysis.tracing import ModelGraph, symbolic_trace
from ...parametrizations import attach
from ...parametrizations.gated import ChannelGate, ChannelGated, GateBank, InSeg
from ...parametrizations.gated_weight import GatedWeight
from ...parametrizations.hard_concrete import prob_nonzero, wide
from ...parametrizations.projection import EvalProjection


@dataclass(eq=False)
class GatedLayer:
    """One targeted layer as the L0 method sees it.

    Attributes:
        target: the layer.
        constraint: index of the constraint it belongs to.
        cost: budget units per weight.
        weight_gate: its per-weight gates (``granularity="weight"``).
        out_gate: the gate of its output channels (``granularity="channel"``), if its group is gated.
        in_segs: layout of its input dimension when it reads gated channels (see :class:`ChannelGated`).
    """

    target: Target
    constraint: int
    cost: float = 1.0
    weight_gate: GatedWeight | None = None
    out_gate: ChannelGate | None = None
    in_segs: tuple[InSeg, ...] = ()

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def numel(self) -> int:
        return self.target.numel

    @property
    def gated(self) -> bool:
        return self.weight_gate is not None or self.out_gate is not None or bool(self.in_segs)

    @property
    def in_width(self) -> int:
        return sum((hi - lo) * rep for _g, lo, hi, rep in self.in_segs)

    def _same_gate(self) -> bool:
        g = self.out_gate
        return g is not None and self.in_segs == ((g, 0, g.log_alpha.numel(), 1),)

    def floor(self, p_min: float) -> float:
        """Expected kept weights when every gate sits at the lower clamp (``P(z != 0) = p_min``)."""
        if self.weight_gate is not None:
            return self.numel * p_min
        if self._same_gate():
            c = self.out_gate.log_alpha.numel()
            return self.numel / (c * c) * ((c * p_min) ** 2 - c * p_min**2 + c * p_min)
        n = self.numel * (p_min if self.out_gate is not None else 1.0)
        if self.in_segs:
            kept = sum(rep * (hi - lo) * (p_min if g is not None else 1.0) for g, lo, hi, rep in self.in_segs)
            n *= kept / self.in_width
        return n

    def count(self, kept_out: int | None, kept_in: int | None) -> int:
        """Kept weights given the kept output channels and kept input columns (``None``: all of them)."""
        num, den = self.numel, 1
        if self.out_gate is not None:
            num, den = num * kept_out, den * self.out_gate.log_alpha.numel()
        if self.in_segs:
            num, den = num * kept_in, den * self.in_width
        return num // den

    def input_kept(self, keeps: dict[ChannelGate, Tensor]) -> int:
        """Kept input columns given a keep vector per gate."""
        return sum(rep * (int(keeps[g][lo:hi].sum()) if g is not None else hi - lo) for g, lo, hi, rep in self.in_segs)

    def count_for(self, keeps: dict[ChannelGate, Tensor]) -> int:
        """Kept weights given a keep vector per gate."""
        if not self.gated:
            return self.numel
        out = int(keeps[self.out_gate].sum()) if self.out_gate is not None else None
        return self.count(out, self.input_kept(keeps) if self.in_segs else None)


class ExpectedCost:
    """The expected density of every constraint in a fixed number of tensor operations, whatever the layer count.

    For each layer: its ``numel`` times ``P(z != 0)`` averaged over its output channels, times the same over its
    input columns (an ungated column counts 1); for a layer whose input and output share one gate, the mean of
    ``p_i p_j`` over all pairs instead. Computed for all layers at once: every channel gate's ``log_alpha`` in one
    vector, one ``P(z != 0)``, and every layer's channel sums read off one float64 cumulative sum (a range
    ``lo..hi`` sums to ``cs[hi] - cs[lo]``); the tests compare it, values and gradients, with these sums written
    out one layer at a time. Each layer has three factor rows: its output mean, its input mean and (same gate on both
    sides) the correction ``sum p (1 - p) / C^2``, so that ``E = numel * cost * (out * in + correction)``; a factor
    with no gate is the constant 1. Per-weight layers use their gates' expected counts. This runs every training
    step (the Lagrangian term); per layer it took about twenty small operations and as many autograd nodes.

    Args:
        layers: the method's layers.
        totals: budget units of each constraint (the densities' denominators).
    """

    def __init__(self, layers: list[GatedLayer], totals: list[float]) -> None:
        self.weight_layers = [la for la in layers if la.weight_gate is not None]
        chan = [la for la in layers if la.weight_gate is None]
        self.gates: list[ChannelGate] = []
        offset: dict[ChannelGate, int] = {}
        width = 0  # channels of all gates; the p(1 - p) half of the source starts there
        for la in chan:
            for g in [la.out_gate] + [g for g, *_ in la.in_segs]:
                if g is not None and g not in offset:
                    offset[g], width = width, width + g.log_alpha.numel()
                    self.gates.append(g)
        n = len(chan)
        segs: list[tuple[int, int, int, float]] = []  # (factor row, lo, hi, weight) of the source
        const = [0.0] * (3 * n)
        for j, la in enumerate(chan):
            g = la.out_gate
            if g is not None:
                c = g.log_alpha.numel()
                segs.append((j, offset[g], offset[g] + c, 1.0 / c))
            else:
                const[j] = 1.0
            if la._same_gate():
                c = g.log_alpha.numel()
                segs.append((n + j, offset[g], offset[g] + c, 1.0 / c))
                segs.append((2 * n + j, width + offset[g], width + offset[g] + c, 1.0 / (c * c)))
            elif la.in_segs:
                for gi, a, b, rep in la.in_segs:
                    if gi is None:
                        const[n + j] += rep * (b - a) / la.in_width
                    else:
                        segs.append((n + j, offset[gi] + a, offset[gi] + b, rep / la.in_width))
            else:
                const[n + j] = 1.0
        rows, lo, hi, scale = (list(column) for column in zip(*segs)) if segs else ([], [], [], [])
        i64, f64 = torch.int64, torch.float64
        self._values = {
            "rows": (rows, i64), "lo": (lo, i64), "hi": (hi, i64), "scale": (scale, f64), "const": (const, f64),
            "weights": ([la.cost * la.numel for la in chan], f64), "owner": ([la.constraint for la in chan], i64),
            "wscale": ([la.cost for la in self.weight_layers], f64),
            "wowner": ([la.constraint for la in self.weight_layers], i64), "totals": (list(totals), f64),
        }  # fmt: skip
        self._cache: dict[torch.device, dict[str, Tensor]] = {}

    def _tensors(self, device: torch.device) -> dict[str, Tensor]:
        if device not in self._cache:
            self._cache[device] = {k: torch.tensor(v, dtype=t, device=device) for k, (v, t) in self._values.items()}
        return self._cache[device]

    def __call__(self, device: torch.device) -> Tensor:
        """Expected density per constraint, in budget units (float64, differentiable in the gates)."""
        t = self._tensors(device)
        used = torch.zeros_like(t["totals"])
        n = t["weights"].numel()
        if n:
            f = t["const"]
            if self.gates:
                p = prob_nonzero(wide(torch.cat([g.log_alpha for g in self.gates])), self.gates[0].beta).double()
                cs = torch.nn.functional.pad(torch.cat([p, p * (1.0 - p)]).cumsum(0), (1, 0))
                f = f.index_add(0, t["rows"], (cs[t["hi"]] - cs[t["lo"]]) * t["scale"])
            used = used.index_add(0, t["owner"], t["weights"] * (f[:n] * f[n : 2 * n] + f[2 * n :]))
        if self.weight_layers:
            counts = torch.stack([la.weight_gate.expected_count() for la in self.weight_layers]).double()
            used = used.index_add(0, t["wowner"], counts * t["wscale"])
        return used / t["totals"]


def attach_weight_gates(targets: list[Target], droprate_init: float, beta: float, bound: float | None = None,
                        final: EvalProjection | None = None) -> list[GatedWeight]:  # fmt: skip
    """One :class:`GatedWeight` on each target's weight (``log_alpha`` clamped to ``[-bound, bound]``; eval-mode
    gates from ``final``)."""
    return [attach(t.module, "weight", GatedWeight(t.original, droprate_init, beta, bound, final)) for t in targets]


@dataclass
class ChannelPlan:
    """The result of :func:`attach_channel_gates`.

    Attributes:
        out_gates: layer name -> gate of its output channels.
        in_segs: layer name -> layout of its input dimension.
        gates: every gate, in group order.
        producers: gate -> names of the producer layers (for tie-breaking scores).
        notes: what could not be gated, and why.
    """

    out_gates: dict[str, ChannelGate]
    in_segs: dict[str, tuple[InSeg, ...]]
    gates: list[ChannelGate]
    producers: dict[ChannelGate, list[str]]
    notes: list[str]


def _gateable(modules: dict[str, nn.Module], group: ChannelGroup) -> str:
    """Why the group's companions cannot all be gated ('' when they can)."""
    for mname, tname in group.companions:
        tensor = getattr(modules[mname], tname, None)
        if tensor is not None and tensor.numel() != group.size:
            return f"{mname}.{tname} has {tensor.numel()} entries for {group.size} channels"
    return ""


def _analysis(
    model: nn.Module, graph: ModelGraph, input_shape: Sequence[int] | None
) -> tuple[ChannelAnalysis, fx.GraphModule, bool]:
    """Channel analysis (with its graph), with shapes when an input shape is known (flatten -> Linear needs them)."""
    if input_shape is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")  # timm models know theirs
        input_shape = list(size) if isinstance(size, (list, tuple)) else None
    if input_shape is None:
        return analyse_channels(model, graph.graph), graph.graph, False
    gm = symbolic_trace(model)  # a fresh graph: the shapes are written into its nodes
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, *input_shape, dtype=p.dtype, device=p.device))
    except Exception as exc:  # the graph did not run on that shape: analyse without shapes
        warnings.warn(f"shape propagation at input_shape={list(input_shape)} failed ({exc}); flatten -> Linear "
                      "channels stay ungated", stacklevel=4)  # fmt: skip
        return analyse_channels(model, graph.graph), graph.graph, False
    finally:
        model.train(was_training)
    return analyse_channels(model, gm), gm, True


def attach_channel_gates(model: nn.Module, graph: ModelGraph, targets: list[Target], droprate_init: float,
                         beta: float, input_shape: Sequence[int] | None = None,
                         final: EvalProjection | None = None) -> ChannelPlan:  # fmt: skip
    """Create one gate per exact, fully targeted channel group and attach the gated parametrizations (their
    eval-mode gates from ``final``).

    Raises:
        TraceError: if the model could not be traced (channel groups unknown).
    """
    graph.require_traced("granularity='channel'")
    analysis, gm, shaped = _analysis(model, graph, input_shape)
    modules = dict(model.named_modules())
    by_name = {t.name: t for t in targets}
    plan = ChannelPlan({}, {}, [], {}, [])
    gate_of: dict[int, ChannelGate] = {}
    bank = GateBank()  # every gate's sample drawn at once
    for index, group in enumerate(analysis.groups):
        mine = [p for p in group.producers if p in by_name]
        if not mine:
            continue
        others = [p for p in group.producers if p not in by_name]
        why = group.reasons[0] if group.reasons else _gateable(modules, group)
        why = why or (f"also produced by untargeted {', '.join(others)}" if others else "")
        if why:
            hint = " (pass input_shape= so that flatten can be analysed)" if "flatten" in why and not shaped else ""
            plan.notes.append(f"channels of {', '.join(mine)} left ungated: {why}{hint}")
            continue
        gate = ChannelGate(group.size, by_name[mine[0]].original, droprate_init, beta, bank)
        gate_of[index] = gate
        plan.gates.append(gate)
        plan.producers[gate] = mine
        plan.out_gates.update({p: gate for p in mine})
    reads: dict[str, list] = {}
    for use in analysis.uses:
        if use.role == "in" and use.module in by_name:
            reads.setdefault(use.module, []).append(use)
    for name, uses in reads.items():
        segs = tuple((gate_of.get(s.space) if s.space is not None else None, s.lo, s.hi, s.rep) for s in uses[0].segs)
        if not any(g is not None for g, *_ in segs):
            continue
        if len(uses) > 1 or uses[0].groups > 1:
            why = "it is called several times" if len(uses) > 1 else f"it is a grouped conv (groups={uses[0].groups})"
            plan.notes.append(f"{name} reads gated channels but {why}: its dead input slices are not counted")
            continue
        plan.in_segs[name] = segs
    gated_companions = {c for i in gate_of for c in analysis.groups[i].companions}
    normalized = _normalized(gm, modules, set(plan.out_gates), gated_companions)
    owned: set[ChannelGate] = set()
    for t in targets:
        out, segs = plan.out_gates.get(t.name), plan.in_segs.get(t.name, ())
        if out is None and not segs:
            plan.notes.append(f"{t.name}: no gated channel group on its output or input; left dense, not a target")
            continue
        own = out is not None and out not in owned
        attach(t.module, "weight", ChannelGated(out, segs, owner=own, mask_only=t.name in normalized, final=final))
        owned.add(out)
    done: set[tuple[str, str]] = set()
    for index, gate in gate_of.items():
        for mname, tname in analysis.groups[index].companions:
            if (mname, tname) in done or getattr(modules[mname], tname, None) is None:
                continue
            done.add((mname, tname))
            attach(modules[mname], tname, ChannelGated(gate, mask_only=mname in normalized, final=final))
    return plan


def _normalized(gm: fx.GraphModule, modules: dict[str, nn.Module], producers: set[str],
                companions: set[tuple[str, str]]) -> set[str]:  # fmt: skip
    """Gated producers whose only use is a BatchNorm whose affine terms are gated by the same channel gate.

    BatchNorm removes any per-channel scale of its input, so for these layers the gate acts through the
    BatchNorm's weight and bias (``z * BN(x)``, the L0BatchNorm of the paper) and the layer's own rows (and
    bias) are only masked (0/1) by the eval gate: the same function, without scaling full weight tensors.
    """
    out: set[str] = set()
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    for name in producers:
        nodes = calls.get(name, [])
        if len(nodes) != 1 or len(nodes[0].users) != 1:
            continue
        user = next(iter(nodes[0].users))
        bn = modules.get(str(user.target)) if user.op == "call_module" else None
        if (
            isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and len(calls.get(str(user.target), [])) == 1
            and {(str(user.target), "weight"), (str(user.target), "bias")} <= companions
        ):
            out.add(name)
    return out


def channel_scores(plan: ChannelPlan, modules: dict[str, nn.Module]) -> dict[ChannelGate, Tensor]:
    """Ranking score of every channel: ``log_alpha``; ties (gates at the clamp) are broken by the channel's
    weight magnitude: the mean ``|w|`` of its producer rows times that of its consumer columns (when targeted)."""

    def zeros(gate: ChannelGate) -> Tensor:
        return torch.zeros(gate.log_alpha.numel(), dtype=torch.float64, device=gate.log_alpha.device)

    rows = {g: zeros(g) for g in plan.gates}
    cols = {g: zeros(g) for g in plan.gates}
    for gate in plan.gates:
        for name in plan.producers[gate]:
            w = modules[name].parametrizations.weight.original.detach()
            rows[gate] += w.abs().reshape(w.shape[0], -1).mean(1).double()
    for name, segs in plan.in_segs.items():
        w = modules[name].parametrizations.weight.original.detach().abs().double()
        col = w.transpose(0, 1).reshape(w.shape[1], -1).mean(1)  # one value per input column
        start = 0
        for gate, lo, hi, rep in segs:
            width = (hi - lo) * rep
            if gate is not None:
                cols[gate][lo:hi] += col[start : start + width].view(hi - lo, rep).mean(1)
            start += width
    out = {}
    for gate in plan.gates:
        mag = rows[gate] * (cols[gate] if bool((cols[gate] > 0).any()) else 1.0)
        out[gate] = gate.log_alpha.detach().double() + 1e-9 * mag / mag.max().clamp_min(1e-30)
    return out

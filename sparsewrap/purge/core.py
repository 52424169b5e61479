"""``purge``: remove exactly-zero channels, features and heads from a plain model, verified, with rollback.

Steps: trace the plain model (attention blocks with a head rule as leaves), propagate shapes on the example
input, analyse channel groups with the real weights, plan kept indices, apply them to a copy, and compare its
outputs with the original's. Units (groups, heads) whose removal changes an output or breaks the forward are
found by bisection and left dense; what is shipped has always passed the comparison.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from ..analysis.channels import analyse_channels
from ..analysis.inputs import check_example_inputs
from ..analysis.rules import BLOCK_RULES
from ..analysis.tracing import SparseTracer
from ..errors import ConfigError, TraceError
from .plan import Ops, Planner, Unit
from .shrink import apply_ops

PURGE_ATTR = "_sparsewrap_purge"


@dataclass
class UnitReport:
    """What happened to one group or attention module.

    Attributes:
        name: the first producer of the group (or the attention module).
        kind: ``"group"`` or ``"heads"``.
        size: channels (or heads) before.
        kept: channels (or heads) after.
        zero: channels that were exactly zero at every producer (heads: dead heads).
        status: ``"purged"``, ``"dense"`` (had zeros but stayed; see ``reason``) or ``"no zeros"``.
        reason: why a group with zeros stayed dense.
    """

    name: str
    kind: str
    size: int
    kept: int
    zero: int
    status: str
    reason: str = ""


@dataclass
class PurgeReport:
    """Outcome of :func:`purge`: parameter counts, per-unit status, verification and timing."""

    params_before: int
    params_after: int
    units: list[UnitReport] = field(default_factory=list)
    max_rel_error: float = 0.0
    seconds: float = 0.0
    trace_error: str = ""

    @property
    def changed(self) -> bool:
        return self.params_after != self.params_before or any(u.status == "purged" for u in self.units)

    @property
    def coverage(self) -> str:
        """``"full"`` (every group with zeros purged), ``"partial"`` or ``"none"``."""
        with_zeros = [u for u in self.units if u.zero]
        purged = [u for u in with_zeros if u.status == "purged"]
        if not purged:
            return "none"
        return "full" if len(purged) == len(with_zeros) else "partial"

    def summary(self) -> str:
        if not self.changed:
            why = f" ({self.trace_error})" if self.trace_error else ""
            return f"nothing to purge: no exactly-zero channel can be removed{why}; the model is returned unchanged"
        dense = sum(u.status == "dense" for u in self.units)
        return (f"purged {sum(u.status == 'purged' for u in self.units)} groups/heads, {dense} left dense; "
                f"parameters {self.params_before:,} -> {self.params_after:,}")  # fmt: skip


@dataclass
class PurgeResult:
    """The purged model, its replayable plan (``{module: {role: kept indices}}``) and the report."""

    model: nn.Module
    ops: Ops
    report: PurgeReport


class PurgeTracer(SparseTracer):
    """:class:`SparseTracer` that also keeps blocks with a known channel interface (attention) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        rule = BLOCK_RULES.get(type(m))
        if rule is not None and rule.applies(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def as_tuple(example: Any) -> tuple:
    """Example inputs as the positional arguments of one call: a tuple or list as is, anything else alone."""
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _flat(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flat(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def run_outputs(model: nn.Module, inputs: tuple) -> list[Tensor]:
    """The model's outputs on ``inputs`` (no grad), flattened to a list of tensors (dict outputs by sorted key)."""
    with torch.no_grad():
        return [t.detach() for t in _flat(model(*inputs))]


def relative_error(ref: Sequence[Tensor], out: Sequence[Tensor]) -> float:
    """Largest ``max|a - b| / max|a|`` over the outputs; ``inf`` if shapes, dtypes or non-finite entries differ."""
    if len(ref) != len(out):
        return math.inf
    worst = 0.0
    for a, b in zip(ref, out):
        if a.shape != b.shape or a.dtype != b.dtype:
            return math.inf
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return math.inf
            continue
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        if not torch.equal(fa, fb):
            return math.inf
        na, nb = a[~fa], b[~fb]
        if not bool(((na == nb) | (torch.isnan(na) & torch.isnan(nb))).all()):
            return math.inf
        if fa.any():
            scale = a[fa].abs().max().clamp_min(torch.finfo(a.dtype).tiny)
            worst = max(worst, float((a[fa] - b[fa]).abs().max() / scale))
    return worst


def default_tolerance(model: nn.Module) -> float:
    """Relative output error accepted by verification: a few thousand ulps of the model's dtype."""
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)


def apply_plan(model: nn.Module, ops: Ops) -> nn.Module:
    """Apply ``{module: {role: kept indices}}`` to ``model`` in place and return it.

    Raises:
        ShrinkError: if a module is missing, has no shrink function, or an index list is invalid.
    """
    from .shrink import ShrinkError

    modules = dict(model.named_modules())
    for name, roles in ops.items():
        if name not in modules:
            raise ShrinkError(f"the plan names module {name!r}, which this model does not have")
        apply_ops(modules[name], roles)
    return model


def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer (shrinking replaces, never mutates)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _own_tensors(candidate: nn.Module, original: nn.Module) -> nn.Module:
    """Give the shipped model its own copy of the tensors it still shares with the original."""
    shared = {id(t) for t in list(original.parameters()) + list(original.buffers())}
    for module in candidate.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in shared:
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and id(b) in shared:
                module._buffers[name] = b.clone()
    return candidate


class _Trial:
    """Builds a candidate for a set of units and checks it against the reference outputs."""

    def __init__(self, model: nn.Module, planner: Planner, inputs: tuple, ref: list[Tensor], tol: float) -> None:
        self.model, self.planner, self.inputs, self.ref, self.tol = model, planner, inputs, ref, tol
        self.failures: dict[int | str, str] = {}
        self.last: tuple[frozenset, nn.Module, Ops, float] | None = None

    def build(self, units: list[Unit]) -> tuple[nn.Module, Ops, float]:
        key = frozenset(u.key for u in units)
        if self.last is not None and self.last[0] == key:
            return self.last[1:]
        keep = self.planner.keep_sets({g for u in units if u.kind == "group" for g in u.members})
        ops = self.planner.ops(keep, {u.key for u in units if u.kind == "heads"})
        candidate = apply_plan(_shared_copy(self.model), ops)
        err = relative_error(self.ref, run_outputs(candidate, self.inputs))
        self.last = (key, candidate, ops, err)
        return candidate, ops, err

    def fail(self, unit: Unit, reason: str) -> None:
        for key in unit.members or (unit.key,):
            self.failures[key] = reason

    def passes(self, units: list[Unit]) -> bool:
        try:
            _, _, err = self.build(units)
        except Exception as exc:  # any failure of a candidate means "leave these units dense"
            if len(units) == 1:
                self.fail(units[0], f"shrinking breaks the forward ({type(exc).__name__}: {exc})"[:300])
            return False
        if err > self.tol and len(units) == 1:
            self.fail(units[0], f"outputs change after shrinking (relative error {err:.2e})")
        return err <= self.tol

    def settle(self, accepted: list[Unit], todo: list[Unit]) -> list[Unit]:
        """Accept as many of ``todo`` as verification allows, by bisection."""
        if not todo:
            return accepted
        if self.passes(accepted + todo):
            return accepted + todo
        if len(todo) == 1:
            return accepted
        half = len(todo) // 2
        accepted = self.settle(accepted, todo[:half])
        return self.settle(accepted, todo[half:])


def _analyse(model: nn.Module, inputs: tuple) -> tuple[Any, list[Tensor]]:
    """Channel analysis with shapes, and the reference outputs (the traced graph's run on ``inputs``).

    The reference comes from the traced graph rather than a separate forward of the model: one forward less,
    and should the trace ever differ from the model, every candidate fails verification and stays dense.
    """
    tracer = PurgeTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise TraceError(f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}") from exc
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    try:
        with torch.no_grad():
            ref = [t.detach() for t in _flat(ShapeProp(gm).propagate(*inputs))]
    except Exception as exc:
        raise TraceError(
            f"the traced graph of {type(model).__name__} does not run: {type(exc).__name__}: {exc}"
        ) from exc
    return analyse_channels(model, gm, real=True), ref


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def purge(model: nn.Module, example_inputs: Any, round_to: int = 1, tolerance: float | None = None) -> PurgeResult:
    """Remove every channel, feature and attention head that is exactly zero, keeping outputs identical.

    ``model`` is a plain model (e.g. from :func:`sparsewrap.export`); it is not modified. Groups the analysis
    cannot prove removable, or whose removal fails verification, stay dense and are listed in the report.

    Args:
        model: the plain model.
        example_inputs: a tensor or tuple of tensors for one forward (shapes and verification).
        round_to: keep channel counts of each group a multiple of this (fast kernels); 1 keeps only what is needed.
        tolerance: largest relative output error accepted (default 1e-4 in float32, 1e-9 in float64).

    Returns:
        A :class:`PurgeResult`; ``result.model`` is a new module.

    Raises:
        ConfigError: if ``model`` still has parametrizations, ``round_to`` is not a positive integer, or the
            model cannot run on ``example_inputs`` (the message names the input it expects).
    """
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ConfigError("purge works on plain models; call sparsewrap.export(model) first (or export(purge=True))")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to={round_to!r} must be a positive integer (e.g. 8 for fast kernels)")
    start = time.perf_counter()
    inputs = as_tuple(example_inputs)
    check_example_inputs(model, inputs)
    was_training = model.training
    model.eval()
    try:
        result = _purge(
            model, inputs, round_to, tolerance if tolerance is not None else default_tolerance(model), start
        )
    finally:
        model.train(was_training)
    result.model.train(was_training)
    return result


def _purge(model: nn.Module, inputs: tuple, round_to: int, tol: float, start: float) -> PurgeResult:
    before = _count(model)
    try:
        analysis, ref = _analyse(model, inputs)
        planner = Planner(model, analysis, round_to)
    except Exception as exc:  # untraceable, or an analysis bug: never a crash, the model stays as it is
        why = str(exc) if isinstance(exc, TraceError) else f"channel analysis failed: {type(exc).__name__}: {exc}"
        report = PurgeReport(before, before, trace_error=why, seconds=time.perf_counter() - start)
        return PurgeResult(copy.deepcopy(model), {}, report)
    trial = _Trial(model, planner, inputs, ref, tol)
    units = planner.units()
    accepted = trial.settle([], units)
    purged, ops, err = trial.build(accepted) if accepted else (model, {}, 0.0)
    purged = _own_tensors(purged, model) if accepted else copy.deepcopy(model)
    report = PurgeReport(before, _count(purged), _unit_reports(planner, units, accepted, ops, trial), err)
    report.seconds = time.perf_counter() - start
    return PurgeResult(purged, ops, report)


def _unit_reports(
    planner: Planner, units: list[Unit], accepted: list[Unit], ops: Ops, trial: _Trial
) -> list[UnitReport]:
    done = {g for u in accepted if u.kind == "group" for g in u.members} | {
        u.key for u in accepted if u.kind == "heads"
    }
    keep = planner.keep_sets({g for u in accepted if u.kind == "group" for g in u.members}) if accepted else {}
    out = []
    for i, g in enumerate(planner.groups):
        zero = int(planner.dead[i].sum())
        if i in done and int(keep[i].sum()) < g.size:
            out.append(UnitReport(g.producers[0], "group", g.size, int(keep[i].sum()), zero, "purged"))
            continue
        if i in done:
            why = "layout constraints keep them all (round_to, grouped conv, GroupNorm, tied channels)"
            out.append(UnitReport(g.producers[0], "group", g.size, g.size, zero, "dense", why))
            continue
        rem = int(planner.removable[i].sum()) if i in planner.removable else 0
        if not zero and not rem:
            out.append(UnitReport(g.producers[0], "group", g.size, g.size, 0, "no zeros"))
            continue
        reason = (
            trial.failures.get(i)
            or "; ".join(planner.reasons[i][:3])
            or "its zeros are not zero where they are read (norm shift, non-zero-preserving op)"
        )
        out.append(UnitReport(g.producers[0], "group", g.size, g.size, zero, "dense", reason))
    for name, dead in planner.heads.items():
        kept = int(ops[name]["heads"].numel()) if name in done else dead.numel()
        status = "purged" if name in done else "dense"
        out.append(UnitReport(name, "heads", dead.numel(), kept, int(dead.sum()), status, trial.failures.get(name, "")))
    return out

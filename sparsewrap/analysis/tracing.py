"""Symbolic tracing that sees through sparsewrap's own wrapping.

``torch.nn.utils.parametrize`` swaps a module's class for an injected subclass whose ``__module__`` is
``torch.nn.utils.parametrize``; the default FX tracer then treats *any* wrapped module as a leaf and, worse,
a wrapped subclass of ``nn.Linear`` defined outside ``torch.nn`` (timm's ``Linear``) would be traced into,
reading the parametrized weight eagerly as a constant. :class:`SparseTracer` decides leafness on the
*original* class and always keeps sparsifiable layers and norms as leaves, so a model traces to the same
graph before and after :func:`sparsewrap.sparsify`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from ..errors import TraceError
from .channels import channel_groups
from .rules import NORMS, SPARSIFIABLE


def original_class(module: nn.Module) -> type[nn.Module]:
    """The class a module had before ``register_parametrization`` injected its subclass."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        return cls.__bases__[0]
    return cls


def _timm_fx_rules() -> tuple[list[type[nn.Module]], list[Callable]]:
    """Leaf modules and functions timm registers for FX (its own models rely on them to trace)."""
    try:
        from timm.layers import _fx
    except ImportError:  # pragma: no cover - timm is a dependency, but keep the tracer usable without it
        return [], []
    return list(_fx.get_notrace_modules()), list(_fx.get_notrace_functions())


class SparseTracer(fx.Tracer):
    """An FX tracer that gives the same graph for a model before and after it is wrapped."""

    def __init__(self) -> None:
        leaf_modules, functions = _timm_fx_rules()
        super().__init__(autowrap_functions=tuple(f for f in functions if callable(f)))
        self._leaf_modules = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, SPARSIFIABLE + NORMS) or parametrize.is_parametrized(m):
            return True
        if self._leaf_modules and isinstance(m, self._leaf_modules):
            return True
        cls = original_class(m)
        return cls.__module__.startswith(("torch.nn", "torch.ao.nn")) and not issubclass(cls, nn.Sequential)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with :class:`SparseTracer`.

    Raises:
        TraceError: if FX cannot trace the model; the message names the construct FX stopped at.
    """
    tracer = SparseTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # FX raises many types (TraceError, TypeError, NotImplementedError, ...)
        raise TraceError(f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}") from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


@dataclass
class ModelGraph:
    """What sparsewrap knows about a model's structure.

    Attributes:
        order: names of every module called in the forward, in execution order (first call).
        graph: the traced FX graph module, or ``None`` when tracing failed.
        trace_error: why tracing failed (empty when it succeeded).
        groups: channel groups (see :mod:`sparsewrap.analysis.channels`); empty when untraced.
    """

    order: list[str]
    graph: fx.GraphModule | None = None
    trace_error: str = ""
    groups: list = field(default_factory=list)

    @property
    def traced(self) -> bool:
        return self.graph is not None

    def require_traced(self, what: str) -> None:
        """Raise a clear error when a structured operation needs a graph that could not be built.

        Raises:
            TraceError: if the model was not traced.
        """
        if not self.traced:
            raise TraceError(
                f"{what} needs the model's graph, but tracing failed: {self.trace_error}. "
                "Use granularity='weight' (unstructured), or make the model FX-traceable "
                "(e.g. register the offending function or module as a leaf with timm.layers.register_notrace_*)."
            )


def analyse(model: nn.Module) -> ModelGraph:
    """Trace ``model`` and derive execution order and channel groups.

    Falls back to the module-registration order with a warning when the model cannot be traced.
    """
    try:
        gm = symbolic_trace(model)
    except TraceError as exc:
        warnings.warn(
            f"{exc}. Falling back to a module walk: unstructured sparsity still works, "
            "structured granularities will raise.",
            stacklevel=3,
        )
        return ModelGraph(order=[n for n, _ in model.named_modules() if n], trace_error=str(exc))
    order: list[str] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        # a leaf module runs its children inside its own forward: list them right after it
        for sub, _ in model.get_submodule(str(node.target)).named_modules(prefix=str(node.target)):
            if sub not in seen:
                seen.add(sub)
                order.append(sub)
    return ModelGraph(order=order, graph=gm, groups=channel_groups(model, gm))

"""The link between a method's final projection and its parametrizations' eval-mode forward.

Some methods export a projection of their learned state rather than the state itself (L0 keeps the gates of
highest ``log_alpha`` until the budget is met exactly). So that the model one evaluates is the model one exports,
their parametrizations compute the eval-mode tensor from the same *factors* that export multiplies in, which
the method supplies through an :class:`EvalProjection` shared by all of them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import nn


class EvalProjection:
    """Hands each parametrization its final factors, recomputed by the method only when its state changed.

    The method binds a function returning ``{parametrization: factors}`` (cheap when nothing changed: it keeps
    its own cache keyed by the tensors' versions). The function is asked again when a parametrization comes
    back for its factors a second time (the next forward has started) or after :meth:`reset` (the method's
    step), so one forward asks it once, not once per layer. The holder keeps only a weak reference to the
    method; a deep copy or an unpickled copy is unbound until the copied method binds it again, and an unbound
    holder gives ``None`` (the parametrization then falls back to its own deterministic form).
    """

    def __init__(self) -> None:
        self._source: Callable[[], Callable[[], dict[nn.Module, Any]] | None] | None = None
        self._factors: dict[nn.Module, Any] | None = None
        self._served: set[int] = set()

    def bind(self, source: Callable[[], dict[nn.Module, Any]]) -> None:
        """Take the factors from ``source`` (a bound method is referenced weakly)."""
        self._source = weakref.WeakMethod(source) if hasattr(source, "__self__") else (lambda: source)
        self.reset()

    def reset(self) -> None:
        """Forget the factors handed out (the method's state changed); the next request asks the method."""
        self._factors = None
        self._served = set()

    def factors(self, parametrization: nn.Module) -> Any | None:
        """The final factors of ``parametrization``, or ``None`` when unbound (or it has none)."""
        source = self._source() if self._source is not None else None
        if source is None:
            return None
        if self._factors is None or id(parametrization) in self._served:
            self._factors = source()
            self._served = set()
        self._served.add(id(parametrization))
        return self._factors.get(parametrization)

    def __getstate__(self) -> dict[str, Any]:
        return {"_source": None, "_factors": None, "_served": set()}  # copies are unbound (see the class doc)

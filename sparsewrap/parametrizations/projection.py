"""The link between a method's final projection and its parametrizations' eval-mode forward.

Some methods export a projection of their learned state rather than the state itself (L0 keeps the gates of
highest ``log_alpha`` until the budget is met exactly). So that the model one evaluates is the model one exports,
their parametrizations compute the eval-mode tensor from the same *factors* that export multiplies in, which
the method supplies through an :class:`EvalProjection` shared by all of them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

from .. import switches


class EvalProjection:
    """Hands each parametrization its final factors, recomputed by the method only when its state changed.

    The method binds a function returning ``{parametrization: factors}``, and optionally a *state key*: a
    function returning a hashable value that changes whenever the factors could (the version counters of the
    tensors they are computed from, see :func:`~sparsewrap.parametrizations.base.version_key`). The function is
    asked again when a parametrization comes back for its factors a second time (the next forward has started)
    and the state key differs from the one the factors were computed at (without a key: every time), or after
    :meth:`reset` (the method's step), so one forward asks it at most once, not once per layer, and evaluation
    forwards in a row on unchanged weights ask it once. Writes through ``.data`` do not move version counters:
    call :meth:`reset` after them. The holder keeps only a weak reference to the method; a
    deep copy or an unpickled copy is unbound until the copied method binds it again, and an unbound holder
    gives ``None`` (the parametrization then falls back to its own deterministic form).
    """

    def __init__(self) -> None:
        self._source: Callable[[], Callable[[], dict[nn.Module, Any]] | None] | None = None
        self._key: Callable[[], Callable[[], Hashable] | None] | None = None
        self._factors: dict[nn.Module, Any] | None = None
        self._at: Hashable = None  # the state key the factors were computed at
        self._served: set[int] = set()

    def bind(self, source: Callable[[], dict[nn.Module, Any]], key: Callable[[], Hashable] | None = None) -> None:
        """Take the factors from ``source``, and reuse them while ``key()`` is unchanged (bound methods are
        referenced weakly)."""
        self._source = _weak(source)
        self._key = _weak(key) if key is not None else None
        self.reset()

    def reset(self) -> None:
        """Forget the factors handed out (the method's state changed); the next request asks the method."""
        self._factors = None
        self._at = None
        self._served = set()

    def factors(self, parametrization: nn.Module) -> Any | None:
        """The final factors of ``parametrization``, or ``None`` when unbound (or it has none)."""
        source = self._source() if self._source is not None else None
        if source is None:
            return None
        if self._factors is None or id(parametrization) in self._served:
            key_fn = self._key() if self._key is not None else None
            # factors made under inference mode cannot be saved for a backward: reused only there
            at = (torch.is_inference_mode_enabled(), key_fn()) if key_fn is not None else None
            if self._factors is None or at is None or at != self._at or not switches.REUSE_PROJECTION:
                self._factors, self._at = source(), at
            self._served = set()
        self._served.add(id(parametrization))
        return self._factors.get(parametrization)

    def __getstate__(self) -> dict[str, Any]:
        return {"_source": None, "_key": None, "_factors": None, "_at": None, "_served": set()}  # copies are unbound


def _weak(fn: Callable) -> Callable[[], Callable | None]:
    """A callable returning ``fn`` (``None`` once a bound method's object is gone)."""
    return weakref.WeakMethod(fn) if hasattr(fn, "__self__") else (lambda: fn)

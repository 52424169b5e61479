"""The error hierarchy of sparsewrap.

Every error is a :class:`SparsewrapError`; each subclass is also the matching built-in exception, so
``except ValueError`` keeps working for callers who do not know about sparsewrap.
"""

from __future__ import annotations

from collections.abc import Iterable


class SparsewrapError(Exception):
    """Base class of every error raised by sparsewrap."""


class ConfigError(SparsewrapError, ValueError):
    """An argument or option has an invalid value."""


class UnknownNameError(SparsewrapError, KeyError):
    """A name (method, model, option) is not registered.

    ``KeyError`` quotes its message with ``repr``; ``__str__`` is overridden to keep it readable.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NoTargetsError(ConfigError):
    """Include/exclude patterns matched no sparsifiable layer."""


class TraceError(SparsewrapError, RuntimeError):
    """The model could not be analysed well enough for the requested operation."""


class CheckpointError(SparsewrapError, ValueError):
    """A checkpoint file is truncated, corrupted, foreign, or does not match the model."""


class DivergenceError(SparsewrapError, RuntimeError):
    """The ranks of a distributed run hold different sparsity state (``sparsewrap.train.distributed``)."""


def choices(names: Iterable[str]) -> str:
    """Format a list of valid names for an error message."""
    return ", ".join(repr(n) for n in sorted(names))

"""The one place sparsewrap touches private torch APIs, each with a fallback for a torch that lacks it.

Private torch names (a leading underscore) change or vanish between torch releases without notice. Every use
sparsewrap makes of one goes through a function here, and each function has a fallback built on public APIs
only, which gives the same results (at worst more work per step). ``tests/test_torch_compat.py`` runs the
library with every fallback in place and checks that the results do not change.

- :func:`version`: a tensor's in-place version counter (``Tensor._version``). Fallback: ``None``, "unknown";
  :func:`sparsewrap.parametrizations.base.version_key` then reports a change at every call, and the lazy
  projections (re-zeroing pruned weights, clamping gates) read the values to tell whether there is anything to
  write: a read pass where the counter would have said "unchanged".
- :func:`storage_use_count`: how many tensors and storage objects share a tensor storage
  (``torch._C._storage_Use_Count``). Fallback: ``None``; buffers are then never reused (a new one per step).
- :func:`owns_memory`: whether a tensor is not a view of another (``Tensor._base``). Fallback: ``False``; a
  kernel then writes into a new tensor rather than over the incoming one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor


# -- version counters -----------------------------------------------------------------------------------------
def read_version(t: Tensor) -> int | None:
    """``t``'s version counter: it grows at every in-place write to ``t`` (not at writes through ``.data``)."""
    return t._version


def no_version(t: Tensor) -> int | None:
    """The fallback of :func:`version` where tensors have no readable version counter: ``None`` (unknown)."""
    return None


def _has_version() -> bool:
    try:
        return isinstance(torch.zeros(1)._version, int)
    except AttributeError:  # pragma: no cover - a torch without Tensor._version
        return False


# callers look it up here at each call (torch_compat.version(t)), so that tests can swap in the fallback
version: Callable[[Tensor], int | None] = read_version if _has_version() else no_version

_unknown = itertools.count(-1, -1)  # never equal to a real version (those are >= 0)


def version_or_new(t: Tensor) -> int:
    """:func:`version` of ``t``, or where that is unknown a number never returned before: "changed"."""
    v = version(t)
    return next(_unknown) if v is None else v


# -- storage use counts -----------------------------------------------------------------------------------------
def find_storage_use_count() -> Callable[[torch.UntypedStorage], int] | None:
    """torch's count of the references to a storage, as a function of the storage, or ``None`` without it."""
    counter = getattr(torch._C, "_storage_Use_Count", None)
    if counter is None:
        return None
    return lambda storage: counter(storage._cdata)


# like version: looked up at each call, swapped for None in tests
use_count: Callable[[torch.UntypedStorage], int] | None = find_storage_use_count()


def storage_use_count(storage: torch.UntypedStorage) -> int | None:
    """How many tensors and storage objects refer to ``storage`` (``None`` where torch does not say)."""
    return use_count(storage) if use_count is not None else None


# -- views ------------------------------------------------------------------------------------------------------
def owns_memory(t: Tensor) -> bool:
    """Whether ``t`` is known not to be a view of another tensor (``False`` when torch does not say)."""
    base = getattr(t, "_base", t)
    return base is None

"""Purge: physically remove exactly-zero channels, features and attention heads, with identical outputs.

    from sparsewrap.purge import purge
    result = purge(plain_model, example_inputs)   # result.model, result.ops (the plan), result.report

:func:`sparsewrap.export` with ``purge=True`` calls it on the baked model; :func:`save_purged` writes the
weights and the plan to one safetensors file and :func:`load_purged` replays the plan on a fresh instance.
For inference, :func:`fold_batchnorm` (``export(..., fold_bn=True)``) folds each BatchNorm that directly follows
a conv into the conv's weight and bias; the folds are part of the plan and replayed by :func:`load_purged`.
Extend it with :func:`register_shrink` (a new layer type) and :func:`register_heads` (a new attention class).
"""

from .core import PURGE_ATTR, PurgeReport, PurgeResult, PurgeTracer, UnitReport, apply_plan, purge
from .fold import FoldReport, apply_folds, fold_batchnorm
from .heads import HeadRule, register_heads
from .io import fold_report, load_purged, purge_report, read_plan, save_purged
from .shrink import ShrinkError, register_shrink

__all__ = [
    "purge",
    "purge_report",
    "fold_batchnorm",
    "fold_report",
    "apply_folds",
    "FoldReport",
    "save_purged",
    "load_purged",
    "read_plan",
    "PurgeResult",
    "PurgeReport",
    "UnitReport",
    "PurgeTracer",
    "apply_plan",
    "register_shrink",
    "register_heads",
    "HeadRule",
    "ShrinkError",
    "PURGE_ATTR",
]

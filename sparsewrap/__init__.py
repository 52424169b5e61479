"""sparsewrap: make any PyTorch model sparse with published methods, then export a plain compact model.

Quick start::

    import sparsewrap as sw
    sp = sw.sparsify(model, method="magnitude", target=0.7)
    ...  # train with sp.param_groups(), sp.penalty(), sp.step()
    plain = sw.export(model)

The public names below are imported on first use (PEP 562), so that ``import sparsewrap`` and the command
line's ``--help`` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load": "io.checkpoint", "save": "io.checkpoint",
    "Sparsifier": "controller", "sparsify": "controller",
    "CheckpointError": "errors", "ConfigError": "errors", "NoTargetsError": "errors", "SparsewrapError": "errors",
    "TraceError": "errors", "UnknownNameError": "errors",
    "export": "bake", "save_plain": "io.plain",
    "fit": "train.loop", "compare": "train.compare",
    "Method": "methods", "list_methods": "methods", "register_method": "methods",
    "budgets": "methods.budgets",
    "load_purged": "purge.io",
    "ModelRecipe": "io.recipe", "create_model": "io.recipe",
    "register_factory": "io.trust",
}  # fmt: skip

if TYPE_CHECKING:
    from .bake import export
    from .controller import Sparsifier, sparsify
    from .errors import CheckpointError, ConfigError, NoTargetsError, SparsewrapError, TraceError, UnknownNameError
    from .io.checkpoint import load, save
    from .io.plain import save_plain
    from .io.recipe import ModelRecipe, create_model
    from .io.trust import register_factory
    from .methods import Method, list_methods, register_method
    from .methods.budgets import budgets
    from .purge.io import load_purged
    from .train.compare import compare as compare
    from .train.loop import fit as fit


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, as ``sparsewrap.purge``) on first access."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "sparsify",
    "Sparsifier",
    "export",
    "save_plain",
    "load_purged",
    "save",
    "load",
    "create_model",
    "register_factory",
    "ModelRecipe",
    "register_method",
    "list_methods",
    "Method",
    "budgets",
    "SparsewrapError",
    "ConfigError",
    "UnknownNameError",
    "NoTargetsError",
    "TraceError",
    "CheckpointError",
]

"""sparsewrap: make any PyTorch model sparse with published methods, then export a plain compact model.

Quick start::

    import sparsewrap as sw
    sp = sw.sparsify(model, method="magnitude", target=0.7)
    ...  # train with sp.param_groups(), sp.penalty(), sp.step()
    plain = sw.export(model)
"""

__version__ = "0.1.0"

from .checkpoint import load, save  # noqa: E402
from .controller import Sparsifier, sparsify  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    NoTargetsError,
    SparsewrapError,
    TraceError,
    UnknownNameError,
)
from .export import export, save_plain  # noqa: E402
from .loop import fit as fit  # noqa: E402  (re-exported: sw.fit)
from .methods import Method, list_methods, register_method  # noqa: E402
from .purge.io import load_purged  # noqa: E402
from .recipe import ModelRecipe, create_model  # noqa: E402
from .trust import register_factory  # noqa: E402

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
    "SparsewrapError",
    "ConfigError",
    "UnknownNameError",
    "NoTargetsError",
    "TraceError",
    "CheckpointError",
]

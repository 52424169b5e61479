"""Budget transfer: the per-layer sparsities one run ended at, as a ``target=`` dict for another method.

STR ends with non-uniform per-layer budgets (the seed's ``--use-budget`` reuses them). :func:`budgets` reads them
from a controller or a checkpoint as ``{layer name: sparsity}``; ``magnitude``, ``gmp``, ``dnw``, ``l0`` and ``cs``
accept such a dict as ``target=`` (each named layer pruned to its own sparsity, in ``[0, 1)``; layers it does not
name stay dense). :func:`read_budgets` loads one written as JSON by ``sparsewrap budgets CKPT -o budgets.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError


def budgets(obj: Any, *, model: nn.Module | None = None, trust_factory: bool = False) -> dict[str, float]:
    """``{layer name: sparsity}`` of every targeted layer at export (after the method's final projection).

    Args:
        obj: a :class:`sparsewrap.Sparsifier`, a model it sparsified, or the path of a checkpoint.
        model: for a checkpoint, a fresh instance of the architecture (see :func:`sparsewrap.load`).
        trust_factory: for a checkpoint, call the model factory it names (see :func:`sparsewrap.load`).

    Returns:
        The exported sparsity of each targeted layer, in execution order (a ``target=`` for another method).

    Raises:
        ConfigError: for a model that was not sparsified, or anything else that is neither a controller nor a path.
        CheckpointError: for an unreadable checkpoint.
    """
    from ..controller import Sparsifier, controller_of  # the controller imports the methods: import it here
    from ..io.checkpoint import load

    if isinstance(obj, (str, os.PathLike)):
        obj = load(obj, model=model, trust_factory=trust_factory)
    if not isinstance(obj, (nn.Module, Sparsifier)):
        raise ConfigError(
            f"budgets() takes a Sparsifier, a sparsified model or a checkpoint path, got {type(obj).__name__}"
        )
    _model, sp = controller_of(obj)
    if sp is None:
        raise ConfigError(
            f"{type(obj).__name__} was not sparsified (no sparsewrap controller); pass the Sparsifier that "
            "sparsify() returned, or a checkpoint path"
        )
    return {layer.name: layer.exported_sparsity for layer in sp.report().layers}


def read_budgets(path: str | os.PathLike) -> dict[str, float]:
    """A budgets dict written as JSON (``sparsewrap budgets CKPT -o budgets.json``).

    Raises:
        ConfigError: if the file cannot be read or is not a JSON object of layer names to numbers.
    """
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read budgets file {str(path)!r}: {exc}; write one with `sparsewrap budgets CKPT -o FILE`"
        ) from exc
    if (
        not isinstance(value, dict)
        or not value
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values())
    ):
        raise ConfigError(
            f"budgets file {str(path)!r} is not a JSON object {{layer name: sparsity}}; write one with "
            "`sparsewrap budgets CKPT -o budgets.json`"
        )
    return {str(k): float(v) for k, v in value.items()}

"""The model, the data and the device of a training command: what ``sparsewrap train`` and ``compare`` share.

``--model`` becomes a :class:`~sparsewrap.io.recipe.ModelRecipe` fitted to the data (``num_classes`` and
``in_chans`` where the factory takes them), ``--data`` the data sets, ``--device`` a checked device name. Torch,
the data and the recipe are imported only when a command runs.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from ..demo.data import TrainData
    from ..io.recipe import ModelRecipe


def _accepts(spec: str) -> set[str] | None:
    """Keyword names a ``pkg.mod:factory`` accepts (None when it takes ``**kwargs`` or cannot be inspected)."""
    mod, _, attr = spec.partition(":")
    try:
        params = inspect.signature(getattr(importlib.import_module(mod), attr)).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def model_recipe(spec: str, num_classes: int, input_shape: tuple[int, ...], kwargs: dict[str, Any]) -> ModelRecipe:
    """The recipe of ``--model`` for this data: ``num_classes``/``in_chans`` where the model takes them.

    Raises:
        ConfigError: for a spec that is neither ``timm:<arch>`` nor ``package.module:factory``.
    """
    from ..io.recipe import ModelRecipe

    recipe = ModelRecipe.parse(spec)
    fitted = {"num_classes": num_classes, "in_chans": input_shape[0]}
    if recipe.source != "timm":
        accepted = _accepts(spec)
        fitted = {k: v for k, v in fitted.items() if accepted is None or k in accepted}
    return ModelRecipe(recipe.source, recipe.name, {**fitted, **kwargs}, list(input_shape))


def data_and_recipe(
    data: str, model: str, limit: int | None, val_limit: int | None, image_size: int, kwargs: dict[str, Any]
) -> tuple[TrainData, ModelRecipe]:
    """The data sets of ``--data`` and the recipe of ``--model`` fitted to them (``train`` and ``compare``).

    Raises:
        ConfigError: for a malformed ``--model`` or ``--data``.
        MissingDataError: when the data needs a package that is not installed.
    """
    from ..demo.data import build_data

    train_data = build_data(data, limit, val_limit, image_size)
    return train_data, model_recipe(model, train_data.num_classes, train_data.input_shape, kwargs)


def check_device(device: str | None) -> None:
    """Validate ``--device``.

    Raises:
        typer.BadParameter: for anything but ``cpu``, ``cuda`` or ``cuda:N``.
        ConfigError: for CUDA on a machine without it.
    """
    from ..errors import ConfigError

    if device is None:
        return
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise typer.BadParameter(f"{device!r} is not a device; valid: cpu, cuda, cuda:N", param_hint="--device")
    if kind == "cuda" and not _cuda():
        raise ConfigError(f"--device {device} but CUDA is not available here; use --device cpu")


def default_device(device: str | None) -> str:
    """``--device``, or ``"cuda"`` when it is left out and CUDA is available, else ``"cpu"``."""
    return device or ("cuda" if _cuda() else "cpu")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()

"""One-file checkpoints: safetensors weights plus a JSON recipe in the header. Nothing is ever unpickled.

Layout: tensors ``model.<key>`` (the wrapped model's ``state_dict``: originals, masks, gates) and
``controller.<key>`` (tensor state of the method); metadata ``sparsewrap`` holds the JSON recipe: how to
rebuild the model, the :func:`sparsify` call, and the JSON part of the controller state; ``sha256`` is a
digest of the recipe and every tensor's bytes, so a corrupted file is refused instead of loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .controller import Sparsifier, controller_of, sparsify
from .errors import CheckpointError, ConfigError
from .export import _unshare
from .fileio import write_atomic
from .recipe import ModelRecipe, recipe_for

FORMAT_VERSION = 1
MODEL, CTRL, EXTRA = "model.", "controller.", "extra."


def _digest(tensors: dict[str, Tensor], header: str = "") -> str:
    h = hashlib.sha256()
    h.update(header.encode())  # the recipe too: a flipped digit in it would silently change the run
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Separate tensors (stored as safetensors) from JSON values in a nested controller state."""
    tensors: dict[str, Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, Tensor):
            tensors[path] = obj.detach()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]
        return obj

    return walk(state, ""), tensors


def _join_state(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_state(v, tensors) for v in obj]
    return obj


def save(obj: nn.Module | Sparsifier, path: str | os.PathLike, recipe: ModelRecipe | None = None,
         input_shape: list[int] | tuple[int, ...] | None = None,
         extra: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write a sparsified model and its controller state to one safetensors file, atomically.

    Args:
        obj: a sparsified model or its :class:`Sparsifier`.
        path: destination (``.safetensors``).
        recipe: how to rebuild the model; inferred for models made by :func:`sparsewrap.create_model` or
            timm. Without one, :func:`load` needs ``model=``.
        input_shape: one input's shape without the batch dim, recorded for ``pt2`` export (default: the
            shape of the model's first input after :func:`sparsify`, when it has had one).
        extra: more state to keep in the file (nested dicts/lists of tensors and JSON values, e.g. the training
            loop's optimizer and RNG states); :func:`read_extra` returns it.

    Raises:
        ConfigError: if ``obj`` was not sparsified by sparsewrap.
    """
    from safetensors.torch import save_file

    model, sp = controller_of(obj)
    if sp is None:
        raise ConfigError("this model was not sparsified by sparsewrap.sparsify (no controller attached)")
    recipe = recipe or recipe_for(model)
    if input_shape is None and sp.input is not None:  # the shape of the model's first input after sparsify
        input_shape = sp.input.shape
    if recipe is not None and input_shape is not None:
        recipe = ModelRecipe(recipe.source, recipe.name, recipe.kwargs, [int(d) for d in input_shape])
    controller_json, controller_tensors = _split_state(sp.state_dict())
    tensors = {MODEL + k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({CTRL + k: v.contiguous() for k, v in controller_tensors.items()})
    extra_json, extra_tensors = _split_state(extra or {})
    tensors.update({EXTRA + k: v.contiguous() for k, v in extra_tensors.items()})
    tensors = _unshare({k: v.cpu() for k, v in tensors.items()})
    header = {
        "format_version": FORMAT_VERSION,
        "sparsewrap_version": __version__,
        "model": None if recipe is None else json.loads(recipe.to_json()),
        "method": sp.spec.method,
        "target": sp.spec.target,
        "options": sp.spec.options,
        "include": sp.spec.include,
        "exclude": sp.spec.exclude,
        "layers": sp.spec.layers,
        "controller": controller_json,
        "extra": extra_json,
    }
    header_json = json.dumps(header)
    meta = {"format": "pt", "sparsewrap": header_json, "sha256": _digest(tensors, header_json)}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The header and tensors of a checkpoint, verified.

    Raises:
        CheckpointError: if the file is missing, truncated, corrupted, or not a sparsewrap checkpoint.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    if "sparsewrap" not in meta:
        raise CheckpointError(
            f"{path} is a safetensors file but not a sparsewrap checkpoint (no 'sparsewrap' metadata); "
            "plain weights load with model.load_state_dict(safetensors.torch.load_file(path))"
        )
    if meta.get("sha256") != _digest(tensors, meta["sparsewrap"]):
        raise CheckpointError(f"{path} is corrupted: its tensors or recipe do not match the recorded sha256 digest")
    try:
        header = json.loads(meta["sparsewrap"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the sparsewrap header is not valid JSON: {exc}") from exc
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer sparsewrap (format {header.get('format_version')}); upgrade sparsewrap"
        )
    return header, tensors


def read_extra(path: str | os.PathLike) -> dict[str, Any]:
    """The ``extra=`` state given to :func:`save` (``{}`` if none), tensors on the CPU.

    Raises:
        CheckpointError: as :func:`read`.
    """
    header, tensors = read(path)
    extra_tensors = {k[len(EXTRA) :]: v for k, v in tensors.items() if k.startswith(EXTRA)}
    return _join_state(header.get("extra") or {}, extra_tensors)


def load(
    path: str | os.PathLike, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> Sparsifier:
    """Rebuild a sparsified model and its controller from :func:`save`'s file.

    Args:
        path: the checkpoint.
        model: a fresh, unwrapped instance of the architecture; needed only when the file has no recipe.
        map_location: device for the model.

    Returns:
        The :class:`Sparsifier`; ``.model`` is the rebuilt, wrapped model.

    Raises:
        CheckpointError: for an unreadable or foreign file, or a model that does not match it.
    """
    header, tensors = read(path)
    if model is None:
        if not header.get("model"):
            raise CheckpointError(f"{path} records no model recipe; pass model=<a fresh instance of the architecture>")
        try:
            model = ModelRecipe.from_dict(header["model"]).build()
        except (ConfigError, KeyError) as exc:
            raise CheckpointError(f"{path}: cannot rebuild the model from its recipe: {exc}") from exc
    model.to(map_location)
    layers = set(header.get("layers") or [])
    if layers:  # the exact layers of the saved run, whatever patterns (or callables) selected them
        include, exclude = (lambda name, _m: name in layers), None
    else:
        include, exclude = header.get("include"), header.get("exclude")
    try:
        sp = sparsify(model, header["method"], target=header["target"], include=include, exclude=exclude,
                      **header.get("options", {}))  # fmt: skip
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot re-create the sparsified model: {exc}") from exc
    sp.spec.include, sp.spec.exclude = header.get("include"), header.get("exclude")
    model_state = {k[len(MODEL) :]: v for k, v in tensors.items() if k.startswith(MODEL)}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match the model: {exc}") from exc
    ctrl_tensors = {k[len(CTRL) :]: v.to(map_location) for k, v in tensors.items() if k.startswith(CTRL)}
    sp.load_state_dict(_join_state(header.get("controller", {}), ctrl_tensors))
    return sp

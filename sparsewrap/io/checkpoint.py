"""One-file checkpoints: safetensors weights plus a JSON recipe in the header. Nothing is ever unpickled.

Layout: tensors ``model.<key>`` (the wrapped model's ``state_dict``: originals, masks, gates; 0/1 masks stored as
``bool``, their dtype recorded in ``packed_masks`` and restored on read) and
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

from .. import __version__
from ..controller import Sparsifier, controller_of, sparsify
from ..errors import CheckpointError, ConfigError
from .atomic import write_atomic
from .reading import read_safetensors
from .recipe import ModelRecipe, rebuild_model, recipe_for
from .tensors import join_tensors, split_tensors, unshare_storage

FORMAT_VERSION = 1
MODEL, CTRL, EXTRA = "model.", "controller.", "extra."
_MASK_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


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
    controller_json, controller_tensors = split_tensors(sp.state_dict())
    tensors = {MODEL + k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({CTRL + k: v.contiguous() for k, v in controller_tensors.items()})
    extra_json, extra_tensors = split_tensors(extra or {})
    tensors.update({EXTRA + k: v.contiguous() for k, v in extra_tensors.items()})
    tensors = unshare_storage({k: v.cpu() for k, v in tensors.items()})
    packed = pack_masks(tensors)
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
        "packed_masks": packed,
    }
    header_json = json.dumps(header)
    meta = {"format": "pt", "sparsewrap": header_json, "sha256": _digest(tensors, header_json)}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The header and tensors of a checkpoint, verified.

    Raises:
        CheckpointError: if the file is missing, truncated, corrupted, or not a sparsewrap checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        hint = path / "last.safetensors"
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a directory; give the checkpoint file in it, e.g. {str(hint)!r}"
        )
    meta, tensors = read_safetensors(path, "checkpoint")
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
    unpack_masks(tensors, header.get("packed_masks") or {}, path)
    return header, tensors


def pack_masks(tensors: dict[str, Tensor]) -> dict[str, str]:
    """Store each floating-point 0/1 mask of the model as ``bool`` (4x smaller than float32), in place.

    Returns:
        ``{key: original dtype name}`` for the header, so that :func:`read` restores the dtype exactly.
    """
    packed = {}
    for key, t in tensors.items():
        if key.startswith(MODEL) and key.endswith(".mask") and t.is_floating_point() and t.dtype in _MASK_DTYPES:
            if bool(((t == 0) | (t == 1)).all()) and not bool(torch.signbit(t).any()):
                tensors[key], packed[key] = t.to(torch.bool), _MASK_DTYPES[t.dtype]
    return packed


def unpack_masks(tensors: dict[str, Tensor], packed: dict[str, str], path: Path) -> None:
    """Give the masks :func:`pack_masks` stored as ``bool`` their recorded dtype back, in place.

    Raises:
        CheckpointError: if the record names a missing tensor or an unknown dtype.
    """
    names = {name: dtype for dtype, name in _MASK_DTYPES.items()}
    if not isinstance(packed, dict):
        raise CheckpointError(f"{path}: the header's packed_masks is malformed (expected an object)")
    for key, name in packed.items():
        if key not in tensors or name not in names or tensors[key].dtype != torch.bool:
            raise CheckpointError(f"{path}: the header's packed_masks entry {key!r}: {name!r} does not fit the file")
        tensors[key] = tensors[key].to(names[name])


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sparsewrap checkpoint (a safetensors file with sparsewrap's header); reads only the
    header, verifies nothing."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as fh:
            return "sparsewrap" in (fh.metadata() or {})
    except Exception:  # not a safetensors file at all
        return False


def read_extra(path: str | os.PathLike) -> dict[str, Any]:
    """The ``extra=`` state given to :func:`save` (``{}`` if none), tensors on the CPU.

    Raises:
        CheckpointError: as :func:`read`.
    """
    header, tensors = read(path)
    extra_tensors = {k[len(EXTRA) :]: v for k, v in tensors.items() if k.startswith(EXTRA)}
    return join_tensors(header.get("extra") or {}, extra_tensors)


def load(
    path: str | os.PathLike, model: nn.Module | None = None, map_location: str | torch.device = "cpu",
    trust_factory: bool = False,
) -> Sparsifier:  # fmt: skip
    """Rebuild a sparsified model and its controller from :func:`save`'s file.

    Loading runs no code named in the file unless allowed (see :mod:`sparsewrap.io.trust`): a ``pkg.mod:fn``
    factory in the recipe is called only if the program registered it (:func:`sparsewrap.register_factory`)
    or ``trust_factory`` is true; otherwise pass ``model=``.

    Args:
        path: the checkpoint.
        model: a fresh, unwrapped instance of the architecture; needed when the file has no recipe, or names a
            factory that is neither registered nor trusted.
        map_location: device for the model.
        trust_factory: import and call the factory the file names (only for files you trust: like
            ``trust_remote_code``, it runs code chosen by whoever wrote the file).

    Returns:
        The :class:`Sparsifier`; ``.model`` is the rebuilt, wrapped model.

    Raises:
        CheckpointError: for an unreadable or foreign file, or a model that does not match it.
    """
    header, tensors = read(path)
    if model is None:
        model = rebuild_model(header.get("model"), path, trust_factory)
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
    load_controller(sp, header, ctrl_tensors, path)
    return sp


def load_controller(sp: Sparsifier, header: dict[str, Any], tensors: dict[str, Tensor], path: Path | str) -> None:
    """Load the header's controller state (with its ``tensors``) into ``sp``.

    Raises:
        CheckpointError: if the state is malformed (a forged or damaged field), naming the file.
    """
    try:
        sp.load_state_dict(join_tensors(header.get("controller") or {}, tensors))
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: the controller state is malformed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
            "the file was edited or written by an incompatible version; start over or use another checkpoint"
        ) from exc

"""Tensors in files: a nested state split into JSON and tensors, and copies of storage that safetensors refuses
to write twice."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def split_tensors(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Separate the tensors of a nested state (dicts, lists, tuples) from its JSON values.

    Returns:
        The state with each tensor replaced by ``{"__tensor__": path}``, and ``{path: tensor}``.
    """
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


def join_tensors(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of :func:`split_tensors`: put the tensors back in place of their ``{"__tensor__": path}``."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def unshare_storage(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): give later ones their own copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out

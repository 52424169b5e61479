"""Rewrite the header of a sparsewrap file and recompute its digest, as anyone can (the digest has no key)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def digest(text: str, tensors: dict[str, torch.Tensor], purge_style: bool = False) -> str:
    """The digest as an attacker recomputes it (the file formats are public; the digest has no key)."""
    h = hashlib.sha256(text.encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        if purge_style:
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        else:
            h.update(key.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def forge(path: Path, value: Any, key: str = "sparsewrap", recipe_field: str = "model") -> Path:
    """Set ``recipe_field`` of the file's JSON header to ``value`` and recompute the digest."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    header = json.loads(meta[key])
    header[recipe_field] = value
    text = json.dumps(header, sort_keys=key != "sparsewrap")
    save_file(
        tensors, str(path), metadata={"format": "pt", key: text, "sha256": digest(text, tensors, key != "sparsewrap")}
    )
    return path

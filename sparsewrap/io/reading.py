"""Reading a safetensors file that sparsewrap wrote: its metadata (where the JSON header lives) and its tensors.

Shared by checkpoints (:mod:`.checkpoint`) and purged models (:mod:`sparsewrap.purge.io`); each then checks its
own header key and digest.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..errors import CheckpointError


def read_safetensors(path: Path, what: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The metadata and tensors of the safetensors file ``path``.

    Args:
        path: the file.
        what: what the file should be (``"checkpoint"``, ``"purged model"``), for the message when it is missing.

    Raises:
        CheckpointError: if the file does not exist, or is not a readable safetensors file (truncated, corrupted).
    """
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    return meta, tensors

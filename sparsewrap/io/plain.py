"""Writing a plain (exported) model: its ``state_dict`` as safetensors, or a ``torch.export`` program."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, choices
from .atomic import write_atomic
from .tensors import unshare_storage

FORMATS = ("safetensors", "pt2")


def export_program(plain: nn.Module, input_shape: Sequence[int]) -> torch.export.ExportedProgram:
    """``torch.export`` the plain model in eval mode for inputs ``(batch, *input_shape)``, any batch size.

    The batch dimension is dynamic (``torch.export.Dim``), so the program runs at batch 1 as at batch 64. A
    model whose code fixes its batch size (e.g. a ``view(2, -1)``) cannot be exported so: it is exported at
    batch 1, with a warning naming the reason.
    """
    plain = plain.eval()
    p = next(plain.parameters())
    gen = torch.Generator().manual_seed(0)
    # batch 2: torch.export specializes a dimension whose example size is 0 or 1
    example = torch.randn(2, *input_shape, generator=gen).to(device=p.device, dtype=p.dtype)
    try:
        return torch.export.export(plain, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as exc:  # torch raises several types (constraint violations, guard failures, user errors)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"{type(plain).__name__} does not export with a dynamic batch size ({reason}); exported at batch 1 only",
            stacklevel=2,
        )
    return torch.export.export(plain, (example[:1],))


def save_plain(plain: nn.Module, path: str | os.PathLike, fmt: str = "safetensors",
               input_shape: Sequence[int] | None = None) -> Path:  # fmt: skip
    """Write an exported model atomically: its ``state_dict`` (safetensors) or a ``torch.export`` program.

    Raises:
        ConfigError: on an unknown format, or ``pt2`` without an input shape.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is unknown; valid: {choices(FORMATS)}")
    if fmt == "pt2":
        if not input_shape:
            raise ConfigError("format 'pt2' needs an input shape, e.g. --input-shape 3,224,224")
        program = export_program(plain, input_shape)
        return write_atomic(path, lambda tmp: torch.export.save(program, str(tmp)))
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in plain.state_dict().items()}
    return write_atomic(path, lambda tmp: save_file(unshare_storage(state), str(tmp), metadata={"format": "pt"}))

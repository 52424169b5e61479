"""Random-number-generator states as JSON (torch CPU and CUDA, Python ``random``, NumPy), for exact resumes.

A resumed run must draw the same random numbers as an uninterrupted one (data order, dropout, stochastic
gates), so checkpoints record every generator's state. JSON keeps them inside the checkpoint's header, with
no pickle.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def get_state(generators: list[torch.Generator] = ()) -> dict[str, Any]:
    """The state of every global generator of this process, and of ``generators`` (e.g. a DataLoader's)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "python": [version, list(internal), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    if generators:
        state["generators"] = [_b64(g.get_state()) for g in generators]
    return state


def set_state(state: dict[str, Any], generators: list[torch.Generator] = ()) -> None:
    """Restore what :func:`get_state` returned (CUDA states only where CUDA is in use)."""
    torch.set_rng_state(_from_b64(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_b64(s) for s in cuda[: torch.cuda.device_count()]])
    for g, saved in zip(generators, state.get("generators", [])):
        g.set_state(_from_b64(saved))


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python ``random`` and NumPy."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

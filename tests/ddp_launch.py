"""Two-process DDP tests on CPU (gloo): launch the workers, give each its process group, collect what they saw.

Each worker is a module-level function ``worker(rank, world, tmp)`` of the test module (``torch.multiprocessing``
pickles it by name); inside :func:`process_group` it does its run and saves a JSON record with
:func:`save_record`; :func:`spawn` returns the records in rank order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(worker: Callable[[int, int, str], None], tmp: Path, world: int = 2) -> list[Any]:
    """Run ``worker(rank, world, str(tmp))`` in ``world`` spawned processes; each rank's record, rank 0 first."""
    mp.spawn(worker, args=(world, str(tmp)), nprocs=world, join=True)
    return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


@contextmanager
def process_group(rank: int, world: int, tmp: str) -> Iterator[None]:
    """A gloo process group of ``world`` ranks meeting in ``tmp`` (one thread per process), destroyed on exit."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def save_record(tmp: str, rank: int, record: Any) -> None:
    """Save what rank ``rank`` saw (JSON) for :func:`spawn` to return."""
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(record))


def digest(tensors: list[torch.Tensor]) -> str:
    """SHA-256 of the tensors' bytes, in order: equal digests on two ranks mean bit-identical tensors."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()

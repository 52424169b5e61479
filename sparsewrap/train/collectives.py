"""Collectives over the initialised process group: tensors broadcast or averaged, JSON broadcast or gathered.

Split from :mod:`.distributed` (which keeps the set-up and the sparsity state identical across ranks) as one
concept: moving values between ranks. Tensors travel in one flat collective per dtype; JSON travels as bytes
in a uint8 tensor (no pickle). Every rank calls each function at the same point.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def comm_device() -> torch.device:
    """The device the collectives send from: this rank's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _flat_by_dtype(tensors: list[Tensor]) -> Iterator[tuple[list[Tensor], Tensor]]:
    """``tensors`` grouped by dtype, each group with its values flattened into one tensor on the comm device
    (one group at a time, so that only one flat copy is alive)."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    comm = comm_device()
    for group in by_dtype.values():
        yield group, torch.cat([t.detach().reshape(-1).to(comm) for t in group])


def _unflatten_into(group: list[Tensor], flat: Tensor) -> None:
    """Copy ``flat`` back into the tensors of ``group``, in order (the inverse of :func:`_flat_by_dtype`)."""
    offset = 0
    with torch.no_grad():
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def broadcast_tensors(tensors: list[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values, in one collective per dtype."""
    for group, flat in _flat_by_dtype(tensors):
        dist.broadcast(flat, src)
        if dist.get_rank() != src:  # rank src's tensors already hold what it sent
            _unflatten_into(group, flat)


def average_tensors(tensors: list[Tensor]) -> None:
    """Replace ``tensors`` in place by their mean over all ranks, in one all-reduce per dtype.

    The controller applies it to the dense gradients a method asked for (``Method.dense_grad_step``), so that
    every rank chooses from the gradient of the whole batch, as DDP's averaged weight gradients are.
    """
    world = dist.get_world_size()
    for group, flat in _flat_by_dtype(tensors):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        _unflatten_into(group, flat)


def broadcast_json(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s JSON-able ``obj`` on every rank (sent as bytes in a tensor)."""
    comm = comm_device()
    data = json.dumps(obj).encode() if dist.get_rank() == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=comm)
    dist.broadcast(size, src)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=comm)
    if dist.get_rank() == src:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def gather_json(obj: Any) -> list[Any]:
    """Every rank's JSON-able ``obj``, as a list indexed by rank (on every rank)."""
    comm = comm_device()
    data = json.dumps(obj).encode()
    size = torch.tensor([len(data)], dtype=torch.int64, device=comm)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8, device=comm)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(comm)
    bufs = [torch.zeros_like(buf) for _ in sizes]
    dist.all_gather(bufs, buf)
    return [json.loads(bytes(b[: int(s.item())].cpu().tolist()).decode()) for b, s in zip(bufs, sizes)]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()

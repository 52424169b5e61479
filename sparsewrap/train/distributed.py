"""Data-parallel training with ``torch.distributed`` (DDP): set-up, and keeping the sparsity state identical.

Launch with ``torchrun --nproc_per_node=N -m sparsewrap train ...`` (gloo on CPU, NCCL on GPU). DDP keeps the
*trained* parameters identical on every rank (same initial broadcast, same averaged gradients, same update).
What DDP does not cover is a method's own decisions: masks recomputed in ``step()``, multipliers updated from
a measured defect, a rewiring drawn at random. :func:`sync_sparsity` makes rank 0 the authority: after every
``sp.step()`` it broadcasts every tensor of every sparsewrap parametrization (masks, gates, scores) and the
method's ``state_dict()`` (multipliers, schedule state), so all ranks hold rank 0's state at every step.
A method therefore needs no distributed code of its own, as long as its state lives in its parametrizations
or its ``state_dict``.

Only JSON and tensors cross the wire (no pickle), as in checkpoints.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError
from ..parametrizations import wrapped_tensors


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a distributed run.

    Attributes:
        rank: global rank (0 is the one that writes and prints).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: this process's device.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process run (``WORLD_SIZE`` > 1, set by ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | None = None) -> DistContext | None:
    """Initialise the process group from ``torchrun``'s environment; ``None`` for a single-process run.

    The backend is NCCL when ``device`` is ``"cuda"`` (each process takes GPU ``LOCAL_RANK``) and gloo on CPU.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA if available).

    Raises:
        ConfigError: if CUDA is asked for but unavailable, or there are fewer GPUs than local processes.
    """
    if not launched_by_torchrun():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} but CUDA is not available; use --device cpu (gloo backend)")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); lower --nproc_per_node"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif kind == "cpu":
        dev, backend = torch.device("cpu"), "gloo"
    else:
        raise ConfigError(f"device={device!r} is not supported for distributed runs; valid: 'cpu', 'cuda'")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=dev if backend == "nccl" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def current() -> DistContext | None:
    """The context of an already initialised process group with more than one process, else ``None``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    backend = dist.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def teardown() -> None:
    """Destroy the process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (already on ``ctx.device``)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


# -- keeping sparsity state identical ----------------------------------------------------------------------------
def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_tensors(tensors: list[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values, in one collective per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    comm = _comm_device()
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(comm) for t in group])
        dist.broadcast(flat, src)
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n


def average_tensors(tensors: list[Tensor]) -> None:
    """Replace ``tensors`` in place by their mean over all ranks, in one all-reduce per dtype.

    The controller applies it to the dense gradients a method asked for (``Method.dense_grad_step``), so that
    every rank chooses from the gradient of the whole batch, as DDP's averaged weight gradients are.
    """
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    comm, world = _comm_device(), dist.get_world_size()
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(comm) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n


def broadcast_json(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s JSON-able ``obj`` on every rank (sent as bytes in a tensor)."""
    comm = _comm_device()
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
    comm = _comm_device()
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
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def sparsity_tensors(model: nn.Module) -> list[Tensor]:
    """Every parameter and buffer of every sparsewrap parametrization in ``model`` (masks, gates, scores)."""
    seen: set[int] = set()
    out = []
    for _m, _mod, _t, p in wrapped_tensors(model):
        # tensors DDP trains through averaged gradients (a penalty method's coefficients) are never overwritten
        seen.update(id(t) for t in (p.ddp_trained() if hasattr(p, "ddp_trained") else ()))
        for t in [*p.parameters(recurse=True), *p.buffers(recurse=True)]:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def sync_sparsity(sp: Any, src: int = 0) -> None:
    """Give every rank rank ``src``'s masks, gates and method state (a no-op outside a distributed run).

    Call on every rank at the same point, e.g. right after ``sp.step()``; it ends with ``sp.settle()`` (pruned
    weights re-zeroed under the received masks), which ``sp.step()`` leaves to it in a distributed run.

    Args:
        sp: the :class:`sparsewrap.Sparsifier`.
        src: the rank whose state wins.
    """
    if current() is None:
        return
    from ..io.checkpoint import _join_state, _split_state

    broadcast_tensors(sparsity_tensors(sp.model), src)
    state_json, state_tensors = _split_state(sp.method.state_dict())
    state_json = broadcast_json(state_json, src)
    names = sorted(state_tensors)
    if names:
        received = {k: state_tensors[k].detach().clone() for k in names}
        broadcast_tensors([received[k] for k in names], src)
        state_tensors = received
    if dist.get_rank() != src:
        sp.method.load_state_dict(_join_state(state_json, state_tensors))
    sp.settle()  # pruned weights zero under the masks every rank now shares

"""Data-parallel training with ``torch.distributed`` (DDP): set-up, and keeping the sparsity state identical.

Launch with ``torchrun --nproc_per_node=N -m sparsewrap train ...`` (gloo on CPU, NCCL on GPU). DDP keeps the
*trained* parameters identical on every rank (same initial broadcast, same averaged gradients, same update),
the parametrizations' gates, thresholds and scores included. It does not cover a method's decisions taken
outside autograd: masks recomputed in ``step()``, multipliers updated from a measured defect, a random
rewiring. After every ``sp.step()``, :func:`sync_sparsity` broadcasts those from rank 0 (the parametrizations'
buffers and the method's ``state_dict()``), each only when some rank changed it, and every ``check_every``
steps :func:`check_identical` compares a hash of the whole sparsity state across ranks. A method needs no
distributed code of its own as long as it keeps such decisions in buffers or its ``state_dict()``.

Only JSON and tensors cross the wire (no pickle), as in checkpoints.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError, DivergenceError
from ..parametrizations import wrapped_tensors
from .collectives import broadcast_json, broadcast_tensors, comm_device

CHECK_EVERY = 100  # default steps between two checks that the ranks agree (check_identical)


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
    """``DistributedDataParallel`` around ``model`` (already on ``ctx.device``), without its buffer broadcast.

    DDP's default sends every buffer from rank 0 before each forward, masks as large as the weights included;
    the loop calls :func:`sync_sparsity` (masks, when they change) and :func:`broadcast_buffers` (the others:
    BatchNorm statistics) after each step instead. Buffers are made identical once here.
    """
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:  # torch >= 2.13
        ddp = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    else:
        ddp = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    broadcast_tensors(list(model.buffers()))
    return ddp


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers, except those of sparsewrap parametrizations (see
    :func:`sync_sparsity`): what DDP's ``broadcast_buffers=True`` does before each forward (no-op outside DDP)."""
    if current() is None:
        return
    ours = {id(t) for t in sparsity_tensors(model)}
    buffers = [b for b in model.buffers() if id(b) not in ours]
    if buffers:
        broadcast_tensors(buffers, src)


# -- keeping sparsity state identical ----------------------------------------------------------------------------
def sparsity_tensors(model: nn.Module) -> list[Tensor]:
    """Every parameter and buffer of every sparsewrap parametrization in ``model`` (masks, gates, scores)."""
    seen: set[int] = set()
    out = []
    for _m, _mod, _t, p in wrapped_tensors(model):
        for t in [*p.parameters(recurse=True), *p.buffers(recurse=True)]:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def is_trained(t: Tensor) -> bool:
    """Whether DDP keeps ``t`` identical on every rank: a parameter that requires a gradient."""
    return isinstance(t, nn.Parameter) and t.requires_grad


def sync_tensors(model: nn.Module) -> list[Tensor]:
    """The tensors of sparsewrap parametrizations that may diverge between ranks and that
    :func:`sync_sparsity` therefore broadcasts: buffers (masks) and parameters that do not require a gradient.

    Parameters trained by autograd (gates, thresholds, scores) are left out: DDP gives them the same averaged
    gradient on every rank, so the same optimizer update keeps them identical.
    """
    return [t for t in sparsity_tensors(model) if not is_trained(t)]


@dataclass
class Synced:
    """What :func:`sync_sparsity` last left on every rank, to broadcast only what changed since."""

    tensors: list[Tensor] | None = None  # copies of sync_tensors(model)
    method: dict[str, Tensor] | None = None  # copies of the tensors of the method's state_dict()


_SYNCED: weakref.WeakKeyDictionary[Any, Synced] = weakref.WeakKeyDictionary()


def _differs(kept: Tensor | None, now: Tensor | None) -> Tensor:
    """1 (int32, on the collectives' device) where ``now`` differs from ``kept`` or either is missing, else 0,
    without waiting for the device."""
    comm = comm_device()
    if kept is None or now is None or kept.shape != now.shape or kept.dtype != now.dtype or kept.device != now.device:
        return torch.ones((), dtype=torch.int32, device=comm)
    return (kept != now).any().to(device=comm, dtype=torch.int32)


def check_every_value(check_every: int) -> int:
    """``check_every`` validated: a step count >= 0 (0 turns the check off).

    Raises:
        ConfigError: for anything else.
    """
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
        raise ConfigError(
            f"check_every={check_every!r} must be a whole number of steps >= 0, e.g. {CHECK_EVERY} (0: off)"
        )
    return check_every


def sync_sparsity(sp: Any, src: int = 0, *, check_every: int = CHECK_EVERY, full: bool = False) -> None:
    """Give every rank rank ``src``'s masks and method state (a no-op outside a distributed run).

    Broadcasts what can diverge between ranks (decisions taken outside autograd): the tensors of
    :func:`sync_tensors` and the method's ``state_dict()``, and of those only what some rank changed since the
    last call (every rank compares with a copy it keeps; one small all-reduce of flags agrees on the list).
    Parameters trained by autograd are kept identical by DDP and are not sent, except with ``full``. Every
    ``check_every`` steps, :func:`check_identical` then verifies that all of it, trained parameters included,
    is the same on every rank.

    Call on every rank at the same point, e.g. right after ``sp.step()``; it ends with ``sp.settle()`` (pruned
    weights re-zeroed under the received masks), which ``sp.step()`` leaves to it in a distributed run.

    Args:
        sp: the :class:`sparsewrap.Sparsifier`.
        src: the rank whose state wins.
        check_every: run :func:`check_identical` when ``sp.step_count`` is a multiple of it (0: never).
        full: broadcast every tensor, trained parameters included, changed or not (once, before training).

    Raises:
        ConfigError: for a bad ``check_every``.
        DivergenceError: if the check finds ranks that differ.
    """
    check_every = check_every_value(check_every)
    if current() is None:
        return
    from ..io.tensors import join_tensors, split_tensors

    kept = _SYNCED.setdefault(sp, Synced())
    tensors = sync_tensors(sp.model)
    fresh = full or kept.tensors is None or len(kept.tensors) != len(tensors)
    flags = [_differs(None if fresh else k, t) for k, t in zip(kept.tensors or tensors, tensors)]
    state_json, local = split_tensors(sp.method.state_dict())
    header = broadcast_json({"state": state_json, "tensors": {k: [list(v.shape), str(v.dtype)] for k, v in
                                                               sorted(local.items())}}, src)  # fmt: skip
    names = list(header["tensors"])
    old = kept.method if kept.method is not None and not full else {}
    flags += [_differs(old.get(k), local.get(k)) for k in names]
    changed: list[bool] = []
    if flags:
        stacked = torch.stack(flags)
        dist.all_reduce(stacked, op=dist.ReduceOp.MAX)  # a change on any rank is sent (rank src's value)
        changed = stacked.bool().tolist()
    send = [t for t, c in zip(tensors, changed) if c]
    mine = dist.get_rank() == src
    received = {}
    for k, c in zip(names, changed[len(tensors) :]):
        shape, dtype = header["tensors"][k]
        if not c or mine:  # unchanged: equal to rank src's already
            received[k] = local[k]
        elif k in local and list(local[k].shape) == shape and str(local[k].dtype) == dtype:
            received[k] = local[k].clone()
        else:
            received[k] = torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=comm_device())
        if c:
            send.append(received[k])
    if full:
        send += [t for t in sparsity_tensors(sp.model) if is_trained(t)]
    if send:
        broadcast_tensors(send, src)
    if not mine:
        sp.method.load_state_dict(join_tensors(header["state"], received))
    kept.tensors = [
        t.detach().clone() if fresh or c else k for k, t, c in zip(kept.tensors or tensors, tensors, changed)
    ]
    kept.method = {k: v.detach().clone() if c else old[k] for (k, v), c in
                   zip(received.items(), changed[len(tensors) :])}  # fmt: skip
    sp.settle()  # pruned weights zero under the masks every rank now shares
    if check_every and sp.step_count % check_every == 0:
        check_identical(sp)


def _digest(tensors: list[Tensor], text: str = "") -> int:
    """A 62-bit hash of ``text`` and the tensors' shapes, dtypes and bytes (exact: one differing bit shows)."""
    h = hashlib.blake2b(text.encode(), digest_size=8)
    for t in tensors:
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "big") >> 2


PARTS = (
    "the parametrizations' buffers (masks)",
    "the parameters trained by autograd (gates, thresholds)",
    "the method's state_dict()",
)


def check_identical(sp: Any) -> None:
    """Verify that every rank holds the same sparsity state, at the cost of one all-reduce of six integers.

    Each rank hashes the tensors of its parametrizations (buffers and trained parameters apart) and its
    method's ``state_dict()``; an all-reduce of the hashes (and their negatives, under ``MAX``) shows whether
    they all agree. Call it on every rank at the same point (:func:`sync_sparsity` does, every ``check_every``
    steps).

    Raises:
        DivergenceError: naming what differs, on every rank.
    """
    if current() is None:
        return
    from ..io.tensors import split_tensors

    everything = sparsity_tensors(sp.model)
    state_json, state = split_tensors(sp.method.state_dict())
    hashes = [
        _digest([t for t in everything if not is_trained(t)]),
        _digest([t for t in everything if is_trained(t)]),
        _digest([state[k] for k in sorted(state)], json.dumps(state_json, sort_keys=True)),
    ]
    both = torch.tensor(hashes + [-h for h in hashes], dtype=torch.int64, device=comm_device())
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[:3].tolist(), (-both[3:]).tolist()
    differ = [part for part, a, b in zip(PARTS, high, low) if a != b]
    if differ:
        raise DivergenceError(
            f"ranks hold different sparsity state after step {sp.step_count}: {' and '.join(differ)} differ; "
            "a method must keep decisions taken outside autograd (masks, rewiring, random draws) in its "
            "parametrizations' buffers or its state_dict(), which sync_sparsity broadcasts from rank 0, and "
            "change trained parameters only through autograd or identically on every rank (docs/methods-api.md)"
        )

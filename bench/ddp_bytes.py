"""Bytes sent per training step under DDP: sparsewrap's own synchronisation, and DDP's, before and after.

Runs ``sw.fit`` on ResNet-18 (torchvision, 10 classes, random 32x32 inputs) in two processes on the CPU (gloo)
with per-weight ``l0`` and with gradual per-weight ``magnitude``, each twice: ``before`` replaces
``sync_sparsity`` by a copy of the old one (every tensor of every parametrization and the method's state
broadcast from rank 0 after every step) and wraps the model in DDP with its defaults (every buffer, masks
included, broadcast from rank 0 before each forward), ``after`` runs the library's code. Per step, rank 0
records

- ``sync``: bytes of the tensors that sparsewrap gives to ``broadcast`` and ``all_reduce`` (a
  counting shim around those ``torch.distributed`` functions, in this script only);
- ``ddp_grad``: bytes of the gradient buckets DDP all-reduces (a counting comm hook, ``register_comm_hook``);
- ``ddp_buffers``: bytes of the module buffers DDP broadcasts from rank 0 before each training forward
  (its default; masks are buffers, so they are included; ``distributed.wrap`` now turns it off);
- ``wchar``: bytes this process wrote through system calls (``/proc/self/io``), which includes every socket
  write of gloo: an independent check of the other columns (a two-rank ring all-reduce writes about the
  tensor's size from each rank, a broadcast writes it from rank 0).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 bench/ddp_bytes.py
    # prints a table; rank 0 writes results/ddp_bytes/<commit>-<time>.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from runfiles import run_stem, write_new
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

import sparsewrap as sw
from sparsewrap.io.tensors import join_tensors, split_tensors
from sparsewrap.train import collectives, distributed
from sparsewrap.train.history import Callback

CONFIGS = {
    "l0": {"method": "l0", "target": 0.9},  # per-weight gates (the default granularity)
    "magnitude": {"method": "magnitude", "target": 0.9, "schedule": "cubic", "end": 8, "every": 4},
}
COUNTERS = ("sync", "ddp_grad", "ddp_buffers", "wchar")
counts = dict.fromkeys(COUNTERS, 0)
REAL_ALL_REDUCE = dist.all_reduce
legacy = False  # whether run() is measuring the old code (set per run)


def wchar() -> int:
    """Bytes this process has written through system calls (``/proc/self/io``; 0 where it does not exist)."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return 0
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("wchar:"))


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def install_shim() -> None:
    """Count the bytes of every tensor sparsewrap hands to a collective (it calls them as ``dist.<name>``)."""
    for name in ("broadcast", "all_reduce"):  # what a training step uses (all_gather: checkpoints only)
        real = getattr(dist, name)

        def counted(tensor: torch.Tensor, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            counts["sync"] += nbytes(tensor)
            return _real(tensor, *args, **kwargs)

        setattr(dist, name, counted)


def install_ddp_counters() -> None:
    """Make ``distributed.wrap`` (what ``sw.fit`` calls) return a DDP that counts its gradient and buffer bytes."""
    wrap = distributed.wrap

    def counting_wrap(model: torch.nn.Module, ctx: distributed.DistContext) -> torch.nn.Module:
        ddp = DistributedDataParallel(model) if legacy else wrap(model, ctx)  # the old wrap: DDP's defaults

        def hook(state, bucket):  # DDP checks annotations: none here (they would be strings)
            """DDP's default: the bucket averaged by all-reduce (through the real one, which the shim would count)."""
            counts["ddp_grad"] += nbytes(bucket.buffer())
            work = REAL_ALL_REDUCE(bucket.buffer().div_(dist.get_world_size()), async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        def buffers(module: torch.nn.Module, args: Any) -> None:  # DDP broadcast them just before this forward
            if ddp.will_sync_module_buffers():
                counts["ddp_buffers"] += sum(map(nbytes, module.buffers()))

        ddp.register_comm_hook(None, hook)
        model.register_forward_pre_hook(buffers)
        return ddp

    distributed.wrap = counting_wrap


def legacy_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Before, the loop broadcast no buffers itself: DDP did, before each forward."""


def legacy_sync(sp: sw.Sparsifier, src: int = 0, **_: Any) -> None:
    """The old ``sync_sparsity``: every parametrization tensor and the method's state from rank 0, every step."""
    collectives.broadcast_tensors(distributed.sparsity_tensors(sp.model), src)
    state_json, state_tensors = split_tensors(sp.method.state_dict())
    state_json = collectives.broadcast_json(state_json, src)
    names = sorted(state_tensors)
    if names:
        received = {k: state_tensors[k].detach().clone() for k in names}
        collectives.broadcast_tensors([received[k] for k in names], src)
        state_tensors = received
    if dist.get_rank() != src:
        sp.method.load_state_dict(join_tensors(state_json, state_tensors))
    sp.settle()


class PerStep(Callback):
    """Rank 0's counters at the end of every step (differences give the bytes of each step)."""

    def __init__(self) -> None:
        self.marks: list[dict[str, int]] = []

    def on_train_begin(self, state: Any) -> None:
        self.marks = [self.now()]

    def on_step_end(self, state: Any) -> None:
        self.marks.append(self.now())

    @staticmethod
    def now() -> dict[str, int]:
        return {**counts, "wchar": wchar()}


def run(config: dict[str, Any], mode: str, steps: int, batch: int, size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    options = dict(config)
    sp = sw.sparsify(resnet18(num_classes=10), options.pop("method"), **options)
    g = torch.Generator().manual_seed(dist.get_rank())
    n = steps * batch
    data = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(10, (n,), generator=g))
    loader = DataLoader(data, batch_size=batch)
    global legacy
    legacy = mode == "before"
    sync, buffers = distributed.sync_sparsity, distributed.broadcast_buffers
    if legacy:
        distributed.sync_sparsity, distributed.broadcast_buffers = legacy_sync, legacy_buffers
    callback = PerStep()
    try:
        sw.fit(sp, loader, epochs=1, optimizer="sgd", lr=0.01, seed=0, callback=callback, handle_signals=False)
    finally:
        distributed.sync_sparsity, distributed.broadcast_buffers = sync, buffers
    marks = callback.marks
    per_step = {c: [b[c] - a[c] for a, b in zip(marks, marks[1:])] for c in COUNTERS}
    gates = sum(map(nbytes, sp.method.method_parameters()))
    masks = sum(map(nbytes, sp.model.buffers())) - sum(map(nbytes, resnet18(num_classes=10).buffers()))
    return {"mode": mode, "steps": len(per_step["sync"]), "per_step": per_step, "gate_bytes": gates,
            "mask_bytes": masks}  # fmt: skip


def mb(x: float) -> str:
    return f"{x / 1e6:9.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8, help="examples per rank and step")
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    ctx = distributed.setup("cpu")
    if ctx is None:
        raise SystemExit("run under torchrun: torchrun --standalone --nproc_per_node=2 bench/ddp_bytes.py")
    install_shim()
    install_ddp_counters()
    rows = []
    for name in args.configs:
        for mode in ("before", "after"):
            rows.append(
                {"config": name, **CONFIGS[name], **run(CONFIGS[name], mode, args.steps, args.batch, args.size)}
            )
    distributed.teardown()
    if not ctx.is_main:
        return
    head = (
        f"{'config':<10} {'sync':<6} {'sparsewrap MB/step':>19} {'(min..max)':>21} {'DDP grads':>9} {'DDP buffers':>11}"
    )
    print(head + f" {'total MB/step':>13} {'wchar MB/step':>13}")
    for r in rows:
        s = r["per_step"]
        mean = {c: statistics.fmean(s[c]) for c in COUNTERS}
        total = mean["sync"] + mean["ddp_grad"] + mean["ddp_buffers"]
        r["mean"] = mean | {"total": total}
        spread = f"{mb(min(s['sync'])).strip()}..{mb(max(s['sync'])).strip()}"
        print(f"{r['config']:<10} {r['mode']:<6} {mb(mean['sync']):>19} {spread:>21} {mb(mean['ddp_grad']):>9} "
              f"{mb(mean['ddp_buffers']):>11} {mb(total):>13} {mb(mean['wchar']):>13}")  # fmt: skip
    record = {"benchmark": "ddp_bytes", "model": "torchvision resnet18(num_classes=10)", "world_size": ctx.world_size,
              "backend": "gloo", "steps": args.steps, "batch_per_rank": args.batch, "size": args.size,
              "torch": torch.__version__, "python": platform.python_version(), "rows": rows,
              "command": "OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 bench/ddp_bytes.py"}  # fmt: skip
    out = write_new(run_stem("ddp_bytes").with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Evaluation forward of a sparsified model against the dense one, with and without reusing the export projection.

Methods whose export projects their learned state (``str``'s exact count, a gradual ``magnitude`` schedule before
its end, ``cs``'s ticket during the search) show that projection in eval mode, so that what one evaluates is what
one exports. The projection is computed from the method's tensors; ``switches.REUSE_PROJECTION`` keeps it across
evaluation forwards while they are unchanged (the method's state key), instead of once per forward. Each row
trains a few steps (the state a validation pass meets mid-run), then times the eval forward of the dense model,
of the sparse one with reuse and without, interleaved in one process; the table gives medians and ratios to
dense (CPU time).

    python bench/eval_overhead.py                     # writes results/eval_overhead/<commit>-<time>.json
    python bench/eval_overhead.py --threads 2 --batch 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import timm
import torch
from runfiles import run_stem, write_new

import sparsewrap as sw
from sparsewrap import switches

ROWS: dict[str, dict[str, Any]] = {
    "str": dict(method="str", target=0.9),
    "magnitude (gradual, mid-schedule)": dict(method="magnitude", target=0.9, schedule="cubic", end=1.0, every=1),
    "cs (search)": dict(method="cs", target=0.9),
}


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=10)


def cpu_ms(fn) -> float:
    """CPU milliseconds of one call of ``fn`` without gradients."""
    with torch.no_grad():
        start = time.process_time()
        fn()
        return (time.process_time() - start) * 1e3


def measure(name: str, kwargs: dict[str, Any], x: torch.Tensor, steps: int, repeats: int) -> dict[str, Any]:
    dense = build().eval()
    model = build()
    sp = sw.sparsify(model, **kwargs)
    opt = torch.optim.SGD(sp.param_groups(lr=0.01), momentum=0.9)
    sp.start(total_steps=10 * steps, optimizer=opt)
    for _ in range(steps):
        loss = model(x).logsumexp(1).mean() + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
    model.eval()
    times: dict[str, list[float]] = {"dense": [], "reuse": [], "recompute": []}
    with torch.no_grad():
        dense(x), model(x)  # warm up
    try:
        for _ in range(repeats):  # interleaved: the machine's drift hits every column alike
            times["dense"].append(cpu_ms(lambda: dense(x)))
            switches.REUSE_PROJECTION = True
            times["reuse"].append(cpu_ms(lambda: model(x)))
            switches.REUSE_PROJECTION = False
            times["recompute"].append(cpu_ms(lambda: model(x)))
    finally:
        switches.REUSE_PROJECTION = True
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"row": name, "options": kwargs, "median_ms": med, "reuse_x_dense": med["reuse"] / med["dense"],
            "recompute_x_dense": med["recompute"] / med["dense"], "samples_ms": times}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="training steps before the timing")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = [measure(name, ROWS[name], x, args.steps, args.repeats) for name in args.rows]
    print(f"ResNet-18 eval forward, batch {args.batch} of 32x32, {args.threads} thread(s), CPU time, median ms")
    print(f"{'row':36s} {'dense':>8s} {'reuse':>8s} {'recompute':>10s} {'reuse/dense':>12s} {'recompute/dense':>16s}")
    for r in rows:
        m = r["median_ms"]
        print(f"{r['row']:36s} {m['dense']:8.1f} {m['reuse']:8.1f} {m['recompute']:10.1f} "
              f"{r['reuse_x_dense']:12.2f} {r['recompute_x_dense']:16.2f}")  # fmt: skip
    stem = run_stem("eval_overhead")
    write_new(stem.with_suffix(".json"), json.dumps({"config": vars(args), "rows": rows}, indent=1) + "\n")
    print(f"wrote {stem}.json")


if __name__ == "__main__":
    main()

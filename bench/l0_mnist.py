"""Constrained L0 on MNIST: LeNet-300-100 and LeNet-5 at sparsity targets 0.5, 0.7, 0.9.

For each (model, target): train with ``sparsify(model, "l0", target=..., granularity=...)`` and Adam, then
report the expected density at the end of training (what the constraint controls), the exported sparsity of
the targeted weights (exact), the test error of the exported model, and the parameters and MACs of the
purged model (``export(purge=True)``) as a percentage of the dense model, next to the constrained-L0 paper's
MNIST table (Gallego-Posada et al. 2022, METHODS.md §1.9: 200 epochs, structured gates, mean of 5 seeds).

    python bench/l0_mnist.py                      # the full table (about an hour on 2 CPU cores)
    python bench/l0_mnist.py --models lenet5 --targets 0.9 --epochs 8

Writes a new ``bench/results/l0_mnist/<commit>-<time>.json`` per run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from runfiles import run_stem, write_new

import sparsewrap as sw
from sparsewrap.analysis.macs import total_macs
from sparsewrap.demo.data import load_mnist
from sparsewrap.demo.models import lenet5, mlp_300_100

MODELS = {"mlp": mlp_300_100, "lenet5": lenet5}
# METHODS.md §1.9 (structured, model-wise constraint; Params/MACs of the purged model in % of dense).
PAPER = {
    "mlp": {"target density": 0.33, "L0 %": 34.17, "params %": 26.58, "MACs %": 26.66, "error %": 1.77},
    "lenet5": {"target density": 0.10, "L0 %": 12.24, "params %": 7.75, "MACs %": 46.47, "error %": 1.01},
}
INPUT = (1, 28, 28)


def batches(x: torch.Tensor, y: torch.Tensor, size: int, gen: torch.Generator):
    order = torch.randperm(x.shape[0], generator=gen)
    for i in range(0, x.shape[0], size):
        idx = order[i : i + size]
        yield x[idx], y[idx]


@torch.no_grad()
def error_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    wrong = sum(int((model(x[i : i + 1000]).argmax(1) != y[i : i + 1000]).sum()) for i in range(0, len(x), 1000))
    return 100.0 * wrong / len(x)


def run(name: str, target: float, args: argparse.Namespace, data: dict) -> dict:
    torch.manual_seed(args.seed)
    model = MODELS[name]()
    dense_params = sum(p.numel() for p in model.parameters())
    dense_macs = total_macs(model, INPUT)
    options = {
        k: getattr(args, k) for k in ("dual_lr", "droprate_init", "log_alpha_max") if getattr(args, k) is not None
    }
    sp = sw.sparsify(model, "l0", target=target, granularity=args.granularity, input_shape=list(INPUT), **options)
    opt = torch.optim.Adam(sp.param_groups(lr=args.lr, gates={"lr": args.gate_lr}))
    xtr, ytr = data["train"]
    gen = torch.Generator().manual_seed(args.seed)
    start, curve = time.perf_counter(), []
    for epoch in range(args.epochs):
        model.train()
        for xb, yb in batches(xtr, ytr, args.batch, gen):
            loss = F.cross_entropy(model(xb), yb) + sp.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sp.step()
        summary = sp.method.summary()
        curve.append({"epoch": epoch + 1, "expected density": summary["expected density"],
                      "deterministic density": summary["deterministic density"], "multiplier": summary["multiplier"],
                      "eval error %": error_rate(model, *data["test"])})  # fmt: skip
        print(f"  {name} target={target} epoch {epoch + 1}: {curve[-1]}", flush=True)
    train_s = time.perf_counter() - start
    report = sp.report()
    plain = sw.export(sp)
    purged = sw.export(sp, purge=True, example_inputs=torch.zeros(1, *INPUT))
    return {
        "model": name,
        "granularity": args.granularity,
        "requested sparsity": target,
        "expected density (end of training)": curve[-1]["expected density"],
        "deterministic density (learned gates)": report.extras.get("learned density (before projection)"),
        "exported sparsity": report.exported,
        "test error % (exported)": error_rate(plain, *data["test"]),
        "test error % (purged)": error_rate(purged, *data["test"]),
        "params % (purged)": 100.0 * sum(p.numel() for p in purged.parameters()) / dense_params,
        "MACs % (purged)": 100.0 * total_macs(purged, INPUT) / dense_macs,
        "options": sp.spec.options,
        "epochs": args.epochs,
        "train seconds": round(train_s, 1),
        "curve": curve,
        "notes": report.notes,
    }


def table(rows: list[dict]) -> str:
    head = f"{'model':8} {'target':>6} {'E[dens] end':>11} {'exported':>9} {'err %':>6} {'params %':>8} {'MACs %':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:8} {r['requested sparsity']:6.2f} {r['expected density (end of training)']:11.4f} "
            f"{r['exported sparsity']:9.4f} {r['test error % (purged)']:6.2f} {r['params % (purged)']:8.2f} "
            f"{r['MACs % (purged)']:7.2f}"
        )
    lines.append("paper (200 epochs, 5 seeds, model-wise): density / L0 % / params % / MACs % / error %")
    for name, p in PAPER.items():
        lines.append(
            f"  {name:8} {p['target density']:.2f} / {p['L0 %']} / {p['params %']} / {p['MACs %']} / {p['error %']}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    ap.add_argument("--granularity", default="channel", choices=["weight", "channel"])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--gate-lr", type=float, default=0.05)
    ap.add_argument("--dual-lr", type=float, default=None, help="default: the method's")
    ap.add_argument("--droprate-init", type=float, default=None, help="default: the method's")
    ap.add_argument("--log-alpha-max", type=float, default=None, help="default: the method's")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1 avoids OpenMP stalls on a busy machine")
    ap.add_argument("--out", type=Path, default=None, help="default: a new file under results/l0_mnist/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mnist = load_mnist()
    train, test = mnist["train"].dataset(args.limit), mnist["test"].dataset()
    data = {"train": train.tensors, "test": test.tensors}
    rows = []
    for name in args.models:
        for target in args.targets:
            rows.append(run(name, target, args, data))
    print(table(rows))
    config = {k: v for k, v in vars(args).items() if k not in ("out",)}
    text = json.dumps({"config": config, "paper": PAPER, "rows": rows}, indent=2, default=float)
    out = write_new(args.out or run_stem("l0_mnist").with_suffix(".json"), text + "\n")
    print(f"wrote {out}")
    assert all(math.isfinite(r["test error % (purged)"]) for r in rows)


if __name__ == "__main__":
    main()

"""Optimizer update of per-weight L0 gates: torch's default loop against its fused update (``"fused": True`` in
the gates' group, ``param_groups(gates={"fused": True})``).

Per-weight gates are as many values as the weights (11 M on ResNet-18), so their optimizer step is a pass the
dense model does not have. This times ``opt.step()`` over the real ``log_alpha`` tensors of
``sparsify(resnet18, "l0", target=0.9)`` with fixed random gradients, for each optimizer, the gates' group with
``fused`` False and True, interleaved in one process; the table gives the median step and the ratio.

    python bench/gate_update.py                  # all optimizers, writes results/gate_update/<commit>-<time>.json
    python bench/gate_update.py --threads 2 --optimizers sgd adam
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch
from runfiles import run_stem, write_new

import sparsewrap as sw

OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.01, momentum=0.9),
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-3),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-3),
    "adagrad": lambda groups: torch.optim.Adagrad(groups, lr=1e-2),
}


def gate_steps(name: str, steps: int) -> dict[str, list[float]]:
    """Step times (seconds) of the gates-only optimizer, loop and fused, interleaved."""
    torch.manual_seed(0)
    sp = sw.sparsify(timm.create_model("resnet18", pretrained=False, num_classes=10), "l0", target=0.9)
    gates = sp.method.gate_parameters()
    for g in gates:
        g.grad = torch.randn_like(g)
    opts = {}
    for label, fused in (("loop", False), ("fused", True)):
        group = next(g for g in sp.param_groups(lr=0.01, gates={"fused": fused}) if g["name"] == "gates")
        # separate copies of the gates, so that each optimizer owns its parameters and state
        params = [torch.nn.Parameter(g.detach().clone()) for g in group["params"]]
        for p, g in zip(params, group["params"]):
            p.grad = g.grad.clone()
        opts[label] = OPTIMIZERS[name]([{**group, "params": params}])
        opts[label].step()  # creates the state
    times: dict[str, list[float]] = {label: [] for label in opts}
    for i in range(steps):
        for label in list(opts) if i % 2 == 0 else list(opts)[::-1]:
            start = time.perf_counter()
            opts[label].step()
            times[label].append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS), help="subset of: %(default)s")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="default: a new file under results/gate_update/")
    args = ap.parse_args()
    unknown = sorted(set(args.optimizers) - set(OPTIMIZERS))
    if unknown:
        ap.error(f"unknown optimizer(s) {unknown}; choices: {list(OPTIMIZERS)}")
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'optimizer':<10} {'loop ms':>8} {'fused ms':>9} {'fused/loop':>11}")
    for name in args.optimizers:
        times = gate_steps(name, args.steps)
        loop, fused = (statistics.median(times[k]) * 1e3 for k in ("loop", "fused"))
        rows.append({"optimizer": name, "loop_ms": loop, "fused_ms": fused, "ratio": fused / loop})
        print(f"{name:<10} {loop:8.1f} {fused:9.1f} {fused / loop:11.2f}", flush=True)
    record = {"threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps, "rows": rows}
    text = json.dumps(record, indent=2)
    args.out = write_new(args.out or run_stem("gate_update").with_suffix(".json"), text + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Purge benchmark: ResNet-50 with 50 % of its channels removed by magnitude channel pruning.

Measures the purge time (trace, analysis, shrink, verification; goal <= 3 s on CPU), the MACs ratio, and the
measured CPU latency ratio at batch 32 (goal: within 1.3x of the MACs ratio), median of repeats.

    python bench/purge.py                      # writes results/purge_resnet50.json
    python bench/purge.py --repeats 5 --size 224
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import timm
import torch

import sparsewrap as sw
from sparsewrap.macs import total_macs
from sparsewrap.purge import purge
from sparsewrap.purge.compare import latency

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--purge-runs", type=int, default=3, help="purge is timed this many times (median)")
    args = ap.parse_args()
    torch.manual_seed(0)
    shape = (3, args.size, args.size)
    model = timm.create_model(args.model, pretrained=False)
    sp = sw.sparsify(model, "magnitude", target=0.5, granularity="channel")
    plain = sw.export(sp).eval()
    x = torch.randn(1, *shape)
    times, result = [], None
    for _ in range(args.purge_runs):
        start = time.perf_counter()
        result = purge(plain, x)
        times.append(time.perf_counter() - start)
    small = result.model.eval()
    purge_s = sorted(times)[len(times) // 2]
    macs = (total_macs(plain, shape), total_macs(small, shape))
    params = (sum(p.numel() for p in plain.parameters()), sum(p.numel() for p in small.parameters()))
    lat = [latency(m, shape, args.batch, args.repeats) for m in (plain, small)]
    lat1 = [latency(m, shape, 1, args.repeats) for m in (plain, small)]
    macs_ratio, lat_ratio = macs[1] / macs[0], lat[1] / lat[0]
    record = {
        "model": args.model,
        "input": list(shape),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "purge_seconds_median": round(purge_s, 3),
        "purge_seconds_runs": [round(t, 3) for t in times],
        "purge_example_batch": 1,
        "coverage": result.report.coverage,
        "max_rel_error": result.report.max_rel_error,
        "params": params,
        "params_ratio": round(params[1] / params[0], 4),
        "macs": macs,
        "macs_ratio": round(macs_ratio, 4),
        f"latency_bs{args.batch}_ms": [round(t * 1e3, 1) for t in lat],
        "latency_bs1_ms": [round(t * 1e3, 2) for t in lat1],
        "latency_ratio": round(lat_ratio, 4),
        "latency_over_macs": round(lat_ratio / macs_ratio, 3),
        "goals": {"purge_le_3s": purge_s <= 3.0, "latency_within_1.3x_of_macs": lat_ratio <= 1.3 * macs_ratio},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"purge_{args.model}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'':24s} {'dense':>12s} {'purged':>12s} {'ratio':>7s}")
    print(f"{'parameters':24s} {params[0]:12,d} {params[1]:12,d} {params[1] / params[0]:7.3f}")
    print(f"{'MACs':24s} {macs[0]:12,d} {macs[1]:12,d} {macs_ratio:7.3f}")
    print(f"{'latency bs1 (ms)':24s} {lat1[0] * 1e3:12.1f} {lat1[1] * 1e3:12.1f} {lat1[1] / lat1[0]:7.3f}")
    print(f"{f'latency bs{args.batch} (ms)':24s} {lat[0] * 1e3:12.1f} {lat[1] * 1e3:12.1f} {lat_ratio:7.3f}")
    print(f"purge time {purge_s:.2f} s (median of {args.purge_runs}); latency/MACs ratio {lat_ratio / macs_ratio:.2f}")
    print(json.dumps(record["goals"]))


if __name__ == "__main__":
    main()

"""Purge benchmark: ResNet-50 with 50 % of its channels removed by magnitude channel pruning.

Measures the purge time (trace, analysis, shrink, verification; goal <= 3 s on CPU), the MACs ratio, and the
measured CPU latency ratio at batch 32 (goal: within 1.3x of the MACs ratio), median of repeats. Latencies are
CPU seconds of one thread (``time.process_time``), which other processes on a shared machine do not inflate;
the wall-clock ratio at the default thread count is recorded too.

Latency is measured twice: as exported (BatchNorm modules in place) and with BatchNorm folded into the convs
(``fold_batchnorm``, what ``export(..., fold_bn=True)`` does) on *both* the dense and the purged model. BatchNorm,
ReLU and residual adds are memory-bound, so they shrink with the channel count (about 0.5) rather than with the
MACs (about 0.26); folding removes the BatchNorm passes on both sides. A third pair runs folded and in
``channels_last`` (NHWC), oneDNN's native layout on the CPU, which spares the per-conv layout reorders that
also scale with channels, not MACs. The goal is reported for each of the three.

    python bench/purge.py                      # writes results/purge_resnet50/<commit>-<time>.json
    python bench/purge.py --repeats 5 --size 224
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import timm
import torch
from runfiles import run_stem, write_new

import sparsewrap as sw
from sparsewrap.analysis.macs import total_macs
from sparsewrap.purge import fold_batchnorm, purge
from sparsewrap.purge.compare import paired_latency

CPU = time.process_time  # CPU seconds of this process: what the forward costs on one thread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--purge-runs", type=int, default=3, help="purge is timed this many times (median)")
    ap.add_argument("--round-to", type=int, default=1, help="keep channel counts a multiple of this")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the CPU-time measurements")
    args = ap.parse_args()
    torch.manual_seed(0)
    shape = (3, args.size, args.size)
    model = timm.create_model(args.model, pretrained=False)
    sp = sw.sparsify(model, "magnitude", target=0.5, granularity="channel")
    plain = sw.export(sp).eval()
    x = torch.randn(1, *shape)
    wall_threads = torch.get_num_threads()
    times, cpu_times, result = [], [], None
    torch.set_num_threads(args.threads)
    for _ in range(args.purge_runs):
        start, cpu = time.perf_counter(), time.process_time()
        result = purge(plain, x, round_to=args.round_to)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    small = result.model.eval()
    purge_s, purge_cpu = sorted(times)[len(times) // 2], sorted(cpu_times)[len(cpu_times) // 2]
    macs = (total_macs(plain, shape), total_macs(small, shape))
    params = (sum(p.numel() for p in plain.parameters()), sum(p.numel() for p in small.parameters()))
    # CPU seconds on one thread: the cost of the forward, whatever else runs on the machine
    folded = []
    for m in (plain, small):
        f = copy.deepcopy(m).eval()
        report = fold_batchnorm(f, x)
        folded.append(f)
    # CPU seconds on one thread: the cost of the forward, whatever else runs on the machine
    unfolded_lat = paired_latency([plain, small], shape, args.batch, args.repeats, CPU)
    lat = paired_latency(folded, shape, args.batch, args.repeats, CPU)
    lat1 = paired_latency(folded, shape, 1, max(args.repeats, 9), CPU)
    nhwc_unfolded = paired_latency([copy.deepcopy(m) for m in (plain, small)], shape, args.batch, args.repeats, CPU,
                                   channels_last=True)  # fmt: skip
    nhwc = paired_latency([copy.deepcopy(m) for m in folded], shape, args.batch, args.repeats, CPU, channels_last=True)
    torch.set_num_threads(wall_threads)
    wall = paired_latency(folded, shape, args.batch, args.repeats)
    macs_ratio, lat_ratio = macs[1] / macs[0], lat[1] / lat[0]
    unfolded_ratio = unfolded_lat[1] / unfolded_lat[0]
    record = {
        "model": args.model,
        "input": list(shape),
        "threads_cpu_clock": args.threads,
        "threads_wall_clock": wall_threads,
        "load_average": list(os.getloadavg()),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "purge_seconds_median": round(purge_s, 3),
        "purge_cpu_seconds_median": round(purge_cpu, 3),
        "purge_seconds_runs": [round(t, 3) for t in times],
        "purge_example_batch": 1,
        "round_to": args.round_to,
        "coverage": result.report.coverage,
        "max_rel_error": result.report.max_rel_error,
        "params": params,
        "params_ratio": round(params[1] / params[0], 4),
        "macs": macs,
        "macs_ratio": round(macs_ratio, 4),
        "batchnorm_folded": report.summary(),
        f"latency_bs{args.batch}_cpu_ms_unfolded": [round(t * 1e3, 1) for t in unfolded_lat],
        "latency_ratio_unfolded": round(unfolded_ratio, 4),
        f"latency_bs{args.batch}_cpu_ms_channels_last_unfolded": [round(t * 1e3, 1) for t in nhwc_unfolded],
        "latency_ratio_channels_last_unfolded": round(nhwc_unfolded[1] / nhwc_unfolded[0], 4),
        f"latency_bs{args.batch}_cpu_ms_channels_last": [round(t * 1e3, 1) for t in nhwc],
        "latency_ratio_channels_last": round(nhwc[1] / nhwc[0], 4),
        f"latency_bs{args.batch}_cpu_ms": [round(t * 1e3, 1) for t in lat],
        "latency_bs1_cpu_ms": [round(t * 1e3, 2) for t in lat1],
        "latency_ratio": round(lat_ratio, 4),
        f"latency_bs{args.batch}_wall_ms": [round(t * 1e3, 1) for t in wall],
        "latency_ratio_wall": round(wall[1] / wall[0], 4),
        "latency_over_macs": round(lat_ratio / macs_ratio, 3),
        "latency_over_macs_unfolded": round(unfolded_ratio / macs_ratio, 3),
        "latency_over_macs_channels_last": round(nhwc[1] / nhwc[0] / macs_ratio, 3),
        "goals": {
            "purge_le_3s_cpu": purge_cpu <= 3.0,
            "purge_le_3s_wall": purge_s <= 3.0,
            "latency_within_1.3x_of_macs_as_exported": unfolded_ratio <= 1.3 * macs_ratio,
            "latency_within_1.3x_of_macs_bn_folded": lat_ratio <= 1.3 * macs_ratio,
            "latency_within_1.3x_of_macs_bn_folded_channels_last": nhwc[1] / nhwc[0] <= 1.3 * macs_ratio,
        },
    }
    suffix = "" if args.round_to == 1 else f"_round{args.round_to}"
    out = write_new(run_stem(f"purge_{args.model}{suffix}").with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    print(f"{'':24s} {'dense':>12s} {'purged':>12s} {'ratio':>7s}")
    print(f"{'parameters':24s} {params[0]:12,d} {params[1]:12,d} {params[1] / params[0]:7.3f}")
    print(f"{'MACs':24s} {macs[0]:12,d} {macs[1]:12,d} {macs_ratio:7.3f}")
    print(f"{'latency bs1 (CPU ms)':24s} {lat1[0] * 1e3:12.1f} {lat1[1] * 1e3:12.1f} {lat1[1] / lat1[0]:7.3f}   "
          "BN folded")  # fmt: skip
    print(f"{f'latency bs{args.batch} (CPU ms)':24s} {unfolded_lat[0] * 1e3:12.1f} {unfolded_lat[1] * 1e3:12.1f} "
          f"{unfolded_ratio:7.3f}   as exported")  # fmt: skip
    print(f"{f'latency bs{args.batch} (CPU ms)':24s} {lat[0] * 1e3:12.1f} {lat[1] * 1e3:12.1f} {lat_ratio:7.3f}   "
          "BN folded")  # fmt: skip
    print(f"{f'latency bs{args.batch} (CPU ms)':24s} {nhwc_unfolded[0] * 1e3:12.1f} {nhwc_unfolded[1] * 1e3:12.1f} "
          f"{nhwc_unfolded[1] / nhwc_unfolded[0]:7.3f}   channels_last")  # fmt: skip
    print(f"{f'latency bs{args.batch} (CPU ms)':24s} {nhwc[0] * 1e3:12.1f} {nhwc[1] * 1e3:12.1f} "
          f"{nhwc[1] / nhwc[0]:7.3f}   BN folded, channels_last")  # fmt: skip
    wall_ratio = wall[1] / wall[0]
    print(f"{f'latency bs{args.batch} (wall ms)':24s} {wall[0] * 1e3:12.1f} {wall[1] * 1e3:12.1f} {wall_ratio:7.3f}   "
          "BN folded")  # fmt: skip
    print(
        f"purge {purge_s:.2f} s wall, {purge_cpu:.2f} s CPU (median of {args.purge_runs}, {args.threads} thread); "
        f"latency/MACs ratio {lat_ratio / macs_ratio:.2f}; load average {os.getloadavg()[0]:.1f}"
    )
    print(json.dumps(record["goals"]))


if __name__ == "__main__":
    main()

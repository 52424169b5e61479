"""Purge on one model per timm architecture family: 50 % channel magnitude pruning, export, purge.

Families are timm's defining modules (timm 1.0.31 has 98); each is represented by its variant with the fewest
parameters (counted on the meta device, ``--pick`` recomputes ``results/timm_families.json``). Every model runs
in its own subprocess with a time limit, on a small input where the architecture accepts one.

For each family it records: whether sparsify/export/purge ran, the output error of the purged model against
the masked (sparsified) model on the same input, parameters and MACs kept, and the purge coverage: ``full``
(every group with zero channels removed), ``partial`` or ``none``.

    python bench/timm_sweep.py                 # all families, writes results/timm_sweep/<commit>-<time>.{json,md}
    python bench/timm_sweep.py --only resnet vgg --timeout 120
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

from runfiles import run_stem, write_new

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PICKS = RESULTS / "timm_families.json"
WRONG = 1e-3  # relative output error (float32) above which a purged model counts as a wrong output


def pick_families() -> dict[str, str]:
    """``{family: smallest model}``, parameter counts from a meta-device build of every registered model."""
    import timm
    import torch
    from timm.models import _registry

    by_family: dict[str, list[str]] = defaultdict(list)
    for name in timm.list_models():
        by_family[_registry._model_to_module[name]].append(name)
    picks = {}
    for family, names in sorted(by_family.items()):
        best = None
        for name in names:
            try:
                with torch.device("meta"):
                    n = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
            except Exception:
                continue
            if best is None or n < best[1]:
                best = (name, n)
        if best is not None:
            picks[family] = best[0]
    return picks


def _small_input(name: str):
    """The smallest of a few input sizes the model accepts (kwargs, input tensor)."""
    import timm
    import torch

    cfg = timm.get_pretrained_cfg(name)
    default = tuple(cfg.input_size) if cfg is not None and cfg.input_size else (3, 224, 224)
    tries = [({}, (default[0], s, s)) for s in (64, 96, 128)]
    tries += [({"img_size": s}, (default[0], s, s)) for s in (64, 96, 128)]
    tries.append(({}, default))
    for kwargs, shape in tries:
        try:
            model = timm.create_model(name, pretrained=False, **kwargs).eval()
            with torch.no_grad():
                model(torch.randn(2, *shape))
            return model, kwargs, shape
        except Exception:
            continue
    raise RuntimeError("no input size works")


def _rel(a, b) -> float:
    from sparsewrap.purge.core import _flat, relative_error

    return relative_error(_flat(a), _flat(b))


def run_one(name: str) -> dict:
    """Sparsify, export and purge one model; return the record (errors are recorded, not raised)."""
    import torch

    import sparsewrap as sw
    from sparsewrap.analysis.macs import total_macs
    from sparsewrap.purge import purge_report

    torch.manual_seed(0)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rec: dict = {"model": name}
    model, kwargs, shape = _small_input(name)
    rec.update(kwargs=kwargs, input=list(shape))
    x = torch.randn(2, *shape)
    stage = "sparsify"
    try:
        sp = sw.sparsify(model, "magnitude", target=0.5, granularity="channel")
        model.eval()
        with torch.no_grad():
            masked = model(x)
        stage = "export"
        plain = sw.export(sp)
        stage = "purge"
        t0 = time.perf_counter()
        purged = sw.export(sp, purge=True, example_inputs=x)
        rec["purge_seconds"] = round(time.perf_counter() - t0, 2)
        stage = "forward"
        purged.eval()
        with torch.no_grad():
            out = purged(x)
        rec["rel_error"] = _rel(masked, out)
        report = purge_report(purged)
        rec["coverage"] = report.coverage
        rec["params_dense"] = sum(p.numel() for p in plain.parameters())
        rec["params_purged"] = sum(p.numel() for p in purged.parameters())
        stage = "macs"
        rec["macs_dense"] = total_macs(plain, shape)
        rec["macs_purged"] = total_macs(purged, shape)
        rec["groups_purged"] = sum(u.status == "purged" for u in report.units)
        rec["groups_dense"] = sum(u.status == "dense" for u in report.units)
        reasons = [f"{u.name}: {u.reason}" for u in report.units if u.status == "dense"]
        rec["dense_reasons"] = reasons[:5]
        rec["trace_error"] = report.trace_error[:300]
        rec["status"] = "ok"
    except Exception as exc:
        rec["status"] = f"{stage} failed"
        rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return rec


def _child(name: str, out: Path) -> None:
    rec = run_one(name)
    out.write_text(json.dumps(rec))


def sweep(picks: dict[str, str], timeout: int, jobs: int) -> list[dict]:
    """Run every family in a subprocess (``jobs`` at a time) under ``timeout`` seconds each."""
    tmp = Path(tempfile.mkdtemp(prefix="timm_sweep_"))
    pending = list(picks.items())
    running: list[tuple[str, str, subprocess.Popen, float, Path]] = []
    records = []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    while pending or running:
        while pending and len(running) < jobs:
            family, name = pending.pop(0)
            out = tmp / f"{family}.json"
            out.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "--child", name, str(out)]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            running.append((family, name, proc, time.time(), out))
        time.sleep(0.5)
        for item in list(running):
            family, name, proc, started, out = item
            elapsed = time.time() - started
            if proc.poll() is None and elapsed < timeout:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            running.remove(item)
            if out.exists():
                rec = json.loads(out.read_text())
            else:
                status = "timeout" if elapsed >= timeout else f"crashed (exit {proc.returncode})"
                rec = {"model": name, "status": status}
            rec["family"] = family
            rec["seconds"] = round(elapsed, 1)
            records.append(rec)
            print(_line(rec), flush=True)
    return sorted(records, key=lambda r: r["family"])


def _fewer(rec: dict) -> bool:
    return rec.get("status") == "ok" and rec.get("params_purged", 0) < rec.get("params_dense", 0)


def _line(rec: dict) -> str:
    if rec.get("status") != "ok":
        return f"{rec['family']:28s} {rec['model']:36s} {rec['status']}: {rec.get('error', '')[:100]}"
    kept = rec["params_purged"] / rec["params_dense"]
    macs = rec["macs_purged"] / max(rec["macs_dense"], 1)
    return (f"{rec['family']:28s} {rec['model']:36s} {rec['coverage']:8s} params {kept:6.1%} MACs {macs:6.1%} "
            f"err {rec['rel_error']:.1e} purge {rec.get('purge_seconds', 0):.1f}s")  # fmt: skip


def summarize(records: list[dict]) -> dict:
    n = len(records)
    ok = [r for r in records if r.get("status") == "ok"]
    wrong = [r["family"] for r in ok if not r["rel_error"] <= WRONG]
    cov = {k: sum(r.get("coverage") == k for r in ok) for k in ("full", "partial", "none")}
    fewer = sum(_fewer(r) for r in records)
    return {
        "families": n,
        "ran": len(ok),
        "failed": {r["family"]: r["status"] for r in records if r.get("status") != "ok"},
        "wrong_outputs": wrong,
        "coverage": cov,
        "fewer_params": fewer,
        "fewer_params_fraction": round(fewer / n, 4) if n else 0.0,
    }


def write_markdown(records: list[dict], summary: dict, path: Path) -> None:
    lines = [
        "# Purge sweep: one timm model per family (50 % channel magnitude pruning)",
        "",
        f"{summary['families']} families; ran {summary['ran']}; fewer parameters: {summary['fewer_params']} "
        f"({summary['fewer_params_fraction']:.1%}); coverage full {summary['coverage']['full']}, partial "
        f"{summary['coverage']['partial']}, none {summary['coverage']['none']}; wrong outputs: "
        f"{len(summary['wrong_outputs'])}; failures: {len(summary['failed'])}.",
        "",
        "| family | model | input | coverage | params kept | MACs kept | rel. error | purge s | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("status") != "ok":
            note = f"{r['status']}: {r.get('error', '')[:120]}".replace("|", "/")
            lines.append(f"| {r['family']} | {r['model']} | {r.get('input', '')} | — | — | — | — | — | {note} |")
            continue
        kept = r["params_purged"] / r["params_dense"]
        macs = r["macs_purged"] / max(r["macs_dense"], 1)
        note = (r["dense_reasons"][0] if r.get("dense_reasons") else r.get("trace_error", ""))[:120].replace("|", "/")
        lines.append(
            f"| {r['family']} | {r['model']} | {'x'.join(map(str, r['input']))} | {r['coverage']} | {kept:.1%} | "
            f"{macs:.1%} | {r['rel_error']:.1e} | {r.get('purge_seconds', 0):.1f} | {note} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="families to run (default: all)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per model")
    ap.add_argument("--jobs", type=int, default=2, help="models run at once (one thread each)")
    ap.add_argument("--pick", action="store_true", help="recompute the family -> model table")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], Path(args.child[1]))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.pick or not PICKS.exists():
        PICKS.write_text(json.dumps(pick_families(), indent=1, sort_keys=True) + "\n")
    picks = json.loads(PICKS.read_text())
    if args.only:
        picks = {k: v for k, v in picks.items() if k in set(args.only)}
    records = sweep(picks, args.timeout, args.jobs)
    summary = summarize(records)
    suffix = "" if not args.only else "_partial"
    stem = run_stem(f"timm_sweep{suffix}")
    write_new(stem.with_suffix(".json"), json.dumps({"summary": summary, "records": records}, indent=1))
    write_markdown(records, summary, stem.with_suffix(".md"))
    print(f"wrote {stem}.json and .md")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

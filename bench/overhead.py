"""Training overhead of sparsification: median train-step time of the sparsified model over the dense model.

Both models are built from the same initialisation and stepped in the same process, interleaved (dense,
sparse, sparse, dense, ...), so that machine noise (other processes, frequency scaling, allocator warm-up)
hits both alike. A step is forward + cross-entropy + backward + SGD(momentum) step (+ ``sp.penalty()`` and
``sp.step()`` for the sparse model), on one fixed random batch so that no data loading is timed.

    python bench/overhead.py                       # all models x all rows, writes results/overhead/<commit>-<time>.json
    python bench/overhead.py --models resnet18 --rows magnitude --steps 30
    python bench/overhead.py --device cuda
    python bench/overhead.py --threads 1 --clock cpu   # process CPU time: stable on a busy machine
    python bench/overhead.py --repeats 5               # 5 rounds, each with freshly built models
    python bench/overhead.py --fused                   # SGD(fused=True) for both models
    python bench/overhead.py --malloc keep             # no heap trimming, for both models (see keep_heap)

Each row is measured in ``--repeats`` rounds (new models, new allocations each time); the ratio pools the step
times of all rounds, and ``spread`` gives the lowest and highest ratio of a single round. The ``control`` row
times a second, identical dense model in place of the sparse one: its distance from 1.00 is what the machine's
noise alone does to a ratio.

Goals (``GOALS``, on the paired ratio): 1.05x dense for masks and channel gates, 1.3x for per-weight gates;
issues 16-18: 1.3x for ``str``, ``cs`` and ``dnw``, 1.05x between updates for ``static``, ``set``, ``deepr`` and
``dsr``, 1.10x amortised for ``rigl``, 1.2x for ``halo``, ``l1`` and ``sws`` (``hashednet``: measured, no goal).

The run's length. The sparse model's ``sp.start(total_steps=...)`` is told a run of ``RUN_SHARE`` (100) times the
steps of one round (warm-up and timed), so the timed steps are the first 1 % of a run: schedules laid over the
run are in their first phase (CS's first search round, with its rewind point; the penalties' steering, every
1 % of the run, once per round; RigL's ``end=0.75`` far ahead), and cadences counted in steps keep their
value: the DST rows rewire every 100 steps (rigl ``every=100`` as issue 17 states; ``set`` and ``dsr`` their
default 100; ``deepr`` every step). ``MIN_STEPS`` raises the timed steps of those rows so that updates fall
inside the timed window: 100 for ``set`` and ``dsr`` (the update after step 99), 200 for ``rigl`` (two whole
intervals: its dense-gradient backward and rewiring after steps 99 and 199).

Update steps. The sparse model's steps on which the method updates (``is_update_step`` or ``dense_grad_step``
of step ``t``: the dense-gradient backward and the rewiring both fall in that timed step) are flagged. Besides
the paired ratio over all steps, each row gives the paired ratio over the steps *between* updates, over the
*update* steps, and the *amortised* ratio, the two weighted by their share of the timed steps (with whole
intervals timed, 1/every for the update steps): ``(1 - u) * between + u * update``. Medians keep one slow step
from moving a figure, so the update steps are timed apart rather than averaged in. A row's goal is checked on
the amortised ratio for ``AMORTISED`` rows (rigl), else on the ratio between updates (the amortised one when
every step updates, as DeepR's). The ``control`` row is the noise floor of the paired ratio.

The rows of ``PIECE_ROWS`` run a method with pieces of the hot path switched off (``SWITCHES``; set through
``sparsewrap/switches.py`` and ``sparsewrap/torch_compat.py``, for measurement only): a piece's gain is its
method row's ratio against the ratio of the row without it, both against the same dense model. The
``*-plain`` rows switch every piece off but the version counters (their own rows measure them): ``w * mask``
as a parametrization, eager hard-concrete gates.

    python bench/overhead.py --models resnet18 --threads 1 --rows control magnitude magnitude-no-native l0 l0-eager
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from runfiles import run_stem, write_new
from torch import nn

import sparsewrap as sw
from sparsewrap import switches, torch_compat

# (name, timm architecture, image size, batch)
MODELS: list[tuple[str, str, int, int]] = [
    ("resnet18", "resnet18", 32, 64),
    ("vit_tiny", "vit_tiny_patch16_224", 224, 16),
]
# (row id, sparsify keyword arguments incl. method); add a row per method
METHOD_ROWS: list[tuple[str, dict[str, Any] | None]] = [
    ("control", None),  # an identical dense model: the noise floor of the measurement
    ("magnitude", dict(method="magnitude", target=0.9)),
    ("magnitude-channel", dict(method="magnitude", target=0.5, granularity="channel")),
    ("l0", dict(method="l0", target=0.9)),
    ("l0-channel", dict(method="l0", target=0.5, granularity="channel")),
    # issue 16: learned masks and thresholds
    ("str", dict(method="str", target=0.9)),
    ("cs", dict(method="cs", target=0.9)),
    ("dnw", dict(method="dnw", target=0.9)),
    # issue 17: dynamic sparse training (every: each paper's default, rigl's stated by the issue)
    ("static", dict(method="static", target=0.9)),
    ("set", dict(method="set", target=0.9, every=100)),
    ("deepr", dict(method="deepr", target=0.9)),
    ("dsr", dict(method="dsr", target=0.9, every=100)),
    ("rigl", dict(method="rigl", target=0.9, every=100)),
    ("hashednet", dict(method="hashednet", target=0.9)),
    # issue 18: penalty methods
    ("halo", dict(method="halo", target=0.9)),
    ("l1", dict(method="l1", target=0.9)),
    ("sws", dict(method="sws", target=0.9)),
]
# the timed steps are the first 1/RUN_SHARE of the run given to sp.start(total_steps=...): schedules laid over
# the run (CS's rounds, RigL's end=0.75, the penalties' steering every 1 % of the run) are in their first phase,
# and steps counted in steps (the DST methods' every=100) keep their cadence
RUN_SHARE = 100
# rows whose updates come every 100 steps: at least this many timed steps per round, so that updates happen
# inside the timed window (t = 99, 199 with the default 3 warm-up steps)
MIN_STEPS = {"set": 100, "dsr": 100, "rigl": 200}
_MAG = dict(method="magnitude", target=0.9)
_L0 = dict(method="l0", target=0.9)
# what each switch turns off (docs/benchmarks.md, "What the hot path keeps")
SWITCHES = {
    "native": "the C kernels (masks.c, hardconcrete.c): the eager path",
    "hard_masks": "hard masks: every mask is the plain product w * mask",
    "reuse_buffers": "the per-weight gates' reused buffers: new tensors every step",
    "version_counters": "tensor version counters (torch_compat.no_version): every lazy projection redone",
}
# the plain path: every piece off but the version counters (without them the fallback reads values: slower)
ALL_OFF = tuple(name for name in SWITCHES if name != "version_counters")
# (row id, sparsify keyword arguments, the switches turned off)
PIECE_ROWS: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("magnitude-plain", _MAG, ALL_OFF),
    ("magnitude-no-native", _MAG, ("native",)),
    ("magnitude-no-version", _MAG, ("version_counters",)),
    ("l0-plain", _L0, ALL_OFF),
    ("l0-eager", _L0, ("native",)),
    ("l0-no-reuse", _L0, ("reuse_buffers",)),
    ("l0-no-version", _L0, ("version_counters",)),
    ("cs-eager", dict(method="cs", target=0.9), ("native",)),
]
# the issues' goals (paired ratio), flagged in the table when missed
GOALS = {
    "magnitude": 1.05, "magnitude-channel": 1.05, "l0": 1.3, "l0-channel": 1.05,
    "str": 1.3, "cs": 1.3, "dnw": 1.3,  # issue 16
    "static": 1.05, "set": 1.05, "deepr": 1.05, "dsr": 1.05, "rigl": 1.10,  # issue 17 (hashednet: no goal)
    "halo": 1.2, "l1": 1.2, "sws": 1.2,  # issue 18
}  # fmt: skip
# rows whose goal is on the amortised ratio (update steps included at their share); the others' goal is on the
# ratio between updates (the paired ratio over the steps without an update: all of them for most methods)
AMORTISED = {"rigl"}
# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@dataclass
class Result:
    model: str
    row: str
    input: list[int]
    dense_ms: float
    sparse_ms: float
    ratio: float  # median sparse / median dense, over the steps of every round
    paired_ratio: float  # median over steps of sparse / dense measured back to back
    steps: int  # timed steps per model and round
    repeats: int = 1
    round_ratios: list[float] | None = None  # the ratio of each round alone
    dense_faults: float | None = None  # median minor page faults per step (getrusage), dense model
    sparse_faults: float | None = None  # the same, sparse model
    off: list[str] | None = None  # the hot-path pieces switched off (SWITCHES)
    total_steps: int | None = None  # the run's length given to sp.start (RUN_SHARE x the steps of a round)
    update_steps: int = 0  # timed steps (all rounds) on which the method updated (is_update_step, dense_grad_step)
    between_ratio: float | None = None  # paired ratio over the steps without an update (None: every step updates)
    update_ratio: float | None = None  # paired ratio over the update steps (None: none timed)
    amortised_ratio: float | None = None  # between and update ratios weighted by their share of the timed steps


class switched_off:
    """Turn the named pieces of the hot path off for the duration of a ``with`` block (see ``SWITCHES``)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        unknown = sorted(set(names) - set(SWITCHES))
        if unknown:
            raise ValueError(f"unknown switches {unknown}; known: {sorted(SWITCHES)}")
        self.names = names
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> switched_off:
        for name in self.names:
            if name == "version_counters":
                self.saved[name] = torch_compat.version
                torch_compat.version = torch_compat.no_version
            else:
                self.saved[name] = getattr(switches, name.upper())
                setattr(switches, name.upper(), False)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            if name == "version_counters":
                torch_compat.version = value
            else:
                setattr(switches, name.upper(), value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """One model, its optimizer and (for the sparse one) its Sparsifier; :meth:`__call__` times one step."""

    def __init__(self, model: nn.Module, sp: sw.Sparsifier | None, device: torch.device, clock: str,
                 fused: bool = False, total_steps: int | None = None) -> None:  # fmt: skip
        self.model, self.sp, self.device = model.to(device).train(), sp, device
        self.clock = time.process_time if clock == "cpu" else time.perf_counter
        params = sp.param_groups(lr=0.01) if sp is not None else [{"params": list(model.parameters()), "lr": 0.01}]
        self.opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, fused=fused or None)
        if sp is not None:
            sp.start(total_steps=total_steps, optimizer=self.opt)  # regrown weights' state is reset in this one
        self.faults: list[int] = []  # minor page faults of each step (the whole process)
        self.updates: list[bool] = []  # whether the method updated on each step (see is_update)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        _sync(self.device)
        self.updates.append(self.sp is not None and is_update(self.sp, self.sp.step_count))
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = self.clock()
        loss = F.cross_entropy(self.model(x), y)
        if self.sp is not None:
            loss = loss + self.sp.penalty()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sp is not None:
            self.sp.step()
        _sync(self.device)
        elapsed = self.clock() - start
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        return elapsed


def is_update(sp: sw.Sparsifier, t: int) -> bool:
    """Whether the method updates on step ``t`` (DST rewiring, RigL's dense gradient): its ``is_update_step``
    or ``dense_grad_step``; methods without updates (or with other events, which the median ignores) never."""
    method = sp.method
    check = getattr(method, "is_update_step", None)
    return bool(method.dense_grad_step(t) or (check is not None and check(t)))


def measure(arch: str, size: int, batch: int, kwargs: dict[str, Any] | None, steps: int, warmup: int,
            device: torch.device, clock: str, fused: bool = False,
            off: tuple[str, ...] = ()) -> tuple[list[Any], ...]:  # fmt: skip
    """Interleaved step times (seconds) of the dense and the sparsified model (``kwargs`` None: a second dense
    model, the control), then the page faults of their timed steps, then whether the method updated on each
    timed step; the pieces ``off`` are switched off for both models, from building them to the last step (the
    dense model runs none of them). The sparse model is told a run of ``RUN_SHARE * (warmup + steps)`` steps."""
    with switched_off(off):
        return _measure(arch, size, batch, kwargs, steps, warmup, device, clock, fused)


def _measure(arch: str, size: int, batch: int, kwargs: dict[str, Any] | None, steps: int, warmup: int,
             device: torch.device, clock: str, fused: bool) -> tuple[list[Any], ...]:  # fmt: skip
    torch.manual_seed(0)
    dense_model = timm.create_model(arch, pretrained=False, num_classes=10)
    sparse_model = timm.create_model(arch, pretrained=False, num_classes=10)
    sparse_model.load_state_dict(dense_model.state_dict())
    sp = None
    if kwargs is not None:
        options = dict(kwargs)
        sp = sw.sparsify(sparse_model, options.pop("method"), **options)
    dense = Stepper(dense_model, None, device, clock, fused)
    sparse = Stepper(sparse_model, sp, device, clock, fused, RUN_SHARE * (warmup + steps))
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for _ in range(warmup):
        dense(x, y), sparse(x, y)
    times: tuple[list[float], list[float]] = ([], [])
    dense.faults.clear(), sparse.faults.clear(), sparse.updates.clear()
    for i in range(steps):
        order = (dense, sparse) if i % 2 == 0 else (sparse, dense)  # ABBA: neither always runs first
        for stepper in order:
            times[stepper is sparse].append(stepper(x, y))
    return (*times, dense.faults, sparse.faults, sparse.updates)


def run_one(name: str, arch: str, size: int, batch: int, row: str, kwargs: dict[str, Any] | None, steps: int,
            warmup: int, device: torch.device, clock: str, repeats: int = 1,
            fused: bool = False, off: tuple[str, ...] = ()) -> Result:  # fmt: skip
    dense: list[float] = []
    sparse: list[float] = []
    faults: tuple[list[int], list[int]] = ([], [])
    updates: list[bool] = []
    rounds = []
    for _ in range(repeats):
        d_times, s_times, d_faults, s_faults, s_updates = measure(
            arch, size, batch, kwargs, steps, warmup, device, clock, fused, off
        )
        updates += s_updates
        rounds.append(statistics.median(s_times) / statistics.median(d_times))
        dense += d_times
        sparse += s_times
        faults[0].extend(d_faults), faults[1].extend(s_faults)
    d, s = statistics.median(dense), statistics.median(sparse)
    paired = statistics.median(b / a for a, b in zip(dense, sparse))
    between, update, amortised = split_ratios(dense, sparse, updates)
    shape = [batch, 3, size, size]
    d_f, s_f = statistics.median(faults[0]), statistics.median(faults[1])
    return Result(name, row, shape, d * 1e3, s * 1e3, s / d, paired, steps, repeats, rounds, d_f, s_f,
                  list(off) or None, RUN_SHARE * (warmup + steps), sum(updates), between, update,
                  amortised)  # fmt: skip


def split_ratios(dense: list[float], sparse: list[float],
                 updates: list[bool]) -> tuple[float | None, float | None, float]:  # fmt: skip
    """The paired ratio (median over steps of sparse / dense) over the steps without an update and over the
    update steps (``None`` where there are none), and the amortised ratio: the two weighted by their share of
    the timed steps (with whole update intervals timed, ``1/every`` for the update steps)."""
    ratios = [b / a for a, b in zip(dense, sparse)]
    plain = [r for r, u in zip(ratios, updates) if not u]
    upd = [r for r, u in zip(ratios, updates) if u]
    between = statistics.median(plain) if plain else None
    update = statistics.median(upd) if upd else None
    share = len(upd) / len(ratios)
    amortised = (1 - share) * (between or 0.0) + share * (update or 0.0)
    return between, update, amortised


def goal_ratio(r: Result) -> float:
    """The ratio a row's goal is checked on: amortised for ``AMORTISED`` rows, else between updates (the
    paired ratio when no step is an update, the amortised one when every step is, as DeepR's)."""
    if r.row in AMORTISED or r.between_ratio is None:
        return r.amortised_ratio if r.amortised_ratio is not None else r.paired_ratio
    return r.between_ratio


def keep_heap() -> bool:
    """Stop glibc from returning freed heap memory to the system between steps (``--malloc keep``).

    glibc trims the top of its heap whenever more than a threshold is free there, so that the next step's
    large tensors fault their pages in again (minor page faults: the kernel zeroes each page). Whether a step
    trims depends on where small long-lived allocations happen to sit: one ResNet-18 (dense or masked)
    training alone in its own process took 4,400-7,800 faults per step, and in one paired run 6,300 faults
    per step cost the masked model 8.6 ms of system time, while in most paired runs both models take none.
    The ``faults d/s`` column shows when one model of a pair was hit; keeping the heap (no trimming, and
    tensors up to 32 MiB from the heap rather than fresh ``mmap`` calls, as jemalloc or tcmalloc would do)
    takes that out of both models alike. Returns whether it applied (glibc only)."""
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        return names[0] if names else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def render(results: list[Result]) -> str:
    lines = [
        f"{'model':<10} {'row':<22} {'input':<16} {'dense ms':>9} {'sparse ms':>10} {'ratio':>7} {'paired':>7} "
        f"{'spread':>13} {'faults d/s':>11} {'upd':>4} {'between':>8} {'update':>8} {'amort':>7}"
    ]
    for r in results:
        flag = f"  > goal {GOALS[r.row]}" if r.row in GOALS and goal_ratio(r) > GOALS[r.row] else ""
        extra = " ".join(f"{x:{w}.3f}" if x is not None else " " * w for x, w in
                         ((r.between_ratio, 8), (r.update_ratio, 8), (r.amortised_ratio, 7)))  # fmt: skip
        rounds = r.round_ratios or [r.ratio]
        spread = f"{min(rounds):.3f}-{max(rounds):.3f}" if len(rounds) > 1 else ""
        faults = f"{r.dense_faults or 0:.0f}/{r.sparse_faults or 0:.0f}"
        lines.append(f"{r.model:<10} {r.row:<22} {'x'.join(map(str, r.input)):<16} {r.dense_ms:9.1f} "
                     f"{r.sparse_ms:10.1f} {r.ratio:7.3f} {r.paired_ratio:7.3f} {spread:>13} "
                     f"{faults:>11} {r.update_steps:>4} {extra}{flag}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=[m[0] for m in MODELS], help="subset of: %(default)s")
    pieces = " ".join(r[0] for r in PIECE_ROWS)
    ap.add_argument("--rows", nargs="*", default=[r[0] for r in METHOD_ROWS],
                    help=f"default: %(default)s; also the hot-path rows {pieces}")  # fmt: skip
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model (each)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1, help="rounds per row, each with freshly built models")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter; cpu: process CPU time (use with --threads 1 on a shared machine)",
    )
    ap.add_argument("--fused", action="store_true", help="torch's fused SGD (one pass per tensor) for both models")
    ap.add_argument(
        "--malloc",
        choices=("default", "keep"),
        default="default",
        help="keep: glibc keeps freed memory for the next step, for both models (see keep_heap)",
    )
    ap.add_argument("--out", type=Path, default=None, help="default: a new file under results/overhead/")
    args = ap.parse_args()
    # named by the commit the run started from (the code it imported), not the one checked out when it ends
    stem, started_at = run_stem("overhead"), _commit()
    kept = args.malloc == "keep" and keep_heap()
    if args.malloc == "keep" and not kept:
        print("--malloc keep: not glibc, allocator left as is")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = {name: (kwargs, ()) for name, kwargs in METHOD_ROWS}
    rows.update({name: (kwargs, off) for name, kwargs, off in PIECE_ROWS})
    unknown = sorted(set(args.rows) - set(rows)) + sorted(set(args.models) - {m[0] for m in MODELS})
    if unknown:
        ap.error(f"unknown model or row {unknown}; models: {[m[0] for m in MODELS]}, rows: {list(rows)}")
    results = []
    for name, arch, size, batch in [m for m in MODELS if m[0] in args.models]:
        for row in dict.fromkeys(args.rows):  # in the order given, so that related rows run side by side
            setting = (max(args.steps, MIN_STEPS.get(row, 0)), args.warmup, device, args.clock, args.repeats,
                       args.fused)  # fmt: skip
            kwargs, off = rows[row]
            results.append(run_one(name, arch, size, batch, row, kwargs, *setting, off=off))
            print(render(results[-1:]).splitlines()[-1], flush=True)
    print()
    print(render(results))
    record = {
        "goals": GOALS,
        "amortised_goals": sorted(AMORTISED),
        "run_share": RUN_SHARE,
        "switches": SWITCHES,
        "device": str(device),
        "clock": args.clock,
        "fused_sgd": args.fused,
        "malloc_keep": kept,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "commit": started_at,
        "results": [asdict(r) for r in results],
    }
    text = json.dumps(record, indent=2)
    args.out = write_new(args.out or stem.with_suffix(".json"), text + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

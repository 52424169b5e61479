"""Optional native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

The hard-concrete gate of :mod:`sparsewrap.parametrizations.gated` costs about fifteen passes over a weight
tensor in eager PyTorch (noise, logit, sigmoid, clamp, products, and as many in backward); the kernels in
``hardconcrete.c`` do the forward and the backward in one pass each, vectorized (``-O3 -ffast-math``, an
inlined ``exp``; the gate gradient written with non-temporal stores). ``masks.c`` zeroes the pruned entries of
a hard mask from the mask packed one bit per weight (:mod:`sparsewrap.parametrizations.masked`); ``halo.c``
computes HALO's penalty and its gradients in one pass (:mod:`sparsewrap.methods.penalty.halo_term`);
``softmask.c`` CS's soft mask (:mod:`sparsewrap.parametrizations.soft_mask`), ``shrink.c`` STR's soft threshold
(:mod:`sparsewrap.parametrizations.threshold`) and ``topk.c`` DNW's top-k band selection
(:mod:`sparsewrap.parametrizations.topk`), one pass per direction each.
Plain C with no Python or torch headers: it builds in about a second. When torch runs on GNU OpenMP (its pip wheels do),
the library is built with ``-fopenmp`` and links to the ``libgomp`` torch has already loaded, so its loops run
on torch's own thread pool with ``torch.get_num_threads()`` threads (separate Python threads would fight
torch's spinning OpenMP workers for the cores). The shared library is cached under ``$SPARSEWRAP_CACHE``
(default ``~/.cache/sparsewrap``), keyed by the sources, the flags, the compiler and the CPU, and written
atomically. Every pointer argument is passed as a plain address (:func:`ptr`).

Without a C compiler, or with ``SPARSEWRAP_NATIVE=0``, :func:`kernels` returns ``None`` and callers use their
eager path (same math and distribution, another noise stream, slower; for masks, a product with the float
mask); the reason is logged once at INFO level.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .. import switches

log = logging.getLogger(__name__)

# masks.c last (tests/test_native.py builds it alone as SOURCES[-1])
SOURCES = [
    Path(__file__).with_name(name)
    for name in ("hardconcrete.c", "halo.c", "softmask.c", "shrink.c", "topk.c", "masks.c")
]
HEADERS = [Path(__file__).with_name("gate_common.h")]  # included by the sources: part of the build's cache key
# -mprefer-vector-width=512: the gate math is compute-bound, so 16-wide AVX-512 lanes pay where the CPU has them
FLAGS = [
    "-O3",
    "-ffast-math",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fopenmp-simd",
    "-fPIC",
    "-std=c11",
]
# Linked in a separate step without -ffast-math: at link time that flag makes GCC add crtfastmath.o, whose
# constructor sets flush-to-zero and denormals-are-zero for the whole process when the library is loaded,
# changing the results of every torch operation in the thread that loaded it.
LINK_FLAGS = ["-shared"]
_lock = threading.Lock()
_state: dict[str, object] = {}

_p, _i64, _u32, _f32, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int
_f64p, _i64p = ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int64)
SIGNATURES = {
    "sw_hc_uniform": [_p, _i64, _i64, _u32, _u32],
    "sw_hc_sample": [_p, _p, _i64, _i64, _u32, _u32, _f32, _i32],
    "sw_hc_forward": [_p, _p, _p, _p, _i64, _i64, _u32, _u32, _f32, _f32, _i32, _f32, ctypes.POINTER(ctypes.c_double)],
    "sw_hc_backward": [_p, _p, _p, _p, _p, _p, _i64, _i64, _f32, _f32, _f32],
    "sw_mask_zero": [_p, _i64, _p],
    "sw_mask_pack": [_p, _p, _i64],
    "sw_mask_zero_rows": [_p, _i64, _i64, _p],
    "sw_mask_vectorized": [],
    "sw_halo_forward": [_p, _p, _i64, _f32, ctypes.POINTER(ctypes.c_double)],
    "sw_halo_forward_grad": [_p, _p, _p, _p, _i64, _f32, _f32, _f32, ctypes.POINTER(ctypes.c_double)],
    "sw_halo_backward": [_p, _p, _p, _p, _i64, _f32, _f32],
    "sw_halo_clamp": [_p, _i64, _f32],
    "sw_sm_forward": [_p, _p, _p, _i64, _f32, _f32, _f64p, _i64p],  # softmask.c
    "sw_sm_backward": [_p, _p, _p, _p, _p, _i64, _f32, _f32, _f32],
    "sw_shrink_forward": [_p, _p, _i64, _f32, _p],  # shrink.c
    "sw_shrink_backward": [_p, _p, _p, _i64, _p],
    "sw_topk_band": [_p, _i64, _f32, _f32, _p, _i64, _i64, _p],  # topk.c
    "sw_topk_apply": [_p, _p, _i64, _f32, _p],
}
RESTYPES = {"sw_mask_vectorized": _i32}


def cache_dir() -> Path:
    root = os.environ.get("SPARSEWRAP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsewrap")
    return Path(root) / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return ""


def _torch_runs_gomp() -> bool:
    """Whether this process has GNU OpenMP loaded (torch's pip wheels ship and load ``libgomp.so.1``)."""
    try:
        with open("/proc/self/maps") as fh:
            return any("libgomp" in line for line in fh)
    except OSError:
        return False


def _build(cc: str) -> Path:
    omp = ["-fopenmp"] if _torch_runs_gomp() else []
    flags, link = FLAGS + omp, LINK_FLAGS + omp
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [source.read_text() for source in [*SOURCES, *HEADERS]]
    key = hashlib.sha256("\0".join([*texts, " ".join(flags), " ".join(link), version, _cpu_id()]).encode())
    key = key.hexdigest()
    target = cache_dir() / f"kernels-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as objdir:
            objects = [str(Path(objdir) / f"{source.stem}.o") for source in SOURCES]
            commands = [[cc, *flags, "-c", str(src), "-o", obj] for src, obj in zip(SOURCES, objects)]
            commands.append([cc, *link, "-o", tmp, *objects, "-lm"])
            for command in commands:
                out = subprocess.run(command, capture_output=True, text=True, timeout=120)
                if out.returncode != 0:
                    raise OSError(f"{cc} failed: {out.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def kernels() -> ctypes.CDLL | None:
    """The compiled library (built on first call), or ``None`` when native kernels are unavailable."""
    if not switches.NATIVE:  # off for a measurement (sparsewrap/switches.py)
        return None
    if "lib" in _state:  # the common case, on every gated forward and masked gradient: no lock needed
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib = None
        if os.environ.get("SPARSEWRAP_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            log.info("sparsewrap native kernels disabled by SPARSEWRAP_NATIVE")
        elif (cc := _compiler()) is None:
            log.info("no C compiler found (set CC): sparsewrap uses its eager hard-concrete gates")
        else:
            try:
                lib = ctypes.CDLL(str(_build(cc)))
                for name, args in SIGNATURES.items():
                    getattr(lib, name).argtypes = args
                    getattr(lib, name).restype = RESTYPES.get(name)
            except (OSError, subprocess.SubprocessError, AttributeError) as exc:
                log.info("sparsewrap native kernels unavailable (%s): using the eager hard-concrete gates", exc)
                lib = None
        _state["lib"] = lib
        return lib


def kernels_for(*tensors: torch.Tensor, min_numel: int = 0) -> ctypes.CDLL | None:
    """The library when the kernels apply to ``tensors``: float32, on the CPU, contiguous, one shape, the first
    with at least ``min_numel`` entries (below it the eager path is as fast); else ``None``."""
    first = tensors[0]
    if first.numel() < min_numel:
        return None
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() or t.shape != first.shape:
            return None
    return kernels()


def ptr(t: torch.Tensor | None) -> int | None:
    """The address of a contiguous CPU tensor's data, for a pointer argument (``None``, a NULL, for ``None``)."""
    return None if t is None else t.data_ptr()

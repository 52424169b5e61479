"""Switches that turn one piece of the per-step hot path off, for measurement only.

``bench/overhead.py`` sets them to time each piece against the plain path in one process (``docs/benchmarks.md``,
"What the hot path keeps"). They are not part of the public API: the library never changes them, and
everything but the benchmark leaves them at ``True``. Each is read where its piece runs; models built while a
switch is off keep what it decided at build time (hard or plain masks).
"""

from __future__ import annotations

NATIVE = True  # the C kernels of sparsewrap/native (False: the eager path, as with SPARSEWRAP_NATIVE=0)
HARD_MASKS = True  # Masked keeps pruned originals at zero (False: every mask is the plain product w * mask)
REUSE_PROJECTION = True  # eval forwards reuse the export projection while the method's state key is unchanged
REUSE_BUFFERS = True  # per-weight gates reuse their sample, output and gradient buffers from step to step

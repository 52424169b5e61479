"""Discovering Neural Wirings (Wortsman et al. 2019, https://arxiv.org/abs/1906.00586), as in the STR repository.

Every forward keeps the ``k_l`` weights of largest ``|w|`` of each layer ``l`` and zeroes the rest; the backward
is straight-through, so every weight (pruned ones included) receives the gradient of the masked weight and a
pruned weight whose magnitude grows past the ``k_l``-th comes back:

    w_eff = w * 1[|w| among the k_l largest of the layer],      dL/dw = dL/dw_eff

``k_l`` comes from the target: one overall sparsity split over the layers by ``allocation`` (``"uniform"``, the
paper's, or ``"erk"``) with the counts rounded so that the total is exact, or a ``{layer pattern: sparsity}``
dict (each layer at its own sparsity, e.g. budgets learned by STR; unmatched layers stay dense). The sparsity is
exact at every forward, so export just writes the current masked weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError, choices
from ..parametrizations import attach
from ..parametrizations.topk import TopMagnitude
from .base import Method, register_method
from .layer_budgets import LAYER_ALLOCATIONS, layer_drop_counts


@dataclass
class DNWConfig:
    """Options of ``method="dnw"``.

    Attributes:
        allocation: how one overall target is split over the layers: ``"uniform"`` (every layer at the
            target, the paper's) or ``"erk"`` (Erdős–Rényi-Kernel). Ignored for a dict target.
    """

    allocation: str = "uniform"

    def __post_init__(self) -> None:
        if self.allocation not in LAYER_ALLOCATIONS:
            raise ConfigError(
                f"allocation={self.allocation!r} is unknown for method 'dnw'; valid: {choices(LAYER_ALLOCATIONS)} "
                "(DNW prunes each layer to its own count; give target= as a dict for other budgets)"
            )


@register_method
class DNW(Method):
    """Discovering Neural Wirings (see the module docstring)."""

    name = "dnw"
    description = "DNW: top-k |w| of each layer at every forward, straight-through gradient to every weight."
    Config = DNWConfig

    def attach(self) -> None:
        kept, drops = layer_drop_counts(self.targets, self.target, self.config.allocation)
        self.targets[:] = kept
        self.drops = drops
        self.layers = [attach(t.module, "weight", TopMagnitude(t.numel - d)) for t, d in zip(kept, drops)]

    def requested_sparsity(self) -> float:
        """The overall sparsity of the per-layer counts (the target itself for a float target, to one weight)."""
        if isinstance(self.target, float):
            return self.target
        return sum(self.drops) / max(sum(t.numel for t in self.targets), 1)

    def summary(self) -> dict[str, float]:
        return {"layers": float(len(self.layers))}

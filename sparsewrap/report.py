"""Sparsity reports: plain dataclasses (the CLI renders them; the core never prints)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import Tensor


@dataclass
class LayerReport:
    """One targeted layer.

    Attributes:
        name: module name.
        shape: weight shape.
        params: number of weights.
        nonzeros: non-zero weights now (deterministic, eval-mode form).
        exported_nonzeros: non-zero weights in the exported model (after the method's final projection).
    """

    name: str
    shape: tuple[int, ...]
    params: int
    nonzeros: int
    exported_nonzeros: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.params if self.params else 0.0

    @property
    def exported_sparsity(self) -> float:
        return 1.0 - self.exported_nonzeros / self.params if self.params else 0.0


@dataclass
class Report:
    """Requested vs achieved sparsity, per layer and overall, plus method-specific figures."""

    method: str
    requested: float | None
    step: int
    layers: list[LayerReport] = field(default_factory=list)
    extras: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def nonzeros(self) -> int:
        return sum(layer.nonzeros for layer in self.layers)

    @property
    def achieved(self) -> float:
        """Current overall sparsity of the targeted weights."""
        return 1.0 - self.nonzeros / self.params if self.params else 0.0

    @property
    def exported(self) -> float:
        """Overall sparsity the exported model will have."""
        return 1.0 - sum(la.exported_nonzeros for la in self.layers) / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(achieved=self.achieved, exported=self.exported, params=self.params, nonzeros=self.nonzeros)
        return d


def count_nonzero(t: Tensor) -> int:
    return int(t.count_nonzero())

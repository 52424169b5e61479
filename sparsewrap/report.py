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
class BudgetUpdate:
    """One recorded update of a dynamic sparse training method (SET, RigL, DSR, DeepR).

    Attributes:
        step: the step after which the connections moved.
        moved: connections regrown at new positions (as many left elsewhere).
        active: active connections per targeted layer after the update, in the order of ``Report.layers``.
    """

    step: int
    moved: int
    active: list[int]


@dataclass
class Report:
    """Requested vs achieved sparsity, per layer and overall, plus method-specific figures.

    ``updates`` is the budget history of a dynamic sparse training run (empty for other methods): the connections
    moved per update and each layer's active count over time (DSR moves budget between layers).
    """

    method: str
    requested: float | None
    step: int
    layers: list[LayerReport] = field(default_factory=list)
    extras: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    updates: list[BudgetUpdate] = field(default_factory=list)

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

    def table(self) -> list[list[str]]:
        """The per-layer table as text cells: a header row, one row per layer and a ``total`` row."""
        rows = [["layer", "shape", "params", "nonzeros", "sparsity", "exported"]]
        for la in self.layers:
            rows.append([la.name, "×".join(map(str, la.shape)), f"{la.params:,}", f"{la.nonzeros:,}",
                         f"{la.sparsity:.4f}", f"{la.exported_sparsity:.4f}"])  # fmt: skip
        rows.append(
            ["total", "", f"{self.params:,}", f"{self.nonzeros:,}", f"{self.achieved:.4f}", f"{self.exported:.4f}"]
        )
        return rows

    def budget_table(self, columns: int = 6) -> list[list[str]]:
        """The budget history as text cells (empty without ``updates``).

        A header row (``layer`` and the step of each update shown), one row per layer with its active connections
        and density after each update, and a ``moved`` row. At most ``columns`` updates are shown, evenly spread
        from the first recorded to the last.
        """
        if not self.updates:
            return []
        n = len(self.updates)
        picks = sorted({round(i * (n - 1) / (columns - 1)) for i in range(columns)}) if n > columns else range(n)
        shown = [self.updates[i] for i in picks]
        rows = [["layer"] + [f"step {u.step}" for u in shown]]
        for i, la in enumerate(self.layers):
            rows.append([la.name] + [f"{u.active[i]:,} ({u.active[i] / la.params:.3f})" for u in shown])
        rows.append(["moved"] + [f"{u.moved:,}" for u in shown])
        return rows

    def __str__(self) -> str:
        """The table ``sparsewrap report`` prints, as plain text (``print(sp.report())``)."""
        rows = self.table()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

        def line(row: list[str]) -> str:
            cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
            return "  ".join(cells).rstrip()

        rule = "  ".join("-" * w for w in widths)
        requested = "-" if self.requested is None else f"{self.requested:.4f}"
        out = [f"method {self.method}, step {self.step}", line(rows[0]), rule]
        out += [line(r) for r in rows[1:-1]] + [rule, line(rows[-1])]
        out.append(f"requested sparsity {requested}   achieved now {self.achieved:.4f}   at export {self.exported:.4f}")
        out += [f"{key}: {value:.6g}" for key, value in self.extras.items()]
        out += [f"note: {note}" for note in self.notes]
        budgets = self.budget_table()
        if budgets:
            widths = [max(len(r[i]) for r in budgets) for i in range(len(budgets[0]))]
            out.append(f"budget over time ({len(self.updates)} updates recorded): active connections (density) "
                       "per layer after each update, and connections moved")  # fmt: skip
            out += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                    for r in budgets]  # fmt: skip
        return "\n".join(out)


def count_nonzero(t: Tensor) -> int:
    return int(t.count_nonzero())

"""``sparsewrap methods``, ``sparsewrap report`` and ``sparsewrap budgets``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from .common import app, console

TRUST_HELP = "Import and call the model factory the file names (only for files you trust: it runs their code)."


@app.command("methods")
def methods_cmd() -> None:
    """List the registered sparsification methods and their options (type or choices, and default)."""
    from ..methods import get_method, list_methods
    from .options import option_infos

    table = Table(title="sparsewrap methods (options: -O KEY=VALUE, or sparsify(..., KEY=VALUE))")
    table.add_column("method", style="bold cyan")
    table.add_column("description")
    table.add_column("options: type or choices = default")
    for name, desc in list_methods().items():
        options = "\n".join(escape(info.describe()) for info in option_infos(get_method(name).Config))
        table.add_row(name, desc, options or "(none)")
    console.print(table)


def render_report(report, title: str) -> Table:
    """A rich table of a :class:`sparsewrap.report.Report`."""
    table = Table(title=title, show_footer=True)
    table.add_column("layer", footer="total")
    table.add_column("shape")
    table.add_column("params", justify="right", footer=f"{report.params:,}")
    table.add_column("nonzeros", justify="right", footer=f"{report.nonzeros:,}")
    table.add_column("sparsity", justify="right", footer=f"{report.achieved:.4f}")
    table.add_column("exported", justify="right", footer=f"{report.exported:.4f}")
    for layer in report.layers:
        table.add_row(layer.name, "×".join(map(str, layer.shape)), f"{layer.params:,}", f"{layer.nonzeros:,}",
                      f"{layer.sparsity:.4f}", f"{layer.exported_sparsity:.4f}")  # fmt: skip
    return table


def render_budgets(report) -> Table | None:
    """A rich table of a dynamic sparse training run's budget history (None for other methods)."""
    rows = report.budget_table()
    if not rows:
        return None
    table = Table(title=f"budget over time ({len(report.updates)} updates recorded): active connections (density) "
                  "per layer after each update, and connections moved")  # fmt: skip
    for i, head in enumerate(rows[0]):
        table.add_column(head, justify="left" if i == 0 else "right")
    for row in rows[1:]:
        table.add_row(*row, end_section=row is rows[-2])
    return table


@app.command("report")
def report_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by sparsewrap.save / train."),  # noqa: B008
    trust_factory: bool = typer.Option(False, "--trust-factory", help=TRUST_HELP),
) -> None:
    """Per-layer shape, params, nonzeros and sparsity; totals; requested vs achieved."""
    from ..io.checkpoint import load

    sp = load(checkpoint, trust_factory=trust_factory)
    report = sp.report()
    console.print(render_report(report, f"{checkpoint.name}: method {report.method}, step {report.step}"))
    requested = "—" if report.requested is None else f"{report.requested:.4f}"
    console.print(f"requested sparsity {requested}   achieved now {report.achieved:.4f}   "
                  f"at export {report.exported:.4f}")  # fmt: skip
    for key, value in report.extras.items():
        console.print(f"{key}: {value:.6g}")
    for note in report.notes:
        console.print(f"note: {note}", style="yellow")
    budgets = render_budgets(report)
    if budgets is not None:
        console.print(budgets)


@app.command("budgets")
def budgets_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by sparsewrap.save / train."),  # noqa: B008
    output: Path = typer.Option(..., "--output", "-o", help="The JSON file to write ({layer: sparsity})."),  # noqa: B008
    trust_factory: bool = typer.Option(False, "--trust-factory", help=TRUST_HELP),
) -> None:
    """Write each layer's exported sparsity as JSON, for `sparsewrap train --target budgets.json`."""
    import json

    from ..io.atomic import write_atomic
    from ..methods.budgets import budgets

    found = budgets(checkpoint, trust_factory=trust_factory)
    text = json.dumps(found, indent=1)
    write_atomic(output, lambda tmp: tmp.write_text(text + "\n"))
    total = sum(found.values()) / len(found) if found else 0.0
    console.print(f"wrote {len(found)} layer budgets to {output} (mean layer sparsity {total:.4f}); use them with "
                  f"sparsewrap train --target {output}", highlight=False, soft_wrap=True)  # fmt: skip

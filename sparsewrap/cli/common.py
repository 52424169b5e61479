"""The typer application every command module registers on, and the consoles the command line prints to."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="sparsewrap",
    help="Make any PyTorch model sparse with published methods, then export a plain, compact model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
settings = {"debug": False}  # set from --debug by main() and the root callback


def show_version(value: bool) -> None:
    """Print ``sparsewrap <version>`` and exit (the eager ``--version`` option)."""
    if value:
        from .. import __version__

        console.print(f"sparsewrap {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors."),
    version: bool = typer.Option(
        False, "--version", callback=show_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    settings["debug"] = debug

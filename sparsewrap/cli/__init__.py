"""The ``sparsewrap`` command line (typer + rich). Each command group lives in its own module.

Nothing here imports torch or timm at module level (each command imports what it needs when it runs), so
``--help``, ``--version``, shell completion and argument errors answer at once.
"""

from __future__ import annotations

import sys
import traceback

import typer
from rich.markup import escape

try:  # typer >= 0.20 vendors its own click: its usage errors are not click.ClickException
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click.exceptions import ClickException

from .common import app, err_console, settings


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 600 else text[:597] + "..."


def error_name(exc: BaseException) -> str:
    """The exception's class name, qualified by its module when the bare name says nothing (``re.error``)."""
    name = type(exc).__qualname__
    if name.lower() in ("error", "exception"):
        return f"{type(exc).__module__}.{name}"
    return name


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sparsewrap`` console script and ``python -m sparsewrap``."""
    from . import compare as _compare  # noqa: F401
    from . import export as _export  # noqa: F401  (registers commands)
    from . import inspect as _inspect  # noqa: F401
    from . import train as _train  # noqa: F401

    args = list(sys.argv[1:] if argv is None else argv)
    settings["debug"] = "--debug" in args
    try:
        code = app(args=args, prog_name="sparsewrap", standalone_mode=False)
    except ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # every other error: one line, or the traceback with --debug
        if settings["debug"]:
            traceback.print_exc()
        else:  # "Error:" as click prints its usage errors (exc.show() above), so that both kinds read alike
            message = f"[bold red]Error:[/] {error_name(exc)}: {escape(_one_line(exc))}"
            err_console.print(message, highlight=False, soft_wrap=True)
            err_console.print("(run with --debug for the traceback)", style="dim")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)

"""Checks of ``sparsewrap train``'s cheap arguments, run before any data is loaded or model built (no torch)."""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path
from typing import Any

import typer


def check_out_dir(out: Path) -> None:
    """Check that ``--out`` is (or can become) a writable directory, by writing a probe file there.

    Nothing is created: for a missing directory the nearest existing parent is probed.

    Raises:
        typer.BadParameter: for a file, or a place where nothing can be written.
    """
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{str(out)!r} is a file; give a directory for the run", param_hint="--out")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise typer.BadParameter(f"{str(out)!r} cannot be created: {str(probe)!r} is a file", param_hint="--out")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".sparsewrap-probe-"):
            pass
    except OSError as exc:
        raise typer.BadParameter(
            f"{str(out)!r} is not writable (writing in {str(probe)!r} fails: {exc.strerror or exc}); choose a "
            "directory you can write to",
            param_hint="--out",
        ) from None


def check_number(value: float, flag: str, example: str) -> None:
    """A learning rate or weight decay: finite and >= 0.

    Raises:
        typer.BadParameter: naming the flag, the value and an example.
    """
    if not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"{value!r} must be a finite number >= 0, e.g. {flag} {example}", param_hint=flag)


def check_count(value: int | None, flag: str, what: str, none_means: str | None = None) -> None:
    """A count that must be >= 1 (``None`` allowed when ``none_means`` says what leaving it out does).

    Raises:
        typer.BadParameter: naming the flag, the value and the fix.
    """
    if value is not None and value < 1:
        fix = f"give a positive number of {what}" + (f", or leave {flag} out to {none_means}" if none_means else "")
        raise typer.BadParameter(f"{value} uses no {what}; {fix}", param_hint=flag)


def check_run_options(
    epochs: int,
    batch_size: int,
    limit: int | None,
    val_limit: int | None,
    image_size: int,
    lr: float,
    weight_decay: float,
) -> None:
    """The training options ``train`` and ``compare`` share: counts >= 1, rates finite and >= 0.

    Raises:
        typer.BadParameter: for the first bad one, naming its flag, the value and the fix.
    """
    check_count(epochs, "--epochs", "epochs")
    check_count(batch_size, "--batch-size", "examples per batch")
    check_count(limit, "--limit", "training examples", "use them all")
    check_count(val_limit, "--val-limit", "validation examples", "use them all")
    check_count(image_size, "--image-size", "pixels")
    check_number(lr, "--lr", "1e-3")
    check_number(weight_decay, "--weight-decay", "5e-4")


def group_rates(pairs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Parsed ``--group-lr GROUP=LR`` pairs → ``{group: {"lr": LR}}``.

    Raises:
        typer.BadParameter: for a rate that is not a finite number >= 0.
    """
    out = {}
    for key, value in pairs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise typer.BadParameter(
                f"{key}={value!r}: the learning rate must be a finite number >= 0, e.g. --group-lr {key}=0.1",
                param_hint="--group-lr",
            )
        out[key] = {"lr": float(value)}
    return out


def check_patterns(patterns: list[str] | None, flag: str) -> None:
    """Compile each ``re:`` pattern now, so that a bad one fails before the data is loaded.

    Raises:
        typer.BadParameter: naming the pattern and the regex error.
    """
    for pattern in patterns or []:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise typer.BadParameter(
                    f"{pattern!r} is not a valid regular expression ({exc}); fix the regex after 're:', or give a "
                    "glob such as 'layer1.*'",
                    param_hint=flag,
                ) from None

"""``sparsewrap export``: checkpoint → plain model file (safetensors state_dict or torch.export program)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app, console


def parse_shape(text: str | None) -> list[int] | None:
    """``"3,224,224"`` → ``[3, 224, 224]``.

    Raises:
        typer.BadParameter: on anything but comma-separated positive integers.
    """
    if text is None:
        return None
    try:
        shape = [int(s) for s in text.replace("x", ",").split(",") if s.strip()]
    except ValueError:
        shape = []
    if not shape or any(s <= 0 for s in shape):
        raise typer.BadParameter(f"{text!r} is not a shape; give one input without the batch dim, e.g. 3,224,224")
    return shape


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by sparsewrap.save / train."),
    output: Path = typer.Option(None, "-o", "--output", help="Output file (default: next to the checkpoint)."),
    fmt: str = typer.Option("safetensors", "--format", "-f", help="safetensors (state_dict) or pt2 (torch.export)."),
    input_shape: str = typer.Option(None, "--input-shape", help="Input shape without batch for pt2, e.g. 3,224,224."),
    purge: bool = typer.Option(False, "--purge", help="Also remove zeroed channels physically."),
) -> None:
    """Bake the sparsity into a plain model for the original architecture and write it atomically."""
    from ..checkpoint import load
    from ..export import FORMATS, export, save_plain
    from ..recipe import recipe_for

    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r} is not a format; valid: {', '.join(FORMATS)}", param_hint="--format")
    shape = parse_shape(input_shape)
    sp = load(checkpoint)
    if fmt == "pt2" and shape is None:
        recipe = recipe_for(sp.model)
        shape = recipe.default_input_shape() if recipe else None
        if shape is None:
            raise typer.BadParameter("pt2 needs an input shape: the checkpoint records none", param_hint="--input-shape")
    plain = export(sp, purge=purge)
    out = output or checkpoint.with_name(f"{checkpoint.stem}.exported.{'pt2' if fmt == 'pt2' else 'safetensors'}")
    save_plain(plain, out, fmt, shape)
    report = sp.report()
    console.print(f"wrote {out} ({fmt}); sparsity of targeted weights {report.exported:.4f}"
                  + ("" if report.requested is None else f" (requested {report.requested:.4f})"))  # fmt: skip

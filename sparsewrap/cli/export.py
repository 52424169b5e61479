"""``sparsewrap export``: checkpoint → plain model file (safetensors, pt2, onnx), optionally purged.

With ``--purge`` it also prints a before/after table (parameters, MACs, file size, CPU latency at batch 1
and 32, median of repeats) and flags any row where the purged model is not better. ``--fold-bn`` folds each
BatchNorm that directly follows a conv into the conv (inference only); with ``--purge`` the dense side of the
table is folded the same way, so the ratios compare like with like.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from .common import app, console
from .inspect import TRUST_HELP

if TYPE_CHECKING:
    from ..purge.fold import FoldReport

FORMATS = ("safetensors", "pt2", "onnx")
SUFFIX = {"safetensors": ".safetensors", "pt2": ".pt2", "onnx": ".onnx"}


def parse_shape(text: str | None) -> list[int] | None:
    """``"3,224,224"`` (or ``3x224x224``) → ``[3, 224, 224]``.

    Raises:
        typer.BadParameter: on anything but positive integers separated by single commas (or ``x``).
    """
    if text is None:
        return None
    parts = [s.strip() for s in text.replace("x", ",").split(",")]
    shape = [int(s) for s in parts if s.isdigit()]
    if len(shape) != len(parts) or not shape or any(s <= 0 for s in shape):
        raise typer.BadParameter(
            f"{text!r} is not a shape; give one input without the batch dim, e.g. 3,224,224", param_hint="--input-shape"
        )
    return shape


def check_output(checkpoint: Path, out: Path, fmt: str, force: bool) -> None:
    """Refuse an output that would lose data or mislead: the input itself, a sparsewrap checkpoint, an existing
    file without ``--force``, a directory, or a suffix that is not the format's.

    Raises:
        typer.BadParameter: naming the path and what to do instead.
    """
    from ..io.checkpoint import is_checkpoint

    suffix = SUFFIX[fmt]
    if out.suffix != suffix:
        other = next((f for f, s in SUFFIX.items() if s == out.suffix), None)
        alt = f", or --format {other}" if other else ""
        raise typer.BadParameter(
            f"{str(out)!r} does not end in {suffix!r}, the suffix of --format {fmt}; use -o "
            f"{str(out.with_suffix(suffix))!r}{alt}",
            param_hint="--output",
        )
    if out.is_dir():
        raise typer.BadParameter(f"{str(out)!r} is a directory; give a file name", param_hint="--output")
    if out.exists() and (out.resolve() == checkpoint.resolve() or (checkpoint.exists() and out.samefile(checkpoint))):
        raise typer.BadParameter(
            f"{str(out)!r} is the checkpoint being exported; writing there would destroy it; give another -o",
            param_hint="--output",
        )
    if is_checkpoint(out):
        raise typer.BadParameter(
            f"{str(out)!r} is a sparsewrap training checkpoint (report and --resume need it): an export never "
            "replaces one, even with --force; give another -o, or delete the checkpoint yourself first",
            param_hint="--output",
        )
    if out.exists() and not force:
        raise typer.BadParameter(
            f"{str(out)!r} already exists; add --force to replace it, or give another -o", param_hint="--output"
        )


def check_input_shape(model, shape: list[int]) -> None:
    """Run ``model`` (eval mode, no grad) once on a batch of ``shape``, so that an ``--input-shape`` that does not
    fit fails here in one line naming what the first layer takes, not deep inside an export.

    Raises:
        typer.BadParameter: naming the shape, the model's error and its first layer's input size.
    """
    import torch
    from torch import nn

    from ..purge.io import example_batch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_batch(shape, model))
    except Exception as exc:  # any failure of the forward is the shape's fault here: the model itself loaded
        layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
        name, first = next(((n, m) for n, m in model.named_modules() if isinstance(m, layers)), (None, None))
        takes = ""
        if isinstance(first, nn.Linear):
            takes = f"; its first layer {name!r} (Linear) takes {first.in_features} features"
        elif first is not None:
            kind, dims = next(t.__name__ for t in layers if isinstance(first, t)), len(first.kernel_size)
            spatial = shape[1:] if len(shape) == dims + 1 else [32] * dims
            example = ",".join(map(str, [first.in_channels, *spatial]))
            takes = (
                f"; its first layer {name!r} ({kind}) takes {first.in_channels} input channel(s), channels first: "
                f"give e.g. --input-shape {example}"
            )
        detail = " ".join(str(exc).split())[:200]
        raise typer.BadParameter(
            f"{','.join(map(str, shape))} does not fit the model ({type(exc).__name__}: {detail}){takes}",
            param_hint="--input-shape",
        ) from None
    finally:
        model.train(was_training)


def _write(model, path: Path, fmt: str, shape: list[int] | None, purged: bool) -> Path:
    from ..io.plain import save_plain
    from ..purge.io import save_onnx, save_purged

    if purged:
        return save_purged(model, path, fmt, shape)
    if fmt == "onnx":
        return save_onnx(model, path, shape)
    return save_plain(model, path, fmt, shape)


def _fmt(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "B":
        return f"{value / 1e6:.2f} MB"
    return f"{value / 1e6:.3f} M" if value >= 1e5 else f"{int(value):,}"


def render_comparison(comparison, title: str) -> Table:
    """A rich table of :class:`sparsewrap.purge.compare.Comparison` rows, flagging rows that did not improve."""
    table = Table(title=title)
    for col in ("", "before", "after", "ratio", ""):
        table.add_column(col, justify="right" if col else "left")
    for row in comparison.rows:
        flag = (
            "[bold red]not faster[/]" if row.worse and row.unit == "ms" else ("[yellow]no gain[/]" if row.worse else "")
        )
        table.add_row(row.name, _fmt(row.before, row.unit), _fmt(row.after, row.unit), f"{row.ratio:.3f}", flag)
    return table


def _print_folds(report: FoldReport) -> None:
    console.print(f"fold: {report.summary()}")
    for name, reason in report.skipped[:8]:
        console.print(f"  kept: {name}: {reason}", style="dim")


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by sparsewrap.save / train."),  # noqa: B008
    output: Path = typer.Option(None, "-o", "--output", help="Output file (default: next to checkpoint)."),  # noqa: B008
    fmt: str = typer.Option("safetensors", "--format", "-f", help="safetensors (+ purge plan), pt2 or onnx."),
    input_shape: str = typer.Option(None, "--input-shape", help="Input shape without batch, e.g. 3,224,224."),
    purge: bool = typer.Option(False, "--purge", help="Remove exactly-zero channels, features and heads."),
    round_to: int = typer.Option(1, "--round-to", min=1, help="With --purge: kept channel counts a multiple of N."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="With --purge: timed runs per latency (median)."),
    timing: bool = typer.Option(True, "--timing/--no-timing", help="With --purge: measure CPU latency."),
    fold_bn: bool = typer.Option(
        False, "--fold-bn", help="Fold BatchNorms into the preceding convs (inference); the file records the folds."
    ),
    channels_last: bool = typer.Option(
        False, "--channels-last", help="With --purge: time both models in NHWC (oneDNN's CPU layout) on image input."
    ),
    trust_factory: bool = typer.Option(False, "--trust-factory", help=TRUST_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file (never a checkpoint)."),
) -> None:
    """Bake the sparsity into a plain model for the original architecture and write it atomically."""
    from ..bake import export
    from ..io.checkpoint import load
    from ..io.recipe import recipe_for
    from ..purge import fold_report, purge_report
    from ..purge.compare import compare, file_size
    from ..purge.io import example_batch

    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r} is not a format; valid: {', '.join(FORMATS)}", param_hint="--format")
    purge_only = [name for name, given in (("--round-to", round_to != 1), ("--channels-last", channels_last)) if given]
    if purge_only and not purge:
        raise typer.BadParameter(
            f"{' and '.join(purge_only)} only {'applies' if len(purge_only) == 1 else 'apply'} to a purged export; "
            f"add --purge or drop {'it' if len(purge_only) == 1 else 'them'}",
            param_hint=purge_only[0],
        )
    shape = parse_shape(input_shape)
    kind = "purged" if purge else ("folded" if fold_bn else "exported")
    out = output or checkpoint.with_name(f"{checkpoint.stem}.{kind}{SUFFIX[fmt]}")
    check_output(checkpoint, out, fmt, force)
    sp = load(checkpoint, trust_factory=trust_factory)
    if shape is not None:
        check_input_shape(sp.model, shape)
    if shape is None:
        recipe = recipe_for(sp.model)
        shape = recipe.default_input_shape() if recipe else None
    if shape is None and (fmt != "safetensors" or purge):
        raise typer.BadParameter("this needs an input shape: the checkpoint records none", param_hint="--input-shape")
    report = sp.report()
    sparsity = f"sparsity of targeted weights {report.exported:.4f}" + (
        "" if report.requested is None else f" (requested {report.requested:.4f})"
    )
    needs_example = shape is not None and (purge or fold_bn)
    example = example_batch(shape, sp.model) if needs_example else None
    if not purge:
        plain = export(sp, example_inputs=example, fold_bn=fold_bn)
        _write(plain, out, fmt, shape, purged=fold_bn)  # the folds must be recorded to load it again
        console.print(f"wrote {out} ({fmt}); {sparsity}")
        if fold_bn:
            _print_folds(fold_report(plain))
        return
    dense = export(sp, example_inputs=example, fold_bn=fold_bn).eval()
    small = export(sp, purge=True, example_inputs=example, round_to=round_to, fold_bn=fold_bn).eval()
    _write(small, out, fmt, shape, purged=True)
    summary = purge_report(small)
    console.print(f"wrote {out} ({fmt}); {sparsity}")
    console.print(f"purge: {summary.summary()} (verified, max relative error {summary.max_rel_error:.1e})")
    for unit in [u for u in summary.units if u.status == "dense"][:8]:
        console.print(f"  dense: {unit.name} ({unit.zero}/{unit.size} zero): {unit.reason}", style="dim")
    if fold_bn:
        _print_folds(fold_report(small))
    sizes = (file_size(lambda path: _write(dense, path, fmt, shape, purged=False), SUFFIX[fmt]), out.stat().st_size)
    batches = (1, 32) if timing else ()
    comparison = compare(dense, small, shape, batches, repeats=repeats, sizes=sizes, channels_last=channels_last)
    folded = (", both BatchNorm-folded" if fold_bn else "") + (", channels_last" if channels_last else "")
    title = f"{checkpoint.name}: dense vs purged ({'x'.join(map(str, shape))}{folded})"
    console.print(render_comparison(comparison, title))
    slow = [r.name for r in comparison.rows if r.unit == "ms" and r.worse]
    if slow:
        console.print(f"[bold red]warning:[/] the purged model is not faster ({', '.join(slow)})")

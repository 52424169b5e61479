"""``sparsewrap compare``: the dense baseline and every (method, target) cell on one model and data set, one table.

The cells are :func:`sparsewrap.compare`'s; this module parses the arguments (with ``train``'s checks), shows the
progress and renders the table.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from ..train.history import Callback
from . import run_options as run
from .checks import check_count, check_out_dir, check_run_options
from .common import app, console
from .train import RichProgress, parse_pairs

if TYPE_CHECKING:
    from ..train.compare import CompareRow


def parse_list(value: str, flag: str) -> list[str]:
    """``"a,b"`` → ``["a", "b"]`` (blank items dropped).

    Raises:
        typer.BadParameter: when nothing is left.
    """
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise typer.BadParameter(f"{value!r} names nothing; give a comma-separated list", param_hint=flag)
    return items


def parse_targets(value: str) -> list[float]:
    """``--targets 0.5,0.9`` → ``[0.5, 0.9]``.

    Raises:
        typer.BadParameter: for an item that is not a number in (0, 1).
    """
    out = []
    for item in parse_list(value, "--targets"):
        try:
            t = float(item)
        except ValueError:
            t = float("nan")
        if not 0 < t < 1:
            raise typer.BadParameter(f"{item!r} is not a sparsity in (0, 1); give e.g. 0.5,0.9", param_hint="--targets")
        out.append(t)
    return out


def parse_method_options(items: list[str] | None, methods: list[str]) -> dict[str, dict[str, Any]]:
    """``-O rigl:every=50`` items → ``{"rigl": {"every": 50}}``, each method among those compared.

    Raises:
        typer.BadParameter: for an item without ``METHOD:`` or naming a method that is not compared.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        method, sep, pair = item.partition(":")
        if not sep or "=" in method:
            raise typer.BadParameter(f"{item!r} is not METHOD:KEY=VALUE, e.g. -O rigl:every=50", param_hint="--option")
        if method not in methods:
            raise typer.BadParameter(
                f"{item!r} names {method!r}, which is not compared; valid: {', '.join(methods)}", param_hint="--option"
            )
        out.setdefault(method, {}).update(parse_pairs([pair], "--option"))
    return out


def resolve_methods(value: str) -> list[str]:
    """``--methods``: a comma-separated list of registered methods, or ``all``.

    Raises:
        typer.BadParameter: for an unknown name, listing the registered ones.
    """
    from ..methods import list_methods

    registered = list(list_methods())
    if value.strip() == "all":
        return registered
    names = parse_list(value, "--methods")
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise typer.BadParameter(
            f"{unknown[0]!r} is not a registered method; valid: {', '.join(registered)}, or all", param_hint="--methods"
        )
    return names


class CompareProgress(Callback):
    """The train command's progress bars for each cell, and one line when a cell starts and ends."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bars = RichProgress(console)
        self.trained_here = False  # whether fit's hooks ran here (not with --jobs: the cells train elsewhere)

    def on_cell_begin(self, index: int, total: int, method: str, target: float | None) -> None:
        what = "dense baseline" if target is None else f"{method} at {target:g}"
        self.console.print(f"[bold cyan]cell {index + 1}/{total}: {what}", highlight=False)

    def on_cell_end(self, index: int, total: int, row: CompareRow, cached: bool) -> None:
        what = "dense baseline" if row.target is None else f"{row.method} at {row.target:g}"
        if cached:
            self.console.print(f"  finished in an earlier run ({row.directory})", style="dim", highlight=False)
        elif row.status == "failed":
            self.console.print(f"  failed: {row.error}", style="red", highlight=False, soft_wrap=True)
        elif not self.trained_here:  # a worker process trained it: one line with its result
            result = "—" if row.accuracy is None else f"{row.accuracy:.4f}"
            self.console.print(f"  cell {index + 1}/{total} ({what}) {row.status}: accuracy {result}",
                               highlight=False, soft_wrap=True)  # fmt: skip

    def on_train_begin(self, state: Any) -> None:
        self.trained_here = True
        self.bars.on_train_begin(state)

    def on_step_end(self, state: Any) -> None:
        self.bars.on_step_end(state)

    def on_epoch_end(self, state: Any, record: Any) -> None:
        self.bars.on_epoch_end(state, record)

    def on_train_end(self, state: Any) -> None:
        self.bars.on_train_end(state)


def render_rows(rows: list[CompareRow], title: str) -> Any:
    """The comparison as a rich table."""
    from rich.table import Table

    table = Table(title=title)
    for name in ("method", "target", "accuracy", "sparsity", "learned", "params", "MACs", "time ×dense", "status"):
        table.add_column(name, justify="left" if name in ("method", "status") else "right")
    num = lambda v, d=4: "—" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.{d}f}")  # noqa: E731
    for r in rows:
        status = r.status if r.error is None else f"[red]{r.status}: {r.error}"
        accuracy = r.accuracy if r.accuracy is not None else r.loss
        table.add_row(r.method, "—" if r.target is None else f"{r.target:g}", num(accuracy), num(r.sparsity),
                      num(r.learned_sparsity), num(r.params), num(r.macs), num(r.relative_time, 2), status)  # fmt: skip
    return table


@app.command("compare")
def compare_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="timm:<arch> or package.module:factory.")],
    out: Annotated[Path, typer.Option("--out", help="Directory of the cells, compare.json and compare.md.")],
    methods: Annotated[str, typer.Option(help="Comma-separated methods, or all.")],
    targets: Annotated[str, typer.Option(help="Comma-separated sparsities in (0, 1), e.g. 0.5,0.9.")],
    data: run.DataOption = "mnist",
    epochs: Annotated[int, typer.Option(help="Epochs per cell.")] = 3,
    force: Annotated[bool, typer.Option("--force", help="Retrain every cell, finished ones included.")] = False,
    plot: Annotated[bool, typer.Option(help="Draw compare.png (needs: pip install 'sparsewrap[plot]').")] = True,
    device: run.DeviceOption = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    optimizer: run.OptimizerOption = run.Optimizer.adam,
    lr: run.LrOption = 1e-3,
    weight_decay: run.WeightDecayOption = 0.0,
    lr_schedule: run.LRScheduleOption = run.LRSchedule.constant,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-O", help="METHOD:KEY=VALUE, e.g. rigl:every=50.")
    ] = None,
    model_kw: run.ModelKwOption = None,
    limit: run.LimitOption = None,
    val_limit: run.ValLimitOption = None,
    image_size: run.ImageSizeOption = 224,
    seed: Annotated[int, typer.Option(help="Random seed (same initialisation and data order in every cell).")] = 0,
    jobs: Annotated[int, typer.Option(help="Cells trained at once, each in its own process (GPUs: one each).")] = 1,
) -> None:
    """Train a dense baseline and every (method, target) cell alike; write compare.json, .md and .png."""
    check_run_options(epochs, batch_size, limit, val_limit, image_size, lr, weight_decay)
    check_count(jobs, "--jobs", "processes")
    target_list = parse_targets(targets)
    kwargs = parse_pairs(model_kw, "--model-kw")
    check_out_dir(out)
    method_list = resolve_methods(methods)
    options = parse_method_options(option, method_list)

    from ..demo.data import make_loaders
    from ..io.recipe import ModelRecipe
    from ..methods import get_method, make_config
    from ..train import distributed
    from ..train.compare import accepting_methods, compare
    from .model_data import check_device, data_and_recipe, default_device
    from .options import check_options

    check_device(device)
    if jobs > 1 and distributed.launched_by_torchrun():
        raise typer.BadParameter(f"{jobs} under torchrun: each cell is already a DDP run over the torchrun processes; "
                                 "drop --jobs, or run without torchrun", param_hint="--jobs")  # fmt: skip
    ModelRecipe.parse(model)
    if plot:
        from ..train.compare_plot import require_matplotlib

        require_matplotlib()  # before any training
    for name, opts in options.items():
        cls = get_method(name)
        check_options(name, cls.Config, opts)
        make_config(cls, opts)
    ctx = distributed.setup(device)  # under torchrun every cell is a DDP run over the processes
    show = console if ctx is None or ctx.is_main else Console(quiet=True)
    dev = ctx.device if ctx else default_device(device)
    train_data, recipe = data_and_recipe(data, model, limit, val_limit, image_size, kwargs)
    if methods.strip() == "all":  # every registered method that accepts the model
        method_list, rejected = accepting_methods(partial(recipe.build, trust_factory=True), method_list,
                                                  target_list[0], options)  # fmt: skip
        for name, error in rejected.items():
            show.print(f"left out {name}: {error}", style="yellow", highlight=False, soft_wrap=True)
        if not method_list:
            from ..errors import ConfigError

            raise ConfigError(
                f"no registered method accepts {model} (each one's error is above); name methods and their "
                "options instead of all, e.g. --methods magnitude -O magnitude:granularity=channel"
            )
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    train, val = make_loaders(train_data, batch_size, 0, seed, rank, world)
    show.print(f"{recipe.name} on {data} ({len(train_data.train):,} training examples): dense + "
               f"{len(method_list)} method(s) × {len(target_list)} target(s), {epochs} epoch(s) each, on {dev}"
               + (f", {jobs} at a time" if jobs > 1 else f", {world} process(es) per cell" if ctx else ""),
               highlight=False, soft_wrap=True)  # fmt: skip
    try:  # the model builder is a partial, not a lambda: with --jobs it goes to the worker processes
        rows = compare(partial(recipe.build, trust_factory=True), train, val, methods=method_list,
                       targets=target_list, epochs=epochs, out=out, options=options, force=force, seed=seed,
                       callback=CompareProgress(show), plot=plot, device=dev, optimizer=optimizer.value, lr=lr,
                       weight_decay=weight_decay, lr_schedule=lr_schedule.value, jobs=jobs)  # fmt: skip
    finally:
        distributed.teardown()
    if ctx is not None and not ctx.is_main:
        return
    console.print(render_rows(rows, f"{recipe.name} on {data}, {epochs} epoch(s) per cell"))
    files = ["compare.json", "compare.md"] + (["compare.png"] if plot else [])
    console.print(f"wrote {', '.join(str(out / f) for f in files)}", highlight=False, soft_wrap=True)
    if any(r.status == "interrupted" for r in rows):
        console.print("stopped; run the same command again to continue", style="yellow")
        raise typer.Exit(130)
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        console.print(f"{len(failed)} cell(s) failed (see the status column)", style="red")
        raise typer.Exit(1)

"""``sparsewrap train`` (model + data + method → checkpoints in ``--out``) and ``sparsewrap demo``.

Under ``torchrun --nproc_per_node=N -m sparsewrap train ...`` every process runs this command; rank 0 alone
prints and writes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer.core import TyperCommand

from ..train.history import Callback, EpochRecord, LoopState
from . import run_options as run
from .checks import check_out_dir, check_patterns, check_run_options, group_rates
from .common import app, console
from .model_data import check_device, data_and_recipe, default_device


class RichProgress(Callback):
    """Rich progress bars (epochs, and steps with live loss and sparsity), one line per finished epoch.

    The bars are drawn only on a terminal; the per-epoch lines are always printed (they make a readable log).

    Args:
        console: where to render.
        refresh: seconds between sparsity read-outs (each one bakes every mask).
    """

    def __init__(self, console: Console, refresh: float = 0.5) -> None:
        self.console = console
        self.refresh = refresh
        self._last = 0.0
        self._sparsity: float | None = None
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, disable=not console.is_terminal)  # fmt: skip

    def on_train_begin(self, state: LoopState) -> None:
        if state.history.resumed_at is not None:
            epoch, batch = state.history.resumed_at
            self.console.print(f"resuming at epoch {epoch + 1}, batch {batch} (step {state.step})", soft_wrap=True)
        self.progress.start()
        self._epochs = self.progress.add_task("epochs", total=state.epochs, completed=state.epoch, info="")
        self._steps = self.progress.add_task(f"epoch {state.epoch + 1}", total=state.batches, completed=state.batch,
                                             info="")  # fmt: skip

    def on_step_end(self, state: LoopState) -> None:
        now = time.monotonic()
        if state.sparsifier is not None and (now - self._last >= self.refresh or state.batch == state.batches):
            self._sparsity, self._last = state.sparsifier.sparsity(), now
        info = f"loss {state.loss - state.penalty:.4f}" + (f" + penalty {state.penalty:.4f}" if state.penalty else "")
        info += "" if self._sparsity is None else f"  sparsity {self._sparsity:.4f}"
        self.progress.update(self._steps, completed=state.batch, info=info)

    def on_epoch_end(self, state: LoopState, record: EpochRecord) -> None:
        self.progress.update(self._epochs, completed=state.epoch)
        self.progress.console.print(epoch_line(record, state.epochs), highlight=False, soft_wrap=True)
        if state.epoch < state.epochs:
            self.progress.reset(self._steps, total=state.batches, description=f"epoch {state.epoch + 1}", info="")

    def on_train_end(self, state: LoopState) -> None:
        for task in list(self.progress.task_ids):  # the same bars serve the next run (the demo has two)
            self.progress.remove_task(task)
        self.progress.stop()


LINE_WIDTH = 119  # the epoch line stays under 120 characters


def epoch_line(record: EpochRecord, epochs: int) -> str:
    """One line (under 120 characters) summing up an epoch.

    ``loss`` is the task loss; the method's penalty (the Lagrangian term of ``l0``) follows as ``+ penalty``, so
    a growing multiplier never reads as a growing loss. The exported sparsity is shown when it differs from
    the current one; the method's own figures are added in order while they fit.
    """
    loss = f"loss {record.task_loss:.4f}" + (f" + penalty {record.penalty:.4f}" if record.penalty else "")
    parts = [f"epoch {record.epoch}/{epochs}", loss]
    if record.val_accuracy is not None:
        parts.append(f"val acc {record.val_accuracy:.4f}")
    elif record.val_loss is not None:
        parts.append(f"val loss {record.val_loss:.4f}")
    if record.achieved is not None:
        exported = record.exported if record.exported is not None else record.achieved
        same = f"{exported:.4f}" == f"{record.achieved:.4f}"
        parts.append(f"sparsity {record.achieved:.4f}" + ("" if same else f" (export {exported:.4f})"))
    tail = f"{record.seconds:.1f} s"
    for key, value in record.method.items():
        extra = f"{key} {value:.3g}"
        if len("  ".join([*parts, extra, tail])) <= LINE_WIDTH:
            parts.append(extra)
    return "  ".join([*parts, tail])


def parse_pairs(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` → ``{k: v}``, each value read as JSON when it parses (``3``, ``0.5``, ``true``), else text.

    Raises:
        typer.BadParameter: for an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=flag)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def method_help() -> str:
    """``--method``'s help: the registered methods (imports the registry, hence torch: only when help is shown)."""
    from ..methods import list_methods

    return f"One of: {', '.join(list_methods())} (`sparsewrap methods` lists their options)."


class TrainCommand(TyperCommand):
    """``train``'s command: the ``--method`` help lists the registered methods, looked up only when shown."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for param in self.params:
            if param.name == "method":
                param.help = method_help()
        super().format_help(ctx, formatter)


def next_hint(ckpt: Path, options: dict[str, Any], method: str) -> str:
    """What to run after training: ``--purge`` only pays when whole channels are zero (``granularity=channel``),
    which the hint offers with ``method`` or, when it has no such option, with the methods that have it."""
    import dataclasses

    from ..methods import get_method, list_methods

    if options.get("granularity") == "channel":
        return f"next: sparsewrap export {ckpt} --purge"
    channel = [m for m in list_methods() if "granularity" in {f.name for f in dataclasses.fields(get_method(m).Config)}]
    how = "train with" if method in channel else f"train --method {' or '.join(channel)} with"
    return (
        f"next: sparsewrap export {ckpt}   (per-weight sparsity keeps every layer's shape, so --purge has nothing "
        f"to remove; for a smaller, faster model {how} -O granularity=channel, then export with --purge)"
    )


@app.command("train", cls=TrainCommand)
def train_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="timm:<arch> or package.module:factory.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory (checkpoint last.safetensors, history.json).")],
    data: run.DataOption = "mnist",
    method: Annotated[str, typer.Option(help="A method from `sparsewrap methods`.")] = "l0",
    target: Annotated[str | None, typer.Option(help="Sparsity in (0, 1), or a budgets.json file.")] = None,
    density: Annotated[float | None, typer.Option(help="Requested density (1 - sparsity).")] = None,
    epochs: Annotated[int, typer.Option(help="Total epochs (a resumed run continues up to it).")] = 10,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --out.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite another run's checkpoint in --out.")] = False,
    device: run.DeviceOption = None,
    batch_size: Annotated[int, typer.Option(help="Batch size (per process under torchrun).")] = 128,
    optimizer: run.OptimizerOption = run.Optimizer.adam,
    lr: run.LrOption = 1e-3,
    weight_decay: run.WeightDecayOption = 0.0,
    lr_schedule: run.LRScheduleOption = run.LRSchedule.constant,
    group_lr: Annotated[list[str] | None, typer.Option(help="GROUP=LR for a method group, e.g. gates=0.1.")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-O", help="Method option KEY=VALUE.")] = None,
    model_kw: run.ModelKwOption = None,
    include: Annotated[list[str] | None, typer.Option(help="Layers to sparsify (glob or re:regex).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Layers to leave dense.")] = None,
    limit: run.LimitOption = None,
    val_limit: run.ValLimitOption = None,
    image_size: run.ImageSizeOption = 224,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    plot: Annotated[bool, typer.Option(help="Draw figure.png (needs: pip install 'sparsewrap[plot]').")] = True,
) -> None:
    """Sparsify a model while training it; checkpoint every epoch; Ctrl-C saves, --resume continues."""
    # every cheap argument first: a mistake must not cost a data download or an epoch of training
    check_run_options(epochs, batch_size, limit, val_limit, image_size, lr, weight_decay)
    if workers < 0:
        raise typer.BadParameter(
            f"{workers} is negative; give 0 (load in the main process) or more", param_hint="--workers"
        )
    groups = group_rates(parse_pairs(group_lr, "--group-lr"))
    options = parse_pairs(option, "--option")
    kwargs = parse_pairs(model_kw, "--model-kw")
    check_patterns(include, "--include")
    check_patterns(exclude, "--exclude")
    check_out_dir(out)
    target = parse_target(target)

    from ..controller import resolve_target, sparsify
    from ..demo.data import make_loaders
    from ..io.atomic import write_atomic
    from ..io.recipe import ModelRecipe
    from ..methods import get_method, make_config
    from ..train import distributed
    from ..train.figure import FIGURE_NAME, require_matplotlib, write_training_figure
    from ..train.loop import fit
    from ..train.rng import seed_all
    from ..train.state import CHECKPOINT_NAME, refuse_overwrite
    from .inspect import render_report
    from .options import check_options

    check_device(device)
    if plot:
        require_matplotlib(FIGURE_NAME, "--no-plot")  # before any data or training
    ModelRecipe.parse(model)  # fail fast on a malformed --model, before loading any data
    method_cls = get_method(method)
    check_options(method, method_cls.Config, options)
    make_config(method_cls, options)  # the method's own checks (choices, ranges) before any data
    resolve_target(target, density)
    ckpt = out / CHECKPOINT_NAME
    if ckpt.exists() and not resume and not force:
        refuse_overwrite(ckpt)
    ctx = distributed.setup(device)
    try:
        main = ctx is None or ctx.is_main
        show = console if main else Console(quiet=True)
        dev = ctx.device if ctx else default_device(device)
        train_data, recipe = data_and_recipe(data, model, limit, val_limit, image_size, kwargs)
        seed_all(seed)
        net = recipe.build(trust_factory=True).to(dev)  # --model is the user's own choice
        sp = sparsify(net, method, target=target, density=density, include=include, exclude=exclude, **options)
        rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
        train, val = make_loaders(train_data, batch_size, workers, seed, rank, world)
        show.print(f"{recipe.name} on {data} ({len(train_data.train):,} training examples), method {method}, "
                   f"{len(sp.targets)} layers, {world} process(es) on {dev}",
                   highlight=False, soft_wrap=True)  # fmt: skip
        history = fit(sp, train, val, epochs=epochs, optimizer=optimizer.value, lr=lr, weight_decay=weight_decay,
                      groups=groups, lr_schedule=lr_schedule.value, out=out, resume=resume, overwrite=force,
                      seed=seed, callback=RichProgress(show) if main else None)  # fmt: skip
        if main:
            text = json.dumps(history.to_dict(), indent=1)
            write_atomic(out / "history.json", lambda tmp: tmp.write_text(text))
            report = sp.report()
            show.print(render_report(report, f"{ckpt}: method {method}, step {sp.step_count}"))
            if plot:
                figure = write_training_figure(out / FIGURE_NAME, report, history, f"{recipe.name} on {data}, {method}")
                show.print(f"figure {figure}", highlight=False, soft_wrap=True)
        if history.stopped:
            epoch, batch = history.position
            show.print(f"stopped ({history.stopped}) in epoch {epoch + 1} after batch {batch}; saved {ckpt}; "
                       "run the same command with --resume to continue", style="yellow", soft_wrap=True)  # fmt: skip
            raise typer.Exit(130)
        show.print(next_hint(ckpt, sp.spec.options, sp.spec.method), highlight=False, soft_wrap=True)
    finally:
        distributed.teardown()


def parse_target(value: str | None) -> float | dict[str, float] | None:
    """``--target``: a number, or the path of a budgets JSON file (``{layer name: sparsity}``).

    Raises:
        typer.BadParameter: for a value that is neither a number nor an existing file.
        ConfigError: for a file that is not a budgets JSON object.
    """
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    if not Path(value).is_file():
        raise typer.BadParameter(
            f"{value!r} is neither a number nor a file; give a sparsity in (0, 1), e.g. 0.9, or a budgets JSON "
            "file written by `sparsewrap budgets CKPT -o budgets.json`",
            param_hint="--target",
        )
    from ..methods.budgets import read_budgets

    return read_budgets(value)


def _change(before: float, after: float) -> str:
    return f"{after / before:.2f}×" if before else "—"


@app.command("demo")
def demo_cmd(
    epochs: Annotated[int, typer.Option(help="Epochs of sparse training.")] = 3,
    dense_epochs: Annotated[int, typer.Option(help="Epochs of dense training first.")] = 1,
    method: Annotated[str | None, typer.Option(help="Method (default: the demo's).")] = None,
    limit: Annotated[int, typer.Option(help="Training images per epoch (MNIST has 60,000).")] = 20_000,
    test_limit: Annotated[int | None, typer.Option(help="Test images to evaluate on (default: all 10,000).")] = None,
    out: Annotated[Path, typer.Option(help="Where the checkpoint, exported model and figure go.")] = Path("runs/demo"),
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")] = 1,
    plot: Annotated[bool, typer.Option(help="Draw demo.png (needs: pip install 'sparsewrap[plot]').")] = True,
) -> None:
    """LeNet-5 on the built-in MNIST: dense, then L0 channel gates to 90 % sparsity, purge, table and figure."""
    import torch
    from rich.table import Table

    from ..demo.run import DemoConfig, run_demo
    from .inspect import render_report

    if threads > 0:  # LeNet-5's layers are too small to gain from more threads; on a busy machine they lose a lot
        torch.set_num_threads(threads)
    config = DemoConfig(epochs=epochs, dense_epochs=dense_epochs, train_limit=limit, test_limit=test_limit, out=out,
                        plot=plot)  # fmt: skip
    if method is not None:
        config.method = method
    result = run_demo(config, RichProgress(console), lambda text: console.print(f"[bold cyan]{text}"))
    console.print(render_report(result.report, f"per-layer sparsity ({result.config.method})"))
    b, a, cfg = result.before, result.after, result.config
    table = Table(title=f"LeNet-5 on MNIST ({result.train_examples:,} training images): before / after")
    table.add_column("")
    table.add_column(f"dense\n({cfg.dense_epochs} epoch{'s' * (cfg.dense_epochs != 1)})", justify="right")
    table.add_column(f"{cfg.method} {cfg.target:.0%}{' + purged' if result.purged else ''}\n"
                     f"(+{cfg.epochs} epoch{'s' * (cfg.epochs != 1)})", justify="right")  # fmt: skip
    table.add_column("change", justify="right")
    table.add_row("test accuracy", f"{b.accuracy:.4f}", f"{a.accuracy:.4f}", f"{a.accuracy - b.accuracy:+.4f}")
    table.add_row("parameters", f"{b.params:,}", f"{a.params:,}", _change(b.params, a.params))
    table.add_row("non-zero parameters", f"{b.nonzero:,}", f"{a.nonzero:,}", _change(b.nonzero, a.nonzero))
    table.add_row("MACs / image", f"{b.macs:,}", f"{a.macs:,}", _change(b.macs, a.macs))
    table.add_row(f"CPU latency, batch {result.config.latency_batch} (ms)", f"{b.latency_ms:.2f}",
                  f"{a.latency_ms:.2f}", _change(b.latency_ms, a.latency_ms))  # fmt: skip
    console.print(table)
    if not result.purged:
        console.print("purge is not available in this version: the exported model keeps its zeros", style="yellow")
    if result.figure is not None:
        console.print(f"figure {result.figure}", highlight=False, soft_wrap=True)
    console.print(f"checkpoint {result.checkpoint}\nexported model {result.exported}\n"
                  f"total time {result.seconds:.0f} s", highlight=False, soft_wrap=True)  # fmt: skip

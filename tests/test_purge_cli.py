"""``sparsewrap export --purge``: the purged file, the before/after table and its flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sparsewrap as sw
from sparsewrap.cli import main
from sparsewrap.cli.export import render_comparison
from sparsewrap.purge.compare import Comparison, Row


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


def test_export_purge_writes_a_replayable_file_and_prints_the_table(tmp_path: Path, capsys) -> None:
    model = sw.create_model("tests.zoo:ResNetTiny")
    sp = sw.sparsify(model, "magnitude", target=0.5, granularity="channel")
    ckpt = sw.save(sp, tmp_path / "tiny.safetensors")
    out = tmp_path / "tiny.purged.safetensors"
    args = [
        "export",
        str(ckpt),
        "--purge",
        "--input-shape",
        "3,8,8",
        "--repeats",
        "1",
        "--round-to",
        "2",
        "-o",
        str(out),
    ]
    code, text = run_cli(args, capsys)
    assert code == 0, text
    for row in ("parameters", "MACs", "file size", "latency bs1", "latency bs32"):
        assert row in text
    small = sw.load_purged(out)  # the recipe in the plan rebuilds the architecture
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    kept = [m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(k % 2 == 0 for k in kept)  # --round-to 2


def test_export_without_an_input_shape_for_purge_is_a_clear_error(tmp_path: Path, capsys) -> None:
    model = sw.create_model("tests.zoo:MLP")
    ckpt = sw.save(sw.sparsify(model, "magnitude", target=0.5), tmp_path / "mlp.safetensors")
    code, text = run_cli(["export", str(ckpt), "--purge"], capsys)
    assert code != 0 and "input shape" in text


def test_the_table_flags_a_purged_model_that_is_not_faster() -> None:
    from rich.console import Console

    rows = [Row("parameters", 100, 50), Row("latency bs1", 1.0, 1.2, "ms"), Row("latency bs32", 10.0, 5.0, "ms")]
    console = Console(width=120, record=True)
    console.print(render_comparison(Comparison(rows), "t"))
    lines = console.export_text().splitlines()
    assert "not faster" in next(line for line in lines if "latency bs1" in line)
    assert "not faster" not in next(line for line in lines if "latency bs32" in line)

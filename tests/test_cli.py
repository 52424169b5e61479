"""The ``sparsewrap`` command line: methods, report, export; one-line errors; --debug; ``python -m``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsewrap as sw
from sparsewrap import cli
from sparsewrap.cli import main
from sparsewrap.models import lenet5

# LeNet-5 targets (head fc2 excluded): conv1 20*1*5*5 + conv2 50*20*5*5 + fc1 800*500 weights
TARGETED = 500 + 25_000 + 400_000


def squeeze(text: str) -> str:
    """Text without whitespace: rich wraps long lines (even inside a path) at the console width."""
    return "".join(text.split())


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Call the console entry point in-process; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    sp = sw.sparsify(sw.create_model("sparsewrap.models:lenet5"), "magnitude", target=0.7)
    return sw.save(sp, tmp_path / "run.safetensors")


def test_methods_lists_the_registry(capsys) -> None:
    code, out, _ = run(["methods"], capsys)
    assert code == 0
    assert "magnitude" in out and "granularity" in out
    for name in sw.list_methods():
        assert name in out


def test_report_prints_layers_totals_and_requested_vs_achieved(ckpt: Path, capsys) -> None:
    code, out, _ = run(["report", str(ckpt)], capsys)
    assert code == 0
    for layer in ("conv1", "conv2", "fc1"):
        assert layer in out
    assert f"{TARGETED:,}" in out
    assert f"{round(0.3 * TARGETED):,}" in out  # nonzeros after one-shot pruning
    assert "requested sparsity 0.7000" in out and "at export 0.7000" in out


def test_export_writes_a_plain_state_dict_for_the_original_architecture(ckpt: Path, tmp_path: Path, capsys) -> None:
    out_path = tmp_path / "model.safetensors"
    code, out, _ = run(["export", str(ckpt), "-o", str(out_path)], capsys)
    assert code == 0
    assert squeeze("sparsity of targeted weights 0.7000 (requested 0.7000)") in squeeze(out)
    model = lenet5()
    model.load_state_dict(load_file(str(out_path)), strict=True)
    expected = sw.export(sw.load(ckpt)).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_export_pt2_with_an_explicit_input_shape(ckpt: Path, tmp_path: Path, capsys) -> None:
    out_path = tmp_path / "model.pt2"
    code, _, _ = run(["export", str(ckpt), "-o", str(out_path), "--format", "pt2", "--input-shape", "1,28,28"], capsys)
    assert code == 0
    program = torch.export.load(str(out_path))
    x = torch.randn(1, 1, 28, 28)
    plain = sw.export(sw.load(ckpt)).eval()
    torch.testing.assert_close(program.module()(x), plain(x))


def test_export_pt2_uses_the_recorded_input_shape(tmp_path: Path, capsys) -> None:
    sp = sw.sparsify(sw.create_model("sparsewrap.models:mlp_300_100"), "magnitude", target=0.5)
    ckpt = sw.save(sp, tmp_path / "mlp.safetensors", input_shape=(784,))
    code, _, _ = run(["export", str(ckpt), "--format", "pt2"], capsys)
    assert code == 0
    program = torch.export.load(str(tmp_path / "mlp.exported.pt2"))  # default name beside the checkpoint
    x = torch.randn(1, 784)
    torch.testing.assert_close(program.module()(x), sw.export(sp).eval()(x))


def test_pt2_without_any_input_shape_is_a_usage_error(ckpt: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run(["export", str(ckpt), "-o", str(tmp_path / "m.pt2"), "--format", "pt2"], capsys)
    assert code == 2
    assert "needs an input shape" in err and "--input-shape" in err
    assert not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "nope"], "'nope' is not a format; valid: safetensors, pt2"),
        (["--format", "pt2", "--input-shape", "3,x,-1"], "'3,x,-1' is not a shape"),
        (["--channels-last"], "--channels-last only applies to a purged export; add --purge or drop it"),
        (
            ["--round-to", "8", "--channels-last"],
            "--round-to and --channels-last only apply to a purged export; add --purge or drop them",
        ),
    ],
)
def test_bad_export_options_are_usage_errors(ckpt: Path, capsys, args: list[str], message: str) -> None:
    code, _, err = run(["export", str(ckpt), *args], capsys)
    assert code == 2 and squeeze(message) in squeeze(err)
    assert "Usage: sparsewrap export" in err


def test_errors_print_one_line_and_exit_non_zero(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli.err_console, "width", 1000)  # a wide terminal: no wrapping of the message
    missing = tmp_path / "missing.safetensors"
    code, out, err = run(["report", str(missing)], capsys)
    assert code == 1 and out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[1] == "(run with --debug for the traceback)"
    text = squeeze(err)
    assert text.startswith(squeeze(f"error: CheckpointError: checkpoint '{missing}' does not exist"))
    assert squeeze("(run with --debug for the traceback)") in text


def test_a_corrupted_checkpoint_is_reported_on_one_line(ckpt: Path, capsys) -> None:
    data = bytearray(ckpt.read_bytes())
    data[-10] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    code, _, err = run(["export", str(ckpt)], capsys)
    assert code == 1 and "Traceback" not in err
    assert "CheckpointError" in err and "iscorrupted" in squeeze(err)


def test_debug_shows_the_traceback(tmp_path: Path, capsys) -> None:
    code, _, err = run(["--debug", "report", str(tmp_path / "missing.safetensors")], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert "sparsewrap.errors.CheckpointError" in err and "doesnotexist" in squeeze(err)


def test_python_dash_m_sparsewrap_help() -> None:
    env = dict(os.environ, COLUMNS="120")
    done = subprocess.run([sys.executable, "-m", "sparsewrap", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for command in ("methods", "report", "export", "--debug"):
        assert command in done.stdout

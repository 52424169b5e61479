"""The ``sparsewrap`` command line: methods, report, export; one-line errors; --debug; ``python -m``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsewrap as sw
from sparsewrap import cli
from sparsewrap.cli import common as cli_common
from sparsewrap.cli import main
from sparsewrap.demo.models import lenet5

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
    sp = sw.sparsify(sw.create_model("sparsewrap.demo.models:lenet5"), "magnitude", target=0.7)
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
    sp = sw.sparsify(sw.create_model("sparsewrap.demo.models:mlp_300_100"), "magnitude", target=0.5)
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
    assert text.startswith(squeeze(f"Error: CheckpointError: checkpoint '{missing}' does not exist"))
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


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (this checkout first on the path, as the tests run)."""
    full_env = {**os.environ, "COLUMNS": "200", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


@pytest.mark.parametrize(
    ("argv", "expected_code", "shown"),
    [
        (["--help"], 0, "train"),
        (["--version"], 0, f"sparsewrap {sw.__version__}"),
        (["train", "--no-such-option"], 2, "No such option: --no-such-option"),
        (["train", "--model", "m:f", "--out", "o", "--limit", "0"], 2, "0 uses no training examples"),
        (["export"], 2, "Missing argument 'checkpoint'"),
    ],
)
def test_help_version_and_argument_errors_do_not_import_torch(argv, expected_code: int, shown: str) -> None:
    code = (
        "import sys\nfrom sparsewrap.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    status = e.code\n"
        "print('torch imported:', 'torch' in sys.modules, 'timm imported:', 'timm' in sys.modules, 'exit', status)"
    )
    done = run_python(code)
    assert f"torch imported: False timm imported: False exit {expected_code}" in done.stdout, done.stderr
    assert squeeze(shown) in squeeze(done.stdout + done.stderr), done.stdout + done.stderr


def test_version_is_the_package_version(capsys) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"sparsewrap {sw.__version__}"


def test_shell_completion_is_on(capsys) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "--install-completion" in out and "--show-completion" in out
    done = run_python("from sparsewrap.cli import main\nmain()", _SPARSEWRAP_COMPLETE="complete_bash",
                      COMP_WORDS="sparsewrap train --optimizer a", COMP_CWORD="3")  # fmt: skip
    assert done.returncode == 0 and done.stdout.split() == ["adam", "adamw"], done.stderr


def test_train_help_lists_the_registered_methods(capsys) -> None:
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0
    assert squeeze(f"One of: {', '.join(sw.list_methods())}") in squeeze(out).replace("│", "")


def test_methods_shows_each_options_type_choices_and_default(capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli_common.console, "width", 200)
    code, out, _ = run(["methods"], capsys)
    assert code == 0
    for line in ("schedule: oneshot|cubic|exponential = oneshot", "start: int | float = 0", "every: int = 1",
                 "allocation: global|uniform|erk = global", "granularity: weight|channel = weight",
                 "budget: params|macs = params", "dual_lr: float = 0.05", "input_shape: list[int] | null = null",
                 "dual_restarts: bool = true", "gate_lr: float | null = "):  # fmt: skip
        assert line in out, line


def test_a_bare_error_class_name_is_qualified_by_its_module() -> None:
    assert cli.error_name(re.error("bad")) == "re.error"
    assert cli.error_name(sw.ConfigError("bad")) == "ConfigError"


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("3,224,224", "3,224,224 does not fit the model (RuntimeError: Given groups=1, weight of size [20, 1, 5, 5]"),
        ("3,224,224", "its first layer 'conv1' (Conv2d) takes 1 input channel(s), channels first: give e.g. "
                      "--input-shape 1,224,224"),
        ("1,28,28,,", "'1,28,28,,' is not a shape"),
        ("1,,28,28", "'1,,28,28' is not a shape"),
    ],
)  # fmt: skip
def test_an_input_shape_that_does_not_fit_is_a_one_line_usage_error(ckpt: Path, tmp_path: Path, capsys, shape: str,
                                                                   message: str) -> None:  # fmt: skip
    target = tmp_path / "m.pt2"
    code, _, err = run(["export", str(ckpt), "-o", str(target), "--format", "pt2", "--input-shape", shape], capsys)
    assert code == 2 and squeeze(message) in squeeze(err), err
    assert "Traceback" not in err and not target.exists()


def test_an_input_shape_with_x_separators_still_works(ckpt: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run(["export", str(ckpt), "-o", str(tmp_path / "m.pt2"), "--format", "pt2", "--input-shape",
                        "1x28x28"], capsys)  # fmt: skip
    assert code == 0, err


def test_the_package_imports_its_public_names_on_first_use() -> None:
    code = (
        "import sys\nimport sparsewrap as sw\nprint('torch' in sys.modules)\n"
        "import sparsewrap.bake\n"
        "print(callable(sw.export), sw.export is sys.modules['sparsewrap.bake'].export, sw.fit.__module__)\n"
        "print(hasattr(sw, 'no_such_name'), sorted(set(sw.__all__) - set(dir(sw))))"
    )
    done = run_python(code)
    assert done.stdout.split("\n")[:3] == ["False", "True True sparsewrap.train.loop", "False []"], done.stderr

"""Files and errors: clear messages for bad checkpoints and factories; no command loses a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

import sparsewrap as sw
from sparsewrap.cli import main
from sparsewrap.errors import CheckpointError, ConfigError

from .forging import forge


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, " ".join((out + err).split())


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    sp = sw.sparsify(sw.create_model("sparsewrap.models:lenet5"), "magnitude", target=0.5)
    return sw.save(sp, tmp_path / "run.safetensors")


def broken_factory(**kwargs: object) -> nn.Module:
    raise RuntimeError("boom: no such width")


# -- section 6: errors that name the value and the fix ---------------------------------------------------------
def test_a_directory_as_checkpoint_says_so_and_suggests_last(tmp_path: Path, capsys) -> None:
    with pytest.raises(CheckpointError, match=r"is a directory; give the checkpoint file in it, e\.g\. .*last"):
        sw.load(tmp_path)
    code, text = run(["report", tmp_path], capsys)
    assert code == 1 and "is a directory" in text and "last.safetensors" in text and "does not exist" not in text


@pytest.mark.parametrize("controller", [{"step": 1, "method": "garbage"}, {"step": "abc"}, ["not", "a", "dict"]])
def test_a_forged_controller_field_is_a_checkpoint_error(ckpt: Path, controller) -> None:
    forge(ckpt, controller, recipe_field="controller")
    with pytest.raises(CheckpointError, match=r"run\.safetensors: the controller state is malformed"):
        sw.load(ckpt)


def test_a_factory_that_raises_is_named(capsys, tmp_path: Path) -> None:
    spec = f"{__name__}:broken_factory"
    with pytest.raises(ConfigError, match=rf"model factory '{spec}' failed with width=3: RuntimeError: boom"):
        sw.create_model(spec, width=3)
    argv = ["train", "--model", spec, "--limit", "64", "--val-limit", "64", "--epochs", "1", "--out", tmp_path]
    code, text = run(argv, capsys)
    assert code == 1 and f"model factory '{spec}' failed" in text and "RuntimeError: boom" in text


def test_model_os_system_names_the_factory(capsys, tmp_path: Path) -> None:
    argv = ["train", "--model", "os:system", "--limit", "64", "--val-limit", "64", "--epochs", "1", "--out", tmp_path]
    code, text = run(argv, capsys)
    assert code == 1 and "model factory 'os:system'" in text and "Traceback" not in text


def test_model_kw_that_is_not_an_integer_is_named(capsys, tmp_path: Path) -> None:
    argv = ["train", "--model", "sparsewrap.models:lenet5", "--model-kw", "num_classes=abc", "--limit", "64",
            "--val-limit", "64", "--epochs", "1", "--out", tmp_path]  # fmt: skip
    code, text = run(argv, capsys)
    assert code == 1 and "model keyword num_classes='abc' must be a non-negative integer, e.g. num_classes=10" in text
    with pytest.raises(ConfigError, match=r"in_chans=1\.5"):
        sw.create_model("sparsewrap.models:lenet5", in_chans=1.5)
    assert not (tmp_path / "last.safetensors").exists()

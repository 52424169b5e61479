"""The command line's two kinds of errors render alike: click's usage errors (a bad option value, an unknown
option) and the library's errors that ``sparsewrap.cli.main`` renders itself both print ``Error: <message>``."""

from __future__ import annotations

from pathlib import Path

import pytest

import sparsewrap.cli as cli
from sparsewrap.cli import main


def error_line(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.lower().startswith("error")]
    assert len(lines) == 1, captured.err
    return exit_info.value.code, lines[0]


def test_usage_errors_and_library_errors_render_alike(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cli.err_console, "width", 1000)  # one line, however long
    missing = tmp_path / "missing.safetensors"
    usage_code, usage = error_line(capsys, ["report", str(missing), "--no-such-option"])
    bad_value_code, bad_value = error_line(capsys, ["train", "--model", "m:f", "--out", tmp_path, "--epochs", "0"])
    library_code, library = error_line(capsys, ["report", str(missing)])
    assert (usage_code, bad_value_code, library_code) == (2, 2, 1)
    assert usage == "Error: No such option: --no-such-option"
    assert bad_value.startswith("Error: Invalid value for --epochs: 0 uses no epochs")
    assert library == f"Error: CheckpointError: checkpoint '{missing}' does not exist"
    assert {line.split(" ", 1)[0] for line in (usage, bad_value, library)} == {"Error:"}

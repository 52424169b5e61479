"""The built wheel ships the native kernels' C sources, and an installed sparsewrap compiles and loads them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    src = build / "src"  # a copy, so the build writes no build/ or egg-info into the checkout
    shutil.copytree(
        ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__")
    )
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("sparsewrap-*.whl")
    return whl


def test_wheel_holds_the_kernel_sources(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"sparsewrap/native/hardconcrete.c", "sparsewrap/native/masks.c"} <= names


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_installed_wheel_builds_and_loads_the_kernels(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site), "SPARSEWRAP_CACHE": str(tmp_path / "cache"), "SPARSEWRAP_NATIVE": "1"}
    probe = "import sparsewrap, sparsewrap.native as n; print(sparsewrap.__file__); print(n.kernels() is not None)"
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    where, loaded = run.stdout.split()
    assert Path(where).is_relative_to(site)  # the installed copy, not the checkout
    assert loaded == "True"

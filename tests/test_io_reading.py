"""What checkpoints and purged models share on the way in: reading the safetensors file, rebuilding the model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sparsewrap.demo.models import LeNet5
from sparsewrap.errors import CheckpointError
from sparsewrap.io.checkpoint import read
from sparsewrap.io.reading import read_safetensors
from sparsewrap.io.recipe import rebuild_model
from sparsewrap.purge.io import read_plan


def test_read_safetensors_returns_the_metadata_and_the_tensors_as_written(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "f.safetensors"), metadata={"k": "v"})
    meta, got = read_safetensors(tmp_path / "f.safetensors", "checkpoint")
    assert meta == {"k": "v"}
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_checkpoints_and_purged_models_refuse_a_missing_or_damaged_file_alike(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint '{missing}' does not exist")):
        read(missing)
    with pytest.raises(CheckpointError, match=re.escape(f"purged model '{missing}' does not exist")):
        read_plan(missing)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    messages = []
    for reader in (read, read_plan):
        with pytest.raises(CheckpointError) as info:
            reader(damaged)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{damaged} is not a readable safetensors file (truncated or corrupted?): ")


def test_rebuild_model_builds_the_recorded_recipe_or_says_why_not(tmp_path: Path) -> None:
    recipe = {"source": "factory", "name": "sparsewrap.demo.models:lenet5", "kwargs": {"num_classes": 7}}
    model = rebuild_model(recipe, tmp_path / "f.safetensors", trust_factory=True)
    assert isinstance(model, LeNet5) and model(torch.zeros(1, 1, 28, 28)).shape == (1, 7)
    with pytest.raises(CheckpointError, match="f.safetensors records no model recipe; pass model="):
        rebuild_model(None, tmp_path / "f.safetensors")
    with pytest.raises(CheckpointError, match="f.safetensors: cannot rebuild the model from its recipe: "):
        rebuild_model({"source": "factory", "name": 3}, tmp_path / "f.safetensors")

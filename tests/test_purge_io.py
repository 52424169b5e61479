"""Purged models on disk: safetensors + plan round trip, corrupted or foreign plans, pt2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sparsewrap as sw
from sparsewrap.errors import CheckpointError, ConfigError
from sparsewrap.purge import read_plan, save_purged
from sparsewrap.purge.io import META_KEY, _digest

from .zoo import MLP, ResNetTiny


def purged_resnet() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = ResNetTiny()
    sp = sw.sparsify(model, "magnitude", target=0.5, granularity="channel")
    x = torch.randn(2, 3, 8, 8)
    return sw.export(sp, purge=True, example_inputs=x), x


def test_save_and_load_purged_replays_the_plan_on_a_fresh_instance(tmp_path: Path) -> None:
    small, x = purged_resnet()
    path = save_purged(small, tmp_path / "small.safetensors")
    loaded = sw.load_purged(path, ResNetTiny())
    small.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    plan, _ = read_plan(path)
    assert plan["source"]["class"] == "ResNetTiny" and plan["ops"]  # kept indices per module, as JSON


def test_a_plan_for_another_architecture_is_refused(tmp_path: Path) -> None:
    small, _ = purged_resnet()
    path = save_purged(small, tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError, match="another architecture"):
        sw.load_purged(path, MLP())


def test_a_corrupted_file_is_refused(tmp_path: Path) -> None:
    small, _ = purged_resnet()
    path = save_purged(small, tmp_path / "small.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a weight byte
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        sw.load_purged(path, ResNetTiny())
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        sw.load_purged(path, ResNetTiny())


def _rewrite_plan(path: Path, edit) -> None:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    plan = meta[META_KEY]
    plan = edit(plan)
    save_file(tensors, str(path), metadata={"format": "pt", META_KEY: plan, "sha256": _digest(plan, tensors)})


def test_a_malformed_or_inapplicable_plan_is_refused(tmp_path: Path) -> None:
    small, _ = purged_resnet()
    path = save_purged(small, tmp_path / "small.safetensors")
    _rewrite_plan(path, lambda p: p[:-3])  # truncated JSON with a matching digest
    with pytest.raises(CheckpointError, match="malformed"):
        sw.load_purged(path, ResNetTiny())

    path = save_purged(small, tmp_path / "small2.safetensors")

    def out_of_range(text: str) -> str:
        plan = json.loads(text)
        module, roles = next(iter(plan["ops"].items()))
        role = next(iter(roles))
        plan["ops"][module][role] = [0, 10_000]
        return json.dumps(plan)

    _rewrite_plan(path, out_of_range)
    with pytest.raises(CheckpointError, match="does not apply"):
        sw.load_purged(path, ResNetTiny())


def test_plain_files_and_unpurged_models_are_refused(tmp_path: Path) -> None:
    model = MLP()
    sw.save_plain(model, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no purge plan"):
        sw.load_purged(tmp_path / "plain.safetensors", MLP())
    with pytest.raises(ConfigError, match="not purged"):
        save_purged(model, tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="format 'bin' is unknown"):
        save_purged(model, tmp_path / "x.bin", fmt="bin")


def test_pt2_of_a_purged_model_runs_without_the_plan(tmp_path: Path) -> None:
    small, x = purged_resnet()
    path = save_purged(small, tmp_path / "small.pt2", fmt="pt2", input_shape=[3, 8, 8])
    program = torch.export.load(str(path))
    small.eval()
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x[:1]), small(x[:1]))


@pytest.mark.slow  # torch.onnx's dynamo export takes tens of seconds on 2 cores; `make test-slow` (CI) runs it
def test_onnx_export_of_a_purged_model(tmp_path: Path) -> None:
    import onnx  # the dev extra installs onnx and onnxscript: a missing one fails here rather than skipping
    from onnx.reference import ReferenceEvaluator

    small, x = purged_resnet()
    path = save_purged(small, tmp_path / "small.onnx", fmt="onnx", input_shape=[3, 8, 8])
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert list(dims.values()) == [[1, 3, 8, 8]]
    small.eval()
    with torch.no_grad():
        expected = small(x[:1])
    (got,) = ReferenceEvaluator(graph).run(None, {next(iter(dims)): x[:1].numpy()})  # onnx's own interpreter
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="input shape"):
        save_purged(small, tmp_path / "x.onnx", fmt="onnx")

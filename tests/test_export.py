"""Export: a new plain model, the live model untouched and trainable; safetensors and pt2 files."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

import sparsewrap as sw
from sparsewrap.errors import ConfigError

from .zoo import ConvBN, ResNetTiny, TiedLM


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model.train()
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_export_leaves_the_live_model_wrapped_and_trainable() -> None:
    """PEERS.md §6: a deepcopy shares the injected class; removing parametrizations on it breaks the original."""
    model = ResNetTiny()
    sp = sw.sparsify(model, "magnitude", target=0.5)
    live_cls = type(model.stem)
    x = torch.randn(2, 3, 8, 8)
    plain = sw.export(sp)
    assert type(model.stem) is live_cls and parametrize.is_parametrized(model.stem, "weight")
    assert hasattr(live_cls, "weight") and model.stem.weight.shape == (8, 3, 3, 3)
    assert type(plain.stem) is nn.Conv2d and "weight" in plain.stem._parameters
    opt = torch.optim.SGD(sp.param_groups(lr=0.1))
    before = model.stem.parametrizations.weight.original.detach().clone()
    sgd_step(model, opt, x)
    assert not torch.equal(model.stem.parametrizations.weight.original, before)
    plain2 = sw.export(model)  # a second export still works and sees the training
    assert not torch.equal(plain2.stem.weight, plain.stem.weight)
    assert torch.equal(plain2.stem.weight == 0, plain.stem.weight == 0)  # pruned stay pruned


def test_training_the_export_does_not_touch_the_live_model() -> None:
    model = ConvBN()
    sp = sw.sparsify(model, "magnitude", target=0.5)
    plain = sw.export(sp)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    sgd_step(plain, torch.optim.SGD(plain.parameters(), lr=0.1), torch.randn(2, 3, 8, 8))
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k


def test_plain_model_has_the_original_keys_and_no_parametrizations() -> None:
    model = ResNetTiny()
    keys = list(ResNetTiny().state_dict())
    sp = sw.sparsify(model, "magnitude", target=0.5, granularity="channel")
    plain = sw.export(sp)
    assert list(plain.state_dict()) == keys
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert all(type(m).__module__ != "torch.nn.utils.parametrize" for m in plain.modules())
    fresh = ResNetTiny()
    fresh.load_state_dict(plain.state_dict(), strict=True)


def test_export_keeps_dtype_training_flag_buffers_and_requires_grad() -> None:
    model = ConvBN().double()
    model.conv1.bias.requires_grad_(False)
    sp = sw.sparsify(model, "magnitude", target=0.5, granularity="channel")
    model(torch.randn(4, 3, 8, 8, dtype=torch.float64))  # update BN running stats
    plain = sw.export(sp)
    assert plain.training and plain.conv1.weight.dtype == torch.float64
    assert not plain.conv1.bias.requires_grad and plain.conv1.weight.requires_grad
    torch.testing.assert_close(plain.bn1.running_mean, model.bn1.running_mean)
    model.eval()
    assert not sw.export(sp).training


def test_export_does_not_change_the_live_masks() -> None:
    model = ResNetTiny()
    sp = sw.sparsify(model, "magnitude", target=0.8, schedule="cubic", end=10, every=5)
    sp.step()
    masks = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("mask")}
    plain = sw.export(sp)  # projects onto 0.8 although the schedule is at 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in masks.items())
    total = sum(t.numel for t in sp.targets)
    zeros = sum(int((plain.get_submodule(t.name).weight == 0).sum()) for t in sp.targets)
    assert zeros == round(0.8 * total)


def test_export_of_the_model_equals_export_of_the_sparsifier() -> None:
    model = ResNetTiny()
    sp = sw.sparsify(model, "magnitude", target=0.6)
    a, b = sw.export(model), sw.export(sp)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_export_rejects_other_objects() -> None:
    with pytest.raises(ConfigError, match=r"expected an nn.Module or a Sparsifier, got str"):
        sw.export("model.safetensors")


def test_the_plain_model_unpickles_without_sparsewrap(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    model = sw.create_model("timm:test_resnet", num_classes=3)
    plain = sw.export(sw.sparsify(model, "magnitude", target=0.5))
    assert b"sparsewrap" not in pickle.dumps(plain)
    path = tmp_path / "plain.pt"
    torch.save(plain, path)
    code = (
        "import sys; sys.modules['sparsewrap'] = None; import torch; "
        f"m = torch.load({str(path)!r}, weights_only=False); print(type(m).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ResNet"
    assert isinstance(plain, timm.models.ResNet)


# -- files ---------------------------------------------------------------------------------------------------------
def test_save_plain_safetensors_loads_strictly(tmp_path: Path) -> None:
    model = ResNetTiny()
    sp = sw.sparsify(model, "magnitude", target=0.5)
    plain = sw.export(sp).eval()
    path = sw.save_plain(plain, tmp_path / "plain.safetensors")
    fresh = ResNetTiny()
    fresh.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh.eval()(x), plain(x), rtol=0, atol=0)


def test_save_plain_handles_tied_weights(tmp_path: Path) -> None:
    model = TiedLM()
    sp = sw.sparsify(model, "magnitude", target=0.5)
    plain = sw.export(sp)
    assert plain.out.weight is plain.embed.weight  # the tie survives the export copy
    state = load_file(str(sw.save_plain(plain, tmp_path / "tied.safetensors")))
    assert torch.equal(state["out.weight"], state["embed.weight"])


def test_pt2_export_runs_with_torch_export_load(tmp_path: Path) -> None:
    model = ConvBN()
    sp = sw.sparsify(model, "magnitude", target=0.7, granularity="channel")
    plain = sw.export(sp).eval()
    path = sw.save_plain(plain, tmp_path / "model.pt2", fmt="pt2", input_shape=(3, 8, 8))
    program = torch.export.load(str(path))
    model.eval()
    for batch in (1, 7):  # a dynamic batch dimension: it used to fail with "Guard failed: x.size()[0] == 1"
        x = torch.randn(batch, 3, 8, 8)
        torch.testing.assert_close(program.module()(x), plain(x))
        torch.testing.assert_close(program.module()(x), model(x))
    names = "".join(program.state_dict)
    assert "parametrizations" not in names and "mask" not in names


class BatchOfOne(nn.Module):
    """A model whose code fixes its batch size to 1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(1, 4))


def test_pt2_export_of_a_fixed_batch_model_falls_back_to_batch_one_with_a_warning(tmp_path: Path) -> None:
    plain = sw.export(sw.sparsify(BatchOfOne(), "magnitude", target=0.5, include="fc")).eval()
    with pytest.warns(UserWarning, match=r"BatchOfOne does not export with a dynamic batch size .*batch 1 only"):
        path = sw.save_plain(plain, tmp_path / "model.pt2", fmt="pt2", input_shape=(4,))
    x = torch.randn(1, 4)
    torch.testing.assert_close(torch.export.load(str(path)).module()(x), plain(x))


def test_save_plain_rejects_bad_formats_and_missing_shapes(tmp_path: Path) -> None:
    plain = sw.export(sw.sparsify(ConvBN(), "magnitude", target=0.5))
    with pytest.raises(ConfigError, match=r"format 'onnx' is unknown; valid: 'pt2', 'safetensors'"):
        sw.save_plain(plain, tmp_path / "m.onnx", fmt="onnx")
    with pytest.raises(ConfigError, match=r"format 'pt2' needs an input shape, e.g. --input-shape 3,224,224"):
        sw.save_plain(plain, tmp_path / "m.pt2", fmt="pt2")
    assert list(tmp_path.iterdir()) == []


def test_save_plain_is_atomic(tmp_path: Path, monkeypatch) -> None:
    plain = sw.export(sw.sparsify(ConvBN(), "magnitude", target=0.5))
    path = sw.save_plain(plain, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        sw.save_plain(plain, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_exported_outputs_equal_the_masked_model_in_eval() -> None:
    model = ConvBN()
    sp = sw.sparsify(model, "magnitude", target=0.5, granularity="channel")
    x = torch.randn(8, 3, 8, 8)
    opt = torch.optim.SGD(sp.param_groups(lr=0.05))
    for _ in range(3):
        sgd_step(model, opt, x)
    model.eval()
    plain = sw.export(sp).eval()
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    assert F.mse_loss(plain(x), model(x)) == 0

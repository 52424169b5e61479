"""One-file checkpoints: round trips with recipes, and refusal of truncated, corrupted or foreign files."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import sparsewrap as sw
from sparsewrap.errors import CheckpointError, ConfigError
from sparsewrap.io import checkpoint
from sparsewrap.io.recipe import ModelRecipe, recipe_for

from .forging import digest
from .zoo import ResNetTiny


def train_steps(sp: sw.Sparsifier, x: torch.Tensor, n: int = 2) -> None:
    opt = torch.optim.SGD(sp.param_groups(lr=0.05), momentum=0.9)
    sp.model.train()
    for _ in range(n):
        loss = sp.model(x).logsumexp(-1).mean() + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


def assert_same_run(a: sw.Sparsifier, b: sw.Sparsifier, x: torch.Tensor) -> None:
    assert b.step_count == a.step_count
    assert b.spec.method == a.spec.method and b.spec.target == a.spec.target and b.spec.options == a.spec.options
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0)
    a.model.eval(), b.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(b.model(x), a.model(x), rtol=0, atol=0)
    assert b.report().exported == a.report().exported


def test_round_trip_of_a_timm_model_rebuilds_it_from_the_recipe(tmp_path: Path) -> None:
    model = sw.create_model("timm:test_resnet", num_classes=5)
    sp = sw.sparsify(model, "magnitude", target=0.6, granularity="channel", schedule="cubic", end=4, every=2)
    x = torch.randn(2, 3, 32, 32)
    train_steps(sp, x, 3)
    path = sw.save(sp, tmp_path / "run.safetensors")
    sp2 = sw.load(path)
    # input_shape: the first forward's, recorded after sparsify
    assert recipe_for(sp2.model) == ModelRecipe("timm", "test_resnet", {"num_classes": 5}, [3, 32, 32])
    assert_same_run(sp, sp2, x)
    assert sp2.method.current == sp.method.current == pytest.approx(0.6 * (1 - 0.5**3))  # event at t=2 of 0, 2, 4
    train_steps(sp, x, 2), train_steps(sp2, x, 2)  # the schedule continues identically: t=3 no event, t=4 the last
    assert sp2.method.current == sp.method.current == pytest.approx(0.6)
    assert_same_run(sp, sp2, x)


def test_a_plain_timm_model_gets_an_inferred_recipe(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_vit", pretrained=False, num_classes=3)
    sp = sw.sparsify(model, "magnitude", target=0.5)
    sp2 = sw.load(sw.save(model, tmp_path / "vit.safetensors"))  # save accepts the model as well
    assert recipe_for(sp2.model) == ModelRecipe("timm", "test_vit", {"num_classes": 3})
    assert_same_run(sp, sp2, torch.randn(1, 3, 160, 160))


def test_round_trip_of_a_factory_model_mid_schedule(tmp_path: Path) -> None:
    model = sw.create_model("sparsewrap.demo.models:lenet5", num_classes=7)
    sp = sw.sparsify(model, "magnitude", target=0.8, schedule="exponential", start=0, end=6, every=2)
    x = torch.randn(4, 1, 28, 28)
    train_steps(sp, x, 3)
    sp2 = sw.load(sw.save(sp, tmp_path / "lenet.safetensors"))
    assert recipe_for(sp2.model) == ModelRecipe(
        "factory", "sparsewrap.demo.models:lenet5", {"num_classes": 7}, [1, 28, 28]
    )
    assert_same_run(sp, sp2, x)
    for _ in range(4):
        sp.step(), sp2.step()
    assert sp.sparsity() == sp2.sparsity() == pytest.approx(0.8, abs=1e-3)


def test_input_shape_is_recorded_in_the_recipe(tmp_path: Path) -> None:
    sp = sw.sparsify(sw.create_model("sparsewrap.demo.models:mlp_300_100"), "magnitude", target=0.5)
    header, _ = checkpoint.read(sw.save(sp, tmp_path / "m.safetensors", input_shape=(1, 28, 28)))
    assert header["model"]["input_shape"] == [1, 28, 28]
    assert header["method"] == "magnitude" and header["target"] == 0.5


def test_a_model_without_recipe_needs_model_on_load(tmp_path: Path) -> None:
    sp = sw.sparsify(ResNetTiny(), "magnitude", target=0.5, include="block*", exclude="re:.*shortcut.*")
    path = sw.save(sp, tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match=r"records no model recipe; pass model="):
        sw.load(path)
    sp2 = sw.load(path, model=ResNetTiny())
    assert [t.name for t in sp2.targets] == [t.name for t in sp.targets]
    assert sp2.spec.include == ["block*"] and sp2.spec.exclude == ["re:.*shortcut.*"]
    assert_same_run(sp, sp2, torch.randn(2, 3, 8, 8))


def test_callable_include_reloads_the_same_layers(tmp_path: Path) -> None:
    sp = sw.sparsify(ResNetTiny(), "magnitude", target=0.5, include=lambda n, m: n.endswith("conv1"))
    sp2 = sw.load(sw.save(sp, tmp_path / "c.safetensors"), model=ResNetTiny())
    assert [t.name for t in sp2.targets] == ["block1.conv1", "block2.conv1"]


def test_loading_into_the_wrong_architecture_is_a_checkpoint_error(tmp_path: Path) -> None:
    sp = sw.sparsify(ResNetTiny(), "magnitude", target=0.5)
    path = sw.save(sp, tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors:? (does not match the model|cannot re-create)"):
        sw.load(path, model=nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2)))


def test_save_of_an_unsparsified_model_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not sparsified by sparsewrap"):
        sw.save(ResNetTiny(), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_no_pickle_the_file_is_plain_safetensors(tmp_path: Path) -> None:
    sp = sw.sparsify(ResNetTiny(), "magnitude", target=0.5)
    path = sw.save(sp, tmp_path / "tiny.safetensors")
    tensors = load_file(str(path))
    assert "model.stem.parametrizations.weight.original" in tensors
    assert "model.stem.parametrizations.weight.0.mask" in tensors


# -- damaged and foreign files -----------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    sp = sw.sparsify(sw.create_model("sparsewrap.demo.models:mlp_300_100"), "magnitude", target=0.5)
    return sw.save(sp, tmp_path / "mlp.safetensors")


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize("keep", [0.5, 0.999, 4])
def test_truncated_file_is_refused(saved: Path, keep: float) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file \(truncated or corrupted\?\)"):
        sw.load(saved)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.99])
def test_flipped_bytes_in_the_data_section_are_refused(saved: Path, where: float) -> None:
    data = bytearray(saved.read_bytes())
    start = 8 + _header_len(data)
    pos = start + int((len(data) - start) * where)
    data[pos] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"is corrupted: its tensors or recipe do not match the recorded sha256"):
        sw.load(saved)


def test_a_changed_digit_in_the_recipe_is_refused(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    n = _header_len(data)
    header = data[8 : 8 + n].decode()
    needle = '\\"target\\": 0.5'
    i = header.index(needle) + len(needle) - 1
    data[8 + i] = ord("7")  # still valid JSON, but a different run
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"is corrupted"):
        sw.load(saved)


def test_a_foreign_safetensors_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"fc.weight": torch.ones(2, 2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"is a safetensors file but not a sparsewrap checkpoint"):
        sw.load(path)


@pytest.mark.parametrize("content", [b"", b"hello world, not tensors", b"\x00" * 64])
def test_a_file_of_another_kind_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "other.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file"):
        sw.load(path)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist"):
        sw.load(tmp_path / "nope.safetensors")


def test_a_file_from_a_newer_format_is_refused(tmp_path: Path) -> None:
    header = json.dumps({"format_version": checkpoint.FORMAT_VERSION + 1, "method": "magnitude"})
    tensors = {"model.x": torch.zeros(2)}
    path = tmp_path / "future.safetensors"
    save_file(tensors, str(path), metadata={"sparsewrap": header, "sha256": checkpoint._digest(tensors, header)})
    with pytest.raises(CheckpointError, match=r"written by a newer sparsewrap \(format 2\); upgrade sparsewrap"):
        sw.load(path)


def test_checkpoint_errors_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        sw.load(tmp_path / "nope.safetensors")


# -- atomic writes -------------------------------------------------------------------------------------------------
def test_a_failed_write_leaves_the_previous_file_and_no_temporary(saved: Path, monkeypatch) -> None:
    before = saved.read_bytes()
    sp = sw.sparsify(sw.create_model("sparsewrap.demo.models:mlp_300_100"), "magnitude", target=0.9)

    def half_then_crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        sw.save(sp, saved)
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]
    monkeypatch.undo()
    sw.save(sp, saved)
    assert sw.load(saved).spec.target == 0.9
    assert os.listdir(saved.parent) == [saved.name]


def test_a_loaded_model_trains_and_exports(tmp_path: Path) -> None:
    sp = sw.sparsify(sw.create_model("sparsewrap.demo.models:lenet5"), "magnitude", target=0.7)
    sp2 = sw.load(sw.save(sp, tmp_path / "l.safetensors"))
    x = torch.randn(4, 1, 28, 28)
    train_steps(sp2, x, 2)
    plain = sw.export(sp2)
    fresh = sw.create_model("sparsewrap.demo.models:lenet5")
    fresh.load_state_dict(plain.state_dict(), strict=True)
    sp2.model.eval()
    torch.testing.assert_close(fresh.eval()(x), sp2.model(x))
    assert F.mse_loss(fresh(x), sp2.model(x)) == 0


# -- recipes -------------------------------------------------------------------------------------------------------
def test_recipe_parse_and_its_errors() -> None:
    assert ModelRecipe.parse("timm:resnet18", num_classes=3) == ModelRecipe("timm", "resnet18", {"num_classes": 3})
    assert ModelRecipe.parse("sparsewrap.demo.models:lenet5").source == "factory"
    for bad in ("resnet18", ":lenet5", "sparsewrap.demo.models:"):
        with pytest.raises(
            ConfigError, match=f"model {bad!r} is not understood; accepted forms: 'timm:<architecture>'"
        ):
            ModelRecipe.parse(bad)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("timm:resnet_nope", r"timm has no architecture 'resnet_nope'"),
        ("sparsewrap.nope:f", r"cannot import factory 'sparsewrap.nope:f'"),
        ("sparsewrap.demo.models:nope", r"cannot import factory 'sparsewrap.demo.models:nope'"),
        (
            "sparsewrap.io.recipe:recipe_for",
            r"factory 'sparsewrap.io.recipe:recipe_for' returned NoneType, not an nn.Module",
        ),
    ],
)
def test_create_model_errors_name_the_spec(spec: str, match: str) -> None:
    kwargs = {"model": nn.Linear(2, 2)} if spec.endswith("recipe_for") else {}
    with pytest.raises(ConfigError, match=match):
        sw.create_model(spec, **kwargs)


def test_default_input_shapes() -> None:
    assert ModelRecipe("timm", "resnet18").default_input_shape() == [3, 224, 224]
    assert ModelRecipe("timm", "resnet18", {"in_chans": 1}).default_input_shape() == [1, 224, 224]
    assert ModelRecipe("timm", "vit_tiny_patch16_224", {"img_size": 64}).default_input_shape() == [3, 64, 64]
    assert ModelRecipe("factory", "sparsewrap.demo.models:lenet5").default_input_shape() is None
    assert ModelRecipe("factory", "x:y", input_shape=[1, 28, 28]).default_input_shape() == [1, 28, 28]


def test_a_broken_recipe_in_a_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    sp = sw.sparsify(lenet(), "magnitude", target=0.5)
    path = sw.save(sp, tmp_path / "l.safetensors", recipe=ModelRecipe("factory", "sparsewrap.gone:lenet5"))
    with pytest.raises(CheckpointError, match=r"names the model factory 'sparsewrap.gone:lenet5'"):
        sw.load(path)  # not registered: refused before any import
    with pytest.raises(CheckpointError, match=r"cannot rebuild the model from its recipe: cannot import factory"):
        sw.load(path, trust_factory=True)


def lenet() -> nn.Module:
    from sparsewrap.demo.models import lenet5

    return lenet5()


# -- compact masks ---------------------------------------------------------------------------------------------
def test_masks_are_stored_as_bool_and_loaded_with_their_dtype(tmp_path: Path) -> None:
    sp = sw.sparsify(lenet(), "magnitude", target=0.7)
    path = sw.save(sp, tmp_path / "m.safetensors")
    raw = load_file(str(path))
    masks = [k for k in raw if k.endswith(".mask")]
    assert len(masks) == 3 and all(raw[k].dtype == torch.bool for k in masks)
    mask_bytes = sum(raw[k].numel() for k in masks)  # one byte each instead of four
    dense_bytes = sum(v.numel() * v.element_size() for k, v in raw.items() if not k.endswith(".mask"))
    assert path.stat().st_size < dense_bytes + mask_bytes + 20_000
    sp2 = sw.load(path, model=lenet())
    saved = sp.model.state_dict()
    for key, value in sp2.model.state_dict().items():
        assert value.dtype == saved[key].dtype
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    header, tensors = checkpoint.read(path)
    assert header["packed_masks"] == {f"model.{k}": "float32" for k in saved if k.endswith(".mask")}
    assert all(tensors[k].dtype == torch.float32 for k in masks)


def test_a_file_with_float_masks_from_older_versions_still_loads(tmp_path: Path) -> None:
    sp = sw.sparsify(lenet(), "magnitude", target=0.7)
    path = sw.save(sp, tmp_path / "old.safetensors")
    raw = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    header = json.loads(meta["sparsewrap"])
    del header["packed_masks"]
    tensors = {k: v.float() if k.endswith(".mask") else v for k, v in raw.items()}
    text = json.dumps(header)
    save_file(tensors, str(path), metadata={"format": "pt", "sparsewrap": text, "sha256": digest(text, tensors)})
    assert load_file(str(path))["model.fc1.parametrizations.weight.0.mask"].dtype == torch.float32
    sp2 = sw.load(path, model=lenet())
    torch.testing.assert_close(sp2.model.state_dict(), sp.model.state_dict(), rtol=0, atol=0)


def test_a_mask_with_negative_zero_or_soft_values_is_kept_as_float(tmp_path: Path) -> None:
    tensors = {"model.a.mask": torch.tensor([0.0, -0.0, 1.0]), "model.b.mask": torch.tensor([0.5, 1.0]),
               "model.c.mask": torch.tensor([0.0, 1.0], dtype=torch.float16),
               "model.w": torch.tensor([0.0, 1.0])}  # fmt: skip
    packed = checkpoint.pack_masks(tensors)
    assert packed == {"model.c.mask": "float16"}
    assert tensors["model.a.mask"].dtype == torch.float32 and tensors["model.w"].dtype == torch.float32
    checkpoint.unpack_masks(tensors, packed, tmp_path)
    assert tensors["model.c.mask"].dtype == torch.float16 and tensors["model.c.mask"].tolist() == [0.0, 1.0]

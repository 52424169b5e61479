"""Loading a file never runs code it names unless allowed: forged recipes (digest recomputed) are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import sparsewrap as sw
from sparsewrap.cli import main
from sparsewrap.errors import CheckpointError, ConfigError
from sparsewrap.purge import save_purged

from .forging import forge
from .zoo import MLP


def system_recipe(marker: Path) -> dict:
    return {"source": "factory", "name": "os:system", "kwargs": {"command": f"touch {marker}"}, "input_shape": None}


@pytest.fixture
def forged(tmp_path: Path) -> tuple[Path, Path]:
    sp = sw.sparsify(sw.create_model("sparsewrap.demo.models:lenet5"), "magnitude", target=0.5)
    marker = tmp_path / "MARKER"
    return forge(sw.save(sp, tmp_path / "forged.safetensors"), system_recipe(marker)), marker


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, " ".join((out + err).split())


def test_load_of_a_forged_factory_runs_nothing_and_names_the_three_ways(forged) -> None:
    path, marker = forged
    with pytest.raises(CheckpointError) as info:
        sw.load(path)
    assert not marker.exists()
    text = str(info.value)
    assert "\n" not in text and "'os:system'" in text
    assert "model=" in text and "trust_factory=True" in text and "--trust-factory" in text
    assert "sparsewrap.register_factory('os:system')" in text


def test_the_forged_file_is_valid_so_trusting_it_does_run_its_factory(forged) -> None:
    path, marker = forged  # proves the refusal above is what stops the command, not a broken forgery
    with pytest.raises(CheckpointError, match="returned int, not an nn.Module"):
        sw.load(path, trust_factory=True)
    assert marker.exists()


def test_load_with_model_ignores_the_forged_factory(forged) -> None:
    path, marker = forged
    from sparsewrap.demo.models import lenet5

    assert sw.load(path, model=lenet5()).spec.target == 0.5
    assert not marker.exists()


@pytest.mark.parametrize("command", [["report"], ["export"], ["export", "--purge", "--input-shape", "1,28,28"]])
def test_cli_commands_refuse_a_forged_factory(forged, capsys, command) -> None:
    path, marker = forged
    argv = [command[0], str(path), *command[1:]]
    if command[0] == "export":
        argv += ["-o", str(path.with_name("out.safetensors"))]
    code, text = run(argv, capsys)
    assert code == 1 and not marker.exists()
    assert "'os:system'" in text and "--trust-factory" in text
    assert not path.with_name("out.safetensors").exists()


def test_cli_trust_factory_is_the_opt_in(forged, capsys) -> None:
    path, marker = forged
    code, text = run(["report", str(path), "--trust-factory"], capsys)
    assert code == 1 and "returned int" in text and marker.exists()


def test_train_resume_never_runs_the_factory_of_the_file(forged, capsys) -> None:
    path, marker = forged
    out = path.parent / "run"
    out.mkdir()
    path.rename(out / "last.safetensors")
    argv = ["train", "--model", "sparsewrap.demo.models:lenet5", "--method", "magnitude", "--target", "0.5",
            "--limit", "64", "--val-limit", "64", "--epochs", "1", "--out", str(out), "--resume"]  # fmt: skip
    code, text = run(argv, capsys)
    assert code == 1 and not marker.exists()
    assert "belongs to another run" in text


def test_load_purged_of_a_forged_factory_runs_nothing(tmp_path: Path) -> None:
    sp = sw.sparsify(sw.create_model("sparsewrap.demo.models:lenet5"), "magnitude", target=0.5, granularity="channel")
    small = sw.export(sp, purge=True, example_inputs=torch.randn(2, 1, 28, 28))
    marker = tmp_path / "MARKER"
    path = save_purged(small, tmp_path / "small.safetensors")
    forge(path, system_recipe(marker), key="sparsewrap_purge", recipe_field="recipe")
    with pytest.raises(CheckpointError, match=r"names the model factory 'os:system'.*--trust-factory"):
        sw.load_purged(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="returned int"):
        sw.load_purged(path, trust_factory=True)  # the forgery is valid: trust is what runs it
    assert marker.exists()


# -- timm recipes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pretrained": True}, r"pretrained=True is refused"),
        ({"checkpoint_path": "/tmp/evil.pth"}, r"checkpoint_path='/tmp/evil.pth' is refused"),
        ({"pretrained_cfg_overlay": {"url": "http://x/y.pth"}}, r"pretrained_cfg_overlay=.* is refused"),
        ({"act_layer": "gelu"}, r"act_layer='gelu' is not on sparsewrap's allow-list"),
        ({"num_classes": {"nested": 1}}, r"num_classes=\{'nested': 1\}"),
    ],
)
def test_a_timm_recipe_outside_the_allow_list_is_refused_before_timm_runs(forged, monkeypatch, kwargs, match):
    timm = pytest.importorskip("timm")
    path, _ = forged
    forge(path, {"source": "timm", "name": "resnet18", "kwargs": kwargs, "input_shape": None})
    calls: list[str] = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(a[0]) or nn.Linear(1, 1))
    with pytest.raises(CheckpointError, match=match):
        sw.load(path)
    assert calls == []


def test_pretrained_or_file_overrides_are_refused_even_when_trusted(forged) -> None:
    pytest.importorskip("timm")
    path, _ = forged
    forge(path, {"source": "timm", "name": "resnet18", "kwargs": {"pretrained": True}, "input_shape": None})
    with pytest.raises(CheckpointError, match="pretrained=True is refused"):
        sw.load(path, trust_factory=True)
    with pytest.raises(ConfigError, match="checkpoint_path='x.pth' is refused"):
        sw.create_model("timm:resnet18", checkpoint_path="x.pth")


def test_a_timm_name_unknown_to_list_models_is_refused(forged) -> None:
    pytest.importorskip("timm")
    path, _ = forged
    forge(path, {"source": "timm", "name": "hf-hub:someone/model", "kwargs": {}, "input_shape": None})
    with pytest.raises(CheckpointError, match=r"timm has no architecture 'hf-hub:someone/model'"):
        sw.load(path)


# -- registration ---------------------------------------------------------------------------------------------------
def small_mlp() -> nn.Module:
    return MLP()


def other_mlp() -> nn.Module:
    return MLP()


def test_a_registered_factory_loads_without_model(tmp_path: Path) -> None:
    sp = sw.sparsify(other_mlp(), "magnitude", target=0.5)
    recipe = sw.ModelRecipe("factory", f"{__name__}:other_mlp")
    path = sw.save(sp, tmp_path / "m.safetensors", recipe=recipe)
    with pytest.raises(CheckpointError, match=rf"register_factory\('{__name__}:other_mlp'\)"):
        sw.load(path)
    assert sw.register_factory(other_mlp) is other_mlp  # usable as a decorator
    loaded = sw.load(path)
    x = torch.randn(3, 12)
    sp.model.eval(), loaded.model.eval()
    torch.testing.assert_close(loaded.model(x), sp.model(x), rtol=0, atol=0)


def test_create_model_is_the_callers_choice_and_registers_it(tmp_path: Path) -> None:
    model = sw.create_model(f"{__name__}:small_mlp")
    path = sw.save(sw.sparsify(model, "magnitude", target=0.5), tmp_path / "s.safetensors")
    assert sw.load(path).spec.target == 0.5


def test_register_factory_refuses_a_malformed_name() -> None:
    with pytest.raises(ConfigError, match=r"'nocolon' is not 'package.module:callable'"):
        sw.register_factory("nocolon")

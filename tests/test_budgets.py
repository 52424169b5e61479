"""Budget transfer: ``sw.budgets`` from a controller or a checkpoint, per-layer dict targets for magnitude, gmp,
dnw, l0 and cs, their errors, and the CLI (``sparsewrap budgets``, ``sparsewrap train --target budgets.json``)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sparsewrap as sw
from sparsewrap.errors import ConfigError, NoTargetsError
from sparsewrap.parametrizations import wrapped_tensors

from .test_train_cli import run


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(),
                         nn.Linear(20, 4))  # fmt: skip


def _train(sp: sw.Sparsifier, steps: int, lr: float = 0.05) -> None:
    torch.manual_seed(1)
    x = torch.randn(32, 12)
    opt = torch.optim.SGD(sp.param_groups(lr=lr), momentum=0.9)
    for _ in range(steps):
        loss = sp.model(x).pow(2).mean() + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


def _zeros(plain: nn.Module, name: str) -> int:
    return int((plain.get_submodule(name).weight == 0).sum())


BUDGET = {"0": 0.25, "2": 0.8, "4": 0.0}  # a sparsity of 0 leaves that layer dense


def test_budgets_of_a_controller_and_of_its_checkpoint(tmp_path) -> None:
    sp = sw.sparsify(_mlp(), "str", target=0.7)
    _train(sp, 20)
    found = sw.budgets(sp)
    plain = sw.export(sp)
    assert list(found) == ["0", "2", "4"]
    for t in sp.targets:
        assert found[t.name] == 1.0 - (t.numel - _zeros(plain, t.name)) / t.numel
    total = sum(t.numel for t in sp.targets)
    assert sum(found[t.name] * t.numel for t in sp.targets) == pytest.approx(round(0.7 * total))
    assert sw.budgets(sp.model) == found  # the model it sparsified carries its controller
    sw.save(sp, tmp_path / "str.safetensors")
    assert sw.budgets(tmp_path / "str.safetensors", model=_mlp()) == found


def test_budgets_refuse_a_plain_model() -> None:
    with pytest.raises(ConfigError, match=r"Sequential was not sparsified \(no sparsewrap controller\)"):
        sw.budgets(_mlp())
    with pytest.raises(ConfigError, match=r"budgets\(\) takes a Sparsifier, a sparsified model or a checkpoint path"):
        sw.budgets(3)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("magnitude", {}),
        ("magnitude", dict(schedule="cubic", start=0, end=4, every=2)),
        ("gmp", dict(start=0, end=4, every=2)),
        ("dnw", {}),
        ("cs", dict(rounds=1, ticket_start=3)),
        ("l0", {}),
    ],
)
def test_a_budget_dict_is_the_exported_sparsity_of_each_layer(method: str, options: dict) -> None:
    sp = sw.sparsify(_mlp(), method, target=BUDGET, **options)
    _train(sp, 6)
    plain = sw.export(sp)
    for name, sparsity in BUDGET.items():
        numel = plain.get_submodule(name).weight.numel()
        assert _zeros(plain, name) == round(sparsity * numel), name
    assert _zeros(plain, "6") == 0  # the head, not in the dict, stays dense


def test_magnitude_follows_each_layers_budget_along_its_schedule() -> None:
    sp = sw.sparsify(_mlp(), "magnitude", target={"0": 0.5, "2": 0.9}, schedule="cubic", start=0, end=4, every=2)
    assert [t.name for t in sp.targets] == ["0", "2"]  # layers the dict does not name are not sparsified
    assert sp.report().requested == pytest.approx((0.5 * 480 + 0.9 * 1200) / 1680)
    _train(sp, 3)  # events at steps 0 and 2: half way on the cubic, 1 - (1 - 1/2)^3 = 7/8 of each count
    masks = {m: p for m, _mod, _t, p in wrapped_tensors(sp.model)}
    assert int((masks["0"].mask == 0).sum()) == round(7 / 8 * 240)
    assert int((masks["2"].mask == 0).sum()) == round(7 / 8 * 1080)


@pytest.mark.parametrize("method", ["magnitude", "gmp", "dnw"])
def test_a_dict_naming_a_missing_layer_lists_the_nearest_names(method: str) -> None:
    options = dict(start=0, end=4, every=2) if method == "gmp" else {}
    model = _mlp()
    with pytest.raises(NoTargetsError, match=r"layer-wise target pattern 'layer2' matches no targeted layer; "
                                             r"nearest layer names: "):  # fmt: skip
        sw.sparsify(model, method, target={"0": 0.5, "layer2": 0.5}, **options)
    assert not list(wrapped_tensors(model))


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan")])
def test_a_layer_sparsity_outside_zero_one_is_refused(bad: float) -> None:
    with pytest.raises(ConfigError, match=rf"target\['2'\]={bad!r} is outside \[0, 1\); target\['2'\] is the fraction"):
        sw.sparsify(_mlp(), "magnitude", target={"0": 0.5, "2": bad})


def test_channel_magnitude_refuses_a_dict() -> None:
    with pytest.raises(ConfigError, match=r"per-layer dict target with granularity='weight' only"):
        sw.sparsify(_mlp(), "magnitude", target=BUDGET, granularity="channel")


def test_cli_budgets_then_train_with_them(capsys, tmp_path) -> None:
    base = ["train", "--model", "sparsewrap.demo.models:mlp_300_100", "--limit", "128", "--val-limit", "64",
            "--batch-size", "64", "--epochs", "1"]  # fmt: skip
    code, _, err = run(capsys, *base, "--method", "str", "--target", "0.8", "--out", tmp_path / "str")
    assert code == 0, err
    ckpt = tmp_path / "str" / "last.safetensors"
    out = tmp_path / "budgets.json"
    code, text, err = run(capsys, "budgets", ckpt, "-o", out)
    assert code == 0, err
    found = json.loads(out.read_text())
    assert found == sw.budgets(ckpt, trust_factory=True) and "wrote 2 layer budgets" in text
    code, _, err = run(capsys, *base, "--method", "magnitude", "--target", out, "--out", tmp_path / "mag")
    assert code == 0, err
    report = sw.load(tmp_path / "mag" / "last.safetensors", trust_factory=True).report()
    for layer in report.layers:
        assert layer.exported_nonzeros == layer.params - round(found[layer.name] * layer.params), layer.name
    code, _, err = run(capsys, *base, "--method", "magnitude", "--target", tmp_path / "nope.json", "--out",
                       tmp_path / "x")  # fmt: skip
    assert code == 2 and "is neither a number nor a file" in err

"""BatchNorm folding: exact outputs, what must stay unfolded, export/save/load round trips and the CLI flag."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import sparsewrap as sw
import sparsewrap.purge.fold as fold_module
from sparsewrap.cli import main
from sparsewrap.errors import CheckpointError, ConfigError, TraceError
from sparsewrap.purge import fold_batchnorm, fold_report, purge_report, read_plan, save_purged
from sparsewrap.purge.io import META_KEY, _digest

from .zoo import ZOO, ResNetTiny


def randomize_bn(model: nn.Module, seed: int = 1, shift: bool = True) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (``shift=False``: zero mean and beta, so that
    exactly-zero channels stay zero through the BatchNorm and the purge can still remove them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) if shift else torch.zeros(n))
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=gen))
                    m.bias.copy_(torch.randn(n, generator=gen) if shift else torch.zeros(n))
    return model


def n_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def rel_err(ref: Tensor, out: Tensor) -> float:
    return float((ref - out).abs().max() / ref.abs().max())


def eval_out(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize(
    "name,folds", [("conv_bn", 2), ("resnet_tiny", 6), ("depthwise_grouped", 2), ("conv1d_seq", 1)]
)
@pytest.mark.parametrize("with_example", [True, False])
def test_folded_zoo_models_keep_their_outputs(name: str, folds: int, with_example: bool) -> None:
    factory, make_input = ZOO[name]
    model = randomize_bn(factory().double()).eval()
    x = make_input().double()
    original = copy.deepcopy(model)
    ref = eval_out(original, x)
    report = fold_batchnorm(model, x if with_example else None)
    assert len(report.folded) == folds and not report.skipped
    assert n_batchnorms(model) == 0
    assert rel_err(ref, eval_out(model, x)) <= 1e-6
    for layer, bn in report.folded:
        assert isinstance(model.get_submodule(bn), nn.Identity)
        assert isinstance(model.get_submodule(layer).bias, nn.Parameter)
        assert not torch.equal(model.get_submodule(layer).weight, original.get_submodule(layer).weight)
    assert (report.max_rel_error is not None) == with_example


def test_timm_resnet18_loses_every_batchnorm_and_keeps_its_outputs() -> None:
    model = randomize_bn(timm.create_model("resnet18", pretrained=False, num_classes=10).double()).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref = eval_out(copy.deepcopy(model), x)
    assert n_batchnorms(model) == 20
    report = fold_batchnorm(model, x)
    assert len(report.folded) == 20 and report.skipped == []
    assert n_batchnorms(model) == 0
    assert model.conv1.bias is not None and ("conv1", "bn1") in report.folded
    assert rel_err(ref, eval_out(model, x)) <= 1e-6


def test_float32_folding_is_verified_within_tolerance() -> None:
    model = randomize_bn(ResNetTiny()).eval()
    x = torch.randn(2, 3, 8, 8)
    ref = eval_out(copy.deepcopy(model), x)
    report = fold_batchnorm(model, x)
    assert report.max_rel_error is not None and report.max_rel_error < 1e-5
    torch.testing.assert_close(eval_out(model, x), ref, rtol=1e-5, atol=1e-5)


class ConvBNAct(nn.Module):
    """A timm BatchNormAct2d (BatchNorm2d subclass that also applies an activation) after a plain conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = BatchNormAct2d(6, act_layer=nn.SiLU)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


def test_batchnorm_act_is_left_unfolded_and_exact() -> None:
    model = randomize_bn(ConvBNAct().double()).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ref = eval_out(model, x)
    report = fold_batchnorm(model, x)
    assert report.folded == [] and type(model.bn) is BatchNormAct2d
    assert report.skipped[0][0] == "bn" and "BatchNormAct2d" in report.skipped[0][1]
    assert torch.equal(eval_out(model, x), ref)


def test_efficientnet_batchnorm_act_layers_all_stay() -> None:
    model = timm.create_model("efficientnet_b0", pretrained=False).eval()
    x = torch.randn(1, 3, 32, 32)
    ref = eval_out(model, x)
    before = n_batchnorms(model)
    report = fold_batchnorm(model, x)
    assert report.folded == [] and len(report.skipped) == before == n_batchnorms(model)
    assert torch.equal(eval_out(model, x), ref)


class Unfoldable(nn.Module):
    """Pairs that must not be folded, beside one that must."""

    def __init__(self) -> None:
        super().__init__()
        self.twice = nn.Conv2d(4, 4, 3, padding=1)  # called twice
        self.bn_twice = nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 1)  # output also read by the residual add
        self.bn_shared = nn.BatchNorm2d(4)
        self.same = Conv2dSame(4, 4, 3)  # a Conv2d subclass with its own forward
        self.bn_same = nn.BatchNorm2d(4)
        self.bn_after_relu = nn.BatchNorm2d(4)  # input is not a layer output
        self.no_stats_conv = nn.Conv2d(4, 4, 1)
        self.bn_no_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.ok = nn.Conv2d(4, 4, 1, bias=False)
        self.bn_ok = nn.BatchNorm2d(4, affine=False)  # foldable: affine=False is gamma 1, beta 0

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn_twice(self.twice(self.twice(x)))
        c = self.shared(x)
        x = self.bn_shared(c) + c
        x = self.bn_same(self.same(x))
        x = self.bn_after_relu(F.relu(x))
        x = self.bn_no_stats(self.no_stats_conv(x))
        return self.bn_ok(self.ok(x))


def test_only_single_use_exact_pairs_are_folded() -> None:
    model = randomize_bn(Unfoldable().double()).eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    ref = eval_out(copy.deepcopy(model), x)
    report = fold_batchnorm(model, x)
    assert report.folded == [("ok", "bn_ok")]
    reasons = dict(report.skipped)
    assert set(reasons) == {"bn_twice", "bn_shared", "bn_same", "bn_after_relu", "bn_no_stats"}
    assert "called 2 times" in reasons["bn_twice"]
    assert "also used elsewhere" in reasons["bn_shared"]
    assert "Conv2dSame" in reasons["bn_same"]
    assert "not the output of a layer" in reasons["bn_after_relu"]
    assert "running statistics" in reasons["bn_no_stats"]
    for name in reasons:
        assert isinstance(model.get_submodule(name), nn.BatchNorm2d)
    assert n_batchnorms(model) == 5
    assert rel_err(ref, eval_out(model, x)) <= 1e-6


def test_a_batchnorm_called_twice_is_not_folded() -> None:
    class TwiceBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.a(x)) + self.bn(self.b(x))

    model = randomize_bn(TwiceBN()).eval()
    report = fold_batchnorm(model, torch.randn(2, 3, 4, 4))
    assert report.folded == [] and isinstance(model.bn, nn.BatchNorm2d)
    assert all("called 2 times" in why for _, why in report.skipped)


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.bn(self.fc(x))))


def test_linear_batchnorm1d_is_folded_only_on_a_checked_2d_output() -> None:
    model = randomize_bn(LinearBN().double()).eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    ref = eval_out(copy.deepcopy(model), x)
    report = fold_batchnorm(copy.deepcopy(model), None)
    assert report.folded == [] and "example_inputs" in report.skipped[0][1]
    report = fold_batchnorm(model, x)
    assert report.folded == [("fc", "bn")] and isinstance(model.bn, nn.Identity)
    assert rel_err(ref, eval_out(model, x)) <= 1e-6

    # (N, 8, 8): BatchNorm1d normalises dim 1, not the Linear's features; folding would be wrong
    model = randomize_bn(LinearBN().double()).eval()
    model.fc = nn.Linear(8, 8).double()
    x3 = torch.randn(3, 8, 8, dtype=torch.float64)
    model.head = nn.Identity()
    ref = eval_out(model, x3)
    report = fold_batchnorm(model, x3)
    assert report.folded == [] and "3-D, not 2-D" in report.skipped[0][1]
    assert torch.equal(eval_out(model, x3), ref)


def test_training_mode_and_wrapped_models_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"call model\.eval\(\) first"):
        fold_batchnorm(ResNetTiny())
    sp = sw.sparsify(ResNetTiny(), "magnitude", target=0.5)
    sp.model.eval()
    with pytest.raises(ConfigError, match="plain models"):
        fold_batchnorm(sp.model)


def test_outputs_that_change_raise_and_restore_the_model(monkeypatch) -> None:
    model = randomize_bn(ResNetTiny()).eval()
    x = torch.randn(2, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = eval_out(model, x)

    def wrong(w, b, *args):  # a broken fusion: doubles the weight
        return nn.Parameter(w * 2), nn.Parameter(torch.zeros(w.shape[0]))

    monkeypatch.setattr(fold_module, "fuse_conv_bn_weights", wrong)
    with pytest.raises(TraceError, match="changed the outputs.*restored"):
        fold_batchnorm(model, x)
    assert n_batchnorms(model) == 6 and model.stem.bias is None
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(eval_out(model, x), ref)


def test_an_untraceable_model_is_left_unchanged() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            if x.sum() > 0:  # data-dependent control flow: FX cannot trace it
                x = -x
            return self.bn(self.conv(x))

    model = Dynamic().eval()
    report = fold_batchnorm(model, torch.randn(1, 3, 2, 2))
    assert report.folded == [] and "could not trace" in report.trace_error
    assert isinstance(model.bn, nn.BatchNorm2d)


def purged_folded_resnet(fold_bn: bool = True) -> tuple[nn.Module, nn.Module, Tensor]:
    """(the unfolded dense export, the purged and folded export, the example input)."""
    torch.manual_seed(0)
    model = randomize_bn(ResNetTiny(), shift=False)
    sp = sw.sparsify(model, "magnitude", target=0.5, granularity="channel")
    x = torch.randn(2, 3, 8, 8)
    dense = sw.export(sp).eval()
    return dense, sw.export(sp, purge=True, example_inputs=x, fold_bn=fold_bn), x


def test_export_purge_fold_save_load_round_trip(tmp_path: Path) -> None:
    dense, small, x = purged_folded_resnet()
    assert not small.training and n_batchnorms(small) == 0
    assert purge_report(small).changed and len(fold_report(small).folded) == 6
    torch.testing.assert_close(eval_out(small, x), eval_out(dense, x), rtol=1e-5, atol=1e-5)
    path = save_purged(small, tmp_path / "small.safetensors")
    plan, tensors = read_plan(path)
    assert plan["format_version"] == 2 and [tuple(p) for p in plan["fold_bn"]] == fold_report(small).folded
    assert "report" not in plan and "fold_report" not in plan
    assert not any(k.startswith("bn.") or ".bn1." in k for k in tensors)
    loaded = sw.load_purged(path, ResNetTiny()).eval()  # strict load inside
    assert n_batchnorms(loaded) == 0
    assert loaded.state_dict().keys() == small.state_dict().keys()
    assert torch.equal(eval_out(loaded, x), eval_out(small, x))
    again = save_purged(loaded, tmp_path / "again.safetensors")  # a loaded model saves again
    assert read_plan(again)[0] == plan


def test_plans_without_folds_keep_format_1_and_still_load(tmp_path: Path) -> None:
    _, small, x = purged_folded_resnet(fold_bn=False)
    assert n_batchnorms(small) == 6
    path = save_purged(small, tmp_path / "small.safetensors")
    plan, _ = read_plan(path)
    assert plan["format_version"] == 1 and "fold_bn" not in plan
    loaded = sw.load_purged(path, ResNetTiny()).eval()
    assert n_batchnorms(loaded) == 6
    assert torch.equal(eval_out(loaded, x), eval_out(small.eval(), x))


def _rewrite_plan(path: Path, edit) -> None:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    plan = json.dumps(edit(json.loads(meta[META_KEY])), sort_keys=True)
    save_file(tensors, str(path), metadata={"format": "pt", META_KEY: plan, "sha256": _digest(plan, tensors)})


def test_tampered_or_inapplicable_folds_are_refused(tmp_path: Path) -> None:
    _, small, _ = purged_folded_resnet()
    path = save_purged(small, tmp_path / "small.safetensors")
    meta_plan = read_plan(path)[0]
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    edited = dict(meta_plan, fold_bn=meta_plan["fold_bn"][:-1])  # change the plan, keep the old digest
    meta[META_KEY] = json.dumps(edited, sort_keys=True)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="corrupted"):
        sw.load_purged(path, ResNetTiny())

    path = save_purged(small, tmp_path / "b.safetensors")
    _rewrite_plan(path, lambda p: dict(p, fold_bn=[["stem", "head"]]))
    with pytest.raises(CheckpointError, match="folds do not apply"):
        sw.load_purged(path, ResNetTiny())
    _rewrite_plan(path, lambda p: dict(p, fold_bn=[["stem", "nowhere"]]))
    with pytest.raises(CheckpointError, match="folds do not apply"):
        sw.load_purged(path, ResNetTiny())
    _rewrite_plan(path, lambda p: dict(p, fold_bn="stem"))
    with pytest.raises(CheckpointError, match="malformed"):
        sw.load_purged(path, ResNetTiny())
    _rewrite_plan(path, lambda p: dict(p, format_version=3))
    with pytest.raises(CheckpointError, match="newer sparsewrap"):
        sw.load_purged(path, ResNetTiny())


def test_export_fold_without_purge_round_trips(tmp_path: Path) -> None:
    model = randomize_bn(ResNetTiny())
    sp = sw.sparsify(model, "magnitude", target=0.5)
    x = torch.randn(2, 3, 8, 8)
    dense = sw.export(sp).eval()
    folded = sw.export(sp, fold_bn=True, example_inputs=x)
    assert not folded.training and n_batchnorms(folded) == 0 and model.training  # the live model is untouched
    assert n_batchnorms(model) == 6
    torch.testing.assert_close(eval_out(folded, x), eval_out(dense, x), rtol=1e-5, atol=1e-5)
    assert fold_report(folded).max_rel_error is not None
    with pytest.raises(ConfigError, match="no purge report"):
        purge_report(folded)
    with pytest.raises(ConfigError, match="no fold report"):
        fold_report(dense)
    path = save_purged(folded, tmp_path / "folded.safetensors")
    assert read_plan(path)[0]["ops"] == {}
    loaded = sw.load_purged(path, ResNetTiny()).eval()
    assert torch.equal(eval_out(loaded, x), eval_out(folded, x))


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


def test_cli_fold_bn_folds_both_sides_of_the_table(tmp_path: Path, capsys, monkeypatch) -> None:
    import sparsewrap.purge.compare as compare_module

    compared: list[tuple[nn.Module, nn.Module]] = []
    real = compare_module.compare

    def spy(dense, purged, *args, **kwargs):
        compared.append((dense, purged))
        return real(dense, purged, *args, **kwargs)

    monkeypatch.setattr(compare_module, "compare", spy)
    model = randomize_bn(sw.create_model("tests.zoo:ResNetTiny"), shift=False)
    ckpt = sw.save(sw.sparsify(model, "magnitude", target=0.5, granularity="channel"), tmp_path / "t.safetensors")
    out = tmp_path / "t.purged.safetensors"
    args = ["export", str(ckpt), "--purge", "--fold-bn", "--input-shape", "3,8,8", "--repeats", "1", "-o", str(out)]
    code, text = run_cli(args, capsys)
    assert code == 0, text
    assert "fold: folded 6 BatchNorm layers" in text and "latency bs32" in text
    ((dense, small),) = compared
    assert n_batchnorms(dense) == 0 and n_batchnorms(small) == 0  # like with like
    loaded = sw.load_purged(out).eval()  # the recipe in the plan rebuilds the architecture
    assert n_batchnorms(loaded) == 0
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(eval_out(loaded, x), eval_out(small, x))


def test_cli_fold_bn_without_purge_writes_a_loadable_file(tmp_path: Path, capsys) -> None:
    model = randomize_bn(sw.create_model("tests.zoo:ResNetTiny"))
    sp = sw.sparsify(model, "magnitude", target=0.5)
    ckpt = sw.save(sp, tmp_path / "t.safetensors")
    code, text = run_cli(["export", str(ckpt), "--fold-bn", "--input-shape", "3,8,8"], capsys)
    assert code == 0, text
    out = tmp_path / "t.folded.safetensors"
    assert out.is_file() and "fold: folded 6 BatchNorm layers" in text
    loaded = sw.load_purged(out).eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(eval_out(loaded, x), eval_out(sw.export(sp).eval(), x), rtol=1e-5, atol=1e-5)


def test_cli_channels_last_times_both_models_in_nhwc(tmp_path: Path, capsys, monkeypatch) -> None:
    import sparsewrap.purge.compare as compare_module

    layouts: list[bool] = []
    real = compare_module.paired_latency

    def spy(models, *args, **kwargs):
        out = real(models, *args, **kwargs)
        layouts.append(all(m.stem.weight.is_contiguous(memory_format=torch.channels_last) for m in models))
        return out

    monkeypatch.setattr(compare_module, "paired_latency", spy)
    model = randomize_bn(sw.create_model("tests.zoo:ResNetTiny"), shift=False)
    ckpt = sw.save(sw.sparsify(model, "magnitude", target=0.5, granularity="channel"), tmp_path / "t.safetensors")
    args = ["export", str(ckpt), "--purge", "--channels-last", "--input-shape", "3,8,8", "--repeats", "1"]
    code, text = run_cli(args, capsys)
    assert code == 0, text
    assert layouts == [True, True] and "channels_last" in text  # batch 1 and 32, both models converted


def test_paired_latency_interleaves_the_models_and_restores_their_modes() -> None:
    from sparsewrap.purge.compare import paired_latency

    calls: list[str] = []

    class Tag(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name, self.lin = name, nn.Linear(4, 4)

        def forward(self, x):
            calls.append(self.name)
            return self.lin(x)

    a, b = Tag("a"), Tag("b").eval()
    times = paired_latency([a, b], (4,), batch=2, repeats=4)
    assert len(times) == 2 and all(t >= 0 for t in times)
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 2  # warm-ups, then ABBA
    assert a.training and not b.training

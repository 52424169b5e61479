"""Target selection: defaults, include/exclude patterns, the classifier head, tied weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsewrap as sw
from sparsewrap.analysis.targets import Target, select_targets
from sparsewrap.analysis.tracing import analyse
from sparsewrap.errors import ConfigError, NoTargetsError

from .zoo import ConvBN, ResNetTiny, TiedLM


def names(model: nn.Module, include=None, exclude=None) -> list[str]:
    return [t.name for t in select_targets(model, analyse(model), include, exclude)]


def test_default_is_every_conv_and_linear_but_the_head_in_execution_order() -> None:
    assert names(ResNetTiny()) == [
        "stem", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "block2.shortcut.0",
    ]  # fmt: skip
    assert names(ConvBN()) == ["conv1", "conv2", "fc"]


def test_timm_head_comes_from_get_classifier() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    chosen = names(model)
    assert "fc" not in chosen and len(chosen) == 20 and chosen[0] == "conv1"
    assert names(model, include="fc") == ["fc"]  # included explicitly, the head is sparsified


def test_include_glob_regex_and_callable() -> None:
    model = ResNetTiny()
    assert names(model, include="block1.*") == ["block1.conv1", "block1.conv2"]
    assert names(model, include="re:block\\d\\.conv1") == ["block1.conv1", "block2.conv1"]
    assert names(model, include=lambda n, m: isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)) == [
        "block2.shortcut.0"
    ]
    assert names(model, include=["stem", "head"]) == ["stem", "head"]


def test_regex_is_a_full_match_and_globs_match_the_whole_name() -> None:
    model = ResNetTiny()
    with pytest.raises(NoTargetsError, match=r"include pattern 're:conv1' matches no Conv/Linear layer"):
        names(model, include="re:conv1")
    with pytest.raises(NoTargetsError, match=r"include pattern 'conv1' matches no Conv/Linear layer"):
        names(model, include="conv1")


def test_exclude_removes_from_the_default_and_from_include() -> None:
    model = ResNetTiny()
    assert names(model, exclude="block2.*") == ["stem", "block1.conv1", "block1.conv2"]
    assert names(model, include="block*", exclude=["re:.*shortcut.*", "block1.conv1"]) == [
        "block1.conv2", "block2.conv1", "block2.conv2",
    ]  # fmt: skip


def test_a_pattern_matching_nothing_names_the_pattern_and_the_layers() -> None:
    with pytest.raises(NoTargetsError, match=r"exclude pattern 'layer9\.\*' matches no Conv/Linear layer; layers are "
                       r"named like stem, block1\.conv1, block1\.conv2, block2\.conv1, \.\.\."):  # fmt: skip
        names(ResNetTiny(), exclude="layer9.*")


def test_nothing_left_is_an_error_and_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"nothing left to sparsify in ResNetTiny after include='stem', exclude="):
        names(ResNetTiny(), include="stem", exclude="stem")


def test_a_bad_pattern_type_is_an_error() -> None:
    with pytest.raises(NoTargetsError, match=r"pattern 3 must be a glob string, 're:<regex>', or a callable"):
        names(ResNetTiny(), include=[3])


def test_a_model_without_layers_is_an_error() -> None:
    with pytest.raises(NoTargetsError, match=r"Sequential has no Conv1d/2d/3d or Linear layer to sparsify"):
        names(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))


def test_tied_weights_are_skipped_with_a_warning() -> None:
    model = TiedLM()
    with pytest.warns(UserWarning, match=r"out\.weight is shared by embed\.weight, out\.weight \(weight tying\)"):
        chosen = names(model, include=["hidden", "out"])
    assert chosen == ["hidden"]


def test_tied_weights_stay_tied_after_sparsify() -> None:
    model = TiedLM()
    with pytest.warns(UserWarning, match="weight tying"):
        sp = sw.sparsify(model, "magnitude", target=0.5, include=["hidden", "out"])
    assert model.out.weight is model.embed.weight
    assert [t.name for t in sp.targets] == ["hidden"]


def test_two_linears_sharing_a_weight_are_both_skipped() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    model[2].weight = model[0].weight
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(NoTargetsError, match="nothing left to sparsify"):
            names(model)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("0.weight is shared by 0.weight, 2.weight") for m in messages)
    assert any(m.startswith("2.weight is shared") for m in messages)


def test_tied_head_is_excluded_silently_by_default() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert names(TiedLM()) == ["hidden"]


def test_target_properties_before_and_after_wrapping() -> None:
    conv = nn.Conv2d(3, 8, 3)
    t = Target("c", conv)
    assert t.kind == "conv" and t.shape == (8, 3, 3, 3) and t.numel == 216 and t.fan_in == 27
    assert t.original is conv.weight
    weight = conv.weight
    model = nn.Sequential(conv, nn.ReLU())
    sw.sparsify(model, "magnitude", target=0.5, include="0")
    assert t.original is weight  # the Parameter object survives wrapping (optimizers keep working)
    assert t.original is conv.parametrizations.weight.original
    assert Target("l", nn.Linear(2, 3)).kind == "linear"


@pytest.mark.parametrize(
    ("target", "shown", "kind", "fix"),
    [
        ("0.5", "'0.5'", "str", "target=0.7"),
        (True, "True", "bool", "target=0.7"),
        (torch.tensor(0.5), "tensor(0.5000)", "Tensor", "target=float(...)"),
    ],
)
def test_a_target_of_the_wrong_type_is_a_type_error_not_a_range_error(target, shown, kind, fix) -> None:
    model = ConvBN()
    with pytest.raises(ConfigError) as info:
        sw.sparsify(model, "magnitude", target=target)
    message = str(info.value)
    assert message.startswith(f"target={shown} is a {kind}, not a number;") and f"give e.g. {fix}" in message
    assert "outside" not in message and "\n" not in message


def test_numpy_and_integer_like_reals_are_accepted_as_targets() -> None:
    np = pytest.importorskip("numpy")
    sp = sw.sparsify(ConvBN(), "magnitude", target=np.float32(0.5))
    assert sp.spec.target == 0.5 and isinstance(sp.spec.target, float)


def test_a_dict_target_says_the_fraction_is_zeroed_and_a_dict_density_kept() -> None:
    with pytest.raises(ConfigError, match=r"^target\['conv1'\]=1.5 is outside \[0, 1\); target\['conv1'\] is the "
                       r"fraction of targeted weights that are zeroed"):  # fmt: skip
        sw.sparsify(ConvBN(), "l0", target={"conv1": 1.5})
    with pytest.raises(ConfigError, match=r"density\['conv1'\] is the fraction of targeted weights that are kept"):
        sw.sparsify(ConvBN(), "l0", density={"conv1": 1.5})


@pytest.mark.parametrize("where", ["include", "exclude"])
def test_an_invalid_regex_is_a_one_line_config_error(where: str) -> None:
    with pytest.raises(NoTargetsError) as info:
        sw.sparsify(ConvBN(), "magnitude", target=0.5, **{where: "re:[bad"})
    assert isinstance(info.value, ConfigError)
    assert str(info.value) == (
        "pattern 're:[bad' is not a valid regular expression (unterminated character set at position 0); fix the "
        "regex after 're:', or give a glob such as 'layer1.*'"
    )


def test_a_torchscript_module_is_refused_with_the_way_forward() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in recent torch
        scripted = torch.jit.script(ConvBN())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before any tracing warning
        with pytest.raises(ConfigError, match=r"is a TorchScript module \(torch.jit.ScriptModule\).*sparsify the "
                           r"original nn.Module, then script the exported model"):  # fmt: skip
            sw.sparsify(scripted, "magnitude", target=0.5)

"""The model's first input: recorded after sparsify, used by export(purge=True), kept in checkpoints; wrong
example inputs are refused with one line naming the expected input."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsewrap as sw
from sparsewrap.analysis.inputs import InputRecord
from sparsewrap.errors import ConfigError
from sparsewrap.purge import purge, purge_report

from .zoo import ZOO, ConvBN, TiedLM


def channel_sparse_convbn() -> tuple[nn.Module, sw.Sparsifier]:
    model = ConvBN()
    return model, sw.sparsify(model, "magnitude", target=0.5, granularity="channel")


def train_steps(model: nn.Module, sp: sw.Sparsifier, x: torch.Tensor, steps: int = 2) -> None:
    opt = torch.optim.SGD(sp.param_groups(lr=0.01))
    for _ in range(steps):
        model.train()
        loss = model(x).pow(2).mean() + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


def test_the_first_forward_records_shape_and_dtype_and_the_hook_removes_itself() -> None:
    model, sp = channel_sparse_convbn()
    assert sp.input is None and sp.input_recorder is not None
    model(torch.randn(5, 3, 8, 8))
    assert sp.input == InputRecord([3, 8, 8], "float32")
    assert sp.input_recorder is None
    sp.input = None
    model(torch.randn(2, 3, 8, 8))  # only the first forward records
    assert sp.input is None
    sp.input = InputRecord.of(torch.randn(5, 3, 8, 8))
    assert sp.state_dict()["input"] == {"shape": [3, 8, 8], "dtype": "float32"}


def test_export_purge_of_a_trained_model_needs_no_example_inputs() -> None:
    """It used to refuse: 'Sequential records no input shape', although the model had seen batches."""
    model, sp = channel_sparse_convbn()
    with pytest.raises(ConfigError, match=r"records no input shape"):  # before any forward: nothing to go on
        sw.export(sp, purge=True)
    x = torch.randn(8, 3, 8, 8)
    train_steps(model, sp, x)
    small = sw.export(sp, purge=True)
    assert purge_report(small).changed and sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for p in sw.export(sp).parameters()
    )
    model.eval()
    torch.testing.assert_close(small.eval()(x), model(x), rtol=1e-4, atol=1e-5)
    assert sp.input_recorder is None and sp.input is not None


def test_example_inputs_stay_the_override() -> None:
    model, sp = channel_sparse_convbn()
    model(torch.randn(4, 3, 8, 8))
    sp.input = InputRecord([3, 9, 9], "float32")  # a record the model cannot run: never used when overridden
    small = sw.export(sp, purge=True, example_inputs=torch.randn(2, 3, 8, 8))
    assert purge_report(small).changed


def test_integer_inputs_are_rebuilt_as_valid_token_ids() -> None:
    model = TiedLM()
    sp = sw.sparsify(model, "magnitude", target=0.5)
    model(torch.randint(0, 20, (3, 5)))
    assert sp.input == InputRecord([5], "int64")
    example = sp.input.example(model)
    assert example.dtype == torch.int64 and example.shape == (2, 5) and int(example.max()) == 0


def test_the_record_survives_a_checkpoint(tmp_path: Path) -> None:
    model, sp = channel_sparse_convbn()
    model(torch.randn(4, 3, 8, 8))
    path = sw.save(sp, tmp_path / "c.safetensors")
    loaded = sw.load(path, model=ConvBN())
    assert loaded.input == InputRecord([3, 8, 8], "float32")
    assert purge_report(sw.export(loaded, purge=True)).changed


def test_an_export_before_the_first_forward_carries_no_sparsewrap_hook() -> None:
    model, sp = channel_sparse_convbn()
    plain = sw.export(sp)
    assert b"sparsewrap" not in pickle.dumps(plain)  # no sparsewrap hook came along with the copy
    assert sp.input_recorder is not None  # the live model still records its first input
    plain(torch.randn(3, 3, 8, 8))
    assert sp.input is None
    model(torch.randn(3, 3, 8, 8))
    assert sp.input == InputRecord([3, 8, 8], "float32")


# -- wrong example inputs ------------------------------------------------------------------------------------------
def test_wrong_example_inputs_name_the_recorded_input_in_one_line(capfd: pytest.CaptureFixture) -> None:
    """They used to print two torch tracebacks, warn 'nothing to purge' and return the unpurged model."""
    model, sp = channel_sparse_convbn()
    model(torch.randn(4, 3, 8, 8))
    with pytest.raises(ConfigError) as info:
        sw.export(sp, purge=True, example_inputs=torch.randn(2, 8, 8))
    message = str(info.value)
    assert message.startswith("example_inputs of shape (2, 8, 8), float32 do not run through ConvBN (RuntimeError: ")
    expects = "it expects a tensor of shape (N, 3, 8, 8), float32 (as on its first forward)"
    assert message.endswith(f"{expects}: pass example_inputs= of that form")
    assert "\n" not in message and info.value.__cause__ is None
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    with pytest.raises(ConfigError, match=r"it expects a tensor of shape \(N, 3, 8, 8\), float32"):
        sw.export(sp, fold_bn=True, example_inputs=torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize(
    ("name", "bad", "expected"),
    [
        ("mlp", torch.randn(2, 5), r"a tensor of shape \(N, 12\) or \(N, \.\.\., 12\)"),
        ("conv_bn", torch.randn(2, 1, 8, 8), r"a tensor of shape \(N, 3, H, W\)"),
        ("conv1d_seq", torch.randn(2, 3, 16), r"a tensor of shape \(N, 4, L\)"),
        ("tied_lm", torch.randn(2, 5), r"integer token ids below 20"),
    ],
)
def test_without_a_record_the_expected_input_is_read_from_the_first_layer(name: str, bad, expected: str) -> None:
    model = ZOO[name][0]()
    sp = sw.sparsify(model, "magnitude", target=0.5)
    with pytest.raises(
        ConfigError, match=rf"^example_inputs of shape .* it expects {expected}.*: pass example_inputs="
    ):
        sw.export(sp, purge=True, example_inputs=bad)
    plain = sw.export(sp).train()
    with pytest.raises(ConfigError, match=rf"it expects {expected}"):
        purge(plain, bad)
    assert plain.training  # the check ran in eval mode and gave the flag back


def test_the_check_leaves_batchnorm_statistics_alone() -> None:
    model, sp = channel_sparse_convbn()
    model(torch.randn(4, 3, 8, 8))
    plain = sw.export(sp).train()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    result = purge(plain, torch.randn(2, 3, 8, 8))
    assert result.report.changed and plain.training
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())


def test_a_checkpoint_records_the_first_input_shape_in_its_recipe(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = sw.create_model("tests.zoo:ConvBN")
    sp = sw.sparsify(model, "magnitude", target=0.5, granularity="channel")
    model(torch.randn(4, 3, 8, 8))
    path = sw.save(sp, tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        header = json.loads(fh.metadata()["sparsewrap"])
    assert header["model"]["input_shape"] == [3, 8, 8]  # what `sparsewrap export --format pt2` reads
    assert header["controller"]["input"] == {"shape": [3, 8, 8], "dtype": "float32"}
    sw.save(sp, path, input_shape=(3, 16, 16))  # an explicit shape still wins
    with safe_open(str(path), framework="pt") as fh:
        assert json.loads(fh.metadata()["sparsewrap"])["model"]["input_shape"] == [3, 16, 16]

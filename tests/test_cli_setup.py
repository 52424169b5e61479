"""What `sparsewrap train` and `sparsewrap compare` share: the checks of the training options, the data and the
model recipe fitted to it, the default device."""

from __future__ import annotations

import pytest
import torch

from sparsewrap.cli.model_data import data_and_recipe, default_device
from sparsewrap.demo import data as swdata

from .test_train_cli import run

MODEL = ["--model", "sparsewrap.demo.models:lenet5"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--epochs", "0"], "Invalid value for --epochs: 0 uses no epochs; give a positive number of epochs"),
        (["--batch-size", "0"], "Invalid value for --batch-size: 0 uses no examples per batch"),
        (["--limit", "0"], "Invalid value for --limit: 0 uses no training examples"),
        (["--val-limit", "-3"], "Invalid value for --val-limit: -3 uses no validation examples"),
        (["--image-size", "0"], "Invalid value for --image-size: 0 uses no pixels"),
        (["--lr", "inf"], "Invalid value for --lr: inf must be a finite number >= 0, e.g. --lr 1e-3"),
        (["--weight-decay", "-1"], "Invalid value for --weight-decay: -1.0 must be a finite number >= 0"),
    ],
)  # fmt: skip
def test_train_and_compare_check_the_shared_options_alike_before_loading_data(capsys, tmp_path, monkeypatch,
                                                                              args, message):  # fmt: skip
    monkeypatch.setattr(swdata, "build_data", lambda *a, **k: pytest.fail("data loaded before the checks"))
    train = run(capsys, "train", *MODEL, "--method", "magnitude", "--target", "0.5", "--out", tmp_path / "t", *args)
    compare = run(capsys, "compare", *MODEL, "--methods", "magnitude", "--targets", "0.5", "--no-plot", "--out",
                  tmp_path / "c", *args)  # fmt: skip
    assert train[0] == compare[0] == 2
    assert message in train[2] and message in compare[2], (train[2], compare[2])
    assert train[2].split("Error: ", 1)[1] == compare[2].split("Error: ", 1)[1]  # the same line, word for word
    assert not (tmp_path / "t").exists() and not (tmp_path / "c").exists()


def test_the_recipe_is_fitted_to_the_data_and_takes_only_what_the_factory_accepts():
    train_data, recipe = data_and_recipe("mnist", "sparsewrap.demo.models:lenet5", 64, 32, 224, {})
    assert (len(train_data.train), len(train_data.val)) == (64, 32)
    assert (recipe.source, recipe.name) == ("factory", "sparsewrap.demo.models:lenet5")
    assert recipe.kwargs == {"num_classes": 10}  # lenet5 takes no in_chans
    assert recipe.input_shape == [1, 28, 28]
    _, timm = data_and_recipe("mnist", "timm:resnet18", 8, 8, 224, {"drop_rate": 0.1})
    assert timm.kwargs == {"num_classes": 10, "in_chans": 1, "drop_rate": 0.1}  # timm models take both


def test_the_default_device_is_cuda_only_where_there_is_one():
    assert default_device("cpu") == "cpu" and default_device("cuda:1") == "cuda:1"
    assert default_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")

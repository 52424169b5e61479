"""Fashion-MNIST (issue 19): the IDX reader, the hash check, the missing-files error, and the real set."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import pytest
import torch

from sparsewrap.cli import main
from sparsewrap.demo import fashion_mnist as fm
from sparsewrap.demo.data import MissingDataError, build_data
from sparsewrap.errors import ConfigError, SparsewrapError


def idx_bytes(values: torch.Tensor, type_code: int = 0x08, fmt: str = "B") -> bytes:
    """An IDX file written by hand: magic ``0 0 type ndim``, big-endian uint32 sizes, big-endian values."""
    head = bytes([0, 0, type_code, values.dim()]) + b"".join(struct.pack(">I", s) for s in values.shape)
    return head + struct.pack(f">{values.numel()}{fmt}", *values.flatten().tolist())


def write_set(root: Path, n_train: int = 6, n_test: int = 4) -> dict[str, bytes]:
    """A tiny Fashion-MNIST in the real format (gzipped IDX, the real names); returns each file's content."""
    g = torch.Generator().manual_seed(0)
    arrays = {
        "train-images-idx3-ubyte.gz": torch.randint(0, 256, (n_train, 28, 28), generator=g),
        "train-labels-idx1-ubyte.gz": torch.arange(n_train) % 10,
        "t10k-images-idx3-ubyte.gz": torch.randint(0, 256, (n_test, 28, 28), generator=g),
        "t10k-labels-idx1-ubyte.gz": (torch.arange(n_test) * 3) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    content = {}
    for name, values in arrays.items():
        content[name] = idx_bytes(values)
        (root / name).write_bytes(gzip.compress(content[name]))
    return content


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Path:
    """A tiny set whose recorded hashes are monkeypatched to its own."""
    root = tmp_path / "fashion"
    content = write_set(root)
    monkeypatch.setattr(fm, "FILES", {name: hashlib.sha256(data).hexdigest() for name, data in content.items()})
    return root


def test_parse_idx_reads_shape_and_big_endian_values():
    assert fm.parse_idx(idx_bytes(torch.tensor([[1, 2, 3], [250, 0, 7]]))).tolist() == [[1, 2, 3], [250, 0, 7]]
    wide = fm.parse_idx(idx_bytes(torch.tensor([1, -2, 70000]), 0x0C, "i"))
    assert wide.dtype == torch.int32 and wide.tolist() == [1, -2, 70000]  # 70000 = 0x00011170 read big-endian
    with pytest.raises(SparsewrapError, match="not an IDX file"):
        fm.parse_idx(b"\x1f\x8b\x08\x00")
    with pytest.raises(SparsewrapError, match=r"header \[2, 3\] needs 6"):
        fm.parse_idx(idx_bytes(torch.tensor([[1, 2, 3], [4, 5, 6]]))[:-1])


def test_reads_the_tiny_set_in_the_real_format(tiny):
    splits = fm.load_fashion_mnist(tiny)
    assert splits["train"].images.shape == (6, 28, 28) and splits["train"].images.dtype == torch.uint8
    assert splits["train"].labels.tolist() == [0, 1, 2, 3, 4, 5] and splits["train"].labels.dtype == torch.int64
    assert splits["test"].labels.tolist() == [0, 3, 6, 9]
    g = torch.Generator().manual_seed(0)
    assert torch.equal(splits["train"].images, torch.randint(0, 256, (6, 28, 28), generator=g).to(torch.uint8))
    x, y = splits["train"].dataset()[0]  # normalised with Fashion-MNIST's own statistics
    assert torch.allclose(x, (splits["train"].images[0].float() / 255 - 0.2860) / 0.3530) and int(y) == 0


def test_build_data_finds_the_set_in_a_search_dir(tiny, monkeypatch):
    monkeypatch.setattr(fm, "search_dirs", lambda: [tiny.parent / "absent", tiny])
    data = build_data("fashion-mnist", limit=4)
    assert len(data.train) == 4 and len(data.val) == 4 and data.num_classes == 10 and data.input_shape == (1, 28, 28)


def test_a_changed_file_is_refused_naming_it(tiny, monkeypatch):
    name = "t10k-labels-idx1-ubyte.gz"
    monkeypatch.setitem(fm.FILES, name, "0" * 64)
    with pytest.raises(SparsewrapError, match=rf"{name} has content sha256 [0-9a-f]{{64}}, expected 0{{64}}") as e:
        fm.load_fashion_mnist(tiny)
    assert "\n" not in str(e.value)


def test_missing_set_names_make_data_and_apt_get(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "search_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    wanted = r"not in .*a, .*b; run `make data`.*apt-get install dataset-fashion-mnist"
    with pytest.raises(MissingDataError, match=wanted):
        build_data("fashion-mnist")
    write_set(tmp_path / "a")
    (tmp_path / "a" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(MissingDataError, match=r"lacks t10k-images-idx3-ubyte.gz; run `make data`"):
        fm.load_fashion_mnist(tmp_path / "a")


def test_search_dirs_include_the_local_and_system_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dirs = fm.search_dirs()
    assert dirs[0] == tmp_path / ".data/usr/share/datasets/fashion-mnist"
    assert dirs[-1] == Path("/usr/share/datasets/fashion-mnist")


def test_unknown_data_spec_lists_fashion_mnist():
    with pytest.raises(ConfigError, match="'fashion-mnist'"):
        build_data("fashion")


def test_the_real_set_loads():
    try:
        fm.find_dir()
    except MissingDataError as exc:
        pytest.skip(f"Fashion-MNIST is not installed ({exc})")
    splits = fm.load_fashion_mnist()
    train, test = splits["train"], splits["test"]
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10 and test.labels.bincount().tolist() == [1000] * 10
    assert train.labels[:5].tolist() == [9, 0, 0, 3, 0]  # ankle boot, T-shirt, T-shirt, dress, T-shirt
    x = train.images.float() / 255
    assert x.mean().item() == pytest.approx(fm.MEAN, abs=1e-4) and x.std().item() == pytest.approx(fm.STD, abs=1e-4)


def cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, " ".join(err.split())


def test_train_command_takes_fashion_mnist(capsys, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "search_dirs", lambda: [tiny])
    argv = ["train", "--data", "fashion-mnist", "--model", "sparsewrap.demo.models:mlp_300_100", "--method",
            "magnitude", "--target", "0.5", "--epochs", "1", "--batch-size", "3",
            "--out", tmp_path / "run"]  # fmt: skip
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert "on fashion-mnist (6 training examples)" in out and (tmp_path / "run" / "last.safetensors").is_file()


def test_commands_without_the_set_name_make_data(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "search_dirs", lambda: [tmp_path / "none"])
    train = ["train", "--method", "magnitude", "--target", "0.5"]
    compare = ["compare", "--methods", "magnitude", "--targets", "0.5", "--no-plot"]
    for command in (train, compare):
        argv = [*command, "--data", "fashion-mnist", "--model", "sparsewrap.demo.models:mlp_300_100", "--out",
                tmp_path / command[0]]  # fmt: skip
        code, out, err = cli(capsys, *argv)
        assert code != 0 and "run `make data`" in err + out and "apt-get install dataset-fashion-mnist" in err + out

"""Built-in Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package: four gzipped IDX files, hash-checked.

``make data`` fetches the package without root (``apt-get download``, then ``dpkg-deb -x`` into the project's
``.data/``); ``apt-get install dataset-fashion-mnist`` puts the same files under ``/usr/share/datasets``. The
SHA-256 of each file's *decompressed* content is checked before it is used (the gzip wrapper differs between
Debian's copy and Zalando's download, the content does not), so a damaged or different set is refused rather
than silently trained on.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import SparsewrapError
from .splits import MissingDataError, Split

PACKAGE = "dataset-fashion-mnist"
PACKAGE_DIR = Path("usr/share/datasets/fashion-mnist")  # where the package puts the files, under / or .data/
SYSTEM_DIR = Path("/") / PACKAGE_DIR
LOCAL_DATA = ".data"  # `make data` extracts the package here (git-ignored)
INSTALL_HINT = f"run `make data` in the sparsewrap checkout (no root needed) or `sudo apt-get install {PACKAGE}`"

# SHA-256 of each file's decompressed IDX content (Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1)
FILES = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}  # fmt: skip
MEAN, STD = 0.2860, 0.3530  # of the training images, scaled to [0, 1]
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}  # IDX is big-endian


def search_dirs() -> list[Path]:
    """Where the files are looked for, in order: ``.data/`` of the current directory, ``.data/`` of the checkout
    this package was imported from (an editable install), then the system path of the Debian package."""
    checkout = Path(__file__).resolve().parents[2]
    local = [Path.cwd() / LOCAL_DATA / PACKAGE_DIR, checkout / LOCAL_DATA / PACKAGE_DIR]
    return list(dict.fromkeys([*local, SYSTEM_DIR]))


def find_dir(dirs: Sequence[Path] | None = None) -> Path:
    """The first of ``dirs`` (default :func:`search_dirs`) that holds all four files.

    Raises:
        MissingDataError: if none does (the message names ``make data`` and the ``apt-get install`` command).
    """
    dirs = search_dirs() if dirs is None else list(dirs)
    for d in dirs:
        if all((d / name).is_file() for name in FILES):
            return d
    partial = next((d for d in dirs if any((d / name).is_file() for name in FILES)), None)
    where = ", ".join(str(d) for d in dirs)
    if partial is not None:
        missing = next(name for name in FILES if not (partial / name).is_file())
        raise MissingDataError(f"Fashion-MNIST in {partial} lacks {missing}; {INSTALL_HINT}")
    raise MissingDataError(f"Fashion-MNIST is not in {where}; {INSTALL_HINT}")


def parse_idx(data: bytes, name: str = "IDX data") -> Tensor:
    """The array of an (uncompressed) IDX file: a 4-byte magic ``0 0 type ndim``, ``ndim`` big-endian uint32
    sizes, then the values in big-endian row-major order.

    Raises:
        SparsewrapError: for a bad magic number, an unknown type or a size that does not match the data.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise SparsewrapError(f"{name} is not an IDX file (magic {data[:4].hex()!r}, expected 0000<type><ndim>)")
    dtype, ndim = np.dtype(IDX_TYPES[data[2]]), data[3]
    head = 4 + 4 * ndim
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    count = int(np.prod(shape)) if shape else 1
    if len(data) < head or len(data) != head + count * dtype.itemsize:
        raise SparsewrapError(f"{name} holds {max(len(data) - head, 0)} bytes of values, its header {shape} needs "
                              f"{count * dtype.itemsize}; the file is damaged: {INSTALL_HINT}")  # fmt: skip
    values = np.frombuffer(data, dtype=dtype, count=count, offset=head)
    return torch.from_numpy(values.astype(dtype.newbyteorder("=")).reshape(shape))


def read_checked(path: Path, expected: str) -> Tensor:
    """The array of the gzipped IDX file ``path`` after checking its decompressed content's SHA-256.

    Raises:
        SparsewrapError: if the hash is not ``expected`` (naming the file) or the file is not gzipped IDX.
    """
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise SparsewrapError(f"{path} is not a gzip file ({exc}); {INSTALL_HINT}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise SparsewrapError(f"{path} has content sha256 {digest}, expected {expected}; the file is damaged or "
                              f"another data set: {INSTALL_HINT}")  # fmt: skip
    return parse_idx(data, str(path))


def load_fashion_mnist(root: str | Path | None = None) -> dict[str, Split]:
    """``{"train": Split(60000), "test": Split(10000)}`` (28×28 uint8 images, labels 0-9) from checked files.

    Args:
        root: the directory of the four ``.gz`` files (default: the first of :func:`search_dirs` holding them).

    Raises:
        MissingDataError: if the files are not found (the message names ``make data`` and ``apt-get install``).
        SparsewrapError: if a file's hash is not the recorded one (naming the file) or images and labels disagree.
    """
    return _load(find_dir(None if root is None else [Path(root)]))


@lru_cache(maxsize=1)
def _load(root: Path) -> dict[str, Split]:
    out = {}
    for split, (images_name, labels_name) in SPLITS.items():
        images = read_checked(root / images_name, FILES[images_name])
        labels = read_checked(root / labels_name, FILES[labels_name]).long()
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise SparsewrapError(f"{root / images_name} {list(images.shape)} and {labels_name} "
                                  f"{list(labels.shape)} do not pair up; {INSTALL_HINT}")  # fmt: skip
        out[split] = Split(images, labels, MEAN, STD)
    return out

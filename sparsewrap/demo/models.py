"""Small reference models of the papers, usable as ``--model sparsewrap.demo.models:<name>``.

- :func:`mlp_300_100`: LeNet-300-100 (784-300-100-10, ReLU), as in Louizos et al. 2018.
- :func:`lenet5`: LeNet-5-Caffe (conv 20, conv 50, both 5×5 with 2×2 max-pooling; fc 500; fc 10).
"""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """A ReLU multi-layer perceptron on flattened inputs."""

    def __init__(self, sizes: tuple[int, ...] = (784, 300, 100, 10)) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.fc3 = nn.Linear(sizes[2], sizes[3])
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.fc1(self.flatten(x)))
        return self.fc3(self.act(self.fc2(x)))


class LeNet5(nn.Module):
    """LeNet-5-Caffe for 1×28×28 inputs."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        return self.fc2(self.act(self.fc1(self.flatten(x))))


def mlp_300_100(num_classes: int = 10) -> MLP:
    """LeNet-300-100 for MNIST (266,610 parameters)."""
    return MLP((784, 300, 100, num_classes))


def lenet5(num_classes: int = 10) -> LeNet5:
    """LeNet-5-Caffe for MNIST (431,080 parameters)."""
    return LeNet5(num_classes)

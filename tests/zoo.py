"""The tiny model zoo every method and the purge are tested on (STYLE.md).

Each entry is ``name -> (factory, example_input_factory)``; inputs are small so that a forward/backward of any
model takes milliseconds. Models are plain user-style modules: nothing here knows about sparsewrap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class ConvBN(nn.Module):
    """conv + BN + ReLU + pool, twice, then flatten -> Linear -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 2 * 2, 20)
        self.head = nn.Linear(20, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.head(F.relu(self.fc(torch.flatten(x, 1))))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetTiny(nn.Module):
    """A stem, an identity residual block, a projection (1×1) residual block, global pool, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block1 = ResidualBlock(8, 8)
        self.block2 = ResidualBlock(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.head(torch.flatten(self.pool(x), 1))


class DepthwiseGrouped(nn.Module):
    """pointwise -> depthwise -> grouped conv -> pool -> head (MobileNet-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 12, 1)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.bn2 = nn.BatchNorm2d(12)
        self.grouped = nn.Conv2d(12, 8, 3, padding=1, groups=4)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu6(self.bn1(self.pw(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        x = F.relu(self.grouped(x))
        return self.head(x.mean((2, 3)))


class Concat(nn.Module):
    """Two branches concatenated along channels, then a conv over the concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 10, 1)
        self.merge = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        x = F.relu(self.merge(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    """Patch embedding, one pre-norm transformer block (attention + MLP), mean pool, head."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * 2)
        self.fc2 = nn.Linear(dim * 2, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


class TiedLM(nn.Module):
    """Embedding whose weight is tied to the output projection."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(tokens))))


class OwnParameter(nn.Module):
    """A user module with its own ``nn.Parameter`` used beside Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 16))
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)) * self.scale)


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 10)
        self.mid = nn.Linear(10, 10)
        self.cls = nn.Linear(10, 3)
        self.reg = nn.Linear(10, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.mid(F.relu(self.body(x))))
        return self.cls(h), self.reg(h)


class DictOut(TupleOut):
    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        logits, box = super().forward(x)
        return {"logits": logits, "box": box}


class ScaledLinear(nn.Linear):
    """A user subclass of nn.Linear defined outside torch.nn (as timm's ``Linear``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 0.5


class Conv1dSeq(nn.Module):
    """Conv1d + BatchNorm1d over a sequence, global pool, a user Linear subclass, head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 10, 3, padding=1)
        self.bn = nn.BatchNorm1d(10)
        self.conv2 = nn.Conv1d(10, 12, 3, padding=1, bias=False)
        self.fc = ScaledLinear(12, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv2(F.relu(self.bn(self.conv(x)))))
        return self.head(F.relu(self.fc(x.amax(-1))))


def _img(c: int = 3, s: int = 8) -> Callable[[], Tensor]:
    return lambda: torch.randn(4, c, s, s)


ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], Tensor]]] = {
    "mlp": (MLP, lambda: torch.randn(4, 12)),
    "conv_bn": (ConvBN, _img()),
    "resnet_tiny": (ResNetTiny, _img()),
    "depthwise_grouped": (DepthwiseGrouped, _img()),
    "concat": (Concat, _img()),
    "vit_block": (ViTBlock, _img(3, 8)),
    "tied_lm": (TiedLM, lambda: torch.randint(0, 20, (4, 5))),
    "own_parameter": (OwnParameter, lambda: torch.randn(4, 6)),
    "tuple_out": (TupleOut, lambda: torch.randn(4, 6)),
    "dict_out": (DictOut, lambda: torch.randn(4, 6)),
    "conv1d_seq": (Conv1dSeq, lambda: torch.randn(4, 4, 16)),
}


def outputs(out) -> list[Tensor]:
    """Flatten a model output (tensor, tuple or dict) into a list of tensors for comparisons."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return list(out)

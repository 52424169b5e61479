"""HashedNet (Chen et al. 2015, https://arxiv.org/abs/1504.04788): weights tied to a small trainable bank.

Each targeted layer of ``n`` weights gets a bank of ``m = round((1 - target) * n)`` values and a fixed random
map of its positions onto the bank (every bank value used ``floor`` or ``ceil(n / m)`` times), optionally a +-1
sign hash: ``w = bank[index] * sign`` (:class:`sparsewrap.parametrizations.hashed.Hashed`). The bank is the
parameter the optimizer sees; export writes the dense weights. Nothing is zeroed: the "sparsity" is the share
of free parameters removed, ``1 - m / n``, and ``sp.report()`` shows the bank size and the compression ``n / m``
(the exported weights themselves are dense).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ConfigError
from ...parametrizations import attach
from ...parametrizations.hashed import Hashed, coverage_index
from ..base import Method, register_method


@dataclass
class HashedNetConfig:
    """Options of ``method="hashednet"``.

    Attributes:
        sign: multiply each tied weight by a fixed random +-1 (HashedNet's sign hash; off in the DSR
            repository's baseline, which this follows by default).
        seed: seed of the index map and the signs.
    """

    sign: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.sign, bool):
            raise ConfigError(f"sign={self.sign!r} must be True or False (the +-1 sign hash)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} must be an int (the seed of the index map)")


@register_method
class HashedNet(Method):
    """HashedNet (see the module docstring)."""

    name = "hashednet"
    description = "HashedNet: each layer's weights tied to a trainable bank of (1 - target) * n values by a fixed map."
    Config = HashedNetConfig

    def attach(self) -> None:
        if not isinstance(self.target, float):
            raise ConfigError(
                f"method 'hashednet' takes one overall share of parameters removed, got target={self.target!r}; use "
                "include=/exclude= to choose layers"
            )
        sizes = [(t.name, t.shape, t.numel, round((1.0 - self.target) * t.numel)) for t in self.targets]
        for name, _shape, n, m in sizes:
            if m < 1:
                raise ConfigError(
                    f"method 'hashednet' with target={self.target} leaves layer {name!r} ({n} weights) a bank of 0 "
                    f"values; use a target below {1 - 0.5 / n:.6g} or exclude= the layer"
                )
        gen = torch.Generator().manual_seed(self.config.seed)
        self.sizes = [(n, m) for _name, _shape, n, m in sizes]
        self.layers = []
        for t, (_name, shape, _n, m) in zip(list(self.targets), sizes):
            index = coverage_index(shape, m, gen)
            sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1 if self.config.sign else None
            self.layers.append(attach(t.module, "weight", Hashed(index, sign, t.original, m), unsafe=True))

    def summary(self) -> dict[str, float]:
        dense = sum(n for n, _m in self.sizes)
        bank = sum(m for _n, m in self.sizes)
        return {"bank size": float(bank), "dense size": float(dense), "compression": dense / bank}

    def notes(self) -> list[str]:
        dense = sum(n for n, _m in self.sizes)
        bank = sum(m for _n, m in self.sizes)
        return [
            f"hashednet ties weights instead of zeroing them: {dense} weights share a bank of {bank} values "
            f"(compression {dense / bank:.2f}x); the exported weights are dense"
        ]

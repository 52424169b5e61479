"""Multiply-accumulate counts of Conv and Linear layers, measured with forward hooks on one example input.

Only Conv1d/2d/3d and Linear layers are counted (they dominate CNNs and MLPs); attention's activation-by-
activation matmuls, norms and activations are not. Counts are per example (batch 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .tracing import SPARSIFIABLE


@dataclass
class LayerMacs:
    """MACs of one layer for one example, and its output positions (spatial size, or tokens for Linear)."""

    macs: int
    positions: int


def layer_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, LayerMacs]:
    """``{module name: LayerMacs}`` for every Conv/Linear that runs on a ``(1, *input_shape)`` input."""
    found: dict[str, LayerMacs] = {}
    hooks = []

    def hook(name: str):
        def fn(module: nn.Module, _inputs, output) -> None:
            if name in found or not isinstance(output, torch.Tensor):
                return
            out = output
            if isinstance(module, nn.Linear):
                positions = out.numel() // (out.shape[0] * module.out_features) if out.dim() > 1 else 1
                positions = max(positions, 1)
                found[name] = LayerMacs(positions * module.out_features * module.in_features, positions)
            else:
                positions = math.prod(out.shape[2:])
                per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
                found[name] = LayerMacs(positions * module.out_channels * per_out, positions)

        return fn

    for name, module in model.named_modules():
        if isinstance(module, SPARSIFIABLE):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=p.dtype, device=p.device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def total_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Sum of :func:`layer_macs` over the model."""
    return sum(m.macs for m in layer_macs(model, input_shape).values())

"""The parametrization of a penalized weight: the identity while training, the export in eval mode.

A penalty method trains the plain model. Its weights still carry one :class:`Penalized` parametrization, for
three reasons:

- the learned coefficients λ are parameters of it, so they are in the model's ``state_dict`` (checkpoints,
  resume) and are trained by DDP's averaged gradients like the weights, and export drops them with the
  parametrization;
- in eval mode it multiplies the weight by the keep-mask of the method's final projection (an
  :class:`~sparsewrap.parametrizations.projection.EvalProjection`), so what one evaluates is what export
  writes;
- with ``finetune``, the method prunes at a step of the run by writing its hard mask, and from then on it is
  a :class:`~sparsewrap.parametrizations.Masked` in every respect (pruned weights frozen at zero, the
  optimizer's state zeroed there), with no change of the model's structure, so a checkpoint taken before the
  pruning step resumes past it.

Before the pruning step the training forward returns the original tensor itself (no copy, no hook): the
gradient is the plain model's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...parametrizations import Masked


class Penalized(Masked):
    """A weight of a penalty method: its coefficients, its (initially all-ones) hard mask.

    Args:
        like: the weight (its shape, dtype and device).
        lam_shape: shape of the weight's coefficients λ (``None``: none here, e.g. ``l1``, or a λ held by
            another layer's parametrization, as ``sws``'s shared one).
        bias_shape: shape of the coefficients of the layer's bias (``None``: the bias is not penalized here).
        lambda_init: the coefficients' initial value.
    """

    def __init__(self, like: Tensor, lam_shape: tuple[int, ...] | None = None,
                 bias_shape: tuple[int, ...] | None = None, lambda_init: float = 1.0) -> None:  # fmt: skip
        super().__init__(tuple(like.shape), like)
        self.pruned = False  # set by the method (its state_dict): the mask is in force from then on
        full = lambda shape: nn.Parameter(torch.full(shape, float(lambda_init), dtype=like.dtype, device=like.device))  # noqa: E731
        self.lam = full(lam_shape) if lam_shape is not None else None
        self.lam_bias = full(bias_shape) if bias_shape is not None else None

    def coefficients(self) -> list[nn.Parameter]:
        """The coefficients held here (trained by DDP's averaged gradients: no rank overwrites them)."""
        return [p for p in (self.lam, self.lam_bias) if p is not None]

    def forward(self, original: Tensor) -> Tensor:
        if self.pruned:
            return super().forward(original)
        if not self.training and self.final is not None:
            keep = self.final.factors(self)
            if keep is not None:
                return original * keep
        return original

    def settle(self, original: Tensor) -> None:
        if self.pruned:
            super().settle(original)

    def extra_repr(self) -> str:
        lam = "none" if self.lam is None else tuple(self.lam.shape)
        return f"lambda={lam}, bias_lambda={self.lam_bias is not None}, pruned={self.pruned}"

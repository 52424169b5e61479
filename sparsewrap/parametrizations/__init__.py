"""The parametrizations sparsewrap attaches with ``torch.nn.utils.parametrize``.

Four kinds (DESIGN.md): *masked* (this package's :class:`Masked`), *gated*, *soft-threshold* and *rewired*;
each is one file deriving from :class:`SparseParametrization`.
"""

from .base import SparseParametrization, attach, detach_all, generation, is_ours, wrapped_tensors
from .gated import ChannelGate, ChannelGated  # noqa: F401  (the gated kind, per channel)
from .gated_weight import GatedWeight  # noqa: F401  (the gated kind, per weight)
from .masked import Masked

__all__ = [
    "SparseParametrization",
    "Masked",
    "attach",
    "detach_all",
    "generation",
    "is_ours",
    "wrapped_tensors",
]

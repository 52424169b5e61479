"""Sparsification methods, one file each; importing this package registers them."""

from .base import Method, get_method, list_methods, make_config, register_method, unregister_method
from .dnw import DNW  # noqa: F401  (registers method 'dnw')
from .gmp import GMP  # noqa: F401  (registers method 'gmp')
from .l0.method import L0  # noqa: F401  (registers method 'l0')
from .magnitude import Magnitude
from .penalty import HALO, L1, SWS  # noqa: F401  (registers methods 'halo', 'l1', 'sws')
from .run import RunContext, reset_optimizer_state
from .soft_threshold import STR  # noqa: F401  (registers method 'str')

__all__ = [
    "Method",
    "register_method",
    "unregister_method",
    "get_method",
    "list_methods",
    "make_config",
    "Magnitude",
    "RunContext",
    "reset_optimizer_state",
]

"""Sparsification methods, one file each; importing this package registers them."""

from .base import Method, get_method, list_methods, make_config, register_method, unregister_method
from .l0 import L0  # noqa: F401  (registers method 'l0')
from .magnitude import Magnitude
from .run import RunContext, reset_optimizer_state

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

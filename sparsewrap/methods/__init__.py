"""Sparsification methods, one file each; importing this package registers them."""

from .base import Method, get_method, list_methods, make_config, register_method
from .l0 import L0  # noqa: F401  (registers method 'l0')
from .magnitude import Magnitude

__all__ = ["Method", "register_method", "get_method", "list_methods", "make_config", "Magnitude"]

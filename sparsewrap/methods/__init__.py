"""Sparsification methods, one file each; importing this package registers them."""

from .base import Method, get_method, list_methods, make_config, register_method, unregister_method
from .cs import ContinuousSparsification  # noqa: F401  (registers method 'cs')
from .dnw import DNW  # noqa: F401  (registers method 'dnw')
from .dst.basic import SET, RigL, Static  # noqa: F401  (registers methods 'set', 'rigl', 'static')
from .dst.deepr import DeepR  # noqa: F401  (registers method 'deepr')
from .dst.dsr import DSR  # noqa: F401  (registers method 'dsr')
from .dst.hashednet import HashedNet  # noqa: F401  (registers method 'hashednet')
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

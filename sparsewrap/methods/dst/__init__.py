"""Dynamic sparse training: a fixed budget of connections that moves during training (issue 17).

``static``, ``set``, ``rigl`` (:mod:`.basic`), ``deepr`` (:mod:`.deepr`), ``dsr`` (:mod:`.dsr`) and the tied-weight
``hashednet`` (:mod:`.hashednet`); the shared
machinery is in :mod:`.base`, :mod:`.distribution` and :mod:`.selection`. docs/methods/dst.md has the formulas.
"""

from .base import DSTConfig, DynamicSparse
from .basic import SET, RigL, Static
from .deepr import DeepR
from .dsr import DSR
from .hashednet import HashedNet

__all__ = ["DSTConfig", "DynamicSparse", "SET", "RigL", "Static", "DeepR", "DSR", "HashedNet"]

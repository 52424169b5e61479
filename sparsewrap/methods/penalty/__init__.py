"""Penalty methods ``l1``, ``sws`` and ``halo``: a loss term during training, one pruning to the exact target."""

from .coefficients import Penalized
from .config import HaloConfig, L1Config, SWSConfig
from .method import HALO, L1, SWS, PenaltyMethod

__all__ = ["HALO", "L1", "SWS", "PenaltyMethod", "Penalized", "HaloConfig", "L1Config", "SWSConfig"]

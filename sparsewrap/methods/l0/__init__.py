"""Constrained L0: hard-concrete gates per weight or per channel group under a Lagrangian constraint.

``method.py`` holds the method (config, penalty, dual ascent, bake), ``layout.py`` how gates map onto
weights and channel groups and the expected cost, ``constraints.py`` which layers share a budget and what is
reachable, ``projection.py`` the exact projection onto the target.
"""

from .method import L0, L0Config

__all__ = ["L0", "L0Config"]

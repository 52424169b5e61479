"""Lagrange multipliers for inequality constraints, updated by projected gradient ascent with dual restarts.

For constraints ``g_i(theta) <= 0`` the Lagrangian is ``L = f(theta) + sum_i lambda_i g_i(theta)`` with
``lambda_i >= 0``. The primal player descends ``L``; after each primal step the dual player ascends it
(simultaneous gradient descent-ascent, as Cooper's ``ConstrainedOptimizer``, Gallego-Posada et al. 2022,
https://arxiv.org/abs/2208.04425):

    lambda <- lambda + lr * g                    (plain SGD ascent on the defect)
    lambda_i <- 0   where g_i < 0                (dual restart: a satisfied constraint stops pulling)
    lambda <- max(lambda, 0)                     (projection onto the feasible multipliers)

Multipliers start at 0, one per constraint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError


class DualAscent:
    """The multipliers of ``n`` inequality constraints and their projected-ascent update.

    Args:
        n: number of constraints.
        lr: dual learning rate (``>= 0``).
        restarts: reset a multiplier to 0 as soon as its constraint is satisfied.

    Raises:
        ConfigError: if ``n < 1`` or ``lr < 0``.
    """

    def __init__(self, n: int, lr: float, restarts: bool = True) -> None:
        if n < 1:
            raise ConfigError(f"need at least one constraint, got n={n}")
        if lr < 0:
            raise ConfigError(f"dual_lr={lr} is negative; the dual learning rate must be >= 0 (e.g. 1e-3)")
        self.lr = float(lr)
        self.restarts = bool(restarts)
        self.value = torch.zeros(n, dtype=torch.float64)

    def __len__(self) -> int:
        return self.value.numel()

    def term(self, defect: Tensor) -> Tensor:
        """``sum_i lambda_i * g_i``: the multipliers' part of the Lagrangian (differentiable in the defect)."""
        lam = self.value.to(device=defect.device, dtype=defect.dtype)
        return (lam * defect).sum()

    def update(self, defect: Tensor) -> None:
        """One projected ascent step given the current defects ``g`` (constraint values; ``> 0`` is violated).

        Raises:
            ConfigError: if ``defect`` does not have one entry per constraint.
        """
        g = defect.detach().to(device=self.value.device, dtype=self.value.dtype).reshape(-1)
        if g.numel() != self.value.numel():
            raise ConfigError(f"got {g.numel()} defects for {self.value.numel()} constraints")
        lam = self.value + self.lr * g
        if self.restarts:
            lam = torch.where(g < 0, torch.zeros_like(lam), lam)
        self.value = lam.clamp_min(0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"multipliers": self.value.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            ConfigError: if the number of multipliers differs.
        """
        value = torch.as_tensor(state["multipliers"], dtype=torch.float64).reshape(-1).cpu()
        if value.numel() != self.value.numel():
            raise ConfigError(
                f"state has {value.numel()} multipliers, this problem has {self.value.numel()} constraints"
            )
        self.value = value.clone()

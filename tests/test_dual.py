"""Dual ascent on the Lagrange multipliers of constrained methods (``sparsewrap/methods/dual.py``), on scalars."""

from __future__ import annotations

import pytest
import torch

from sparsewrap.errors import ConfigError
from sparsewrap.methods.dual import DualAscent


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_dual_update_restart_and_projection():
    duals = DualAscent(1, lr=0.1, restarts=True)
    assert duals.value.item() == 0.0  # multipliers start at 0
    duals.update(t64(0.5))
    assert duals.value.item() == pytest.approx(0.05)
    duals.update(t64(0.2))
    assert duals.value.item() == pytest.approx(0.07)
    duals.update(t64(-0.01))  # feasible: restart to exactly 0
    assert duals.value.item() == 0.0
    plain = DualAscent(2, lr=0.1, restarts=False)
    plain.update(t64(0.5, 0.1))
    plain.update(t64(-0.1, -0.5))  # no restart: ascent, then projection onto lambda >= 0
    torch.testing.assert_close(plain.value, t64(0.04, 0.0))
    assert plain.term(t64(2.0, 3.0)).item() == pytest.approx(0.08)


def test_dual_state_round_trip_and_errors():
    duals = DualAscent(2, lr=0.5)
    duals.update(t64(1.0, 2.0))
    other = DualAscent(2, lr=0.5)
    other.load_state_dict(duals.state_dict())
    torch.testing.assert_close(other.value, t64(0.5, 1.0))
    with pytest.raises(ConfigError, match="dual_lr=-1"):
        DualAscent(1, lr=-1)
    with pytest.raises(ConfigError, match="3 multipliers"):
        DualAscent(1, lr=1).load_state_dict({"multipliers": t64(1, 2, 3)})
    with pytest.raises(ConfigError, match="2 defects for 1"):
        DualAscent(1, lr=1).update(t64(1, 2))

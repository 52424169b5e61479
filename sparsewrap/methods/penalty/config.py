"""Options of the penalty methods ``halo``, ``sws`` and ``l1``, each validated with a one-line error."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import ConfigError, choices
from ..schedules import StepSpec, check_steps

HIERARCHIES = ("l1", "l2")


def _real(name: str, value: Any, method: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"{name}={value!r} for method {method!r} must be a finite number, e.g. {name}=1e-4")
    return float(value)


def check_nonnegative(name: str, value: Any, method: str) -> None:
    """Refuse a value that is not a finite real ``>= 0``.

    Raises:
        ConfigError: naming the option, the value and a valid example.
    """
    if _real(name, value, method) < 0:
        raise ConfigError(f"{name}={value!r} for method {method!r} is negative; give {name} >= 0, e.g. {name}=1e-4")


@dataclass
class L1Config:
    """Options of ``method="l1"`` (shared by ``sws`` and ``halo``).

    Attributes:
        xi: ξ, the penalty's scale at the start of training (the controller steers it, see ``steer``).
        layerwise: prune each layer to the target instead of one global ranking of ``|w|``.
        finetune: fraction of the run left to train the masked model: the model is pruned to the target at step
            ``(1 - finetune) * total_steps`` and fine-tuned with the task loss alone. ``0`` prunes only at export.
        tol: a weight with ``|w| <= tol`` counts as near zero (the controller and the report).
        steer: steer ξ so that the near-zero fraction follows a cubic ramp to the target by the pruning step.
        steer_every: steps between two controller updates (an int step count or a fraction of the run).
        penalize_bias: also penalize the biases of the targeted layers (never pruned).
    """

    xi: float = 1e-4
    layerwise: bool = False
    finetune: float = 0.0
    tol: float = 1e-3
    steer: bool = True
    steer_every: StepSpec = 0.01
    penalize_bias: bool = False

    method: ClassVar[str] = "l1"  # for messages only (not an option)

    def __post_init__(self) -> None:
        m = self.method
        check_nonnegative("xi", self.xi, m)
        if isinstance(self.finetune, bool) or not isinstance(self.finetune, numbers.Real):
            raise ConfigError(f"finetune={self.finetune!r} for method {m!r} must be a fraction in [0, 1), e.g. 0.1")
        if not 0.0 <= float(self.finetune) < 1.0:
            raise ConfigError(
                f"finetune={self.finetune!r} for method {m!r} is outside [0, 1); it is the fraction of the run left "
                "to fine-tune after pruning, e.g. finetune=0.1 (0 prunes only at export)"
            )
        if _real("tol", self.tol, m) <= 0:
            raise ConfigError(f"tol={self.tol!r} for method {m!r} must be > 0; it is the near-zero bound, e.g. 1e-3")
        check_steps(self.steer_every, "steer_every")
        if self.steer_every in (0, 0.0):
            raise ConfigError(f"steer_every={self.steer_every!r} must be at least one step, e.g. steer_every=0.01")
        for flag in ("layerwise", "steer", "penalize_bias"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag}={getattr(self, flag)!r} for method {m!r} must be True or False")


@dataclass
class SWSConfig(L1Config):
    """Options of ``method="sws"``: those of ``l1`` and

    Attributes:
        psi: ψ, the scale of ``λ²`` in ``ξ Σ|w| / λ² + ψ λ²``.
        lambda_init: the initial λ (the shared coefficient).
        reg_schedule: ``(factor, every)``: ψ is multiplied by ``factor`` after every ``every`` steps (an int
            step count or a fraction of the run), as the seed's ``--reg_scheduler``; ``None`` keeps ψ fixed.
    """

    xi: float = 1e-4
    psi: float = 1e-4
    lambda_init: float = 1.0
    reg_schedule: tuple[float, StepSpec] | None = None
    method: ClassVar[str] = "sws"

    def __post_init__(self) -> None:
        super().__post_init__()
        m = self.method
        check_nonnegative("psi", self.psi, m)
        if _real("lambda_init", self.lambda_init, m) == 0:
            raise ConfigError(
                f"lambda_init=0 for method {m!r} divides by zero (the penalty is |w| / λ²); give e.g. lambda_init=1.0"
            )
        if self.reg_schedule is not None:
            rs = self.reg_schedule
            if not isinstance(rs, (tuple, list)) or len(rs) != 2:
                raise ConfigError(
                    f"reg_schedule={rs!r} for method {m!r} must be (factor, every), e.g. (10.0, 0.1): ψ x10 every "
                    "tenth of the run"
                )
            if _real("reg_schedule factor", rs[0], m) <= 0:
                raise ConfigError(f"reg_schedule factor {rs[0]!r} for method {m!r} must be > 0, e.g. (10.0, 0.1)")
            check_steps(rs[1], "reg_schedule every")
            if rs[1] in (0, 0.0):
                raise ConfigError(f"reg_schedule every={rs[1]!r} must be at least one step, e.g. (10.0, 0.1)")
            self.reg_schedule = (float(rs[0]), rs[1])


@dataclass
class HaloConfig(SWSConfig):
    """Options of ``method="halo"``: those of ``sws`` and

    Attributes:
        p: the ``p`` of ``R(λ) = |Σ|λ_j| - p|`` (or its square).
        hierarchy: ``"l1"`` for ``R = |Σ|λ_j| - p|`` (the seed's default), ``"l2"`` for ``(Σ|λ_j| - p)²``.
    """

    p: float = 0.0
    hierarchy: str = "l1"
    method: ClassVar[str] = "halo"

    def __post_init__(self) -> None:
        super().__post_init__()
        _real("p", self.p, self.method)
        if self.hierarchy not in HIERARCHIES:
            raise ConfigError(
                f"hierarchy={self.hierarchy!r} is unknown for method 'halo'; valid: {choices(HIERARCHIES)}"
            )

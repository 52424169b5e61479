"""Constrained L0's constraints: which targeted layers share a budget, what a weight costs, what is reachable.

Split from :mod:`.method` as one concept: a float target is one model-wise constraint, a ``{pattern:
sparsity}`` target one constraint per layer (the first matching pattern wins); a weight costs 1 (``budget=
"params"``) or its layer's output positions (``budget="macs"``); and the ``log_alpha`` clamp sets a floor on
the expected density that a target must stay above.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ...analysis.macs import layer_macs
from ...analysis.targets import Target, matcher
from ...errors import ConfigError, NoTargetsError
from .layout import GatedLayer


def constraints(
    target: float | dict[str, float] | None, targets: Sequence[Target], channel: bool
) -> tuple[dict[str, int], list[float | None]]:
    """The constraint of each targeted layer and the requested density of each constraint.

    Args:
        target: the method's sparsity target: a float (one constraint), ``{pattern: sparsity}`` (one per
            layer), or ``None`` (penalized mode: one constraint without a requested density).
        targets: the targeted layers.
        channel: whether the layers are channel-gated (for the error message).

    Returns:
        ``{layer name: constraint index}`` (layers no pattern matches are left out) and the densities.

    Raises:
        NoTargetsError: for a pattern matching no targeted layer.
    """
    if not isinstance(target, dict):
        density = None if target is None else 1.0 - float(target)
        return {t.name: 0 for t in targets}, [density]
    matchers = [(p, matcher(p), s) for p, s in target.items()]
    for pattern, fn, _s in matchers:
        if not any(fn(t.name, t.module) for t in targets):
            names = ", ".join(t.name for t in targets[:4]) + (", ..." if len(targets) > 4 else "")
            gran = " that can be channel-gated" if channel else ""
            raise NoTargetsError(
                f"layer-wise target pattern {pattern!r} matches no targeted layer{gran}; layers are named like "
                f"{names} (globs match the full name; use 're:<regex>' for a regular expression)"
            )
    constraint_of, densities = {}, []
    for t in targets:
        for _p, fn, sparsity in matchers:
            if fn(t.name, t.module):
                constraint_of[t.name] = len(densities)
                densities.append(1.0 - sparsity)
                break
    return constraint_of, densities


def layer_costs(
    model: nn.Module, targets: Sequence[Target], budget: str, input_shape: list[int] | None
) -> dict[str, float]:
    """Budget units per weight of each targeted layer: 1 for ``"params"``, its output positions for ``"macs"``
    (0 for a layer that does not run on ``input_shape``)."""
    if budget == "params":
        return {t.name: 1.0 for t in targets}
    found = layer_macs(model, input_shape)
    return {t.name: float(found[t.name].positions) if t.name in found else 0.0 for t in targets}


def check_floor(
    layers: Sequence[GatedLayer],
    densities: Sequence[float | None],
    totals: Sequence[float],
    p_min: float,
    log_alpha_max: float,
) -> None:
    """Check that every requested density is above what the ``log_alpha`` clamp lets the expected density reach.

    Raises:
        ConfigError: naming the constraint, the floor and the largest sparsity within reach.
    """
    floors = [0.0] * len(densities)
    for layer in layers:
        floors[layer.constraint] += layer.cost * (layer.floor(p_min) if layer.gated else layer.numel)
    for k, (floor, total, density) in enumerate(zip(floors, totals, densities)):
        if density is not None and density <= floor / total:
            where = "the model" if len(densities) == 1 else f"layer {constraint_name(layers, k)}"
            raise ConfigError(
                f"target sparsity {1 - density:.4g} is out of reach for {where}: with log_alpha clamped at "
                f"{-log_alpha_max:.4g} every gate keeps P(z != 0) >= {p_min:.4f}, so the expected "
                f"density cannot go below {floor / total:.4f}; ask for a sparsity below {1 - floor / total:.4f}, "
                "raise log_alpha_max, or use granularity='weight' if channel groups are left ungated"
            )


def constraint_name(layers: Sequence[GatedLayer], k: int) -> str:
    """The name of constraint ``k`` in messages: its layer's name when it covers one layer, else ``"model"``."""
    names = [la.name for la in layers if la.constraint == k]
    return names[0] if len(names) == 1 else "model"

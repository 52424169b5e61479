"""The method interface and the method registry.

A method is one file: a config dataclass and a :class:`Method` subclass registered with
:func:`register_method`. The controller (:class:`sparsewrap.Sparsifier`) calls only the hooks below, so the
loop, the CLI, save/load and export never change when a method is added. ``docs/methods-api.md`` describes
the hooks for the run's length, the optimizer, the dense gradient and methods that wrap nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..analysis.targets import Target
from ..analysis.tracing import ModelGraph
from ..errors import ConfigError, UnknownNameError, choices
from ..parametrizations import wrapped_tensors
from ..report import BudgetUpdate
from .run import RunContext
from .schedules import StepSpec

TargetSpec = float | dict[str, float]


class Method:
    """Base class of a sparsification method (the policy; the parametrizations hold the tensors).

    Subclasses set ``name``, ``description``, ``Config`` (a dataclass validated in ``__post_init__``) and
    implement :meth:`attach`; the other hooks have sensible defaults.

    Args:
        model: the model being sparsified (already analysed).
        targets: the layers to sparsify, in execution order.
        graph: the traced structure (channel groups) of the model.
        target: the requested sparsity: a float in (0, 1), a ``{pattern: sparsity}`` dict for methods that
            support layer-wise targets, or ``None`` for methods without a target.
        config: an instance of ``Config``.

    Attributes:
        run: what the controller knows of the training run (:class:`RunContext`: ``total_steps``,
            ``optimizer``), filled in by ``sp.start(...)`` before training; use :meth:`total_steps`,
            :meth:`resolve_steps` and :meth:`reset_optimizer_state` rather than reading it directly.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type] = type(None)
    needs_target: ClassVar[bool] = True
    # False for methods that parametrize nothing during training (penalty methods): their bake() names plain
    # module tensors, which export writes all the same
    wraps_targets: ClassVar[bool] = True

    def __init__(self, model: nn.Module, targets: list[Target], graph: ModelGraph, target: TargetSpec | None,
                 config: Any) -> None:  # fmt: skip
        self.model = model
        self.targets = targets
        self.graph = graph
        self.target = target
        self.config = config
        self.run = RunContext()

    # -- lifecycle hooks --------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Register parametrizations on the targets (and their companions)."""
        raise NotImplementedError

    def penalty(self) -> Tensor | None:
        """The term to add to the loss (``None`` when the method has none)."""
        return None

    def step(self, t: int) -> None:
        """Called after each optimizer step; ``t`` counts the steps taken before this call."""

    def on_start(self) -> None:
        """Called by ``sp.start(...)`` once the run's length and optimizer are known (each time it is called):
        resolve step options given as fractions of the run here, so that a bad value fails before training."""

    def dense_grad_step(self, t: int) -> bool:
        """Whether the method needs the dense gradient of step ``t`` (the backward before ``step(t)``).

        On such steps every sparsewrap parametrization of the model records the gradient of its effective
        tensor, unmasked (``dense_grads()`` in ``step(t)``); on the others nothing is recorded and nothing costs.
        Must not depend on anything but ``t``, the config and the run's length.
        """
        return False

    def dense_grads(self) -> dict[tuple[str, str], Tensor]:
        """``{(module name, tensor name): dense gradient}`` recorded on this step (empty on other steps)."""
        return {(m, t): p.dense_grad for m, _mod, t, p in wrapped_tensors(self.model) if p.dense_grad is not None}

    # -- the run: its length and its optimizer ----------------------------------------------------------------
    def total_steps(self) -> int:
        """The run's length in steps.

        Raises:
            ConfigError: if the controller was not told it, naming the fix (``sp.start(total_steps=...)``).
        """
        return self.run.require_total_steps(self.name)

    def resolve_steps(self, value: StepSpec, option: str) -> int:
        """A step option (an int step count, or a float fraction of the run) as a step number.

        Raises:
            ConfigError: on an invalid value, or a fraction when the run's length is unknown.
        """
        return self.run.resolve_steps(value, option, self.name)

    def reset_optimizer_state(self, param: Tensor, index_mask: Tensor) -> None:
        """Zero the optimizer's per-weight state (momentum, Adam moments) of ``param`` where ``index_mask``.

        Raises:
            ConfigError: if the controller was not told the optimizer, or does not know its state.
        """
        self.run.reset_optimizer_state(param, index_mask, self.name)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups for the method's own parameters, each with a ``"name"`` and its defaults."""
        return []

    def method_parameters(self) -> list[nn.Parameter]:
        """Every parameter owned by the method (excluded from the weights group)."""
        return [p for g in self.parameter_groups() for p in g["params"]]

    def bake(self) -> dict[tuple[str, str], Tensor]:
        """The final tensors export writes, keyed by ``(module name, tensor name)``.

        The default is each parametrization's deterministic forward; methods whose final mask needs a
        projection to hit the target exactly override this. It must not modify the live model.
        """
        return {(m, t): p.bake(mod.parametrizations[t].original) for m, mod, t, p in wrapped_tensors(self.model)}

    def summary(self) -> dict[str, float]:
        """Method-specific figures for the report (multipliers, thresholds, ...)."""
        return {}

    def notes(self) -> list[str]:
        """Remarks for the report: what could not be sparsified as asked, and why."""
        return []

    def budget_history(self) -> list[BudgetUpdate]:
        """The connections moved per update and each layer's active count over time, for the report and the
        training figure (dynamic sparse training); empty for methods whose connections do not move."""
        return []

    def requested_sparsity(self) -> float | None:
        """Overall requested sparsity of the targeted weights, if the method has one."""
        return self.target if isinstance(self.target, float) else None

    def state_dict(self) -> dict[str, Any]:
        """Controller state beyond the model's ``state_dict`` (tensors or JSON-able values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    @staticmethod
    def zero(model: nn.Module) -> Tensor:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a method class by its ``name`` (usable as a decorator).

    Raises:
        ConfigError: if the name is empty or already registered, or ``Config`` is not a dataclass.
    """
    if not cls.name or not isinstance(cls.name, str):
        raise ConfigError(f"{cls.__qualname__} needs a non-empty class attribute 'name'")
    if cls.name in _REGISTRY:
        raise ConfigError(f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__qualname__})")
    if not dataclasses.is_dataclass(cls.Config):
        raise ConfigError(f"{cls.__qualname__}.Config must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> type[Method]:
    """Remove the method registered as ``name`` (plugins and tests that register one for a while).

    Raises:
        UnknownNameError: listing the registered names.
    """
    cls = get_method(name)
    del _REGISTRY[name]
    return cls


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``.

    Raises:
        UnknownNameError: listing the registered names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(f"unknown method {name!r}; registered methods: {choices(_REGISTRY)}") from None


def list_methods() -> dict[str, str]:
    """``{name: one-line description}`` of every registered method, sorted by name."""
    return {n: _REGISTRY[n].description for n in sorted(_REGISTRY)}


def make_config(cls: type[Method], options: dict[str, Any]) -> Any:
    """Build ``cls.Config`` from keyword options, naming the valid ones when an option is unknown.

    Raises:
        ConfigError: on an unknown option or an invalid value.
    """
    valid = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for method "
            f"{cls.name!r}; valid options: {choices(valid) or '(none)'}"
        )
    try:
        return cls.Config(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for method {cls.name!r}: {exc}") from exc

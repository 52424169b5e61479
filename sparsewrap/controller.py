"""``sparsify()`` and the :class:`Sparsifier` controller it returns."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .analysis.inputs import InputRecord, watch_first_input
from .analysis.targets import Patterns, check_model, select_targets
from .analysis.tracing import analyse
from .errors import ConfigError, choices
from .methods import Method, get_method, make_config
from .parametrizations import Masked, SparseParametrization, generation, wrapped_tensors
from .report import LayerReport, Report, count_nonzero
from .train import collectives, distributed

CONTROLLER_ATTR = "_sparsewrap_controller"


@dataclass
class Spec:
    """Everything needed to redo a :func:`sparsify` call (recorded in checkpoints)."""

    method: str
    target: float | dict[str, float] | None
    options: dict[str, Any] = field(default_factory=dict)
    include: list[str] | None = None
    exclude: list[str] | None = None
    layers: list[str] = field(default_factory=list)  # the resolved targets, so a reload picks the same ones


def _check_fraction(name: str, value: Any, zeroed: bool = True) -> float:
    """``value`` as a float in (0, 1): a fraction of targeted weights that are zero (``zeroed``) or kept."""
    meaning = f"the fraction of targeted weights that are {'zeroed' if zeroed else 'kept'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = f"{name}=float(...)" if isinstance(value, Tensor) else f"{name}=0.7"
        raise ConfigError(
            f"{name}={value!r} is a {type(value).__name__}, not a number; {name} is {meaning}, a float in (0, 1): "
            f"give e.g. {hint}"
        )
    if not 0.0 < float(value) < 1.0:
        raise ConfigError(f"{name}={value!r} is outside (0, 1); {name} is {meaning}, e.g. {name}=0.7")
    return float(value)


def _check_layer_fraction(name: str, value: Any, zeroed: bool) -> float:
    """A per-layer entry of a dict target: a sparsity in ``[0, 1)`` (0 leaves the layer dense) or a density in
    ``(0, 1]``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value) == (0.0 if zeroed else 1.0):
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not 0.0 < float(value) < 1.0:
        span, dense = ("[0, 1)", "0") if zeroed else ("(0, 1]", "1")
        raise ConfigError(
            f"{name}={value!r} is outside {span}; {name} is the fraction of targeted weights that are "
            f"{'zeroed' if zeroed else 'kept'} in that layer, a float in {span} ({dense} leaves it dense), e.g. "
            f"{name}=0.7"
        )
    return _check_fraction(name, value, zeroed)


def resolve_target(target: Any, density: Any) -> float | dict[str, float] | None:
    """Turn ``target=`` (sparsity) or ``density=`` into a sparsity, float or ``{pattern: sparsity}``.

    Raises:
        ConfigError: if both are given, a value is not a real number (a string, a bool, a tensor) or a value is
            outside (0, 1) (a dict's per-layer sparsity may be 0, its density 1: that layer stays dense).
    """
    if target is not None and density is not None:
        raise ConfigError(f"give target= (sparsity) or density= (1 - sparsity), not both (got {target}, {density})")
    if target is None and density is None:
        return None
    name, value = ("target", target) if target is not None else ("density", density)
    zeroed = name == "target"
    if isinstance(value, dict):
        if not value:
            raise ConfigError(f"{name}= is an empty dict; give {{layer pattern: fraction}}")
        out = {str(k): _check_layer_fraction(f"{name}[{k!r}]", v, zeroed) for k, v in value.items()}
        return out if zeroed else {k: 1.0 - v for k, v in out.items()}
    frac = _check_fraction(name, value, zeroed)
    return frac if zeroed else 1.0 - frac


class Sparsifier:
    """Controls a sparsified model: loss term, per-step updates, optimizer groups, reports, state.

    Created by :func:`sparsify`; ``.model`` is the (in-place) wrapped model.
    """

    def __init__(self, model: nn.Module, method: Method, spec: Spec) -> None:
        self.model = model
        self.method = method
        self.spec = spec
        self.step_count = 0
        self.input: InputRecord | None = None  # the first forward's input (sparsewrap.analysis.inputs)
        self.input_recorder = None
        self._capturing: list[SparseParametrization] = []  # recording the dense gradient this step
        self._masked: tuple[int, list[tuple[Masked, nn.Module]]] | None = None  # (generation, [(mask, its list)])
        self._arm_dense_grad()

    @property
    def targets(self) -> list:
        return self.method.targets

    @property
    def total_steps(self) -> int | None:
        """The run's length given to :meth:`start` (``None`` until then)."""
        return self.method.run.total_steps

    @property
    def optimizer(self) -> Optimizer | None:
        """The optimizer given to :meth:`start` (``None`` until then)."""
        return self.method.run.optimizer

    def start(self, total_steps: int | None = None, optimizer: Optimizer | None = None) -> Sparsifier:
        """Tell the controller about the training run, once before training (``sw.fit`` does it).

        Methods with phases lay them over ``total_steps`` (options given as fractions of the run), methods that
        regrow weights reset those entries' state in ``optimizer``. Calling it again (e.g. when resuming) replaces both.

        Args:
            total_steps: how many times :meth:`step` will be called in the whole run (epochs x batches).
            optimizer: the optimizer that steps the model (built from :meth:`param_groups`).

        Returns:
            The controller itself.

        Raises:
            ConfigError: on a non-positive ``total_steps``, something that is not a ``torch.optim.Optimizer``,
                or a method option that the run's length makes invalid.
        """
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):  # fmt: skip
            raise ConfigError(f"total_steps={total_steps!r} must be a positive int (epochs x batches per epoch)")
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        run = self.method.run
        run.total_steps, run.optimizer = total_steps, optimizer
        self.method.on_start()
        self._arm_dense_grad()
        return self

    def penalty(self) -> Tensor:
        """The method's loss term (a zero scalar for methods without one); add it to the task loss."""
        p = self.method.penalty()
        return p if p is not None else self.method.zero(self.model)

    def step(self) -> None:
        """Advance schedules, multipliers and masks; call once after each ``optimizer.step()``.

        Afterwards every pruned weight of a hard mask is exactly zero, whatever the optimizer wrote there
        (:meth:`settle`; in a distributed run, :func:`sparsewrap.train.distributed.sync_sparsity` does it once rank 0's
        masks have arrived, so that no rank zeroes weights under a mask of its own). In a distributed run the
        dense gradients a method asked for are averaged over the ranks before ``method.step``.
        """
        ctx = distributed.current()
        if ctx is not None and self._capturing:  # every rank chooses from the whole batch's dense gradient
            collectives.average_tensors([p.dense_grad for p in self._capturing if p.dense_grad is not None])
        self.method.step(self.step_count)
        self.step_count += 1
        if ctx is None:
            self.settle()
        self._arm_dense_grad()

    def settle(self) -> None:
        """Zero the pruned entries of every hard-masked original that anything wrote to since it was last clean
        (one in-place pass for those only; none after a step of the optimizer given to :meth:`start`)."""
        gen = generation()
        if self._masked is None or self._masked[0] != gen:  # walking the modules costs more than settling
            found = [
                (p, mod.parametrizations[t]) for _m, mod, t, p in wrapped_tensors(self.model) if isinstance(p, Masked)
            ]
            self._masked = (gen, found)
        for p, plist in self._masked[1]:
            p.settle(plist.original)

    def _arm_dense_grad(self) -> None:
        """Record the dense gradient in the coming step if the method asks for it; stop the last step's."""
        for p in self._capturing:
            p.stop_dense_grad()
        self._capturing = []
        if self.method.dense_grad_step(self.step_count):
            self._capturing = [p for _m, _mod, _t, p in wrapped_tensors(self.model)]
            for p in self._capturing:
                p.start_dense_grad()

    def param_groups(self, lr: float | None = None, **overrides: Any) -> list[dict[str, Any]]:
        """Parameter groups for any ``torch.optim`` optimizer.

        The first group, ``"weights"``, holds every model parameter that is not the method's own; then one
        group per kind of method parameter (gates, thresholds, ...) with the method's defaults (e.g. no weight
        decay). ``lr`` sets the weights' learning rate (and the others' unless the method fixes its own);
        ``overrides`` are either a group name mapped to a dict (``gates={"lr": 6.0}``) or a scalar setting
        applied to the weights group (``weight_decay=5e-4``).

        Every group is left to the optimizer's own settings; ``gates={"fused": True}`` asks torch's SGD, Adam,
        AdamW and Adagrad for their fused update of the gates (``bench/gate_update.py`` times it).

        Raises:
            ConfigError: on an unknown group name or a negative learning rate.
        """
        own = self.method.parameter_groups()
        own_ids = {id(p) for g in own for p in g["params"]}
        weights = {"name": "weights", "params": [p for p in self.model.parameters() if id(p) not in own_ids]}
        groups = [weights] + [dict(g) for g in own]
        by_name = {g["name"]: g for g in groups}
        if lr is not None:
            for g in groups:
                g.setdefault("lr", lr)
            weights["lr"] = lr
        for key, value in overrides.items():
            if isinstance(value, dict):
                if key not in by_name:
                    raise ConfigError(f"param_groups: no group named {key!r}; groups: {choices(by_name)}")
                by_name[key].update(value)
            else:
                weights[key] = value
        for g in groups:
            if g.get("lr") is not None and g["lr"] < 0:
                raise ConfigError(f"learning rate of group {g['name']!r} is {g['lr']}; it must be >= 0")
        return [g for g in groups if g["params"]]

    def sparsity(self) -> float:
        """Current overall sparsity of the targeted weights (deterministic, eval-mode form)."""
        return self.report(exported=False).achieved

    def report(self, exported: bool = True) -> Report:
        """Per-layer and overall requested vs achieved sparsity (``exported=False`` skips the projection)."""
        current = {(m, t): p.bake(mod.parametrizations[t].original) for m, mod, t, p in wrapped_tensors(self.model)}
        final = self.method.bake() if exported else current
        layers = []
        for t in self.targets:
            key = (t.name, "weight")
            now = current.get(key, t.original)
            # the effective weight's shape: an original may be smaller than the weight (HashedNet's bank)
            layers.append(LayerReport(t.name, tuple(now.shape), now.numel(), count_nonzero(now),
                                      count_nonzero(final.get(key, now))))  # fmt: skip
        return Report(self.spec.method, self.method.requested_sparsity(), self.step_count, layers,
                      self.method.summary(), self.method.notes(), self.method.budget_history())  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Controller state: step counter and the method's own state (the model holds masks and gates)."""
        state = {"step": self.step_count, "method": self.method.state_dict()}
        return state | ({"input": self.input.to_dict()} if self.input is not None else {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state.get("step", 0))
        self.method.load_state_dict(state.get("method", {}))
        self.input = InputRecord.from_dict(state.get("input")) or self.input
        self._arm_dense_grad()

    def __repr__(self) -> str:
        return (f"Sparsifier(method={self.spec.method!r}, target={self.spec.target!r}, "
                f"layers={len(self.targets)}, step={self.step_count})")  # fmt: skip


def _patterns_for_spec(patterns: Patterns) -> list[str] | None:
    if patterns is None:
        return None
    items = [patterns] if isinstance(patterns, str) or callable(patterns) else list(patterns)
    return [p for p in items if isinstance(p, str)] if all(isinstance(p, str) for p in items) else None


def sparsify(model: nn.Module, method: str, target: Any = None, density: Any = None, *,
             include: Patterns = None, exclude: Patterns = None, **options: Any) -> Sparsifier:  # fmt: skip
    """Make ``model`` sparse with ``method``, in place, and return its controller.

    Args:
        model: any ``nn.Module`` (timm models included); modified in place.
        method: a registered method name (``sparsewrap methods`` lists them).
        target: requested sparsity in (0, 1): the fraction of targeted weights that are zero after export.
            Some methods also accept ``{layer pattern: sparsity}``.
        density: ``1 - target``; give one of the two.
        include: glob (``"layer1.*"``), ``"re:<regex>"`` or callable selecting layers (default: every
            Conv/Linear except the classifier head).
        exclude: patterns removed from the selection.
        **options: the method's options (see its ``Config``).

    Returns:
        The :class:`Sparsifier` controlling the model.

    Raises:
        UnknownNameError: for an unknown method.
        ConfigError: for a bad target, an unknown option or an invalid option value.
        NoTargetsError: if a pattern matches no layer.
    """
    cls = get_method(method)
    sparsity = resolve_target(target, density)
    if sparsity is None and cls.needs_target:
        raise ConfigError(f"method {method!r} needs target= (sparsity in (0, 1)) or density=")
    config = make_config(cls, options)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    check_model(model)
    previous = getattr(model, CONTROLLER_ATTR, None)  # a method that wraps nothing leaves only its controller
    if any(True for _ in wrapped_tensors(model)) or (previous is not None and not previous.method.wraps_targets):
        raise ConfigError(
            f"{type(model).__name__} is already sparsified; export it first (sparsewrap.export) or start from a "
            "fresh model"
        )
    graph = analyse(model)
    targets = select_targets(model, graph, include, exclude)
    impl = cls(model, targets, graph, sparsity, config)
    with torch.no_grad():
        impl.attach()
    spec = Spec(method, sparsity, dataclasses.asdict(config), _patterns_for_spec(include), _patterns_for_spec(exclude),
                [t.name for t in targets])  # fmt: skip
    controller = Sparsifier(model, impl, spec)
    object.__setattr__(model, CONTROLLER_ATTR, controller)
    watch_first_input(controller)
    return controller


def controller_of(obj: nn.Module | Sparsifier) -> tuple[nn.Module, Sparsifier | None]:
    """``(model, sparsifier or None)`` for a model or a Sparsifier."""
    if isinstance(obj, Sparsifier):
        return obj.model, obj
    if isinstance(obj, nn.Module):
        return obj, getattr(obj, CONTROLLER_ATTR, None)
    raise ConfigError(f"expected an nn.Module or a Sparsifier, got {type(obj).__name__}")

"""How to rebuild a model from a checkpoint: a timm architecture or an import path, plus kwargs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, SparsewrapError
from .trust import check_timm_kwargs, register_factory, resolve_factory

RECIPE_ATTR = "_sparsewrap_recipe"


@dataclass
class ModelRecipe:
    """A JSON-able description of how to build a model.

    Attributes:
        source: ``"timm"`` (``name`` is a timm architecture) or ``"factory"`` (``name`` is ``pkg.mod:callable``).
        name: the architecture or import path.
        kwargs: keyword arguments (JSON values only) that shape the model, e.g. ``{"num_classes": 10}``.
        input_shape: the shape of one input without the batch dim, when known (used by ``pt2`` export).
    """

    source: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: list[int] | None = None

    @classmethod
    def parse(cls, spec: str, **kwargs: Any) -> ModelRecipe:
        """``"timm:resnet18"`` or ``"pkg.mod:factory"`` into a recipe.

        Raises:
            ConfigError: if ``spec`` has neither form.
        """
        if spec.startswith("timm:"):
            return cls("timm", spec[5:], kwargs)
        if ":" in spec and all(spec.split(":", 1)):
            return cls("factory", spec, kwargs)
        raise ConfigError(
            f"model {spec!r} is not understood; accepted forms: 'timm:<architecture>' (e.g. timm:resnet18) "
            "or 'package.module:factory' (a callable returning an nn.Module)"
        )

    def build(self, trust_factory: bool = False, origin: str = "this recipe") -> nn.Module:
        """Build a fresh model (random init; never downloads weights).

        A recipe read from a file is untrusted input (see :mod:`sparsewrap.io.trust`): a timm architecture is
        built only with allow-listed kwargs, and a ``pkg.mod:fn`` factory is imported only if it is registered
        or ``trust_factory`` is true.

        Args:
            trust_factory: the caller chose this recipe (code, command line) or trusts the file it came from.
            origin: where the recipe came from, for the refusal message (e.g. the checkpoint's path).

        Raises:
            ConfigError: if the architecture or factory cannot be found or fails, or a timm keyword is refused.
            CheckpointError: if the factory is neither registered nor trusted (nothing is imported or called).
        """
        check_model_kwargs(self.kwargs)
        if self.source == "timm":
            import timm

            kwargs = check_timm_kwargs(self.name, self.kwargs, trust_factory)
            if self.name not in timm.list_models():
                raise ConfigError(f"timm has no architecture {self.name!r}; see timm.list_models('*pattern*')")
            model = _call(f"timm:{self.name}", lambda: timm.create_model(self.name, pretrained=False, **kwargs),
                          kwargs)  # fmt: skip
        elif self.source == "factory":
            factory = resolve_factory(self.name, trust_factory, origin)
            model = _call(self.name, lambda: factory(**self.kwargs), self.kwargs)
            if not isinstance(model, nn.Module):
                raise ConfigError(f"factory {self.name!r} returned {type(model).__name__}, not an nn.Module")
        else:
            raise CheckpointError(f"unknown model source {self.source!r} in recipe (expected 'timm' or 'factory')")
        setattr(model, RECIPE_ATTR, self)
        return model

    def default_input_shape(self) -> list[int] | None:
        if self.input_shape:
            return list(self.input_shape)
        if self.source == "timm":
            import timm

            cfg = timm.get_pretrained_cfg(self.name)
            size = cfg.input_size if cfg is not None else None
            if size:
                in_chans = self.kwargs.get("in_chans", size[0])
                img = self.kwargs.get("img_size")
                hw = [img, img] if isinstance(img, int) else list(img) if img else list(size[1:])
                return [in_chans, *hw]
        return None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRecipe:
        """The recipe of a checkpoint's header.

        Raises:
            ConfigError: if a field has the wrong type (a damaged or hand-edited header).
        """
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not isinstance(d.get("kwargs", {}), dict):
            raise ConfigError(f"the model recipe {json.dumps(d)[:200]} is malformed (expected source, name, kwargs)")
        return cls(d["source"], d["name"], dict(d.get("kwargs") or {}), d.get("input_shape"))


def rebuild_model(recipe: dict[str, Any] | None, path: Any, trust_factory: bool = False) -> nn.Module:
    """Build the model a file's recipe describes (a checkpoint's ``model``, a purged file's ``recipe``).

    Args:
        recipe: the recipe as the file records it (``None`` or empty when it records none).
        path: the file, for the messages and as the origin a refused factory names.
        trust_factory: import and call the ``pkg.mod:fn`` factory the recipe names (see :meth:`ModelRecipe.build`).

    Raises:
        CheckpointError: if there is no recipe, or it is malformed or cannot be built.
    """
    if not recipe:
        raise CheckpointError(f"{path} records no model recipe; pass model=<a fresh instance of the architecture>")
    try:
        return ModelRecipe.from_dict(recipe).build(trust_factory, origin=str(path))
    except (ConfigError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model from its recipe: {exc}") from exc


def create_model(spec: str, **kwargs: Any) -> nn.Module:
    """Build ``"timm:<arch>"`` or ``"pkg.mod:factory"`` with ``kwargs`` and remember the recipe on the model,
    so that :func:`sparsewrap.save` can record how to rebuild it.

    A ``pkg.mod:factory`` named here is the caller's own choice: it is called, and registered
    (:func:`sparsewrap.register_factory`) so that this program may load the checkpoints it saves from it.

    Raises:
        ConfigError: if the spec is malformed, the architecture unknown, or the factory fails.
    """
    recipe = ModelRecipe.parse(spec, **kwargs)
    model = recipe.build(trust_factory=True)  # the caller named this factory: their own choice
    if recipe.source == "factory":
        register_factory(recipe.name)  # so this program may load the files it saves from this model
    return model


def check_model_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse a ``num_classes`` or ``in_chans`` that is not a positive integer (e.g. ``--model-kw num_classes=abc``).

    Raises:
        ConfigError: naming the keyword and its value.
    """
    for key in ("num_classes", "in_chans"):
        value = kwargs.get(key)
        if key in kwargs and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"model keyword {key}={value!r} must be a non-negative integer, e.g. {key}=10")


def _call(name: str, make: Callable[[], Any], kwargs: dict[str, Any]) -> Any:
    """``make()``, with any error turned into one line naming the factory and its kwargs."""
    try:
        return make()
    except SparsewrapError:
        raise
    except Exception as exc:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no keyword arguments"
        raise ConfigError(
            f"model factory {name!r} failed with {args}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}; "
            "check the model name and its keyword arguments (CLI: --model, --model-kw)"
        ) from exc


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    from ..parametrizations import wrapped_tensors

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for mname, _mod, tname, _p in wrapped_tensors(model):
        prefix = f"{mname}.parametrizations.{tname}."
        for key in [k for k in shapes if k.startswith(prefix)]:
            shape = shapes.pop(key)
            if key == prefix + "original":
                shapes[f"{mname}.{tname}" if mname else tname] = shape
    return shapes


def recipe_for(model: nn.Module) -> ModelRecipe | None:
    """The recipe recorded on ``model`` by :func:`create_model`, or one inferred for a timm model.

    An inferred timm recipe (architecture from ``pretrained_cfg``, ``num_classes``, ``in_chans``) is only
    returned if a model built from it on the meta device has exactly the same state-dict keys and shapes.
    """
    recipe = getattr(model, RECIPE_ATTR, None)
    if isinstance(recipe, ModelRecipe):
        return recipe
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not arch:
        return None
    kwargs: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != 3:
        kwargs["in_chans"] = first.in_channels
    candidate = ModelRecipe("timm", arch, kwargs)
    try:
        import timm

        with torch.device("meta"):
            fresh = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception:
        return None
    return candidate if _shapes(fresh) == _shapes(model) else None

"""Which tensors get sparsified: default selection, include/exclude patterns, tied weights."""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, NoTargetsError
from .tracing import SPARSIFIABLE, ModelGraph

Pattern = str | Callable[[str, nn.Module], bool]
Patterns = Pattern | Sequence[Pattern] | None


@dataclass(eq=False)
class Target:
    """One sparsified weight: ``module.weight`` of a Conv or Linear layer named ``name``."""

    name: str
    module: nn.Module

    @property
    def kind(self) -> str:
        return "linear" if isinstance(self.module, nn.Linear) else "conv"

    @property
    def original(self) -> Tensor:
        """The trainable tensor (``parametrizations.weight.original`` once wrapped)."""
        if parametrize.is_parametrized(self.module, "weight"):
            return self.module.parametrizations.weight.original
        return self.module.weight

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.original.shape)

    @property
    def numel(self) -> int:
        return self.original.numel()

    @property
    def fan_in(self) -> int:
        return self.numel // self.shape[0]


def matcher(pattern: Pattern) -> Callable[[str, nn.Module], bool]:
    """A predicate ``(name, module) -> bool`` for a glob, ``"re:<regex>"`` or callable pattern."""
    if callable(pattern):
        return pattern
    if not isinstance(pattern, str):
        raise NoTargetsError(f"pattern {pattern!r} must be a glob string, 're:<regex>', or a callable(name, module)")
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as exc:
            raise NoTargetsError(
                f"pattern {pattern!r} is not a valid regular expression ({exc}); fix the regex after 're:', or give "
                "a glob such as 'layer1.*'"
            ) from None
        return lambda name, _m: regex.fullmatch(name) is not None
    return lambda name, _m: fnmatch.fnmatchcase(name, pattern)


def check_model(model: nn.Module) -> None:
    """Refuse models whose layers sparsewrap cannot wrap.

    Raises:
        ConfigError: for a TorchScript module (``torch.jit.script``/``trace``): its layers are compiled code.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.ScriptModule): its layers are compiled and "
            "cannot be wrapped; sparsify the original nn.Module, then script the exported model "
            "(torch.jit.script(sw.export(sp)))"
        )


def _as_list(patterns: Patterns) -> list[Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str) or callable(patterns):
        return [patterns]
    return list(patterns)


def find_head(model: nn.Module, candidates: Sequence[str]) -> str | None:
    """The classifier head: timm's ``get_classifier()`` when available, else the last layer run."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # some timm models raise for unusual heads; fall back below
            head = None
        if isinstance(head, nn.Module):
            for name, m in model.named_modules():
                if m is head and name:
                    subs = [n for n in candidates if n == name or n.startswith(name + ".")]
                    return subs[-1] if subs else None
    return candidates[-1] if candidates else None


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
        if parametrize.is_parametrized(module):
            for pname, plist in module.parametrizations.items():
                owners.setdefault(id(plist.original), []).append(f"{mname}.{pname}")
    return {k: sorted(set(v)) for k, v in owners.items() if len(set(v)) > 1}


def select_targets(
    model: nn.Module, graph: ModelGraph, include: Patterns = None, exclude: Patterns = None
) -> list[Target]:
    """Pick the layers to sparsify, in execution order.

    By default every Conv1d/2d/3d and Linear layer except the classifier head. ``include`` and ``exclude``
    take glob patterns on module names (``"layer1.*"``), ``"re:<regex>"`` (full match), or callables
    ``f(name, module) -> bool``; a pattern that matches no sparsifiable layer is an error. A weight shared by
    several modules (weight tying) is skipped with a warning rather than masked on one side only.

    Raises:
        NoTargetsError: if a pattern is not a valid regular expression or matches nothing, or nothing is left
            to sparsify.
        ConfigError: for a TorchScript module.
    """
    check_model(model)
    modules = dict(model.named_modules())
    ordered = [n for n in graph.order if n in modules] + [n for n in modules if n not in set(graph.order)]
    candidates = [n for n in ordered if n and isinstance(modules[n], SPARSIFIABLE)]
    if not candidates:
        raise NoTargetsError(f"{type(model).__name__} has no Conv1d/2d/3d or Linear layer to sparsify")
    inc, exc = _as_list(include), _as_list(exclude)
    for kind, pats in (("include", inc), ("exclude", exc)):
        for pat in pats:
            fn = matcher(pat)
            if not any(fn(n, modules[n]) for n in candidates):
                raise NoTargetsError(
                    f"{kind} pattern {pat!r} matches no Conv/Linear layer; layers are named like "
                    f"{', '.join(candidates[:4])}{', ...' if len(candidates) > 4 else ''} "
                    "(globs match the full name; use 're:<regex>' for a regular expression)"
                )
    if inc:
        chosen = [n for n in candidates if any(matcher(p)(n, modules[n]) for p in inc)]
    else:
        head = find_head(model, candidates)
        chosen = [n for n in candidates if n != head]
    chosen = [n for n in chosen if not any(matcher(p)(n, modules[n]) for p in exc)]
    shared = _shared_weights(model)
    targets = []
    for n in chosen:
        mod = modules[n]
        w = mod.parametrizations.weight.original if parametrize.is_parametrized(mod, "weight") else mod.weight
        if id(w) in shared:
            warnings.warn(
                f"{n}.weight is shared by {', '.join(shared[id(w)])} (weight tying); it is left dense so that "
                "both uses stay identical. Exclude it explicitly to silence this warning.",
                stacklevel=3,
            )
            continue
        targets.append(Target(n, mod))
    if not targets:
        raise NoTargetsError(
            f"nothing left to sparsify in {type(model).__name__} after include={include!r}, exclude={exclude!r} "
            "and the default exclusion of the classifier head; pass include= to choose layers"
        )
    return targets

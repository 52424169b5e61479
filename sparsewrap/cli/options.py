"""Method options as the command line shows and checks them: type, default and choices of each ``Config`` field.

The choices of a text option come from the field's ``metadata["choices"]`` when the method declares them, else
from the tuple its module names after the option in the plural (``granularity`` → ``GRANULARITIES``,
``schedule`` → ``SCHEDULES``), the constant its ``Config`` validates against.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any

import typer

_MISSING = object()


@dataclass
class OptionInfo:
    """One method option: ``name``, its type as text, its default (``_MISSING`` if none) and its choices."""

    name: str
    type: str
    default: Any
    choices: tuple[str, ...] | None

    def describe(self) -> str:
        """``name: type = default`` with ``[a|b]`` choices, as ``sparsewrap methods`` lists it."""
        kind = "|".join(self.choices) if self.choices else self.type
        default = "" if self.default is _MISSING else f" = {json_text(self.default)}"
        return f"{self.name}: {kind}{default}"


def json_text(value: Any) -> str:
    """A default as the user would type it after ``-O KEY=`` (JSON for numbers, lists, true/false/null)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).replace(" ", "")


def _plural(name: str) -> str:
    upper = name.upper()
    return upper[:-1] + "IES" if upper.endswith("Y") else upper + "S"


def _choices(config: type, field: dataclasses.Field) -> tuple[str, ...] | None:
    declared = field.metadata.get("choices") if field.metadata else None
    if declared is None:
        module = sys.modules.get(config.__module__)
        declared = getattr(module, _plural(field.name), None)
    if isinstance(declared, (tuple, list)) and declared and all(isinstance(c, str) for c in declared):
        return tuple(declared)
    return None


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return str(hint) if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))


def fits(value: Any, hint: Any) -> bool:
    """Whether a parsed ``-O`` value suits the option's type (an int for a float; unknown types pass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return not isinstance(value, bool) and isinstance(value, (int, float) if hint is float else int)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(fits(v, args[0]) for v in value))
    return True


def option_infos(config: type) -> list[OptionInfo]:
    """Every option of a method's ``Config`` dataclass, in declaration order."""
    hints = typing.get_type_hints(config)
    out = []
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = _MISSING
        out.append(OptionInfo(f.name, _type_name(hints.get(f.name, Any)), default, _choices(config, f)))
    return out


def check_options(method: str, config: type, options: dict[str, Any]) -> None:
    """Check ``-O`` values against the option types before anything is loaded (unknown names are left to the
    method's own check, which lists the valid ones).

    Raises:
        typer.BadParameter: naming the option, the value, its type, default and an example.
    """
    hints = typing.get_type_hints(config)
    infos = {i.name: i for i in option_infos(config)}
    for key, value in options.items():
        info = infos.get(key)
        if info is None:
            continue
        if not fits(value, hints.get(key, Any)):
            example = info.choices[0] if info.choices else json_text(info.default)
            raise typer.BadParameter(
                f"{key}={value!r} is not a valid {info.type} for method {method!r} (default "
                f"{json_text(info.default)}); give e.g. -O {key}={example}",
                param_hint="--option",
            )

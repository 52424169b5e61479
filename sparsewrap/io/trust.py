"""What loading a file may run: the factories a checkpoint's recipe names are called only when allowed.

A checkpoint's SHA-256 digest has no key: it detects corruption, not tampering. Anyone can edit a recipe and
recompute the digest, so the model factory a file names is treated as untrusted input:

- ``timm:<arch>`` is rebuilt through ``timm.create_model`` only for names ``timm.list_models()`` knows, with
  keyword arguments from :data:`TIMM_KWARGS` holding plain JSON values; weights are never downloaded
  (``pretrained=True``) and no file or URL override (``pretrained_cfg``, ``checkpoint_path``, ...) is accepted.
- ``pkg.mod:fn`` is imported and called only if the running program registered it
  (:func:`register_factory`; sparsewrap's own reference models are registered), or the caller passed
  ``trust_factory=True`` (CLI: ``--trust-factory``); otherwise the caller gives ``model=``.

A factory the user names in code or on the command line (``sparsewrap.create_model``, ``train --model``) is
their own choice and is called without registration.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import CheckpointError, ConfigError

F = TypeVar("F", bound=Callable[..., Any])

#: timm keyword arguments a recipe read from a file may pass: they shape the architecture and read nothing.
TIMM_KWARGS = frozenset({
    "num_classes", "in_chans", "img_size", "global_pool", "drop_rate", "drop_path_rate", "drop_block_rate",
    "proj_drop_rate", "attn_drop_rate", "pos_drop_rate", "patch_drop_rate", "output_stride", "patch_size",
    "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "class_token", "no_embed_class", "reg_tokens",
    "dynamic_img_size", "dynamic_img_pad", "scriptable", "exportable", "no_jit",
})  # fmt: skip
#: timm keyword arguments that download weights or read files and URLs: refused even from trusted recipes.
TIMM_REFUSED = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "pretrained_strict",
})  # fmt: skip

_REGISTERED: dict[str, Callable[..., Any] | None] = {}


def _check_spec(name: str) -> str:
    mod, sep, attr = name.partition(":")
    if not (sep and mod and attr):
        raise ConfigError(f"factory name {name!r} is not 'package.module:callable'; e.g. 'mypkg.models:build'")
    return name


def register_factory(fn_or_name: F | str, name: str | None = None) -> F | str:
    """Allow checkpoints whose recipe names this factory to be rebuilt without ``model=`` or ``trust_factory``.

    Usable as a decorator. A callable is registered under ``"<its module>:<its qualified name>"`` (or ``name``),
    which is how :func:`sparsewrap.create_model` records it; a string ``"pkg.mod:fn"`` is imported when a file
    needs it.

    Args:
        fn_or_name: the factory (a callable returning an ``nn.Module``) or its import path.
        name: the import path to register a callable under, when it differs from where it is defined.

    Returns:
        ``fn_or_name``, unchanged.

    Raises:
        ConfigError: for a name that is not ``"package.module:callable"``.
    """
    if isinstance(fn_or_name, str):
        _REGISTERED[_check_spec(fn_or_name)] = None
    elif callable(fn_or_name):
        spec = name or f"{fn_or_name.__module__}:{fn_or_name.__qualname__}"
        _REGISTERED[_check_spec(spec)] = fn_or_name
    else:
        raise ConfigError(f"register_factory({fn_or_name!r}): give a callable or a 'package.module:callable' name")
    return fn_or_name


def is_registered(name: str) -> bool:
    """Whether the running program registered the factory ``name`` (see :func:`register_factory`)."""
    return name in _REGISTERED


def refusal(name: str, origin: str) -> CheckpointError:
    """The one-line error for a file whose recipe names a factory nobody allowed."""
    return CheckpointError(
        f"{origin} names the model factory {name!r}, which sparsewrap does not import from a file unless "
        f"allowed: pass model=<a fresh instance of the architecture>, or trust_factory=True (CLI: --trust-factory) "
        f"if you trust this file, or register it in your program with sparsewrap.register_factory({name!r})"
    )


def resolve_factory(name: str, trusted: bool, origin: str) -> Callable[..., Any]:
    """The callable for ``"pkg.mod:fn"``: registered, or imported when ``trusted``.

    Raises:
        CheckpointError: if the factory is neither registered nor trusted (nothing is imported).
        ConfigError: if it cannot be imported.
    """
    fn = _REGISTERED.get(name)
    if fn is not None:
        return fn
    if not (trusted or name in _REGISTERED):
        raise refusal(name, origin)
    mod_name, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import factory {name!r}: {exc}") from exc


def check_timm_kwargs(name: str, kwargs: dict[str, Any], trusted: bool) -> dict[str, Any]:
    """The kwargs to pass to ``timm.create_model(name, pretrained=False, ...)``.

    ``pretrained=False`` is dropped (it is always passed). Untrusted recipes may only use :data:`TIMM_KWARGS`
    with JSON scalars or lists of numbers as values.

    Raises:
        ConfigError: for a download, file or URL override (always), or a keyword outside the allow-list.
    """
    out = dict(kwargs)
    if out.get("pretrained") is False:
        del out["pretrained"]
    refused = sorted(k for k in out if k in TIMM_REFUSED)
    if refused:
        raise ConfigError(
            f"timm:{name} with {refused[0]}={out[refused[0]]!r} is refused: sparsewrap builds "
            "architectures with random weights and reads no file or URL; load pretrained weights yourself "
            "(timm.create_model(..., pretrained=True)) and pass the model (sparsify it, or load(path, model=...))"
        )
    if trusted:
        return out
    for key, value in out.items():
        scalar = value is None or isinstance(value, (bool, int, float, str))
        numbers = isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
        if key not in TIMM_KWARGS or not (scalar or numbers):
            raise ConfigError(
                f"timm:{name} keyword {key}={value!r} is not on sparsewrap's allow-list of timm "
                f"arguments a file may set ({', '.join(sorted(TIMM_KWARGS))}); pass model=<a fresh instance>, "
                "or trust_factory=True (CLI: --trust-factory) if you trust this file"
            )
    return out


register_factory("sparsewrap.demo.models:mlp_300_100")
register_factory("sparsewrap.demo.models:lenet5")

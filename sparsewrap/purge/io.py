"""Purged models on disk: safetensors weights plus the purge plan in its metadata (no pickle), pt2 or ONNX.

The plan is JSON: the source architecture's fingerprint (class and ``state_dict`` key/shape list of the
*unpurged* model), how to rebuild it (recipe, when known), ``{module: {role: kept indices}}`` and, when
BatchNorms were folded (``fold_bn``), the folded ``[layer, batchnorm]`` pairs. A digest covers the plan and every
tensor, so a corrupted file is refused. :func:`load_purged` checks the fingerprint against the fresh model it is
given, replays the plan with the shrink table, replays the folds and loads the weights strictly.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError, choices
from .core import PURGE_ATTR, PurgeReport, UnitReport, apply_plan, purge
from .fold import FoldReport, apply_folds, fold_batchnorm
from .shrink import ShrinkError

FORMAT_VERSION = 2  # the newest plan format this version reads
PLAN_VERSION = 1  # plans without BatchNorm folds: older sparsewrap versions still read them
FOLD_VERSION = 2  # plans with "fold_bn": older versions must refuse them rather than load a wrong model
META_KEY = "sparsewrap_purge"
FORMATS = ("safetensors", "pt2", "onnx")
LOCAL_KEYS = ("report", "fold_report")  # in the in-memory record only, not written to files


def fingerprint(model: nn.Module) -> str:
    """A digest of the architecture: class name and every ``state_dict`` key with its shape (not dtype)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for key, value in sorted(model.state_dict().items()):
        h.update(f"{key}:{tuple(value.shape)};".encode())
    return h.hexdigest()


def _example_inputs(plain: nn.Module, source: nn.Module, example_inputs: Any, why: str | None) -> Any:
    """``example_inputs``, or a seeded random batch of 2 at the recipe's input shape (``None`` if unknown).

    Raises:
        ConfigError: if there is no shape to build one from and ``why`` says what needs it.
    """
    from ..io.recipe import recipe_for

    if example_inputs is not None:
        return example_inputs
    recipe = recipe_for(source)
    shape = recipe.default_input_shape() if recipe is not None else None
    if not shape:
        if why is None:
            return None
        raise ConfigError(
            f"{why} needs example_inputs=<a tensor or tuple of tensors> to trace shapes and verify outputs; "
            f"{type(source).__name__} records no input shape"
        )
    return example_batch(shape, plain)


def example_batch(shape: Sequence[int], like: nn.Module) -> Tensor:
    """A seeded random batch of 2 inputs of ``shape`` on ``like``'s device and dtype (the default example input
    of purge, BatchNorm folding and the CLI's measurements)."""
    p = next(like.parameters())
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, *shape, generator=gen).to(device=p.device, dtype=p.dtype)


def _new_record(plain: nn.Module, source: nn.Module, round_to: int) -> dict[str, Any]:
    from ..io.recipe import recipe_for

    recipe = recipe_for(source)
    return {
        "format_version": PLAN_VERSION,
        "source": {"class": type(plain).__name__, "fingerprint": fingerprint(plain)},
        "recipe": None if recipe is None else json.loads(recipe.to_json()),
        "round_to": round_to,
        "ops": {},
    }


def _fold_into_record(model: nn.Module, record: dict[str, Any], example_inputs: Any) -> None:
    """Fold ``model``'s BatchNorms (in eval mode) and record the pairs so :func:`load_purged` can replay them."""
    report = fold_batchnorm(model.eval(), example_inputs)
    if report.trace_error:
        warnings.warn(report.summary(), stacklevel=4)
    record["format_version"] = FOLD_VERSION
    record["fold_bn"] = [list(pair) for pair in report.folded]
    record["fold_report"] = asdict(report)


def purge_exported(plain: nn.Module, source: nn.Module, example_inputs: Any, round_to: int,
                   fold_bn: bool = False) -> nn.Module:  # fmt: skip
    """The purge step of :func:`sparsewrap.export` (``purge=True``): purge ``plain`` and record the plan on it.

    With ``fold_bn`` the purged model is then put in eval mode and its BatchNorms folded (recorded in the plan).

    Raises:
        ConfigError: if no example input is given and the model records no input shape.
    """
    example_inputs = _example_inputs(plain, source, example_inputs, "purge")
    record = _new_record(plain, source, round_to)
    result = purge(plain, example_inputs, round_to=round_to)
    if not result.report.changed:
        warnings.warn(result.report.summary(), stacklevel=3)
    record["ops"] = {m: {r: idx.tolist() for r, idx in roles.items()} for m, roles in result.ops.items()}
    record["report"] = asdict(result.report)
    if fold_bn:
        _fold_into_record(result.model, record, example_inputs)
    object.__setattr__(result.model, PURGE_ATTR, record)  # plain data only: the model still unpickles anywhere
    return result.model


def fold_exported(plain: nn.Module, source: nn.Module, example_inputs: Any) -> nn.Module:
    """The ``fold_bn`` step of :func:`sparsewrap.export` without purge: fold in place, record an empty plan.

    The record makes :func:`save_purged` / :func:`load_purged` work for the folded model, whose ``state_dict``
    no longer matches the original architecture. Without example inputs (and no recorded input shape), only
    conv pairs are folded and the outputs are not verified.
    """
    record = _new_record(plain, source, 1)
    _fold_into_record(plain, record, _example_inputs(plain, source, example_inputs, None))
    object.__setattr__(plain, PURGE_ATTR, record)
    return plain


def purge_report(model: nn.Module) -> PurgeReport:
    """The :class:`PurgeReport` of a model returned by ``export(..., purge=True)``.

    Raises:
        ConfigError: if the model was not purged by sparsewrap.
    """
    record = _record(model)
    if "report" not in record:
        raise ConfigError(
            "this model carries no purge report: it was loaded from a file (the report is not stored there) or "
            "exported with fold_bn=True and purge=False"
        )
    data = dict(record["report"])
    data["units"] = [UnitReport(**u) for u in data.get("units", [])]
    return PurgeReport(**data)


def fold_report(model: nn.Module) -> FoldReport:
    """The :class:`FoldReport` of a model returned by ``export(..., fold_bn=True)``.

    Raises:
        ConfigError: if the model's BatchNorms were not folded by ``export`` (or it was loaded from a file).
    """
    record = getattr(model, PURGE_ATTR, None)
    if not isinstance(record, dict) or "fold_report" not in record:
        raise ConfigError(
            "this model carries no fold report: it was not exported with fold_bn=True, or was loaded from a file"
        )
    data = dict(record["fold_report"])
    data["folded"] = [tuple(p) for p in data["folded"]]
    data["skipped"] = [tuple(s) for s in data["skipped"]]
    return FoldReport(**data)


def _record(model: nn.Module) -> dict[str, Any]:
    record = getattr(model, PURGE_ATTR, None)
    if not isinstance(record, dict):
        raise ConfigError("this model was not purged by sparsewrap.export(..., purge=True); use save_plain for it")
    return record


def _digest(plan: str, tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256(plan.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_purged(model: nn.Module, path: str | os.PathLike, fmt: str = "safetensors",
                input_shape: Sequence[int] | None = None) -> Path:  # fmt: skip
    """Write a purged model atomically: safetensors + plan (replay with :func:`load_purged`), pt2 or ONNX.

    Raises:
        ConfigError: on an unknown format, a model that was not purged (safetensors), a missing input shape
            (pt2, onnx) or a missing ``onnx`` package.
    """
    from ..io.atomic import write_atomic
    from ..io.plain import save_plain
    from ..io.tensors import unshare_storage

    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is unknown; valid: {choices(FORMATS)}")
    if fmt == "pt2":
        return save_plain(model, path, "pt2", input_shape)
    if fmt == "onnx":
        return save_onnx(model, path, input_shape)
    from safetensors.torch import save_file

    record = _record(model)
    plan = json.dumps({k: v for k, v in record.items() if k not in LOCAL_KEYS}, sort_keys=True)
    tensors = unshare_storage({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    meta = {"format": "pt", META_KEY: plan, "sha256": _digest(plan, tensors)}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def save_onnx(model: nn.Module, path: str | os.PathLike, input_shape: Sequence[int] | None) -> Path:
    """Export to ONNX at batch 1 (needs the optional extra: ``pip install sparsewrap[onnx]``).

    Raises:
        ConfigError: without an input shape or without the ``onnx`` package.
    """
    from ..io.atomic import write_atomic

    if not input_shape:
        raise ConfigError("format 'onnx' needs an input shape, e.g. --input-shape 3,224,224")
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise ConfigError("format 'onnx' needs the onnx package: pip install 'sparsewrap[onnx]'") from exc
    p = next(model.parameters())
    example = torch.randn(1, *input_shape, dtype=p.dtype, device=p.device)
    was_training = model.training
    model.eval()
    try:
        return write_atomic(
            path, lambda tmp: torch.onnx.export(model, (example,), str(tmp), dynamo=True, verbose=False)
        )
    finally:
        model.train(was_training)


def read_plan(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The verified plan and tensors of a purged safetensors file.

    Raises:
        CheckpointError: if the file is missing, unreadable, not a purged model, or corrupted.
    """
    from ..io.reading import read_safetensors

    path = Path(path)
    meta, tensors = read_safetensors(path, "purged model")
    if META_KEY not in meta:
        raise CheckpointError(f"{path} has no purge plan; it is not a purged model written by sparsewrap")
    if meta.get("sha256") != _digest(meta[META_KEY], tensors):
        raise CheckpointError(f"{path} is corrupted: its plan and tensors do not match the recorded sha256 digest")
    try:
        plan = json.loads(meta[META_KEY])
        ops, source = plan["ops"], plan["source"]
        if not isinstance(ops, dict) or not isinstance(source, dict):
            raise TypeError("ops and source must be objects")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: the purge plan is malformed ({exc})") from exc
    if plan.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer sparsewrap (plan format {plan['format_version']})")
    return plan, tensors


def load_purged(path: str | os.PathLike, model: nn.Module | None = None, trust_factory: bool = False) -> nn.Module:
    """Rebuild a purged model: replay its plan on a fresh instance of the original architecture, load weights.

    Args:
        path: a file written by :func:`save_purged` (``sparsewrap export --purge``, safetensors format).
        model: a fresh, unpurged instance of the architecture the plan was made for; optional when the file
            records how to build it (timm models, and factories registered with
            :func:`sparsewrap.register_factory` or trusted with ``trust_factory``).
        trust_factory: import and call the ``pkg.mod:fn`` factory the file names (only for files you trust).

    Returns:
        ``model`` (or the rebuilt one), shrunk in place (and its recorded BatchNorms folded into their layers,
        replaced by ``nn.Identity``), with the purged weights loaded strictly.

    Raises:
        CheckpointError: for a missing, corrupted or foreign file, a plan made for another architecture, or
            weights that do not fit the replayed model.
    """
    plan, tensors = read_plan(path)
    if model is None:
        from ..io.recipe import rebuild_model

        model = rebuild_model(plan.get("recipe"), path, trust_factory)
    source = plan["source"]
    if fingerprint(model) != source.get("fingerprint"):
        raise CheckpointError(
            f"{path}: the purge plan was made for another architecture ({source.get('class')!r}); the model given "
            f"is a {type(model).__name__} with different layers or shapes. Pass a fresh, unpurged instance of the "
            "architecture the file was exported from"
        )
    folds = plan.get("fold_bn", [])
    if not isinstance(folds, list) or not all(isinstance(p, list) for p in folds):
        raise CheckpointError(f"{path}: the purge plan is malformed (fold_bn must be a list of [layer, batchnorm])")
    try:
        ops = {
            m: {r: torch.as_tensor(idx, dtype=torch.long) for r, idx in roles.items()}
            for m, roles in plan["ops"].items()
        }
        apply_plan(model, ops)
    except (ShrinkError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: the purge plan does not apply to {type(model).__name__}: {exc}") from exc
    try:
        apply_folds(model, folds)
    except ShrinkError as exc:
        raise CheckpointError(f"{path}: the BatchNorm folds do not apply to {type(model).__name__}: {exc}") from exc
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the replayed model: {exc}") from exc
    object.__setattr__(model, PURGE_ATTR, dict(plan))  # lets save_purged write it again
    return model

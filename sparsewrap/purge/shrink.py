"""Per-layer shrink functions, keyed by layer type and open to extension.

A shrink function takes a module and ``{role: kept indices}`` and replaces the module's tensors by their kept
slices, updating the attributes its ``forward`` reads (``out_channels``, ``groups``, ``num_heads`` ...). Roles
(see :class:`sparsewrap.analysis.channels.Use`): ``"out"`` (output rows and bias), ``"in"`` (input dimension),
``"dw"`` (a depthwise conv's channels), ``"norm"`` (a per-channel norm), ``"heads"`` (attention heads).
Per-channel tensor attributes (``"param:<name>:<dim>"``) are sliced generically for any module.

To support a new layer type: ``@register_shrink(MyLayer)`` on a function ``(module, ops) -> None``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .heads import shrink_heads
from .tensors import ShrinkError, check_index, replace_tensor

ShrinkFn = Callable[[nn.Module, dict[str, Tensor]], None]
SHRINKERS: dict[type[nn.Module], ShrinkFn] = {}


def register_shrink(cls: type[nn.Module]) -> Callable[[ShrinkFn], ShrinkFn]:
    """Register the shrink function of a layer type (subclasses use it unless they register their own).

    Raises:
        ValueError: if ``cls`` already has one.
    """

    def deco(fn: ShrinkFn) -> ShrinkFn:
        if cls in SHRINKERS:
            raise ValueError(f"{cls.__name__} already has a shrink function; registries reject duplicates")
        SHRINKERS[cls] = fn
        return fn

    return deco


def shrinker_for(module: nn.Module) -> ShrinkFn | None:
    """The shrink function of the closest registered class in the module's MRO."""
    for cls in type(module).__mro__:
        if cls in SHRINKERS:
            return SHRINKERS[cls]
    return None


def slice_param(module: nn.Module, name: str, dim: int, index: Tensor) -> None:
    """Keep ``index`` along ``dim`` of the tensor attribute ``name`` (a per-channel scale or offset).

    Raises:
        ShrinkError: if the attribute is missing or the indices do not fit.
    """
    tensor = getattr(module, name, None)
    if not isinstance(tensor, Tensor) or dim >= tensor.dim():
        raise ShrinkError(f"{type(module).__name__}.{name} is not a tensor with a dimension {dim}")
    index = check_index(index, tensor.shape[dim], f"{type(module).__name__}.{name}")
    replace_tensor(module, name, tensor.index_select(dim, index.to(tensor.device)))


def _rows(w: Tensor | None, index: Tensor) -> Tensor | None:
    return None if w is None else w.index_select(0, index.to(w.device))


@register_shrink(nn.Linear)
def shrink_linear(module: nn.Linear, ops: dict[str, Tensor]) -> None:
    """``out``: rows and bias; ``in``: columns."""
    unknown = set(ops) - {"out", "in"}
    if unknown:
        raise ShrinkError(f"Linear has no role {sorted(unknown)}; valid: 'in', 'out'")
    _rows_and_columns(module, ops, "out_features", "in_features", "Linear")


def _conv_groups(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, ops: dict[str, Tensor]) -> None:
    g, cin, cout = module.groups, module.in_channels, module.out_channels
    a, b = cin // g, cout // g
    kin = check_index(ops["in"], cin, "Conv in") if "in" in ops else torch.arange(cin)
    kout = check_index(ops["out"], cout, "Conv out") if "out" in ops else torch.arange(cout)
    in_of = [kin[(kin >= j * a) & (kin < (j + 1) * a)] for j in range(g)]
    out_of = [kout[(kout >= j * b) & (kout < (j + 1) * b)] for j in range(g)]
    alive = [j for j in range(g) if in_of[j].numel() or out_of[j].numel()]
    n_in, n_out = {in_of[j].numel() for j in alive}, {out_of[j].numel() for j in alive}
    if len(n_in) != 1 or len(n_out) != 1 or 0 in n_in | n_out:
        raise ShrinkError(f"grouped conv (groups={g}) needs the same number of kept channels in every kept group")
    if sum(in_of[j].numel() for j in alive) != kin.numel() or sum(out_of[j].numel() for j in alive) != kout.numel():
        raise ShrinkError(f"grouped conv (groups={g}): a dropped group still has kept channels")
    w = module.weight
    parts = [w.index_select(0, out_of[j].to(w.device)).index_select(1, (in_of[j] - j * a).to(w.device)) for j in alive]
    replace_tensor(module, "weight", torch.cat(parts, 0))
    if module.bias is not None:
        replace_tensor(module, "bias", _rows(module.bias, kout))
    module.groups = len(alive)
    module.in_channels, module.out_channels = kin.numel(), kout.numel()


@register_shrink(nn.Conv1d)
@register_shrink(nn.Conv2d)
@register_shrink(nn.Conv3d)
def shrink_conv(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, ops: dict[str, Tensor]) -> None:
    """``out``/``in`` (grouped convs keep equal counts per kept group and drop empty groups); ``dw``: a depthwise
    conv's channels, which are its inputs, outputs and groups at once."""
    unknown = set(ops) - {"out", "in", "dw"}
    if unknown:
        raise ShrinkError(f"Conv has no role {sorted(unknown)}; valid: 'in', 'out', 'dw'")
    if "dw" in ops:
        if len(ops) > 1 or not module.groups == module.in_channels == module.out_channels:
            raise ShrinkError("role 'dw' applies alone, to a depthwise conv (groups == in == out channels)")
        idx = check_index(ops["dw"], module.out_channels, "depthwise conv")
        replace_tensor(module, "weight", _rows(module.weight, idx))
        if module.bias is not None:
            replace_tensor(module, "bias", _rows(module.bias, idx))
        module.groups = module.in_channels = module.out_channels = idx.numel()
        return
    if module.groups > 1:
        _conv_groups(module, ops)
        return
    _rows_and_columns(module, ops, "out_channels", "in_channels", "Conv")


def _only_norm(module: nn.Module, ops: dict[str, Tensor], size: int) -> Tensor:
    if set(ops) != {"norm"}:
        raise ShrinkError(f"{type(module).__name__} has only the role 'norm', got {sorted(ops)}")
    return check_index(ops["norm"], size, type(module).__name__)


@register_shrink(nn.modules.batchnorm._BatchNorm)
def shrink_batchnorm(module: nn.modules.batchnorm._BatchNorm, ops: dict[str, Tensor]) -> None:
    """``norm``: affine terms and running statistics."""
    idx = _only_norm(module, ops, module.num_features)
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(module, name, None) is not None:
            replace_tensor(module, name, _rows(getattr(module, name), idx))
    module.num_features = idx.numel()


@register_shrink(nn.GroupNorm)
def shrink_groupnorm(module: nn.GroupNorm, ops: dict[str, Tensor]) -> None:
    """``norm``: whole normalisation groups only (their statistics are shared)."""
    idx = _only_norm(module, ops, module.num_channels)
    per = module.num_channels // module.num_groups
    blocks = torch.unique(idx // per)
    if blocks.numel() * per != idx.numel():
        raise ShrinkError(f"GroupNorm keeps whole groups of {per} channels; the plan cuts one")
    for name in ("weight", "bias"):
        if getattr(module, name, None) is not None:
            replace_tensor(module, name, _rows(getattr(module, name), idx))
    module.num_groups, module.num_channels = blocks.numel(), idx.numel()


def apply_ops(module: nn.Module, ops: dict[str, Tensor]) -> None:
    """Apply ``{role: kept indices}`` to one module: generic ``param:`` roles first, then its shrink function.

    Raises:
        ShrinkError: if the module type has no shrink function for the roles, or an index list is invalid.
    """
    rest = {}
    for role, index in ops.items():
        if role.startswith("param:"):
            _, name, dim = role.split(":")
            slice_param(module, name, int(dim), index)
        else:
            rest[role] = index
    if not rest:
        return
    if "heads" in rest:
        shrink_heads(module, rest.pop("heads"))
        if not rest:
            return
    fn = shrinker_for(module)
    if fn is None:
        raise ShrinkError(f"no shrink function for {type(module).__name__}; register one with register_shrink")
    fn(module, rest)


def _rows_and_columns(module: nn.Module, ops: dict, out_attr: str, in_attr: str, label: str) -> None:
    """Keep output rows (weight dim 0 and bias) and input columns (weight dim 1); update the size attributes."""
    if "out" in ops:
        idx = check_index(ops["out"], getattr(module, out_attr), f"{label} out")
        replace_tensor(module, "weight", _rows(module.weight, idx))
        if module.bias is not None:
            replace_tensor(module, "bias", _rows(module.bias, idx))
        setattr(module, out_attr, idx.numel())
    if "in" in ops:
        idx = check_index(ops["in"], getattr(module, in_attr), f"{label} in")
        replace_tensor(module, "weight", module.weight.index_select(1, idx.to(module.weight.device)))
        setattr(module, in_attr, idx.numel())

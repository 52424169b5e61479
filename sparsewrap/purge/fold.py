"""BatchNorm folding: a conv (or linear) layer followed by an eval-mode BatchNorm becomes one layer with a bias.

In eval mode a BatchNorm is a per-channel affine map, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``. When
it reads only a layer's output, the map folds into that layer's weight rows and bias
(``torch.nn.utils.fusion``) and the BatchNorm becomes ``nn.Identity``: one memory pass less per pair at
inference. Pairs come from the traced graph; a pair is folded only when the result is provably the same
function (exact types, single use, running statistics), and with example inputs the outputs are verified.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from ..errors import ConfigError, TraceError
from .core import PurgeTracer, as_tuple, default_tolerance, relative_error, run_outputs
from .shrink import ShrinkError

# exact types only: subclasses (timm's Conv2dSame, StdConv2d, BatchNormAct2d) change the forward
CONVS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
}
BATCHNORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class FoldReport:
    """Outcome of :func:`fold_batchnorm`.

    Attributes:
        folded: ``(layer, batchnorm)`` qualified names of the folded pairs, in graph order; each BatchNorm is
            now an ``nn.Identity`` and the layer has a bias.
        skipped: ``(batchnorm, reason)`` for every BatchNorm-like module in the graph left as it is.
        max_rel_error: largest relative output change on ``example_inputs`` (``None`` without them).
        trace_error: why the model could not be traced (then nothing is folded).
    """

    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    max_rel_error: float | None = None
    trace_error: str = ""

    def summary(self) -> str:
        if self.trace_error:
            return f"no BatchNorm folded: {self.trace_error}"
        verified = "" if self.max_rel_error is None else f", verified (max relative error {self.max_rel_error:.1e})"
        return f"folded {len(self.folded)} BatchNorm layers, {len(self.skipped)} left{verified}"


@dataclass
class _Candidate:
    layer: str
    bn: str


class _Graph(NamedTuple):
    """What :func:`_why_not` needs to know about the traced graph."""

    modules: dict[str, nn.Module]
    calls: Counter[str]  # qualified name -> call_module nodes
    names: Counter[int]  # id(module) -> names it is registered under
    reads: set[str]  # get_attr targets


def fold_batchnorm(model: nn.Module, example_inputs: Any = None, tolerance: float | None = None) -> FoldReport:
    """Fold every eval-mode BatchNorm that reads only a conv's (or linear's) output into that layer, in place.

    A pair ``layer -> bn`` is folded when ``layer`` is exactly ``nn.Conv1d/2d/3d`` (with the matching
    ``nn.BatchNorm1d/2d/3d``) or ``nn.Linear`` (with ``nn.BatchNorm1d`` on a 2-D output, checked on
    ``example_inputs``), ``bn`` is exactly that BatchNorm class with running statistics, the BatchNorm's only
    input is the layer's output, nothing else reads that output, and each module is called once in the graph.
    Subclasses (timm's ``BatchNormAct2d``, ``Conv2dSame``) and everything else stay as they are and are listed
    in ``report.skipped`` with the reason. A folded layer without a bias gets one (a new ``Parameter``).

    Folding is for inference: the model must be in eval mode (the running statistics are what is folded); a
    folded model trained further has no BatchNorm left to normalise with batch statistics.

    Args:
        model: a plain model (no parametrizations) in eval mode; modified in place.
        example_inputs: a tensor or tuple for one forward; when given, Linear → BatchNorm1d pairs are folded
            too, and the outputs are verified (and the model restored if they change).
        tolerance: largest relative output error accepted (default 1e-4 in float32, 1e-9 in float64).

    Returns:
        A :class:`FoldReport`. An untraceable model is left unchanged and the report says why.

    Raises:
        ConfigError: if the model is in training mode or still has parametrizations.
        TraceError: if folding changed the outputs on ``example_inputs`` (the model is restored first).
    """
    if model.training:
        raise ConfigError(
            f"fold_batchnorm folds the running statistics, which {type(model).__name__} only uses in eval mode; "
            "call model.eval() first (a folded model is for inference)"
        )
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ConfigError("fold_batchnorm works on plain models; call sparsewrap.export(model) first")
    tracer = PurgeTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # FX raises many types; an untraceable model is simply left unfolded
        return FoldReport(trace_error=f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}")
    candidates, skipped = _candidates(model, graph)
    ref: list[Tensor] | None = None
    if example_inputs is not None:
        inputs = as_tuple(example_inputs)
        ndims, ref = _output_dims(model, [c.layer for c in candidates], inputs)
        candidates, late = _check_dims(model, candidates, ndims)
        skipped += late
    else:
        late = [(c.bn, "Linear -> BatchNorm1d is folded only with example_inputs (its output must be 2-D)")
                for c in candidates if type(model.get_submodule(c.layer)) is nn.Linear]  # fmt: skip
        candidates = [c for c in candidates if type(model.get_submodule(c.layer)) is not nn.Linear]
        skipped += late
    pairs = [(c.layer, c.bn) for c in candidates]
    undo = apply_folds(model, pairs)
    report = FoldReport(folded=pairs, skipped=sorted(skipped))
    if ref is not None:
        report.max_rel_error = relative_error(ref, run_outputs(model, inputs))
        tol = tolerance if tolerance is not None else default_tolerance(model)
        if report.max_rel_error > tol:
            _restore(model, undo)
            raise TraceError(
                f"folding {len(pairs)} BatchNorm layers changed the outputs of {type(model).__name__} (relative "
                f"error {report.max_rel_error:.2e} > {tol:.0e}); the model was restored. Pass a larger tolerance "
                "if this dtype needs it, or leave fold_bn off"
            )
    return report


def _candidates(model: nn.Module, graph: fx.Graph) -> tuple[list[_Candidate], list[tuple[str, str]]]:
    """Structurally foldable pairs (in graph order) and the reasons the other BatchNorms stay."""
    nodes = list(graph.nodes)
    ctx = _Graph(
        dict(model.named_modules()),
        Counter(str(n.target) for n in nodes if n.op == "call_module"),
        Counter(id(m) for _, m in model.named_modules(remove_duplicate=False)),
        {str(n.target) for n in nodes if n.op == "get_attr"},
    )
    found: list[_Candidate] = []
    skipped: list[tuple[str, str]] = []
    for node in nodes:
        if node.op != "call_module" or not isinstance(ctx.modules[str(node.target)], _BatchNorm):
            continue
        bn = str(node.target)
        reason = _why_not(node, ctx)
        if reason:
            skipped.append((bn, reason))
        else:
            found.append(_Candidate(str(node.args[0].target), bn))
    return found, skipped


def _why_not(node: fx.Node, ctx: _Graph) -> str:
    """Why the BatchNorm called at ``node`` cannot be folded into its input layer ('' if it can)."""
    modules, calls, names, reads = ctx
    name = str(node.target)
    bn = modules[name]
    if type(bn) not in BATCHNORMS:
        return f"{type(bn).__name__} is not exactly nn.BatchNorm1d/2d/3d (a subclass may change the forward)"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (normalises with batch statistics)"
    if bn.training:
        return "it is in training mode (normalises with batch statistics)"
    src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not isinstance(src, fx.Node) or src.op != "call_module":
        return "its input is not the output of a layer"
    layer_name = str(src.target)
    layer = modules[layer_name]
    mismatch = _mismatch(layer_name, layer, bn)
    if mismatch:
        return mismatch
    if len(src.users) != 1:
        return f"the output of {layer_name} is also used elsewhere"
    for qual, module in ((layer_name, layer), (name, bn)):
        if calls[qual] != 1:
            return f"{qual} is called {calls[qual]} times"
        if names[id(module)] != 1:
            return f"{qual} is registered under more than one name"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{qual} has forward hooks"
        if any(r.startswith(qual + ".") for r in reads):
            return f"the forward reads the tensors of {qual} directly"
        parts = qual.split(".")
        inside = next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in calls), None)
        if inside is not None:
            return f"{qual} also runs inside {inside}"
    return ""


def _output_dims(model: nn.Module, layers: Sequence[str], inputs: tuple) -> tuple[dict[str, int], list[Tensor]]:
    """The output rank of each layer on ``inputs``, and the model's outputs (the verification reference)."""
    ndims: dict[str, int] = {}
    hooks = []
    for name in layers:

        def record(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            ndims[name] = out.dim() if isinstance(out, Tensor) else -1

        hooks.append(model.get_submodule(name).register_forward_hook(record))
    try:
        ref = run_outputs(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return ndims, ref


def _check_dims(
    model: nn.Module, candidates: list[_Candidate], ndims: dict[str, int]
) -> tuple[list[_Candidate], list[tuple[str, str]]]:
    """Keep pairs whose layer output has the batched rank the BatchNorm normalises along dim 1."""
    keep, skipped = [], []
    for c in candidates:
        layer = model.get_submodule(c.layer)
        want = 2 if type(layer) is nn.Linear else len(layer.kernel_size) + 2
        if c.layer not in ndims:
            skipped.append((c.bn, f"{c.layer} did not run on the example inputs"))
        elif ndims[c.layer] != want:
            skipped.append((c.bn, f"the output of {c.layer} is {ndims[c.layer]}-D, not {want}-D"))
        else:
            keep.append(c)
    return keep, skipped


def apply_folds(model: nn.Module, pairs: Sequence[Sequence[str]]) -> list[tuple]:
    """Fold the given ``(layer, batchnorm)`` pairs in place, without tracing (replays a recorded fold).

    Returns:
        What is needed to undo the folds (used by :func:`fold_batchnorm` when verification fails).

    Raises:
        ShrinkError: if a name is missing, or a pair is not an exact conv/linear and matching BatchNorm.
    """
    modules = dict(model.named_modules())
    undo = []
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(n, str) and n in modules for n in pair):
            raise ShrinkError(f"BatchNorm fold {list(pair)!r} does not name two modules of {type(model).__name__}")
        layer, bn = modules[pair[0]], modules[pair[1]]
        _check_pair(pair, layer, bn)
        undo.append((layer, layer._parameters["weight"], layer._parameters.get("bias"), pair[1], bn))
        _fold(layer, bn)
        model.set_submodule(pair[1], nn.Identity())
    return undo


def _mismatch(layer_name: str, layer: nn.Module, bn: nn.Module) -> str:
    """Why ``layer -> bn`` is not an exact conv/linear and its matching BatchNorm ('' if it is)."""
    if type(layer) is nn.Linear:
        want, size, unit = nn.BatchNorm1d, layer.out_features, "features"
    elif type(layer) in CONVS:
        want, size, unit = CONVS[type(layer)], layer.out_channels, "channels"
    else:
        return f"its input comes from {layer_name} ({type(layer).__name__}), not exactly nn.Conv1d/2d/3d or Linear"
    if type(bn) is not want or bn.num_features != size:
        return f"{layer_name} ({type(layer).__name__}, {size} {unit}) does not match {type(bn).__name__}"
    return ""


def _check_pair(pair: Sequence[str], layer: nn.Module, bn: nn.Module) -> None:
    if _mismatch(pair[0], layer, bn) or bn.running_mean is None or bn.running_var is None:
        raise ShrinkError(
            f"cannot fold {pair[1]} ({type(bn).__name__}) into {pair[0]} ({type(layer).__name__}): folding needs an "
            "exact nn.Conv1d/2d/3d or nn.Linear followed by the matching nn.BatchNorm with running statistics"
        )


def _fold(layer: nn.Module, bn: nn.Module) -> None:
    """Replace ``layer``'s weight and bias by the folded ones (new Parameters; the old ones are untouched)."""
    weight = layer.weight
    ones, zeros = torch.ones_like(bn.running_mean), torch.zeros_like(bn.running_mean)
    gamma = bn.weight if bn.weight is not None else ones
    beta = bn.bias if bn.bias is not None else zeros
    with torch.no_grad():
        if type(layer) is nn.Linear:
            w, b = fuse_linear_bn_weights(weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, gamma, beta)
        else:
            w, b = fuse_conv_bn_weights(weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, gamma, beta)
    layer._parameters["weight"] = nn.Parameter(w.detach(), requires_grad=weight.requires_grad)
    layer._parameters["bias"] = nn.Parameter(b.detach(), requires_grad=weight.requires_grad)


def _restore(model: nn.Module, undo: list[tuple]) -> None:
    for layer, weight, bias, bn_name, bn in reversed(undo):
        layer._parameters["weight"] = weight
        layer._parameters["bias"] = bias
        model.set_submodule(bn_name, bn)

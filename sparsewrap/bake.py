"""Export: a new plain model with the sparsity baked in; the sparsified model stays live and trainable.

The plain model is a ``deepcopy`` whose parametrized modules get their *original* class back and plain
Parameters holding the baked tensors. ``remove_parametrizations`` is never called on the copy: a deepcopy
shares the injected class with the original, and removing the property from that class would break the live
model (PEERS.md §6).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .analysis.inputs import check_example_inputs, recorder_detached
from .controller import CONTROLLER_ATTR, Sparsifier, controller_of
from .errors import ConfigError
from .io.recipe import RECIPE_ATTR
from .parametrizations import SparseParametrization, wrapped_tensors


def _baked(model: nn.Module, sp: Sparsifier | None) -> dict[tuple[str, str], torch.Tensor]:
    if sp is not None:
        return sp.method.bake()
    return {(m, t): p.bake(mod.parametrizations[t].original) for m, mod, t, p in wrapped_tensors(model)}


def _plain_copy(model: nn.Module, sp: Sparsifier | None) -> nn.Module:
    # the plain model must unpickle without sparsewrap: leave sparsewrap's own attributes and hook behind
    saved = {k: model.__dict__.pop(k) for k in (CONTROLLER_ATTR, RECIPE_ATTR) if k in model.__dict__}
    try:
        with recorder_detached(sp):
            return copy.deepcopy(model)
    finally:
        model.__dict__.update(saved)


def _example_for(plain: nn.Module, sp: Sparsifier | None, example_inputs: Any) -> Any:
    """``example_inputs`` checked to run through ``plain``, or a batch built from the recorded first input."""
    record = sp.input if sp is not None else None
    if example_inputs is None:
        return record.example(plain) if record is not None else None
    expected = f"{record.describe()} (as on its first forward)" if record is not None else None
    check_example_inputs(plain, example_inputs, expected)
    return example_inputs


def export(obj: nn.Module | Sparsifier, purge: bool = False, *, example_inputs: Any = None,
           round_to: int = 1, fold_bn: bool = False) -> nn.Module:  # fmt: skip
    """A new plain ``nn.Module`` with masks baked in and no parametrizations.

    Its ``state_dict`` keys are those of the unwrapped architecture (it loads with ``strict=True`` into a
    fresh instance; with ``purge`` or ``fold_bn``, use :func:`sparsewrap.load_purged`) and running it needs no
    sparsewrap. The targeted weights reach the requested sparsity exactly (the method's final projection). The
    input model is left intact and trainable.

    Args:
        obj: a sparsified model or its :class:`Sparsifier`.
        purge: also remove exactly-zero channels, features and heads physically (:mod:`sparsewrap.purge`):
            a smaller dense model with the same outputs; groups that cannot be removed exactly stay dense.
            ``sparsewrap.purge.purge_report(result)`` says what was removed and why the rest stayed.
        example_inputs: a tensor or tuple for one forward, used by ``purge`` to trace shapes and verify
            outputs (default: a random batch of 2 shaped as the model's first input after :func:`sparsify`,
            ``sp.input``; else at the recipe's input shape, for timm models and checkpoints).
        round_to: with ``purge``, keep each group's channel count a multiple of this (fast kernels).
        fold_bn: for inference: fold each BatchNorm that directly follows a conv (or a linear layer) into that
            layer's weight and bias and replace it by ``nn.Identity`` (:func:`sparsewrap.purge.fold_batchnorm`),
            after the purge when ``purge`` is set. The model is returned in eval mode; its ``state_dict`` no
            longer fits the original architecture, so save it with ``sparsewrap.purge.save_purged`` (the folds
            are recorded) and load it with :func:`sparsewrap.load_purged`. ``example_inputs`` (or the recipe's
            input shape) also lets it fold Linear → BatchNorm1d and verify the outputs.
            ``sparsewrap.purge.fold_report(model)`` lists what was folded and why the rest was not.

    Raises:
        ConfigError: if ``obj`` is neither a model nor a Sparsifier, or a module mixes sparsewrap and foreign
            parametrizations on one tensor.
            With ``purge``: no example input and no recorded input shape, or a bad ``round_to``.
            With ``purge`` or ``fold_bn``: ``example_inputs`` the model cannot run (the message names the
            expected input).
        TraceError: with ``fold_bn``, if folding changed the outputs on the example inputs.
    """
    model, sp = controller_of(obj)
    baked = _baked(model, sp)
    was_training = model.training
    plain = _plain_copy(model, sp)
    _write_unwrapped(plain, baked)
    for mname, module in plain.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        values = {}
        for tname, plist in module.parametrizations.items():
            if not all(isinstance(p, SparseParametrization) for p in plist):
                raise ConfigError(
                    f"{mname}.{tname} mixes sparsewrap and other parametrizations; remove the others first"
                )
            values[tname] = (baked[(mname, tname)], plist.original)
        module.__class__ = type(module).__bases__[0]
        del module._modules["parametrizations"]
        for tname, (value, original) in values.items():
            value = value.to(device=original.device, dtype=original.dtype)
            module._parameters[tname] = nn.Parameter(value, requires_grad=original.requires_grad)
    plain.train(was_training)
    if purge or fold_bn:
        example_inputs = _example_for(plain, sp, example_inputs)
    if purge:
        from .purge.io import purge_exported

        return purge_exported(plain, model, example_inputs, round_to, fold_bn=fold_bn)
    if fold_bn:
        from .purge.io import fold_exported

        return fold_exported(plain, model, example_inputs)
    return plain


def _write_unwrapped(plain: nn.Module, baked: dict[tuple[str, str], torch.Tensor]) -> None:
    """Write the baked tensors of modules that are not parametrized (a method that wraps nothing, e.g. a penalty
    method, prunes at bake time) into the plain copy's own parameters or buffers.

    Raises:
        ConfigError: if the method baked a tensor the model does not have, or of another shape.
    """
    for (mname, tname), value in baked.items():
        module = plain.get_submodule(mname)
        if parametrize.is_parametrized(module, tname):
            continue  # written with the parametrized modules
        table = module._parameters if module._parameters.get(tname) is not None else module._buffers
        old = table.get(tname)
        if old is None or tuple(old.shape) != tuple(value.shape):
            have = f"has shape {tuple(old.shape)}" if old is not None else "has no such tensor"
            raise ConfigError(
                f"the method baked {mname}.{tname} of shape {tuple(value.shape)}, but the model {have}; fix its bake()"
            )
        value = value.detach().to(device=old.device, dtype=old.dtype).clone()
        table[tname] = nn.Parameter(value, requires_grad=old.requires_grad) if table is module._parameters else value

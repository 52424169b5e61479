"""Base class and helpers shared by every sparsewrap parametrization."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import torch_compat


class SparseParametrization(nn.Module):
    """A parametrization ``original -> effective tensor`` that sparsifies a weight.

    Subclasses implement :meth:`forward`; sparsity state lives in buffers (masks, updated in place) and
    method parameters (gates, thresholds) registered on the subclass, so both are in the model's
    ``state_dict``. :meth:`bake` gives the deterministic tensor that export writes into the plain model.

    On the steps a method asks for (``Method.dense_grad_step``), the controller calls :meth:`start_dense_grad`:
    :attr:`dense_grad` then accumulates the gradient of the loss with respect to the *effective* tensor, the
    dense gradient that no mask has zeroed (RigL grows where it is largest). On the other steps no hook is
    registered and nothing is kept.
    """

    @property
    def dense_grad(self) -> Tensor | None:
        """The dense gradient accumulated since :meth:`start_dense_grad` (``None`` outside a capture)."""
        return self.__dict__.get("_dense_grad")

    @property
    def capturing_dense_grad(self) -> bool:
        """Whether the dense-gradient hook is registered (only on the steps a method asked for)."""
        return self.__dict__.get("_dense_hook") is not None

    def start_dense_grad(self) -> None:
        """Accumulate the gradient of the effective tensor into :attr:`dense_grad` from now on (idempotent)."""
        if self.__dict__.get("_dense_hook") is None:
            self.__dict__["_dense_hook"] = self.register_forward_hook(_expose_dense_grad)
        self.__dict__["_dense_grad"] = None

    def stop_dense_grad(self) -> None:
        """Remove the capture hook and drop :attr:`dense_grad`."""
        hook = self.__dict__.pop("_dense_hook", None)
        if hook is not None:
            hook.remove()
        self.__dict__.pop("_dense_grad", None)

    def add_dense_grad(self, grad: Tensor) -> None:
        """Add one backward's gradient of the effective tensor to :attr:`dense_grad` (a tensor hook)."""
        held = self.__dict__.get("_dense_grad")
        self.__dict__["_dense_grad"] = grad.detach().clone() if held is None else held + grad.detach()

    def bake(self, original: Tensor) -> Tensor:
        """The deterministic effective tensor (eval-mode forward), detached and freshly allocated."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self(original).detach().clone()
        finally:
            self.train(was_training)


def _expose_dense_grad(module: SparseParametrization, args: tuple, output: Tensor) -> Tensor | None:
    """Forward hook of a capturing parametrization: a view of its output whose gradient is recorded."""
    if not isinstance(output, Tensor) or not output.requires_grad or torch.compiler.is_compiling():
        return None
    view = output.view_as(output)  # a non-leaf even where the forward returned the original itself
    view.register_hook(module.add_dense_grad)
    return view


def version_key(t: Tensor) -> tuple[int, int]:
    """``(data_ptr, version counter)``: changes whenever ``t`` is replaced or written in place (not via ``.data``).

    Parametrizations use it to redo a projection (re-zero pruned weights, clamp ``log_alpha``) lazily, only after
    the tensor has changed since they last did it. Where torch has no readable version counter
    (:func:`sparsewrap.torch_compat.version`), every call returns a new key: the projection is redone each time.
    """
    return (t.data_ptr(), torch_compat.version_or_new(t))


def is_ours(module: nn.Module, name: str) -> bool:
    """Whether ``module.name`` is parametrized by a sparsewrap parametrization."""
    return parametrize.is_parametrized(module, name) and any(
        isinstance(p, SparseParametrization) for p in module.parametrizations[name]
    )


_generation = 0  # bumped by attach() and detach_all(): see generation()


def generation() -> int:
    """A counter that changes whenever :func:`attach` or :func:`detach_all` adds or removes parametrizations,
    so that callers may cache what :func:`wrapped_tensors` finds (a walk over every module) between changes."""
    return _generation


def attach(module: nn.Module, name: str, parametrization: SparseParametrization,
           unsafe: bool = False) -> SparseParametrization:  # fmt: skip
    """Register ``parametrization`` on ``module.name``; the original Parameter object is kept (optimizers
    that already hold it stay valid). ``unsafe=True`` (torch's flag) lets the original take another shape: it
    becomes ``parametrization.right_inverse(tensor)``, a new Parameter (HashedNet's bank).
    """
    global _generation
    parametrize.register_parametrization(module, name, parametrization, unsafe=unsafe)
    _generation += 1
    return parametrization


def wrapped_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, SparseParametrization]]:
    """Every ``(module name, module, tensor name, parametrization)`` sparsewrap attached in ``model``."""
    for mname, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tname, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, SparseParametrization):
                    yield mname, module, tname, p


def detach_all(model: nn.Module) -> None:
    """Remove every sparsewrap parametrization in place, keeping the *unsparsified* originals."""
    for _mname, module, tname, _p in list(wrapped_tensors(model)):
        if parametrize.is_parametrized(module, tname):
            parametrize.remove_parametrizations(module, tname, leave_parametrized=False)
    global _generation
    _generation += 1

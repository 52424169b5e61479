"""The input a sparsified model sees: recorded on its first forward, described in errors, rebuilt for export.

:func:`sparsewrap.sparsify` registers a forward pre-hook (:class:`FirstInputRecorder`) that records the shape
(without the batch dimension) and dtype of the model's first call on one tensor, stores them on the
controller (``sp.input``) and removes itself. ``export(purge=True)`` and ``fold_bn=True`` then build their
example batch from the record when ``example_inputs=`` is not given, and the controller state (hence every
checkpoint) keeps it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# the layer types whose input tells what the model expects, with how to describe it
_FIRST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


@dataclass
class InputRecord:
    """One input's shape without the batch dimension, and its dtype (e.g. ``[1, 28, 28]``, ``"float32"``)."""

    shape: list[int]
    dtype: str

    @classmethod
    def of(cls, x: Tensor) -> InputRecord:
        """The record of a batch ``x`` (its first dimension is the batch)."""
        return cls([int(d) for d in x.shape[1:]], str(x.dtype).removeprefix("torch."))

    @property
    def torch_dtype(self) -> torch.dtype:
        """The recorded dtype as a ``torch.dtype`` (float32 if the name is not one)."""
        dtype = getattr(torch, self.dtype, None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32

    def describe(self) -> str:
        """``"a tensor of shape (N, 1, 28, 28), float32"``."""
        return f"a tensor of shape (N, {', '.join(map(str, self.shape))}), {self.dtype}"

    def example(self, like: nn.Module, batch: int = 2) -> Tensor:
        """A seeded batch of this shape on ``like``'s device.

        Floating inputs are random normal in ``like``'s floating dtype (the model may have been cast since its
        first forward); integer inputs (token ids, indices) are zeros of the recorded dtype, valid for any
        embedding.
        """
        p = next(like.parameters(), None)
        device = p.device if p is not None else None
        if not self.torch_dtype.is_floating_point:
            return torch.zeros(batch, *self.shape, dtype=self.torch_dtype, device=device)
        dtype = p.dtype if p is not None and p.is_floating_point() else self.torch_dtype
        gen = torch.Generator().manual_seed(0)
        return torch.randn(batch, *self.shape, generator=gen).to(device=device, dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form kept in the controller state (and so in checkpoints)."""
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Any) -> InputRecord | None:
        """The record in a controller state, or ``None`` if it is missing or malformed."""
        if not isinstance(d, dict) or not isinstance(d.get("shape"), list) or not isinstance(d.get("dtype"), str):
            return None
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in d["shape"]):
            return None
        return cls(list(d["shape"]), d["dtype"])


class FirstInputRecorder:
    """A forward pre-hook that records the model's first input on its controller, then removes itself.

    Only a call with one positional tensor of at least one dimension is recorded (the batch is its first
    dimension); the hook is removed after the first call whatever it was given. It records nothing while
    ``torch.compile`` traces the model, so it never breaks a graph.
    """

    def __init__(self, controller: Any) -> None:
        self.controller = controller
        self.handle: Any = None

    def attach(self) -> None:
        """Register the hook on the controller's model (first among its pre-hooks)."""
        self.handle = self.controller.model.register_forward_pre_hook(self, prepend=True)

    def detach(self) -> None:
        """Remove the hook from the model (no-op when it is not registered)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():
            return
        if getattr(self.controller, "input", None) is None and len(args) == 1:
            x = args[0]
            if isinstance(x, Tensor) and x.dim() >= 1:
                self.controller.input = InputRecord.of(x)
        self.detach()
        if getattr(self.controller, "input_recorder", None) is self:
            self.controller.input_recorder = None


def watch_first_input(controller: Any) -> None:
    """Record the first input of ``controller.model`` on ``controller.input`` (see :class:`FirstInputRecorder`)."""
    recorder = FirstInputRecorder(controller)
    recorder.attach()
    controller.input_recorder = recorder


@contextmanager
def recorder_detached(controller: Any) -> Iterator[None]:
    """Take a pending recorder off the model for the block (a copy made in it carries no sparsewrap hook)."""
    recorder = getattr(controller, "input_recorder", None) if controller is not None else None
    if recorder is None or recorder.handle is None:
        yield
        return
    recorder.detach()
    try:
        yield
    finally:
        recorder.attach()


def describe_inputs(example_inputs: Any) -> str:
    """``"of shape (2, 5), float32"`` for a tensor; each element for a tuple; the type name otherwise."""
    if isinstance(example_inputs, Tensor):
        shape = ", ".join(map(str, example_inputs.shape))
        return f"of shape ({shape}), {str(example_inputs.dtype).removeprefix('torch.')}"
    if isinstance(example_inputs, (tuple, list)):
        return "(" + "; ".join(describe_inputs(x) for x in example_inputs) + ")"
    return f"of type {type(example_inputs).__name__}"


def expected_input(model: nn.Module) -> str | None:
    """What ``model`` expects, guessed from its first Linear, Conv or Embedding layer (``None`` if it has none)."""
    first = next((m for m in model.modules() if isinstance(m, _FIRST_LAYERS)), None)
    if isinstance(first, nn.Linear):
        return f"a tensor of shape (N, {first.in_features}) or (N, ..., {first.in_features})"
    if isinstance(first, nn.Embedding):
        return f"integer token ids below {first.num_embeddings}, e.g. of shape (N, L)"
    for conv, spatial in ((nn.Conv1d, "L"), (nn.Conv2d, "H, W"), (nn.Conv3d, "D, H, W")):
        if isinstance(first, conv):
            return f"a tensor of shape (N, {first.in_channels}, {spatial})"
    return None


def check_example_inputs(model: nn.Module, example_inputs: Any, expected: str | None = None) -> None:
    """Run ``model`` once on ``example_inputs`` (eval mode, no grad; its training flag is restored).

    Args:
        model: the model the inputs are for.
        example_inputs: a tensor or a tuple of positional inputs.
        expected: what the model expects, for the message (default: guessed by :func:`expected_input`).

    Raises:
        ConfigError: one line naming the inputs given, the model's error and the expected input.
    """
    from ..errors import ConfigError

    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    except Exception as exc:  # whatever the model raises on inputs it cannot take
        lines = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
        expected = expected or expected_input(model) or "the input its forward takes"
        raise ConfigError(
            f"example_inputs {describe_inputs(example_inputs)} do not run through {type(model).__name__} ({why}); "
            f"it expects {expected}: pass example_inputs= of that form"
        ) from None
    finally:
        model.train(was_training)

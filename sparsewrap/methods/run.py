"""What the controller knows about the training run, shared with its method: the run's length and the optimizer.

A training loop tells the controller once, with ``sp.start(total_steps=..., optimizer=...)`` (``sw.fit`` and
``sparsewrap train`` do it). Methods reach both through ``self.run`` (a :class:`RunContext`): phases laid over
the run's length, and the optimizer state of weights they regrow or reset.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..errors import ConfigError, choices
from .schedules import START_FIX, StepSpec, resolve_steps

# per-weight state entries each optimizer keeps, by exact type (a subclass may keep others)
OPTIMIZER_STATE: dict[type[Optimizer], tuple[str, ...]] = {
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
}


def reset_optimizer_state(optimizer: Optimizer, param: Tensor, index_mask: Tensor) -> None:
    """Zero ``optimizer``'s per-weight state of ``param`` where ``index_mask`` is True, in place.

    SGD's momentum buffer and Adam/AdamW's first and second moments (and AMSGrad's maximum) become zero at
    those entries, as if the weights there had just been created; step counters are left alone. A parameter
    the optimizer has not stepped yet has no state: nothing to do.

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam`` or ``AdamW``.
        param: a parameter the optimizer holds.
        index_mask: a bool tensor of ``param``'s shape (or broadcastable to it), True where to reset.

    Raises:
        ConfigError: for an optimizer whose state is not known, a parameter it does not hold, or a mask that is
            not bool or does not broadcast to the parameter.
    """
    keys = OPTIMIZER_STATE.get(type(optimizer))
    if keys is None:
        raise ConfigError(
            f"cannot reset the state of optimizer {type(optimizer).__name__}: its per-weight state is unknown to "
            f"sparsewrap; use one of {choices(t.__name__ for t in OPTIMIZER_STATE)}"
        )
    if not any(p is param for g in optimizer.param_groups for p in g["params"]):
        raise ConfigError(
            f"the optimizer does not hold this parameter (shape {tuple(param.shape)}); build the optimizer from "
            "sp.param_groups() after sparsify()"
        )
    if index_mask.dtype != torch.bool:
        raise ConfigError(f"index_mask must be a bool tensor (True where to reset), got {index_mask.dtype}")
    try:
        torch.broadcast_shapes(index_mask.shape, param.shape)
    except RuntimeError:
        raise ConfigError(
            f"index_mask of shape {tuple(index_mask.shape)} does not broadcast to the parameter's {tuple(param.shape)}"
        ) from None
    state = optimizer.state.get(param, {})
    with torch.no_grad():
        for key in keys:
            value = state.get(key)
            if torch.is_tensor(value) and value.shape == param.shape:
                value.masked_fill_(index_mask.to(value.device), 0)


def reset_optimizer_state_at(optimizer: Optimizer, param: Tensor, positions: Tensor) -> None:
    """:func:`reset_optimizer_state` at the flat (row-major) ``positions`` of ``param`` (int64), writing those
    entries alone rather than passing over the whole state (for a few positions of a large weight).

    Raises:
        ConfigError: for an optimizer whose state is not known, a parameter it does not hold, or positions that
            are not integers.
    """
    if type(optimizer) not in OPTIMIZER_STATE or not any(
        p is param for g in optimizer.param_groups for p in g["params"]
    ):
        reset_optimizer_state(optimizer, param, torch.zeros(param.shape, dtype=torch.bool))  # raises, naming which
    if positions.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"positions must be an integer tensor of flat positions, got {positions.dtype}")
    state = optimizer.state.get(param, {})
    with torch.no_grad():
        for key in OPTIMIZER_STATE[type(optimizer)]:
            value = state.get(key)
            if not (torch.is_tensor(value) and value.shape == param.shape):
                continue
            at = positions.to(device=value.device, dtype=torch.int64)
            if value.is_contiguous():
                value.view(-1).index_fill_(0, at, 0)
            else:  # another layout (channels_last): through a bool tensor in the logical order
                where = torch.zeros(value.numel(), dtype=torch.bool, device=value.device).index_fill_(0, at, True)
                value.masked_fill_(where.reshape(value.shape), 0)


class RunContext:
    """The run's length and optimizer, as far as the controller was told (``None`` where it was not).

    Attributes:
        total_steps: the number of optimizer steps the run lasts (``sp.step()`` calls), or ``None``.
        optimizer: the optimizer that steps the model's parameters, or ``None``.
    """

    def __init__(self) -> None:
        self.total_steps: int | None = None
        self.optimizer: Optimizer | None = None

    def require_total_steps(self, method: str) -> int:
        """The run's length; raises if the controller was not told it.

        Raises:
            ConfigError: naming the fix (``sp.start(total_steps=...)``).
        """
        if self.total_steps is None:
            raise ConfigError(f"method {method!r} needs the run's length (total_steps); {START_FIX}")
        return self.total_steps

    def resolve_steps(self, value: StepSpec, name: str, method: str) -> int:
        """A step option as a step number: an int as is, a fraction of the run times ``total_steps``.

        Raises:
            ConfigError: on an invalid value, or a fraction when the run's length is unknown.
        """
        return resolve_steps(value, self.total_steps, name, method)

    def require_optimizer(self, method: str) -> Optimizer:
        """The run's optimizer; raises if the controller was not told it.

        Raises:
            ConfigError: naming the fix (``sp.start(optimizer=...)``).
        """
        if self.optimizer is None:
            raise ConfigError(f"method {method!r} needs the optimizer (to reset its state); {START_FIX}")
        return self.optimizer

    def reset_optimizer_state(self, param: Tensor, index_mask: Tensor, method: str) -> None:
        """:func:`reset_optimizer_state` on the run's optimizer (see there).

        Raises:
            ConfigError: if the optimizer is unknown to the controller or its state cannot be reset.
        """
        reset_optimizer_state(self.require_optimizer(method), param, index_mask)

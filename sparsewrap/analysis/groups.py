"""The data of the channel analysis: segments of a channel axis, channel groups, their uses, the walk's state.

:mod:`sparsewrap.analysis.channels` fills them in; the rule modules and the purge read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class Seg:
    """Channels ``[lo, hi)`` of one space (``space=None``: an opaque run), ``rep`` positions per channel."""

    space: int | None
    lo: int
    hi: int
    rep: int = 1

    @property
    def width(self) -> int:
        return (self.hi - self.lo) * self.rep


@dataclass
class Use:
    """A tensor dimension of a module (or a module attribute) indexed by a layout's positions.

    Attributes:
        module: qualified module name (``""`` for the root).
        role: ``"out"`` (a producer's rows and bias), ``"in"`` (a consumer's input dimension), ``"dw"`` (a
            depthwise conv passing channels through), ``"norm"`` (a per-channel norm) or ``"param"`` (a
            per-channel tensor attribute ``param`` sliced along ``dim``).
        segs: the layout of the positions (``space`` is a group index once the walk is finished).
        groups: ``groups`` of a conv (``"in"``/``"out"``) or of a GroupNorm (``"norm"``).
        zero: which positions are exactly zero (value pass): of the tensor read (``"in"``), or of the
            output (``"out"``, ``"dw"``).
    """

    module: str
    role: str
    segs: tuple[Seg, ...]
    groups: int = 1
    param: str = ""
    dim: int = 0
    zero: Tensor | None = None


@dataclass
class ChannelGroup:
    """Channels that must be zeroed or removed together.

    Attributes:
        size: number of channels.
        producers: modules whose weight dim 0 indexes these channels (convs, Linears, depthwise convs).
        companions: ``(module, param)`` per-channel parameters zeroed with the channel (biases, norm affine).
        consumers: modules that read these channels on their input (weight dim 1).
        reasons: why the group is not exact or cannot be purged (empty when it can).
        blocked: which channels the reasons concern (bool per channel): an op that sees only a slice of the
            group pins that slice, the other channels may still be removed. ``None`` until the walk finishes.
    """

    size: int
    producers: list[str] = field(default_factory=list)
    companions: list[tuple[str, str]] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    blocked: Tensor | None = None

    @property
    def exact(self) -> bool:
        return not self.reasons


@dataclass
class ChannelAnalysis:
    """Groups plus every use of their channels (what the purge slices).

    ``aliases`` (real mode only) pairs two layouts of equal width combined position by position although their
    segments differ (e.g. a ``cat`` of two branches added to one wider tensor): the channels at each position
    must be kept or removed together, across groups.
    """

    groups: list[ChannelGroup]
    uses: list[Use]
    aliases: list[tuple[tuple[Seg, ...], tuple[Seg, ...]]] = field(default_factory=list)


@dataclass
class State:
    """What the walk knows about one tensor: its channel layout, axis and exact zeros."""

    segs: tuple[Seg, ...]
    axis: int  # non-negative when ndim is known, else 1 (N, C, ...) or -1 (..., C)
    ndim: int | None
    zero: Tensor
    spatial_one: bool = False  # spatial dims known to be 1 (after a global pool); used without shapes

    @property
    def width(self) -> int:
        return sum(s.width for s in self.segs)

    def with_(self, **kw) -> State:
        d = dict(segs=self.segs, axis=self.axis, ndim=self.ndim, zero=self.zero, spatial_one=self.spatial_one)
        d.update(kw)
        return State(**d)

"""From a channel analysis to kept indices per module.

A channel of a group is *removable* when, wherever a consumer reads it, it is exactly zero or meets only zero
weight columns; then dropping it from every tensor of the group changes no other value (all ops inside a group
are per-channel). Kept sets start as the non-removable channels and grow until every layout constraint holds:
``round_to`` multiples, grouped convs (equal counts per kept group, a group dropped only when empty on both
sides), GroupNorm (whole normalisation groups) and at least one channel. Growing is always safe: a kept zero
channel is just a zero channel.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..analysis.channels import ChannelAnalysis, Seg, Use, weight_support
from .heads import head_rule
from .shrink import shrinker_for

Ops = dict[str, dict[str, Tensor]]  # module name -> role -> kept indices


@dataclass
class Unit:
    """One independently accepted or rolled back piece of the purge: a channel group, or a module's heads."""

    kind: str  # "group" or "heads"
    key: int | str  # group index (the first of ``members``) or attention module name
    label: str
    size: int
    removable: int
    members: tuple[int, ...] = ()  # groups accepted together (tied by aliases)


def _blocked(g) -> Tensor:
    """Channels the analysis pins (all of them if it gave reasons without saying which channels)."""
    if g.blocked is not None and (bool(g.blocked.any()) or not g.reasons):
        return g.blocked.clone()
    return torch.full((g.size,), bool(g.reasons), dtype=torch.bool)


def _role_key(u: Use) -> str:
    return f"param:{u.param}:{u.dim}" if u.role == "param" else u.role


class Planner:
    """Removable channels, layout constraints and per-module ops for one analysed model."""

    def __init__(self, model: nn.Module, analysis: ChannelAnalysis, round_to: int = 1) -> None:
        self.model = model
        self.groups = analysis.groups
        self.uses = analysis.uses
        self.round_to = max(1, int(round_to))
        self.modules = dict(model.named_modules())
        self.reasons: dict[int, list[str]] = {i: list(g.reasons) for i, g in enumerate(self.groups)}
        self.blocked = {i: _blocked(g) for i, g in enumerate(self.groups)}
        self._colzero: dict[str, Tensor] = {}
        self._refuse_shared_uses()
        self.dead = {i: self._dead(i) for i in range(len(self.groups))}
        self.removable = {i: self._removable(i) & ~self.blocked[i] for i in range(len(self.groups))}
        self.classes, self.components = self._alias_classes(analysis.aliases)
        self.heads = self._dead_heads()

    # -- what may not be touched -----------------------------------------------------------------------------
    def _refuse(self, u: Use, reason: str) -> None:
        for s in u.segs:
            if s.space is not None:
                self.reasons[s.space].append(reason)
                self.blocked[s.space][s.lo : s.hi] = True

    def _refuse_shared_uses(self) -> None:
        counts = Counter((u.module, _role_key(u)) for u in self.uses)
        shared = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        for u in self.uses:
            if u.role == "chunk":
                continue
            module = self.modules.get(u.module)
            if module is None:
                self._refuse(u, f"{u.module}: module not found")
                continue
            if counts[(u.module, _role_key(u))] > 1:
                self._refuse(u, f"{u.module} is called more than once (its weights serve several inputs)")
            if any(shared[id(p)] > 1 for p in module.parameters(recurse=False)):
                self._refuse(u, f"{u.module} has a weight tied to another module")
            if u.role != "param" and shrinker_for(module) is None:
                self._refuse(u, f"{u.module}: no shrink function for {type(module).__name__}")

    # -- zeros -----------------------------------------------------------------------------------------------
    def _dead(self, g: int) -> Tensor:
        """Channels that are exactly zero at every producer of the group."""
        dead = torch.ones(self.groups[g].size, dtype=torch.bool)
        for u in self.uses:
            if u.role != "out" or u.zero is None:
                continue
            for s, z in self._per_seg(u):
                if s.space == g:
                    dead[s.lo : s.hi] &= z.reshape(s.hi - s.lo, s.rep).all(1)
        return dead

    def _per_seg(self, u: Use):
        pos = 0
        for s in u.segs:
            yield s, u.zero[pos : pos + s.width]
            pos += s.width

    def colzero(self, name: str) -> Tensor:
        """Input positions of a Conv/Linear whose weight column is entirely zero."""
        if name not in self._colzero:
            m = self.modules[name]
            support = weight_support(m)
            g = getattr(m, "groups", 1)
            nz = support.reshape(g, support.shape[0] // g, support.shape[1]).any(1).reshape(-1)
            self._colzero[name] = ~nz
        return self._colzero[name]

    def _removable(self, g: int) -> Tensor:
        ok = torch.ones(self.groups[g].size, dtype=torch.bool)
        for u in self.uses:
            if u.role != "in":
                continue
            pos = 0
            for s in u.segs:
                if s.space == g:
                    z = u.zero[pos : pos + s.width] if u.zero is not None else torch.zeros(s.width, dtype=torch.bool)
                    z = z | self.colzero(u.module)[pos : pos + s.width]
                    ok[s.lo : s.hi] &= z.reshape(s.hi - s.lo, s.rep).all(1)
                pos += s.width
        return ok

    @staticmethod
    def _positions(segs: tuple[Seg, ...]):
        for s in segs:
            for c in range(s.lo, s.hi):
                for _ in range(s.rep):
                    yield None if s.space is None else (s.space, c)

    def _alias_classes(self, aliases: list) -> tuple[list[list[tuple[int, int]]], list[tuple[int, ...]]]:
        """Channels tied across groups by aliases (kept or removed together), and the groups tied together."""
        parent: dict[tuple[int, int], tuple[int, int]] = {}

        def find(x: tuple[int, int]) -> tuple[int, int]:
            parent.setdefault(x, x)
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        pinned = set()
        for a, b in aliases:
            for x, y in zip(self._positions(a), self._positions(b)):
                if x is None or y is None:
                    pinned.update(v for v in (x, y) if v is not None)
                elif x != y:
                    parent[find(x)] = find(y)
        members: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for x in list(parent) + list(pinned):
            members[find(x)].append(x)
        classes = [sorted(set(m)) for m in members.values()]
        for cls in classes:  # a channel goes only if every channel tied to it can go
            ok = all(g in self.removable and bool(self.removable[g][c]) and (g, c) not in pinned for g, c in cls)
            if not ok:
                for g, c in cls:
                    if g in self.removable:
                        self.removable[g][c] = False
        link: dict[int, int] = {}

        def root(g: int) -> int:
            link.setdefault(g, g)
            while link[g] != g:
                g = link[g]
            return g

        for cls in classes:
            for g, _ in cls[1:]:
                link[root(g)] = root(cls[0][0])
        comps: dict[int, list[int]] = defaultdict(list)
        for g in range(len(self.groups)):
            comps[root(g)].append(g)
        return classes, [tuple(sorted(c)) for c in comps.values()]

    def _dead_heads(self) -> dict[str, Tensor]:
        outs = {u.module for u in self.uses if u.role == "out"}
        shared = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        found = {}
        for name, module in self.modules.items():
            rule = head_rule(module)
            if rule is None or not any(o.startswith(f"{name}.") for o in outs):
                continue
            if any(shared[id(p)] > 1 for p in module.parameters()):
                continue
            dead = rule.dead(module)
            if bool(dead.any()):
                found[name] = dead
        return found

    # -- units -----------------------------------------------------------------------------------------------
    def units(self) -> list[Unit]:
        out = []
        for comp in self.components:
            if any(g not in self.removable for g in comp):
                continue  # a group tied to a blocked one stays with it
            n = sum(int(self.removable[g].sum()) for g in comp)
            if n:
                grp = self.groups[comp[0]]
                out.append(Unit("group", comp[0], grp.producers[0], grp.size, n, comp))
        for name, dead in self.heads.items():
            out.append(Unit("heads", name, name, dead.numel(), int(dead.sum())))
        return out

    # -- kept sets under the layout constraints ---------------------------------------------------------------
    def mask(self, segs: tuple[Seg, ...], keep: dict[int, Tensor]) -> Tensor:
        parts = []
        for s in segs:
            if s.space is None or s.space not in keep:
                parts.append(torch.ones(s.width, dtype=torch.bool))
            else:
                parts.append(keep[s.space][s.lo : s.hi].repeat_interleave(s.rep))
        return torch.cat(parts) if parts else torch.ones(0, dtype=torch.bool)

    @staticmethod
    def _grow(segs: tuple[Seg, ...], keep: dict[int, Tensor], positions: Tensor) -> bool:
        changed, pos = False, 0
        for s in segs:
            if s.space is not None and s.space in keep:
                sub = positions[pos : pos + s.width].reshape(s.hi - s.lo, s.rep).any(1)
                new = keep[s.space][s.lo : s.hi] | sub
                if not torch.equal(new, keep[s.space][s.lo : s.hi]):
                    keep[s.space][s.lo : s.hi] = new
                    changed = True
            pos += s.width
        return changed

    @staticmethod
    def _pad_rows(blocks: Tensor, rows: Tensor, count: int) -> Tensor:
        """Set the first not-yet-kept positions of each selected row until it keeps ``count``."""
        out = blocks.clone()
        for j in torch.nonzero(rows).flatten().tolist():
            missing = count - int(out[j].sum())
            if missing > 0:
                free = torch.nonzero(~out[j]).flatten()[:missing]
                out[j, free] = True
        return out

    def _grouped_conv(self, name: str, uin: Use | None, uout: Use, keep: dict[int, Tensor]) -> bool:
        m = self.modules[name]
        g, cin, cout = m.groups, m.in_channels, m.out_channels
        pin = self.mask(uin.segs, keep).reshape(g, cin // g) if uin else torch.ones(g, cin // g, dtype=torch.bool)
        pout = self.mask(uout.segs, keep).reshape(g, cout // g)
        alive = pin.any(1) | pout.any(1)
        if not bool(alive.any()):
            alive[0] = True
        kin = max(int(pin[alive].sum(1).max()), 1)
        kout = max(int(pout[alive].sum(1).max()), 1)
        changed = self._grow(uout.segs, keep, self._pad_rows(pout, alive, kout).reshape(-1))
        if uin:
            changed |= self._grow(uin.segs, keep, self._pad_rows(pin, alive, kin).reshape(-1))
        return changed

    def _round(self, keep: dict[int, Tensor]) -> bool:
        changed = False
        for k in keep.values():
            n, size = int(k.sum()), k.numel()
            want = min(size, max(self.round_to, math.ceil(n / self.round_to) * self.round_to))
            if want > n:
                free = torch.nonzero(~k).flatten()[: want - n]
                k[free] = True
                changed = True
        return changed

    def keep_sets(self, accepted: set[int]) -> dict[int, Tensor]:
        """Kept channels of every accepted group once all constraints hold (a fixpoint: sets only grow)."""
        keep = {g: ~self.removable[g] for g in accepted}
        convs: dict[str, dict[str, Use]] = defaultdict(dict)
        for u in self.uses:
            if u.role in ("in", "out") and u.groups > 1:
                convs[u.module][u.role] = u
        norms = [u for u in self.uses if u.role == "norm" and u.groups > 1]
        chunks = [u for u in self.uses if u.role == "chunk"]
        for _ in range(10_000):
            changed = self._round(keep)
            for name, io in convs.items():
                if "out" in io:
                    changed |= self._grouped_conv(name, io.get("in"), io["out"], keep)
            for u in norms:
                m = self.mask(u.segs, keep)
                whole = m.reshape(u.groups, -1).any(1, keepdim=True).expand(u.groups, m.numel() // u.groups)
                changed |= self._grow(u.segs, keep, whole.reshape(-1))
            for u in chunks:  # every piece of a chunk(n) keeps the same number of channels
                m = self.mask(u.segs, keep).reshape(u.groups, -1)
                rows = torch.ones(u.groups, dtype=torch.bool)
                changed |= self._grow(u.segs, keep, self._pad_rows(m, rows, int(m.sum(1).max())).reshape(-1))
            for cls in self.classes:
                if any(g not in keep or bool(keep[g][c]) for g, c in cls):
                    for g, c in cls:
                        if g in keep and not bool(keep[g][c]):
                            keep[g][c] = True
                            changed = True
            if not changed:
                return keep
        raise RuntimeError("purge constraints did not settle")  # pragma: no cover - sets only grow

    def ops(self, keep: dict[int, Tensor], heads: set[str]) -> Ops:
        """``{module: {role: kept indices}}`` for the accepted groups and head units."""
        out: Ops = defaultdict(dict)
        for u in self.uses:
            if u.role == "chunk" or not any(s.space in keep for s in u.segs):
                continue
            m = self.mask(u.segs, keep)
            if bool(m.all()):
                continue
            out[u.module][_role_key(u)] = torch.nonzero(m).flatten()
        for name in heads:
            dead = self.heads[name]
            kept = torch.nonzero(~dead).flatten()
            out[name]["heads"] = kept if kept.numel() else torch.tensor([0])
        return dict(out)

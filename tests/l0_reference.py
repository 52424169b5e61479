"""The hard-concrete formulas of Louizos et al. 2018 (https://arxiv.org/abs/1712.01312), written out in float64.

The tests compare the library's gates, probabilities and exported values with these, so that a reference is never
the library's own code. Limits ``gamma = -0.1``, ``zeta = 1.1``, noise bounds ``eps = 1e-6``, temperature 2/3.
"""

from __future__ import annotations

import math

import torch

from sparsewrap.parametrizations.hard_concrete import uniform_noise


def ref_sample(log_alpha: torch.Tensor, u: torch.Tensor, beta: float = 2 / 3) -> torch.Tensor:
    """``clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) * 1.2 - 0.1, 0, 1)``, differentiable in float64."""
    u = u.double()
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha.double()) / beta)
    return torch.clamp(s * (1.1 - (-0.1)) + (-0.1), 0.0, 1.0)


def ref_prob_nonzero(log_alpha: torch.Tensor, beta: float = 2 / 3) -> torch.Tensor:
    """``P(z != 0) = 1 - clamp(sigmoid(beta log(0.1 / 1.1) - log_alpha), 1e-6, 1 - 1e-6)`` in float64."""
    return 1 - torch.clamp(torch.sigmoid(beta * math.log(0.1 / 1.1) - log_alpha.double()), 1e-6, 1 - 1e-6)


def ref_eval_gates(log_alpha: torch.Tensor, beta: float = 2 / 3) -> torch.Tensor:
    """The median gate ``clamp(sigmoid(log_alpha / beta) * 1.2 - 0.1, 0, 1)`` in float64."""
    return torch.clamp(torch.sigmoid(log_alpha.double() / beta) * 1.2 - 0.1, 0.0, 1.0)


def noise(like: torch.Tensor, seed: int) -> torch.Tensor:
    """The uniforms that the library draws for ``like`` right after ``torch.manual_seed(seed)``, checked in range."""
    torch.manual_seed(seed)
    u = uniform_noise(like)
    assert bool(((u >= 1e-6) & (u <= 1 - 1e-6)).all())
    return u


def ref_mean_gate(log_alpha: torch.Tensor, beta: float = 2 / 3, points: int = 1_000_000) -> torch.Tensor:
    """``E[z]`` per entry: the integral of the sample over ``u ~ U(eps, 1 - eps)`` by a fine midpoint rule (float64)."""
    u = 1e-6 + (1 - 2e-6) * (torch.arange(points, dtype=torch.float64) + 0.5) / points
    flat = log_alpha.detach().double().reshape(-1)
    return torch.stack([ref_sample(torch.full_like(u, float(a)), u, beta).mean() for a in flat]).view(log_alpha.shape)


def _factors(got: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``got / original`` where the original is non-zero, 0 elsewhere (float64)."""
    got, original = got.detach().double(), original.detach().double()
    return torch.where(original != 0, got / torch.where(original != 0, original, 1.0), 0.0)


def _gate_values(log_alpha: torch.Tensor, kept: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exported gate of each unit (0 where dropped; the eval gate where kept, ``E[z]`` where that is 0), and
    the tolerance of each (the library integrates ``E[z]`` with 256 points)."""
    z = torch.where(kept, ref_eval_gates(log_alpha, beta), 0.0)
    restored = kept & (z == 0)
    tol = torch.full_like(z, 1e-6)
    if restored.any():
        z[restored] = ref_mean_gate(log_alpha.detach()[restored], beta, points=200_000)
        tol[restored] = 2e-4
    return z, tol


def check_weight_gated_export(targets: list, plain: torch.nn.Module, target: float, beta: float) -> int:
    """Per-weight gates: the export keeps the ``round((1 - target) * n)`` weights of highest ``log_alpha`` over all
    layers, each times its gate; returns the number of zeros in the exported weights."""
    las = [t.module.parametrizations.weight[0].log_alpha.detach().double() for t in targets]
    flat = torch.cat([la.reshape(-1) for la in las])
    k = round((1 - target) * flat.numel())
    order = flat.sort(descending=True).values
    assert order[k - 1] > order[k], "tied log_alpha at the cut: the expected selection is ambiguous"
    zeros = 0
    for t, la in zip(targets, las):
        z, tol = _gate_values(la, la >= order[k - 1], beta)
        got = plain.get_submodule(t.name).weight
        torch.testing.assert_close(_factors(got, t.original), z * (t.original != 0), rtol=0, atol=tol.max().item())
        zeros += int((got == 0).sum())
    return zeros


def check_channel_gated_export(wrapped: list, plain: torch.nn.Module, beta: float) -> None:
    """Channel gates: every gated tensor is exported as ``original[o, i] * z_o * keep_i`` with ``z_o`` the formula's
    gate of output channel ``o`` (0 for a dropped channel, the same for every tensor the gate scales) and
    ``keep_i`` 0 or 1 per input channel; a dropped channel is zero in every tensor of its group."""
    kept_by_gate: dict[int, torch.Tensor] = {}
    for mname, module, tname, p in wrapped:
        original = module.parametrizations[tname].original.detach()
        got = getattr(plain.get_submodule(mname), tname).detach()
        rows, cols = got.reshape(got.shape[0], -1), original.reshape(got.shape[0], -1)
        kept = rows.ne(0).any(1) | cols.eq(0).all(1)  # a row of zero originals tells nothing: count it kept
        if p.out_gate is not None:
            kept = kept_by_gate.setdefault(id(p.out_gate), kept)
            assert torch.equal(rows.ne(0).any(1) & ~kept, torch.zeros_like(kept)), f"{mname}.{tname}"
            if p.mask_only:
                z, tol = kept.double(), torch.full(kept.shape, 1e-6, dtype=torch.float64)
            else:
                z, tol = _gate_values(p.out_gate.log_alpha, kept, beta)
        else:
            z, tol = torch.ones(rows.shape[0], dtype=torch.float64), torch.full((rows.shape[0],), 1e-6)
        if got.dim() > 1:  # the kept inputs: the same for every kept row
            inputs = got[kept].ne(0).reshape(int(kept.sum()), got.shape[1], -1).any(2).any(0)
            inputs |= original[kept].eq(0).reshape(int(kept.sum()), got.shape[1], -1).all(2).all(0)
            keep_in = inputs.double().view(1, -1, *([1] * (got.dim() - 2)))
        else:
            keep_in = torch.ones(())
        shape = (-1,) + (1,) * (got.dim() - 1)
        expected = (z.view(shape) * keep_in).expand(got.shape) * (original != 0)
        torch.testing.assert_close(_factors(got, original), expected, rtol=0, atol=tol.max().item(), msg=mname)

"""The hard-concrete formulas of Louizos et al. 2018 (https://arxiv.org/abs/1712.01312), written out in float64.

The tests compare the library's gates, probabilities and exported values with these, so that a reference is never
the library's own code. Limits ``gamma = -0.1``, ``zeta = 1.1``, noise bounds ``eps = 1e-6``, temperature 2/3.
"""

from __future__ import annotations

import math

import torch

from sparsewrap.parametrizations.gated import uniform_noise


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

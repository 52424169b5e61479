"""HALO's fused penalty (sparsewrap/methods/penalty/halo_term.py): autograd's gradients in float64 (gradcheck),
the native kernels against the eager path and against the plain expression, the clamp of |λ|."""

from __future__ import annotations

import pytest
import torch

import sparsewrap as sw
from sparsewrap import native, switches
from sparsewrap.methods.penalty.halo_term import HaloTerm, SlopeHint, clamp_magnitude, halo_term

from .zoo import ZOO

needs_native = pytest.mark.skipif(native.kernels() is None, reason="no C compiler: the eager path is used")


def _pairs(dtype: torch.dtype, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in [(5, 4), (7,), (3, 2, 3, 3)]:
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        lam = (0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)) * torch.where(
            torch.rand(shape, generator=gen) < 0.2, -1.0, 1.0
        ).double()  # some negative coefficients: the sign of λ enters the gradient
        out.append((w.to(dtype).requires_grad_(), lam.to(dtype).requires_grad_()))
    return out


def _reference(xi: float, psi: float, p: float, squared: bool, pairs) -> torch.Tensor:
    """The plain expression, differentiated by autograd."""
    lasso = torch.stack([(w.abs() / lam.square()).sum() for w, lam in pairs]).sum()
    total = torch.stack([lam.abs().sum() for _, lam in pairs]).sum() - p
    return xi * lasso + psi * (total.square() if squared else total.abs())


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("p", [1.0, 1e3])  # Σ|λ| above and below p: both signs of R'
def test_halo_term_gradients_match_autograd_in_float64(squared: bool, p: float) -> None:
    pairs = _pairs(torch.float64)
    flat = [t for pair in pairs for t in pair]
    assert torch.autograd.gradcheck(lambda *t: HaloTerm.apply(0.3, 0.7, p, squared, 0.0, None, False, *t), flat)
    value = halo_term(0.3, 0.7, p, squared, pairs)
    expected = _reference(0.3, 0.7, p, squared, pairs)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    got = torch.autograd.grad(value, flat)
    want = torch.autograd.grad(expected, flat)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_a_zero_weight_gets_no_gradient_and_its_coefficient_only_the_hierarchy_term() -> None:
    w = torch.tensor([0.0, 2.0], dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    halo_term(1.0, 2.0, 10.0, False, [(w, lam)]).backward()  # Σ|λ| = 1.5 < p: R' = -1
    assert w.grad.tolist() == [0.0, 1.0]  # sign(w) / λ²
    assert lam.grad.tolist() == [-2.0, -2 * 2.0 / -1.0 - 2.0 * -1.0]  # -2|w|/λ³ + ψ R' sign(λ)


@needs_native
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize(("p", "scale", "guess"), [(3e4, 1.0, 1.0), (3e4, 3.0, 1.0), (1e6, 1.0, 1.0), (1e6, 0.5, -1.0)])
def test_gradients_computed_ahead_match_the_eager_backward_whatever_the_hint(squared, p, scale, guess, monkeypatch):
    """The native forward writes the gradients for g = 1 and the hint's R'; the backward corrects a wrong hint
    (Σ|λ| ≈ 5e4 against p = 1e6: R' = -1, or a squared slope) and a loss scale g != 1."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(100003, generator=gen)
    lam = (0.5 + torch.rand(100003, generator=gen)) * torch.where(torch.rand(100003, generator=gen) < 0.3, -1.0, 1.0)
    results = []
    for on in (True, False):
        monkeypatch.setattr(switches, "NATIVE", on)
        a, b = w.clone().requires_grad_(), lam.clone().requires_grad_()
        hint = SlopeHint(guess)
        value = halo_term(0.01, 0.5, p, squared, [(a, b)], hint=hint)
        (value * scale).backward()
        results.append((value.detach(), a.grad, b.grad, hint.slope))
    (v1, gw1, gl1, s1), (v0, gw0, gl0, _) = results
    excess = lam.double().abs().sum() - p
    assert s1 == pytest.approx(float(2 * excess if squared else torch.sign(excess)), rel=1e-9)
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=0)
    torch.testing.assert_close(gw1, gw0, rtol=1e-6, atol=0)
    torch.testing.assert_close(gl1, gl0, rtol=1e-5, atol=1e-6 * max(1.0, abs(s1)))


@pytest.mark.parametrize("native_on", [True, False])
def test_the_penalty_clamps_small_coefficients_before_using_them(native_on, monkeypatch) -> None:
    monkeypatch.setattr(switches, "NATIVE", native_on)
    n = 70001  # above the kernels' threshold for threads
    w = torch.full((n,), 0.5)
    lam = torch.nn.Parameter(torch.ones(n))
    with torch.no_grad():
        lam[:3] = torch.tensor([1e-6, -1e-6, 0.0])
    version = lam._version
    value = halo_term(1.0, 0.0, 0.0, False, [(w, lam)], floor=1e-2)
    clamped = torch.ones(n)
    clamped[:3] = torch.tensor([1e-2, -1e-2, 1e-2])
    assert torch.equal(lam.detach(), clamped)
    assert lam._version > version
    torch.testing.assert_close(value, (0.5 / clamped.double().square()).sum().float(), rtol=1e-6, atol=0)
    value.backward()
    torch.testing.assert_close(lam.grad[:2], torch.tensor([-2 * 0.5 / 1e-6, 2 * 0.5 / 1e-6]), rtol=1e-5, atol=0)
    with torch.no_grad():  # no gradients wanted: the sums alone, the clamp still done
        lam[5] = 1e-7
        halo_term(1.0, 0.0, 0.0, False, [(w, lam)], floor=1e-2)
    assert float(lam.detach()[5]) == pytest.approx(1e-2)


@needs_native
@pytest.mark.parametrize("squared", [False, True])
def test_native_kernels_give_the_eager_values_and_gradients(squared: bool, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(70000, generator=gen)  # above the kernels' threshold for threads
    w[::7] = 0.0
    lam = (0.5 + torch.rand(70000, generator=gen)) * torch.where(torch.rand(70000, generator=gen) < 0.3, -1.0, 1.0)
    results = []
    for on in (True, False):
        monkeypatch.setattr(switches, "NATIVE", on)
        a, b = w.clone().requires_grad_(), lam.clone().requires_grad_()
        value = halo_term(0.01, 0.5, 3e4, squared, [(a, b)])
        value.backward()
        results.append((value.detach(), a.grad, b.grad))
    (v1, gw1, gl1), (v0, gw0, gl0) = results
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=0)
    torch.testing.assert_close(gw1, gw0, rtol=1e-6, atol=0)
    torch.testing.assert_close(gl1, gl0, rtol=1e-5, atol=1e-7)
    assert torch.equal(gw1 == 0, w == 0)


@pytest.mark.parametrize("native_on", [True, False])
def test_clamp_magnitude_raises_small_coefficients_to_the_floor_keeping_their_sign(native_on, monkeypatch) -> None:
    monkeypatch.setattr(switches, "NATIVE", native_on)
    lam = torch.nn.Parameter(torch.tensor([0.5, -0.5, 1e-6, -1e-6, 0.0, -0.0, 2e-4, float("nan")]))
    version = lam._version
    clamp_magnitude(lam, 1e-4)
    expected = torch.tensor([0.5, -0.5, 1e-4, -1e-4, 1e-4, -1e-4, 2e-4, float("nan")])
    torch.testing.assert_close(lam.detach(), expected, rtol=0, atol=0, equal_nan=True)
    assert lam._version > version  # writers that cache on version counters see the change


def test_halo_trains_as_with_the_plain_expression() -> None:
    """Three SGD steps of the method against the same steps with the plain expression as the penalty."""
    x = ZOO["mlp"][1]()
    models = []
    for fused in (True, False):
        torch.manual_seed(0)
        sp = sw.sparsify(ZOO["mlp"][0](), "halo", target=0.6, psi=0.3, penalize_bias=True, steer=False)
        opt = torch.optim.SGD(sp.param_groups(lr=0.05), lr=0.05, momentum=0.9)
        sp.start(total_steps=30, optimizer=opt)
        for _ in range(3):
            loss = sp.model(x).pow(2).mean()
            if fused:
                loss = loss + sp.penalty()
            else:
                m = sp.method
                loss = loss + _reference(m.xi, m.psi(), m.config.p, m.config.hierarchy != "l1", m.penalized())
            loss.backward()
            opt.step()
            opt.zero_grad()
            sp.step()
        models.append(sp.model.state_dict())
    for key in models[0]:
        torch.testing.assert_close(models[0][key], models[1][key], rtol=1e-5, atol=1e-7, msg=key)

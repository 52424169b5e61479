"""Exact values of the L0 building blocks: hard-concrete gates, P(gate != 0), expected L0, dual ascent.

Expected numbers are computed here, independently of the library's code: with ``math`` on scalars, or with the
formulas written out in float64 in ``tests/l0_reference.py``. Only the uniform noise comes from the library
(drawn under the same seed as the code under test draws it), since a reference sample needs the very same ``u``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sparsewrap as sw
from sparsewrap.parametrizations.gated import ChannelGate, ChannelGated, GateBank
from sparsewrap.parametrizations.gated_weight import GatedMul, gated_mul
from sparsewrap.parametrizations.hard_concrete import (
    BETA,
    EPS,
    GAMMA,
    ZETA,
    eval_gates,
    expected_count,
    mean_gates,
    open_threshold,
    prob_nonzero,
    sample_gates,
    sample_gates_fused,
)

from .l0_reference import noise, ref_eval_gates, ref_mean_gate, ref_prob_nonzero, ref_sample
from .zoo import ZOO


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def hard_concrete(log_alpha: float, u: float, beta: float = 2 / 3) -> float:
    s = sigmoid((math.log(u) - math.log(1 - u) + log_alpha) / beta)
    return min(max(s * (1.1 - (-0.1)) + (-0.1), 0.0), 1.0)


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# -- hard-concrete gates -------------------------------------------------------------------------------------------
def test_constants_are_the_papers():
    assert (GAMMA, ZETA, EPS) == (-0.1, 1.1, 1e-6) and BETA == pytest.approx(2 / 3)


def test_sample_matches_hand_computation_for_given_noise():
    la = t64(0.0, math.log(3.0), 0.0, -2.0, 5.0)
    u = t64(0.5, 0.25, 0.75, 0.9, 0.02)
    z = sample_gates(la, BETA, u)
    expected = [hard_concrete(a, b) for a, b in zip(la.tolist(), u.tolist())]
    torch.testing.assert_close(z, t64(*expected), rtol=0, atol=1e-15)
    assert z[0].item() == pytest.approx(0.5) and z[1].item() == pytest.approx(0.5)  # logit(u) cancels log_alpha
    assert z[2].item() == pytest.approx(sigmoid(1.5 * math.log(3)) * 1.2 - 0.1)


def test_samples_are_bounded_and_hit_both_ends():
    torch.manual_seed(0)
    la = torch.linspace(-6, 6, 101, dtype=torch.float64).repeat(2000)
    z = sample_gates(la)
    assert z.min() == 0.0 and z.max() == 1.0  # the stretch makes exact zeros and ones reachable
    assert bool(((z >= 0) & (z <= 1)).all())
    assert sample_gates(torch.full((1000,), -60.0)).max() == 0.0  # u >= eps bounds the logistic noise
    assert sample_gates(torch.full((1000,), 60.0)).min() == 1.0


def test_noise_is_bounded_by_eps():
    z_low = sample_gates(t64(0.0), BETA, t64(EPS))
    assert z_low.item() == pytest.approx(hard_concrete(0.0, 1e-6))


def test_prob_nonzero_closed_form():
    shift = (2 / 3) * math.log(1.1 / 0.1)  # -beta * log(-gamma/zeta) = 1.5986
    la = t64(0.0, -math.log(100.0), math.log(100.0), -1.0)
    expected = [sigmoid(a + shift) for a in la.tolist()]
    torch.testing.assert_close(prob_nonzero(la), t64(*expected), rtol=0, atol=1e-15)
    assert prob_nonzero(t64(0.0)).item() == pytest.approx(0.83182, abs=1e-5)
    assert prob_nonzero(t64(-math.log(100))).item() == pytest.approx(0.04713, abs=1e-5)  # the clamp's floor
    assert prob_nonzero(t64(-100.0)).item() == pytest.approx(EPS)  # clamped like the reference code


def test_prob_nonzero_agrees_with_monte_carlo():
    torch.manual_seed(1)
    u = 1e-6 + (1 - 2e-6) * torch.rand(400_000, dtype=torch.float64)
    frac = (ref_sample(torch.full_like(u, -0.7), u) > 0).double().mean().item()
    assert frac == pytest.approx(prob_nonzero(t64(-0.7)).item(), abs=4e-3)


def test_eval_gate_values():
    threshold = (2 / 3) * math.log(1 / 11)
    assert open_threshold() == pytest.approx(threshold) and threshold == pytest.approx(-1.5986, abs=1e-4)
    z = eval_gates(t64(0.0, threshold - 1e-9, threshold + 0.01, (2 / 3) * math.log(11), 10.0, -10.0))
    assert z[0].item() == pytest.approx(0.5)
    assert z[1].item() == 0.0 and z[2].item() > 0.0
    assert z[3].item() == pytest.approx(1.0) and z[4].item() == 1.0 and z[5].item() == 0.0
    assert z[2].item() == pytest.approx(sigmoid((threshold + 0.01) * 1.5) * 1.2 - 0.1)


def test_mean_gate_by_quadrature_matches_a_fine_integral_and_monte_carlo():
    torch.manual_seed(2)
    la = t64(-2.0, 0.0, 1.0, 20.0)
    u = 1e-6 + (1 - 2e-6) * torch.rand(200_000, 1, dtype=torch.float64)
    mc = ref_sample(la.expand(200_000, 4), u.expand(-1, 4)).mean(0)
    torch.testing.assert_close(mean_gates(la), mc, rtol=0, atol=4e-3)
    torch.testing.assert_close(mean_gates(la), ref_mean_gate(la), rtol=0, atol=1e-4)  # 4000 times finer
    assert mean_gates(t64(0.0)).item() == pytest.approx(0.5, abs=1e-12)  # symmetric around u = 1/2
    assert mean_gates(t64(20.0)).item() == 1.0


def test_fused_gate_equals_reference_formula_and_gradients():
    torch.manual_seed(3)
    w = torch.randn(40, 30, dtype=torch.float64, requires_grad=True)
    la = (3 * torch.randn(40, 30, dtype=torch.float64)).requires_grad_()
    g = torch.randn(40, 30, dtype=torch.float64)
    torch.manual_seed(9)
    out = gated_mul(w, la)
    (out * g).sum().backward()
    grads = w.grad.clone(), la.grad.clone()
    w.grad = la.grad = None
    ref = w * ref_sample(la, noise(la.detach(), 9))  # the same noise, the formula written out
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], w.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], la.grad, rtol=1e-12, atol=1e-12)
    assert bool((grads[1] == 0).any()) and bool((grads[1] != 0).any())  # clamped samples pass no gradient


def test_fused_gate_with_its_expected_count_output():
    torch.manual_seed(3)
    w = torch.randn(64, 70, dtype=torch.float64, requires_grad=True)
    la = (3 * torch.randn(64, 70, dtype=torch.float64)).clamp(-12, 12).requires_grad_()
    g = torch.randn(64, 70, dtype=torch.float64)
    torch.manual_seed(9)
    out, count = GatedMul.apply(w, la, BETA)
    ((out * g).sum() + 3.0 * count).backward()
    grads = w.grad.clone(), la.grad.clone()
    w.grad = la.grad = None
    ref = w * ref_sample(la, noise(la.detach(), 9))
    ((ref * g).sum() + 3.0 * ref_prob_nonzero(la).sum()).backward()
    assert count.item() == pytest.approx(ref_prob_nonzero(la).sum().item(), rel=1e-13)
    torch.testing.assert_close(grads[0], w.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], la.grad, rtol=1e-12, atol=1e-12)
    la.grad = None
    GatedMul.apply(w, la, BETA)[1].backward()  # the count alone
    p = ref_prob_nonzero(la.detach())
    torch.testing.assert_close(la.grad, p * (1 - p))


def test_fused_gate_in_float32_stays_within_rounding():
    torch.manual_seed(4)
    w = torch.randn(256, 64, requires_grad=True)
    la = torch.randn(256, 64, requires_grad=True)
    torch.manual_seed(5)
    out = gated_mul(w, la)
    ref = w.detach().double() * ref_sample(la.detach(), noise(la.detach(), 5))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_expected_count_value_and_gradient():
    la = t64(-3.0, -1.0, 0.0, 2.0, 4.0).requires_grad_()
    count = expected_count(la)
    shift = (2 / 3) * math.log(11)
    assert count.item() == pytest.approx(sum(sigmoid(a + shift) for a in la.tolist()), abs=1e-14)
    count.backward()
    expected = [sigmoid(a + shift) * (1 - sigmoid(a + shift)) for a in la.tolist()]
    torch.testing.assert_close(la.grad, t64(*expected), rtol=0, atol=1e-14)


# -- channel gates share one sample per forward -------------------------------------------------------------
def test_channel_gate_members_share_a_sample_and_resample_next_forward():
    torch.manual_seed(6)
    gate = ChannelGate(500, torch.zeros(1), droprate_init=0.5)
    a, b = ChannelGated(gate, owner=True), ChannelGated(gate)
    w = torch.ones(500, 3)
    first_a, first_b = a(w), b(torch.ones(500))
    torch.testing.assert_close(first_a[:, 0], first_b)  # the same gate vector for the weight and its bias
    second_a = a(w)  # a second access by the same member starts a new forward: a fresh sample
    assert not torch.equal(second_a, first_a)
    torch.testing.assert_close(b(torch.ones(500)), second_a[:, 0])
    a.eval()
    b.eval()
    torch.testing.assert_close(a(w)[:, 0], ref_eval_gates(gate.log_alpha.detach()).float())
    assert list(dict(a.named_parameters())) == ["gate.log_alpha"] and not list(b.parameters())


def test_one_node_sample_equals_the_reference_with_its_noise():
    la = torch.randn(3000, dtype=torch.float64) * 3
    la1, la2 = la.clone().requires_grad_(), la.clone().requires_grad_()
    g = torch.randn(3000, dtype=torch.float64)
    ref = ref_sample(la1, noise(la, 7))
    torch.manual_seed(7)
    got = sample_gates_fused(la2)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert ((got == 0) | (got == 1)).any() and ((got > 0) & (got < 1)).any()  # both sides of the clamp
    (ref * g).sum().backward()
    (got * g).sum().backward()
    torch.testing.assert_close(la2.grad, la1.grad, rtol=1e-9, atol=1e-12)
    assert got.grad_fn is not None and "HardConcrete" in type(got.grad_fn).__name__  # one node


def _banked(sizes=(40, 70, 30)):
    bank = GateBank()
    gates = [ChannelGate(n, torch.zeros(1), bank=bank) for n in sizes]
    members = [[ChannelGated(g, owner=True), ChannelGated(g)] for g in gates]
    return bank, gates, members


def test_a_bank_draws_once_per_forward_and_each_gate_sees_its_own_piece():
    torch.manual_seed(8)
    bank, gates, members = _banked()
    las = [g.log_alpha for g in gates]
    seen = []
    for step in range(3):
        torch.manual_seed(100 + step)
        zs = [[m(torch.ones(g.log_alpha.numel())) for m in pair] for g, pair in zip(gates, members)]
        assert bank.draws == step + 1  # one draw for all gates, not one per gate
        for z1, z2 in zs:
            torch.testing.assert_close(z1, z2)  # the members of a gate share the sample
        cat = torch.cat(las).detach()  # the draw is the reference sample of the concatenated log_alphas
        ref = torch.split(ref_sample(cat, noise(cat, 100 + step)).float(), [la.numel() for la in las])
        for (z1, _), r in zip(zs, ref):
            torch.testing.assert_close(z1.detach(), r, rtol=0, atol=1e-6)
        seen.append(torch.cat([z1 for z1, _ in zs]).detach())
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    total = sum((z1 * torch.arange(z1.numel())).sum() for z1, _ in zs)
    grads = torch.autograd.grad(total, las)
    assert all(g.abs().sum() > 0 for g in grads)


def test_a_bank_redraws_after_a_change_and_never_hands_out_a_spent_piece():
    torch.manual_seed(9)
    bank, (a, b, c), ((ma, _), (mb, _), (mc, _)) = _banked()
    ma(torch.ones(40)).sum().backward()  # b and c are not used in this forward; a's backward runs
    zb = mb(torch.ones(70))  # b's piece of that draw is spent: a new draw, whose graph is alive
    assert bank.draws == 2
    zb.sum().backward()  # would raise "backward through the graph a second time" with the spent piece
    assert b.log_alpha.grad is not None
    before = bank.draws
    zc = mc(torch.ones(30))
    assert bank.draws == before + 1  # c's piece of draw 2 is spent too
    with torch.no_grad():
        a.log_alpha.add_(1.0)  # a changed since draw 3: its piece is stale
    ma(torch.ones(40))
    assert bank.draws == before + 2
    with torch.no_grad():
        assert not ma(torch.ones(40)).requires_grad  # a draw without gradients: b's piece of it has none
    draws = bank.draws
    assert mb(torch.ones(70)).requires_grad and bank.draws == draws + 1  # drawn again, with the gradient
    del zc


def test_a_copied_bank_samples_the_copied_gates():
    torch.manual_seed(10)
    model = nn.ModuleList([m for pair in _banked()[2] for m in pair])
    model[0](torch.ones(40))
    twin = copy.deepcopy(model)
    bank = twin[0].out_gate._bank
    assert bank is not model[0].out_gate._bank and bank.gates[0] is twin[0].out_gate and bank.draws == 0
    with torch.no_grad():
        twin[0].out_gate.log_alpha.fill_(-50.0)  # the copy's gate: always closed
    assert torch.equal(twin[0](torch.ones(40)), torch.zeros(40))
    assert model[0](torch.ones(40)).sum() > 0  # the original's gates are untouched


# -- expected L0 of layers with known log-alphas --------------------------------------------------------------
class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_expected_density_per_weight_with_known_log_alphas():
    model = TwoLayer()
    sp = sw.sparsify(model, "l0", target=0.5)
    la1 = torch.linspace(-4, 4, 12).view(4, 3)
    la2 = torch.linspace(3, -1, 8).view(2, 4)
    with torch.no_grad():
        model.fc1.parametrizations.weight[0].log_alpha.copy_(la1)
        model.fc2.parametrizations.weight[0].log_alpha.copy_(la2)
    shift = (2 / 3) * math.log(11)
    kept = sum(sigmoid(a + shift) for a in la1.flatten().tolist() + la2.flatten().tolist())
    assert sp.method.expected_densities().item() == pytest.approx(kept / 20, abs=1e-6)
    assert sp.method.summary()["expected density"] == pytest.approx(kept / 20, abs=1e-6)
    assert sp.method.deterministic_density() == pytest.approx(sum(a > -1.5986 for a in la1.flatten().tolist()
                                                                  + la2.flatten().tolist()) / 20)  # fmt: skip


def test_expected_density_per_channel_counts_the_cascade():
    model = TwoLayer()
    sp = sw.sparsify(model, "l0", target=0.5, granularity="channel")
    p = [0.9, 0.2, 0.5, 0.7]  # fc1's 4 output channels = fc2's 4 inputs
    q = [0.6, 0.3]  # fc2's 2 output channels (read by the untargeted head)
    shift = (2 / 3) * math.log(11)
    with torch.no_grad():
        model.fc1.parametrizations.weight[0].gate.log_alpha.copy_(
            torch.tensor([math.log(v / (1 - v)) - shift for v in p])
        )
        model.fc2.parametrizations.weight[0].gate.log_alpha.copy_(
            torch.tensor([math.log(v / (1 - v)) - shift for v in q])
        )
    # brute force: weight (o, i) of fc2 survives iff output o and input i are both kept (independent gates)
    fc1 = sum(p[o] for o in range(4) for _ in range(3))
    fc2 = sum(q[o] * p[i] for o in range(2) for i in range(4))
    assert sp.method.expected_densities().item() == pytest.approx((fc1 + fc2) / 20, abs=1e-6)


class Stream(nn.Module):
    """fc1 reads and writes the same residual stream: its output and input channels share one gate."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(3, 6)
        self.fc1 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc0(x)
        return self.head(h + self.fc1(h))


def _reference_count(layer, probs: dict, like: torch.Tensor) -> torch.Tensor:
    """Expected kept weights of one layer, written out directly (``probs``: ``P(z != 0)`` per channel gate)."""
    if layer.weight_gate is not None:
        return ref_prob_nonzero(layer.weight_gate.log_alpha, layer.weight_gate.beta).sum()
    n = like.new_tensor(float(layer.numel))
    g = layer.out_gate
    if g is not None and layer.in_segs == ((g, 0, g.log_alpha.numel(), 1),):  # one gate on both sides
        p = probs[g]
        c = p.numel()
        return n / (c * c) * (p.sum() ** 2 - (p * p).sum() + p.sum())  # sum over i != j of p_i p_j, plus sum p_i
    if g is not None:
        n = n * probs[g].mean()
    if layer.in_segs:
        kept = sum(rep * (probs[gi][lo:hi].sum() if gi is not None else float(hi - lo))
                   for gi, lo, hi, rep in layer.in_segs)  # fmt: skip
        n = n * kept / layer.in_width
    return n


def _reference_densities(method) -> torch.Tensor:
    """The per-layer expected counts accumulated one layer at a time (the reference)."""
    gates = {g for la in method.layers for g in [la.out_gate] + [gi for gi, *_ in la.in_segs] if g is not None}
    probs = {g: ref_prob_nonzero(g.log_alpha, g.beta) for g in gates}
    like = method.gate_parameters()[0]
    used = [0.0] * len(method.densities)
    for layer in method.layers:
        count = _reference_count(layer, probs, like).double() if layer.gated else float(layer.numel)
        used[layer.constraint] = used[layer.constraint] + layer.cost * count
    return torch.stack([torch.as_tensor(u, dtype=torch.float64) / t for u, t in zip(used, method.totals)])


CASES = [(name, gran, {}) for name in ("mlp", "conv_bn", "resnet_tiny", "concat", "vit_block", "conv1d_seq")
         for gran in ("weight", "channel")]  # fmt: skip
CASES += [("conv_bn", "channel", dict(budget="macs", input_shape=[3, 8, 8])),
          ("resnet_tiny", "channel", dict(target={"stem*": 0.3, "*": 0.6})),
          ("mlp", "weight", dict(target={"fc1": 0.3, "fc2": 0.8})),
          ("concat", "channel", dict(target={"a": 0.5, "merge": 0.5})),  # merge reads ungated channels of b
          ("stream", "channel", {})]  # fmt: skip


@pytest.mark.parametrize("name,granularity,extra", CASES)
def test_vectorised_expected_density_equals_the_per_layer_sums(name, granularity, extra):
    torch.manual_seed(0)
    model = Stream() if name == "stream" else ZOO[name][0]()
    options = dict(target=0.5, granularity=granularity)
    options.update(extra)
    sp = sw.sparsify(model, "l0", **options)
    gates = sp.method.gate_parameters()
    with torch.no_grad():
        for g in gates:
            g.copy_(torch.randn_like(g) * 3)  # spread the probabilities over (0, 1)
    if name == "stream":
        assert any(la._same_gate() for la in sp.method.layers)  # the correction term is exercised
    got = sp.method.expected_densities()
    grads = torch.autograd.grad(got.double().square().sum(), gates)
    ref = _reference_densities(sp.method)
    ref_grads = torch.autograd.grad(ref.square().sum(), gates)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-7)

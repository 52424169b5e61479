"""Behaviour of ``method="l0"``: gating, the constrained loop, export projection, state, bad options (timm models:
``tests/test_timm_smoke.py``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sparsewrap as sw
from sparsewrap.analysis.macs import layer_macs
from sparsewrap.errors import ConfigError, NoTargetsError
from sparsewrap.parametrizations.gated import ChannelGated

from .test_l0_math import TwoLayer
from .zoo import ZOO, ConvBN, outputs

SHIFT = (2 / 3) * math.log(11)


def train(sp: sw.Sparsifier, x: torch.Tensor, steps: int, lr: float = 0.05, gate_lr: float = 0.1) -> list[float]:
    opt = torch.optim.Adam(sp.param_groups(lr=lr, gates={"lr": gate_lr}))
    losses = []
    sp.model.train()
    for _ in range(steps):
        loss = sum(o.float().pow(2).mean() for o in outputs(sp.model(x))) + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
        losses.append(loss.item())
    return losses


def set_log_alpha(param: torch.Tensor, values) -> None:
    with torch.no_grad():
        param.copy_(torch.as_tensor(values, dtype=param.dtype).view_as(param))


# -- gating -------------------------------------------------------------------------------------------------------
def test_eval_is_deterministic_and_train_is_stochastic():
    model = ZOO["mlp"][0]()
    x = torch.randn(8, 12)
    sw.sparsify(model, "l0", target=0.5)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_closed_channel_is_exactly_zero_after_batchnorm():
    torch.manual_seed(0)
    model = ConvBN()
    sp = sw.sparsify(model, "l0", target=0.3, granularity="channel", input_shape=[3, 8, 8])
    gate = model.conv1.parametrizations.weight[0].gate
    set_log_alpha(gate.log_alpha, [-60.0, 60.0] * 4)  # channels 0, 2, 4, 6 closed in every sample
    assert isinstance(model.bn1.parametrizations.weight[0], ChannelGated)  # the L0BatchNorm role
    assert isinstance(model.conv1.parametrizations.bias[0], ChannelGated)
    feats = {}
    model.bn1.register_forward_hook(lambda _m, _i, out: feats.__setitem__("bn1", out))
    x = torch.randn(4, 3, 8, 8)
    for mode in (True, False):
        model.train(mode)
        model(x)
        assert feats["bn1"][:, 0::2].abs().max() == 0.0  # zero after BN, so zero for every consumer
        assert feats["bn1"][:, 1::2].abs().max() > 0.0
    # conv1 feeds only bn1, which carries the gate (z * BN(x)); conv1's rows are just masked at eval and export
    assert model.conv1.parametrizations.weight[0].mask_only and not model.fc.parametrizations.weight[0].mask_only
    plain = sw.export(sp)
    assert (plain.conv1.weight[0::2] == 0).all() and (plain.conv1.bias[0::2] == 0).all()
    z = torch.clamp(torch.sigmoid(gate.log_alpha.detach()[1::2] * 1.5) * 1.2 - 0.1, 0, 1)
    torch.testing.assert_close(plain.conv1.weight[1::2], model.conv1.parametrizations.weight.original[1::2])
    torch.testing.assert_close(plain.bn1.weight[1::2], model.bn1.parametrizations.weight.original[1::2] * z)
    # flatten -> Linear is analysed with the input shape: conv2's channels are gated and fc reads them
    assert model.fc.parametrizations.weight[0].in_segs[0][3] == 4  # 4 positions per channel after the flatten
    assert not sp.report().notes


def test_gradients_reach_gates_and_param_groups_are_separate():
    model = ZOO["conv_bn"][0]()
    sp = sw.sparsify(model, "l0", target=0.5, gate_lr=0.3)
    (model(torch.randn(2, 3, 8, 8)).pow(2).mean() + sp.penalty()).backward()
    gates = [p for p in sp.method.gate_parameters()]
    assert len(gates) == 3 and all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)
    groups = sp.param_groups(lr=1e-3, weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["weights", "gates"]
    assert groups[1]["lr"] == 0.3 and groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 1e-4
    assert {id(p) for p in groups[1]["params"]} == {id(g) for g in gates}


def test_gate_group_leaves_the_fused_update_to_the_user():
    sp = sw.sparsify(ZOO["conv_bn"][0](), "l0", target=0.5)
    weights, gates = sp.param_groups(lr=1e-3)
    assert "fused" not in gates and "fused" not in weights  # the optimizer's own choice
    assert sp.param_groups(lr=1e-3, gates={"fused": True})[1]["fused"] is True


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, weight_decay=1e-3),
        lambda g: torch.optim.Adam(g, lr=0.05),
        lambda g: torch.optim.AdamW(g, lr=0.05),
        lambda g: torch.optim.Adagrad(g, lr=0.05),
        lambda g: torch.optim.RMSprop(g, lr=0.01),  # no fused update: the key is ignored
    ],
    ids=["sgd", "adam", "adamw", "adagrad", "rmsprop"],
)
def test_fused_gate_update_matches_the_optimizers_loop(make):
    """The fused gate update (``gates={"fused": True}``) gives the gates and optimizer state of ``fused=False``.
    The weights are frozen (lr 0): Adam would turn float-rounding differences in a near-zero gradient (a bias before a
    BatchNorm) into steps of size lr, which says nothing about the gates' update."""
    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = ZOO["conv_bn"][0]()
        sp = sw.sparsify(model, "l0", target=0.5)
        opt = make(sp.param_groups(lr=0.1, weights={"lr": 0.0}, gates={"fused": fused}))
        torch.manual_seed(1)
        for _ in range(4):
            loss = model(torch.randn(4, 3, 8, 8)).pow(2).mean() + sp.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sp.step()
        gates = sp.method.gate_parameters()
        runs.append(([g.detach().clone() for g in gates], [opt.state[p] for p in gates]))
    (gates_fused, state_fused), (gates_loop, state_loop) = runs
    untrained = sw.sparsify(ZOO["conv_bn"][0](), "l0", target=0.5).method.gate_parameters()
    assert not torch.equal(gates_loop[0], untrained[0])  # the gates did move
    for a, b in zip(gates_fused, gates_loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(state_fused, state_loop):
        for name in b:
            torch.testing.assert_close(torch.as_tensor(a[name]).float(), torch.as_tensor(b[name]).float(),
                                       rtol=1e-5, atol=1e-6, msg=name)  # fmt: skip


def test_constrained_training_raises_the_multiplier_then_restarts_it():
    torch.manual_seed(0)
    model = TwoLayer()
    sp = sw.sparsify(model, "l0", target=0.8, dual_lr=0.5)
    x = torch.randn(16, 3)
    train(sp, x, steps=1)
    first = sp.method.duals.value.item()
    assert first == pytest.approx(0.5 * (0.8318 - 0.2), abs=2e-3)  # lr * (E[density] at init - 0.2)
    lams = []
    for _ in range(150):
        train(sp, x, steps=1)
        lams.append(sp.method.duals.value.item())
    assert max(lams) > first and 0.0 in lams  # it grew while violated and restarted once satisfied
    assert sp.report().extras["expected density"] == pytest.approx(0.2, abs=0.05)


def test_export_hits_the_target_exactly_and_loads_strictly():
    torch.manual_seed(0)
    model = ZOO["resnet_tiny"][0]()
    sp = sw.sparsify(model, "l0", target=0.7)
    train(sp, torch.randn(4, 3, 8, 8), steps=3)
    plain = sw.export(sp)
    total = sum(t.numel for t in sp.targets)
    zeros = sum(int((plain.get_submodule(t.name).weight == 0).sum()) for t in sp.targets)
    assert zeros == round(0.7 * total)  # exact to one weight
    assert sp.report().exported == pytest.approx(zeros / total)
    fresh = ZOO["resnet_tiny"][0]()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())


def test_projection_keeps_highest_log_alphas_and_reports_the_learned_density():
    model = TwoLayer()
    sp = sw.sparsify(model, "l0", target=0.5)
    la = torch.linspace(-4, 4, 20)[torch.randperm(20)]
    set_log_alpha(model.fc1.parametrizations.weight[0].log_alpha, la[:12])
    set_log_alpha(model.fc2.parametrizations.weight[0].log_alpha, la[12:])
    baked = sp.method.bake()
    kept = torch.cat([(baked[("fc1", "weight")] != 0).flatten(), (baked[("fc2", "weight")] != 0).flatten()])
    assert kept.tolist() == (la > la.median()).tolist()  # the 10 largest log_alpha
    learned = float((la > -SHIFT).float().mean())
    assert sp.method.last_projection["learned density (before projection)"] == pytest.approx(learned)
    assert sp.method.last_projection["exported density"] == 0.5
    # a kept gate that was open keeps its fractional eval gate; a restored one gets its mean gate E[z]
    z1 = torch.clamp(torch.sigmoid(la[:12] * 1.5) * 1.2 - 0.1, 0, 1)
    w1 = model.fc1.parametrizations.weight.original.detach().flatten()
    open_kept = (la[:12] > la.median()) & (z1 > 0)
    torch.testing.assert_close(baked[("fc1", "weight")].flatten()[open_kept], (w1 * z1)[open_kept])


def test_channel_export_counts_the_cascade_exactly():
    torch.manual_seed(0)
    model = TwoLayer()
    sp = sw.sparsify(model, "l0", target=0.5, granularity="channel")
    gate1 = model.fc1.parametrizations.weight[0].gate
    set_log_alpha(gate1.log_alpha, [3.0, -3.0, 3.0, 3.0])  # fc1 channel 1 closed
    set_log_alpha(model.fc2.parametrizations.weight[0].gate.log_alpha, [3.0, 3.0])
    plain = sw.export(sp)
    # fc1 row 1 (3 weights) and fc2 column 1 (2 weights) are zero: 5 of 20, then the projection drops more
    assert (plain.fc1.weight[1] == 0).all() and (plain.fc2.weight[:, 1] == 0).all() and (plain.fc1.bias[1] == 0)
    zeros = int((plain.fc1.weight == 0).sum() + (plain.fc2.weight == 0).sum())
    assert abs(zeros - 10) <= 3  # exact to one channel (a channel of fc1 is 3 + 2 weights)
    assert sp.report().exported == pytest.approx(zeros / 20)
    x = torch.randn(5, 3)
    model.eval()
    purged = sw.export(sp, purge=True, example_inputs=x)
    torch.testing.assert_close(purged.eval()(x), plain.eval()(x))
    kept = sum(m.weight.numel() for m in (purged.fc1, purged.fc2))
    assert kept == 20 - zeros  # what the constraint counted is what the purge keeps


def test_layerwise_targets_one_constraint_per_layer():
    torch.manual_seed(0)
    model = ZOO["mlp"][0]()
    sp = sw.sparsify(model, "l0", target={"fc1": 0.9, "re:fc[0-9]": 0.25})
    assert len(sp.method.duals) == 2 and sp.method.densities == pytest.approx([0.1, 0.75])
    summary = sp.method.summary()
    assert "multiplier[fc1]" in summary and "multiplier[fc2]" in summary
    plain = sw.export(sp)
    assert int((plain.fc1.weight == 0).sum()) == round(0.9 * 384)
    assert int((plain.fc2.weight == 0).sum()) == round(0.25 * 768)
    assert sp.report().requested == pytest.approx(1 - (0.1 * 384 + 0.75 * 768) / 1152)


def test_layerwise_targets_leave_unmatched_layers_alone():
    model = ZOO["mlp"][0]()
    sp = sw.sparsify(model, "l0", target={"fc2": 0.5})
    assert [t.name for t in sp.targets] == ["fc2"]
    assert not parametrize.is_parametrized(model.fc1)


def test_layerwise_pattern_on_ungateable_layers():
    with pytest.raises(NoTargetsError, match="'attn.qkv' matches no targeted layer that can be channel-gated"):
        sw.sparsify(ZOO["vit_block"][0](), "l0", target={"attn.qkv": 0.5, "fc*": 0.5}, granularity="channel")


def test_penalized_mode():
    torch.manual_seed(0)
    model = TwoLayer()
    sp = sw.sparsify(model, "l0", lmbda=2.0)
    dens = sp.method.expected_densities()
    torch.testing.assert_close(sp.penalty(), 2.0 * dens[0])
    assert sp.report().requested is None and "multiplier" not in sp.method.summary()
    set_log_alpha(model.fc1.parametrizations.weight[0].log_alpha, torch.linspace(-4, 4, 12))
    baked = sp.method.bake()  # no projection: exactly the deterministic gates
    assert int((baked[("fc1", "weight")] != 0).sum()) == int((torch.linspace(-4, 4, 12) > -SHIFT).sum())


def test_macs_budget_weights_layers_by_output_positions():
    torch.manual_seed(0)
    model = ConvBN()
    macs = layer_macs(model, [3, 8, 8])
    sp = sw.sparsify(model, "l0", target=0.6, budget="macs", input_shape=[3, 8, 8])
    assert [la.cost for la in sp.method.layers] == [macs[n].positions for n in ("conv1", "conv2", "fc")]
    plain = sw.export(sp)
    kept = sum(macs[n].positions * int((plain.get_submodule(n).weight != 0).sum()) for n in ("conv1", "conv2", "fc"))
    total = sum(macs[n].macs for n in ("conv1", "conv2", "fc"))
    assert abs(kept / total - 0.4) <= macs["conv1"].positions / total  # exact to one weight of the costliest layer
    assert any("MACs" in n for n in sp.report().notes)


def test_ungated_groups_are_listed_in_the_report():
    model = ZOO["vit_block"][0]()
    sp = sw.sparsify(model, "l0", target=0.2, granularity="channel")
    notes = sp.report().notes
    assert any("attn.qkv" in n and "ungated" in n for n in notes)
    assert isinstance(model.fc1.parametrizations.weight[0], ChannelGated)  # MLP hidden units are gated
    assert not parametrize.is_parametrized(model.attn.qkv)


# -- state --------------------------------------------------------------------------------------------------------
def test_save_load_restores_multipliers_and_resumes_identically(tmp_path):
    def fresh():
        torch.manual_seed(0)
        return ZOO["conv_bn"][0]()

    x = torch.randn(4, 3, 8, 8)
    sp = sw.sparsify(fresh(), "l0", target=0.6, granularity="channel", input_shape=[3, 8, 8], dual_lr=0.3)
    opt = torch.optim.SGD(sp.param_groups(lr=0.05), momentum=0.9)

    def run(sp, opt, steps):
        out = []
        for _ in range(steps):
            loss = sp.model(x).pow(2).mean() + sp.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sp.step()
            out.append(loss.item())
        return out

    run(sp, opt, 4)
    sw.save(sp, tmp_path / "ckpt.safetensors")
    opt_state, lam = copy.deepcopy(opt.state_dict()), sp.method.duals.value.clone()
    torch.manual_seed(42)
    expected = run(sp, opt, 4)
    sp2 = sw.load(tmp_path / "ckpt.safetensors", model=fresh())
    assert sp2.step_count == 4 and lam.item() > 0
    torch.testing.assert_close(sp2.method.duals.value, lam, rtol=0, atol=0)
    opt2 = torch.optim.SGD(sp2.param_groups(lr=0.05), momentum=0.9)
    opt2.load_state_dict(opt_state)
    torch.manual_seed(42)
    assert run(sp2, opt2, 4) == expected


# -- bad options --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(target=0.5, lmbda=0.1), ConfigError, "not both"),
        (dict(), ConfigError, "needs target="),
        (dict(target=0.5, gate_lr=-0.1), ConfigError, "gate_lr=-0.1"),
        (dict(target=0.5, dual_lr=-1.0), ConfigError, "dual_lr=-1.0"),
        (dict(target={"nothing*": 0.5}), NoTargetsError, "'nothing\\*' matches no targeted layer"),
        (dict(target=0.97, log_alpha_max=math.log(100)), ConfigError, "cannot go below 0.0471"),
        (dict(target=0.996), ConfigError, "cannot go below 0.0049"),  # the default clamp, log(1000)
        (dict(target=0.5, log_alpha_max=13.0), ConfigError, "log_alpha_max=13.0"),
        (dict(target=0.5, granularity="row"), ConfigError, "granularity='row'"),
        (dict(target=0.5, budget="macs"), ConfigError, "needs input_shape"),
        (dict(target=0.5, droprate_init=1.0), ConfigError, "droprate_init"),
        (dict(target=0.5, colour="red"), ConfigError, "unknown option 'colour'"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        sw.sparsify(ZOO["mlp"][0](), "l0", **kwargs)


def test_negative_learning_rate_in_param_groups():
    sp = sw.sparsify(ZOO["mlp"][0](), "l0", target=0.5)
    with pytest.raises(ConfigError, match="learning rate of group 'gates'"):
        sp.param_groups(lr=0.1, gates={"lr": -1.0})


def test_channel_floor_counts_the_cascade():
    p = 1 / (1 + math.exp(math.log(100) - SHIFT))  # P(z != 0) at the clamp's floor
    floor = (384 * p + 768 * p * p) / 1152  # fc1 by its own gates; fc2 by its own and fc1's
    kw = dict(granularity="channel", log_alpha_max=math.log(100))
    with pytest.raises(ConfigError, match=f"cannot go below {floor:.4f}"):
        sw.sparsify(ZOO["mlp"][0](), "l0", target=0.99, **kw)
    sw.sparsify(ZOO["mlp"][0](), "l0", target=1 - floor - 1e-3, **kw)  # just above: accepted


def test_module_count_stays_small():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    sp = sw.sparsify(model, "l0", target=0.5, granularity="channel")
    assert len(sp.method.plan.gates) == 2  # one gate per gated group, shared by its tensors
    assert sum(p.numel() for p in sp.method.gate_parameters()) == 16


def test_top_k_selection_is_exact_with_ties():
    from sparsewrap.methods.l0.projection import _top_k, top_by_cost

    torch.manual_seed(0)
    x = torch.randint(0, 4, (200,)).double()  # many ties
    for k in (0, 1, 37, 150, 200):
        ref = torch.zeros(200, dtype=torch.bool)
        ref[torch.argsort(x, descending=True, stable=True)[:k]] = True
        assert torch.equal(_top_k(x, k), ref)
    # different costs per layer: the highest scores whose summed cost is closest to the budget
    a, b = torch.tensor([5.0, 1.0, 3.0]), torch.tensor([4.0, 2.0])
    keep_a, keep_b = top_by_cost([a, b], [1.0, 10.0], budget=12.0)  # 5 (1), 4 (10), then 3 (1) -> 12
    assert keep_a.tolist() == [True, False, True] and keep_b.tolist() == [True, False]


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_small_droprate_init_starts_at_the_identity(granularity):
    torch.manual_seed(0)
    dense = ZOO["resnet_tiny"][0]()
    model = ZOO["resnet_tiny"][0]()
    model.load_state_dict(dense.state_dict())
    # penalized: no projection onto a budget, so the eval model is the model with its eval gates, exactly 1
    sw.sparsify(model, "l0", lmbda=0.1, granularity=granularity, droprate_init=0.15)
    x = torch.randn(2, 3, 8, 8)
    dense.eval(), model.eval()
    torch.testing.assert_close(model(x), dense(x), rtol=0, atol=0)
    # with a target the eval model is the projected one (what export gives), but every learned gate is open
    sp = sw.sparsify(ZOO["resnet_tiny"][0](), "l0", target=0.5, granularity=granularity, droprate_init=0.15)
    assert sp.method.deterministic_density() == 1.0

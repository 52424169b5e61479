"""Penalty methods halo, sws, l1 (sparsewrap/methods/penalty/): exact values of the penalty and its gradients,
the profile minimum of λ, the pruning to the exact target, the ξ controller, ``finetune``, ``reg_schedule``, the
optimizer group of the coefficients, the report, and one-line errors for bad options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import sparsewrap as sw
from sparsewrap.errors import ConfigError
from sparsewrap.methods.penalty.pruning import keep_at_target, planned_fraction, sgd_xi_ceiling, steer_xi

from .zoo import ZOO

XI, PSI = 0.1, 0.2
W = [[0.5, -1.0], [0.0, 2.0]]
B = [0.3, -0.4]


class Small(nn.Module):
    """``a`` is the only target (``head``, the classifier, stays dense)."""

    def __init__(self, n_in: int = 2, n_hidden: int = 2, bias: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(n_in, n_hidden, bias=bias)
        self.head = nn.Linear(n_hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.a(x)))


def _small(method: str, **options) -> sw.Sparsifier:
    torch.manual_seed(0)
    model = Small().double()
    sp = sw.sparsify(model, method, target=0.5, steer=False, **options)
    with torch.no_grad():
        sp.targets[0].original.copy_(torch.tensor(W, dtype=torch.float64))
        model.a.bias.copy_(torch.tensor(B, dtype=torch.float64))
    return sp


def _grads(sp: sw.Sparsifier) -> tuple[Tensor, Tensor]:
    value = sp.penalty()
    value.backward()
    return value, sp.targets[0].original.grad


# -- exact values -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("hierarchy", "reg", "dreg"), [("l1", 6.0, 1.0), ("l2", 36.0, 12.0)])
def test_halo_penalty_and_its_gradients_on_known_tensors(hierarchy: str, reg: float, dreg: float) -> None:
    sp = _small("halo", xi=XI, psi=PSI, p=1.0, hierarchy=hierarchy, penalize_bias=True)
    layer = sp.method.layers[0]
    lam, lam_b = [[1.0, 2.0], [0.5, -1.0]], [2.0, 0.5]
    with torch.no_grad():
        layer.lam.copy_(torch.tensor(lam, dtype=torch.float64))
        layer.lam_bias.copy_(torch.tensor(lam_b, dtype=torch.float64))
    value, gw = _grads(sp)
    # sum |w| / lam^2 = 0.5 + 0.25 + 0 + 2 (weights) + 0.075 + 1.6 (bias) = 4.425; sum |lam| - p = 7 - 1 = 6
    torch.testing.assert_close(value, torch.tensor(XI * 4.425 + PSI * reg, dtype=torch.float64))
    torch.testing.assert_close(gw, XI * torch.tensor([[1.0, -0.25], [0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(sp.model.a.bias.grad, XI * torch.tensor([0.25, -4.0], dtype=torch.float64))
    # d/dlam = -2 xi |w| / lam^3 + psi R'(sum - p) sign(lam)
    expected = [[-2 * XI * abs(w) / c**3 + PSI * dreg * math.copysign(1, c) for w, c in zip(rw, rc)]
                for rw, rc in zip(W, lam)]  # fmt: skip
    torch.testing.assert_close(layer.lam.grad, torch.tensor(expected, dtype=torch.float64))
    expected_b = [-2 * XI * abs(b) / lb**3 + PSI * dreg for b, lb in zip(B, lam_b)]
    torch.testing.assert_close(layer.lam_bias.grad, torch.tensor(expected_b, dtype=torch.float64))


def test_sws_penalty_and_its_gradients_on_known_tensors() -> None:
    sp = _small("sws", xi=XI, psi=PSI, penalize_bias=True, lambda_init=2.0)
    value, gw = _grads(sp)
    l1 = 3.5 + 0.7  # sum |w| + sum |b|
    torch.testing.assert_close(value, torch.tensor(XI * l1 / 4 + PSI * 4, dtype=torch.float64))
    torch.testing.assert_close(gw, XI / 4 * torch.tensor(W, dtype=torch.float64).sign())
    lam = sp.method.layers[0].lam
    assert lam.shape == () and len(sp.method.coefficients()) == 1  # one lambda shared by every weight
    torch.testing.assert_close(lam.grad, torch.tensor(-2 * XI * l1 / 8 + 2 * PSI * 2, dtype=torch.float64))


def test_l1_penalty_and_its_gradient_leave_the_bias_alone_by_default() -> None:
    sp = _small("l1", xi=XI)
    value, gw = _grads(sp)
    torch.testing.assert_close(value, torch.tensor(XI * 3.5, dtype=torch.float64))
    torch.testing.assert_close(gw, XI * torch.tensor(W, dtype=torch.float64).sign())
    assert sp.model.a.bias.grad is None and sp.method.coefficients() == [] and sp.param_groups()[1:] == []


@pytest.mark.parametrize(("xi", "psi", "w"), [(1.0, 0.5, 2.0), (0.1, 0.3, 0.75)])
def test_gradient_descent_on_lambda_reaches_the_profile_minimum(xi: float, psi: float, w: float) -> None:
    torch.manual_seed(0)
    model = Small(n_in=1, n_hidden=1, bias=False).double()
    sp = sw.sparsify(model, "halo", target=0.5, xi=xi, psi=psi, steer=False)
    weight = sp.targets[0].original
    with torch.no_grad():
        weight.fill_(w)
    weight.requires_grad_(False)  # w fixed: minimise over lambda alone
    lam = sp.method.layers[0].lam
    opt = torch.optim.SGD([lam], lr=0.2)
    for _ in range(2000):
        opt.zero_grad()
        sp.penalty().backward()
        opt.step()
    star = (2 * xi * w / psi) ** (1 / 3)
    assert float(lam.detach()) == pytest.approx(star, rel=1e-6)
    profile = 3 / 2 ** (2 / 3) * xi ** (1 / 3) * psi ** (2 / 3) * w ** (1 / 3)  # an l_{1/3} penalty on w
    assert float(sp.penalty().detach()) == pytest.approx(profile, rel=1e-9)


# -- the pruning --------------------------------------------------------------------------------------------------
def test_prune_at_target_counts_the_zeros_already_there() -> None:
    w = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, -0.1, 0.3, -0.2, 0.05, 0.9])
    (keep,) = keep_at_target([w], 0.6)
    # 6 of 10 dropped: the 4 zeros and the 2 smallest others; the seed's rule (60 % of the 6 non-zero weights
    # on top of the zeros: 4 + int(0.6 * 6) = 7) would overshoot the target
    assert keep.tolist() == [False] * 4 + [True, False, True, True, False, True]
    a, b = torch.tensor([0.0, 0.0, 1.0, 2.0]), torch.tensor([[0.5, 3.0, 0.0], [4.0, 5.0, 6.0]])
    ka, kb = keep_at_target([a, b], 0.5)  # global: 5 of 10, the three zeros first, then 0.5 and 1.0
    assert ka.tolist() == [False, False, False, True] and kb.tolist() == [[False, True, False], [True, True, True]]
    la, lb = keep_at_target([a, b], 0.5, layerwise=True)  # 2 of 4 and 3 of 6
    assert la.tolist() == [False, False, True, True] and lb.tolist() == [[False, False, False], [True, True, True]]
    la, lb = keep_at_target([torch.ones(3), torch.ones(3)], 0.5, layerwise=True)  # 1.5 + 1.5: the total stays 3
    assert int((~la).sum() + (~lb).sum()) == 3


@pytest.mark.parametrize("layerwise", [False, True])
def test_export_hits_the_target_exactly_on_weights_with_zeros(layerwise: bool) -> None:
    torch.manual_seed(0)
    sp = sw.sparsify(ZOO["mlp"][0](), "halo", target=0.7, layerwise=layerwise)
    with torch.no_grad():
        sp.targets[0].original[:, :6] = 0.0  # 192 of the 1152 targeted weights
    plain = sw.export(sp)
    total = sum(t.numel for t in sp.targets)
    zeros = sum(int((plain.get_submodule(t.name).weight == 0).sum()) for t in sp.targets)
    assert zeros == round(0.7 * total)
    assert sp.report().exported == pytest.approx(zeros / total, abs=1e-12)
    for t in sp.targets:  # what export keeps is the largest |w|: every kept weight beats every pruned one
        kept = plain.get_submodule(t.name).weight != 0
        w = t.original.detach().abs()
        if layerwise or t is sp.targets[0]:
            assert w[kept].min() >= w[~kept].max()


# -- the xi controller --------------------------------------------------------------------------------------------
def test_steer_xi_raises_xi_when_too_few_weights_are_near_zero_and_lowers_it_when_too_many() -> None:
    assert steer_xi(1e-4, 1e-4, near_zero=0.25, planned=0.3) == pytest.approx(1e-4 * math.exp(4.0 * 0.05))
    assert steer_xi(1e-4, 1e-4, near_zero=0.35, planned=0.3) == pytest.approx(1e-4 * math.exp(-4.0 * 0.05))
    assert steer_xi(1e-4, 1e-4, near_zero=0.0, planned=0.9) == pytest.approx(2e-4)  # at most x2 per update
    assert steer_xi(1e-2, 1e-4, near_zero=0.0, planned=0.9) == pytest.approx(1e-2)  # at most 100 x the initial xi
    assert steer_xi(1e-6, 1e-4, near_zero=1.0, planned=0.0) == pytest.approx(1e-6)  # at least a hundredth of it
    assert steer_xi(3e-4, 1e-4, near_zero=0.0, planned=0.9, ceiling=5e-4) == pytest.approx(5e-4)
    assert steer_xi(1e-4, 1e-4, near_zero=0.0, planned=0.9, ceiling=1e-5) == pytest.approx(1e-4)  # not below xi_init
    assert planned_fraction(9, 9, 0.8) == pytest.approx(0.8) and planned_fraction(20, 9, 0.8) == pytest.approx(0.8)
    assert planned_fraction(0, 9, 0.8) == pytest.approx(0.8 * (1 - (8 / 9) ** 3))
    assert planned_fraction(3, None, 0.8) == 0.8


def test_xi_stays_below_the_pull_that_jumps_over_the_tolerance_in_one_sgd_step() -> None:
    torch.manual_seed(0)
    sp = sw.sparsify(ZOO["mlp"][0](), "sws", target=0.8, lambda_init=2.0, xi=1e-4, steer_every=1)
    opt = torch.optim.SGD(sp.param_groups(lr=0.1), momentum=0.9)
    assert sgd_xi_ceiling(opt, 1e-3, 4.0) == pytest.approx(1e-3 * 4.0 * 0.1 / 0.1)
    assert sgd_xi_ceiling(torch.optim.Adam(sp.param_groups(lr=0.1)), 1e-3, 4.0) is None
    sp.start(total_steps=100, optimizer=opt)
    x = ZOO["mlp"][1]()
    for _ in range(30):  # nothing gets near zero at lr 0: the controller doubles xi up to the ceiling
        opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = 0.0
        opt.zero_grad()
        (sp.model(x).pow(2).mean() + sp.penalty()).backward()
        opt.step()
        opt.param_groups[0]["lr"] = 0.1  # the ceiling reads the weights' learning rate
        sp.step()
    assert sp.method.xi == pytest.approx(1e-3 * 4.0 * 0.1 / 0.1)


def _run(sp: sw.Sparsifier, steps: int, total: int, seed: int = 0, lr: float = 0.05) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(sp.param_groups(lr=lr), momentum=0.9)
    sp.start(total_steps=total, optimizer=opt)
    torch.manual_seed(seed)
    x = ZOO["mlp"][1]()
    for _ in range(steps):
        sp.model.train()
        loss = sp.model(x).pow(2).mean() + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
    return opt


def test_the_controller_moves_xi_towards_the_planned_near_zero_fraction() -> None:
    torch.manual_seed(0)
    up = sw.sparsify(ZOO["mlp"][0](), "l1", target=0.8, xi=1e-4, steer_every=1)
    _run(up, steps=1, total=10, lr=0.0)
    assert up.method.near_zero < planned_fraction(0, 9, 0.8) and up.method.xi > 1e-4
    torch.manual_seed(0)
    down = sw.sparsify(ZOO["mlp"][0](), "l1", target=0.8, xi=1e-4, steer_every=1, tol=10.0)  # every |w| <= 10
    _run(down, steps=1, total=10, lr=0.0)
    assert down.method.near_zero == 1.0 and down.method.xi < 1e-4
    torch.manual_seed(0)
    off = sw.sparsify(ZOO["mlp"][0](), "l1", target=0.8, xi=1e-4, steer=False)
    _run(off, steps=3, total=10)
    assert off.method.xi == 1e-4


# -- finetune, resume, reg_schedule, the optimizer group ------------------------------------------------------------
def _eval_equals_export(sp: sw.Sparsifier) -> None:
    x = ZOO["mlp"][1]()
    sp.model.eval()
    plain = sw.export(sp).eval()
    with torch.no_grad():
        torch.testing.assert_close(sp.model(x), plain(x), rtol=0, atol=0)


def _steps(sp: sw.Sparsifier, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    x = ZOO["mlp"][1]()
    for _ in range(steps):
        sp.model.train()
        loss = sp.model(x + 0.1 * torch.randn_like(x)).pow(2).mean() + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


def _started(sp: sw.Sparsifier, total: int = 10) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(sp.param_groups(lr=0.05), momentum=0.9)
    sp.start(total_steps=total, optimizer=opt)
    return opt


def test_finetune_prunes_at_the_planned_step_and_trains_the_masked_model(tmp_path) -> None:
    torch.manual_seed(0)
    sp = sw.sparsify(ZOO["mlp"][0](), "halo", target=0.6, finetune=0.2)
    opt = _started(sp)
    _steps(sp, opt, 8, seed=1)  # the pruning step is 8 (80 % of 10): not reached yet
    assert not sp.method.pruned and sp.sparsity() == 0.0 and sp.penalty() > 0
    _eval_equals_export(sp)
    path = sw.save(sp, tmp_path / "before.safetensors")
    _steps(sp, opt, 1, seed=2)
    assert sp.method.pruned and sp.sparsity() == pytest.approx(round(0.6 * 1152) / 1152)
    assert float(sp.penalty().detach()) == 0.0  # the masked model fine-tunes on the task loss alone
    _eval_equals_export(sp)
    _steps(sp, opt, 1, seed=3)
    for t, p in zip(sp.targets, sp.method.layers):  # pruned weights and their momentum stay exactly zero
        pruned = p.mask == 0
        assert (t.original[pruned] == 0).all() and (opt.state[t.original]["momentum_buffer"][pruned] == 0).all()
        assert (t.original[~pruned] != 0).all()
    _eval_equals_export(sp)
    report = sp.report()
    assert report.exported == pytest.approx(round(0.6 * 1152) / 1152) and report.extras["pruned"] == 1.0
    assert report.extras["learned sparsity"] == sp.method.learned_at_prune < 0.6  # near zero before the pruning
    # resumed from the checkpoint taken before the pruning step (with a fresh optimizer, here and in a rerun of
    # the original from the same point): the same pruning, the same fine-tuned model
    again = sw.load(path, model=ZOO["mlp"][0]())
    assert again.step_count == 8 and not again.method.pruned
    rerun = sw.load(path, model=ZOO["mlp"][0]())
    for run in (again, rerun):
        opt = _started(run)
        _steps(run, opt, 1, seed=2), _steps(run, opt, 1, seed=3)
    assert again.method.pruned and all(p.pruned for p in again.method.layers)
    for (k, a), b in zip(sw.export(rerun).state_dict().items(), sw.export(again).state_dict().values()):
        assert torch.equal(a, b), k
    resumed = sw.load(sw.save(sp, tmp_path / "after.safetensors"), model=ZOO["mlp"][0]())
    assert resumed.method.pruned and all(p.pruned for p in resumed.method.layers)
    for (k, a), b in zip(sw.export(sp).state_dict().items(), sw.export(resumed).state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("method", ["halo", "sws"])
def test_steering_xi_scales_psi_alike_so_the_optimal_lambda_stays(method: str) -> None:
    sp = sw.sparsify(ZOO["mlp"][0](), method, target=0.5, xi=2e-4, psi=5e-4)
    assert sp.method.psi() == pytest.approx(5e-4)
    sp.method.xi = 8e-4  # the controller raised ξ four-fold
    assert sp.method.psi() == pytest.approx(4 * 5e-4)  # the whole penalty scales by 4 ...
    w = 0.3  # ... and λ* = (2 ξ |w| / ψ)^(1/3) stays where it was
    assert (2 * sp.method.xi * w / sp.method.psi()) ** (1 / 3) == pytest.approx((2 * 2e-4 * w / 5e-4) ** (1 / 3))


def test_finetune_needs_the_run_length() -> None:
    sp = sw.sparsify(ZOO["mlp"][0](), "l1", target=0.5, finetune=0.1)
    match = r"finetune=0.1 is a fraction of the run, but method 'l1' was not told the run's length; call sp.start"
    with pytest.raises(ConfigError, match=match):
        sp.step()


def test_reg_schedule_multiplies_psi_every_so_many_steps() -> None:
    torch.manual_seed(0)
    sp = sw.sparsify(ZOO["mlp"][0](), "halo", target=0.5, psi=0.1, reg_schedule=(10.0, 2), steer=False)
    seen = []
    for _ in range(5):
        seen.append(sp.method.psi())
        _run(sp, steps=1, total=10)
    assert seen == pytest.approx([0.1, 0.1, 1.0, 1.0, 10.0])
    frac = sw.sparsify(ZOO["mlp"][0](), "sws", target=0.5, psi=0.1, reg_schedule=(100.0, 0.5), steer=False)
    _run(frac, steps=5, total=10)  # every half of the run: x100 after step 5
    assert frac.method.psi() == pytest.approx(10.0) and frac.report().extras["psi"] == pytest.approx(10.0)


def test_the_coefficients_take_the_weights_learning_rate_momentum_and_weight_decay() -> None:
    torch.manual_seed(0)
    sp = sw.sparsify(ZOO["mlp"][0](), "halo", target=0.5)
    opt = torch.optim.SGD(sp.param_groups(lr=0.1, weight_decay=5e-4, weights={"momentum": 0.9}))
    sp.start(total_steps=10, optimizer=opt)
    weights, lam = opt.param_groups
    assert lam["name"] == "lambdas" and lam["params"] == sp.method.coefficients()
    assert (lam["lr"], lam["momentum"], lam["weight_decay"]) == (0.1, 0.9, 5e-4)
    assert sum(p.numel() for p in lam["params"]) == sum(t.numel for t in sp.targets)  # one per weight


@pytest.mark.parametrize("method", ["halo", "sws"])
def test_lambda_is_kept_away_from_zero(method: str) -> None:
    """|λ| is at or above the floor wherever it is used: sws clamps after each step, halo in its penalty's pass."""
    sp = _small(method, xi=XI, psi=PSI)
    lam = sp.method.layers[0].lam
    small = [[0.0, -1e-9], [3.0, -2.0]] if method == "halo" else 0.0
    with torch.no_grad():
        lam.copy_(torch.tensor(small, dtype=torch.float64))
    sp.step()
    value = sp.penalty()
    assert lam.tolist() == ([[1e-4, -1e-4], [3.0, -2.0]] if method == "halo" else 1e-4) and torch.isfinite(value)


def test_report_gives_near_zero_fractions_xi_psi_lambda_and_what_the_projection_removed() -> None:
    torch.manual_seed(0)
    sp = sw.sparsify(ZOO["mlp"][0](), "halo", target=0.6, tol=0.05)
    with torch.no_grad():
        sp.targets[0].original[0, :4] = torch.tensor([0.0, 2e-5, 2e-4, 2e-3])
    summary = sp.report().extras
    weights = torch.cat([t.original.detach().abs().reshape(-1) for t in sp.targets])
    for tol in (1e-5, 1e-4, 1e-3, 1e-2):
        assert summary[f"near zero (|w| <= {tol:g})"] == pytest.approx(float((weights <= tol).float().mean()))
    threshold = weights.sort().values[round(0.6 * weights.numel()) - 1]
    removed = int(((weights <= threshold) & (weights > 0.05)).sum())
    assert summary["removed, not near zero"] == removed > 0
    # what training learned before the projection: the near-zero fraction at the method's tol (0.05)
    near = float((weights <= 0.05).float().mean())
    assert summary["learned sparsity"] == pytest.approx(near) and near > 0
    assert summary["xi"] == 1e-4 and summary["psi"] == 1e-4 and summary["pruned"] == 0.0
    assert summary["|lambda| mean"] == summary["|lambda| min"] == summary["|lambda| max"] == 1.0


# -- bad options ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("halo", dict(xi=-1.0), r"xi=-1.0 for method 'halo' is negative; give xi >= 0"),
        ("sws", dict(psi=-0.5), r"psi=-0.5 for method 'sws' is negative; give psi >= 0"),
        ("halo", dict(lambda_init=0), r"lambda_init=0 for method 'halo' divides by zero .* e.g. lambda_init=1.0"),
        ("halo", dict(hierarchy="l3"), r"hierarchy='l3' is unknown for method 'halo'; valid: 'l1', 'l2'"),
        ("l1", dict(finetune=1.0), r"finetune=1.0 for method 'l1' is outside \[0, 1\); .* e.g. finetune=0.1"),
        ("l1", dict(finetune=-0.1), r"finetune=-0.1 for method 'l1' is outside \[0, 1\)"),
        ("sws", dict(tol=0.0), r"tol=0.0 for method 'sws' must be > 0; .* e.g. 1e-3"),
        ("halo", dict(tol=-1e-3), r"tol=-0.001 for method 'halo' must be > 0"),
        ("halo", dict(reg_schedule=(0.0, 2)), r"reg_schedule factor 0.0 for method 'halo' must be > 0"),
        ("halo", dict(reg_schedule=10.0), r"reg_schedule=10.0 for method 'halo' must be \(factor, every\)"),
        ("l1", dict(psi=1.0), r"unknown option 'psi' for method 'l1'"),
        ("sws", dict(hierarchy="l2"), r"unknown option 'hierarchy' for method 'sws'"),
        ("halo", dict(target={"fc1": 0.5}), r"method 'halo' takes one overall sparsity, got target=\{'fc1': 0.5\}"),
    ],
)
def test_bad_options_give_one_line_errors(method: str, options: dict, match: str) -> None:
    options = {"target": 0.5} | options
    with pytest.raises(ConfigError, match=match) as info:
        sw.sparsify(ZOO["mlp"][0](), method, **options)
    assert "\n" not in str(info.value)


def test_the_command_line_trains_halo_with_finetune_and_a_reg_schedule(capsys, tmp_path) -> None:
    from sparsewrap.cli import main

    argv = ["train", "--model", "sparsewrap.demo.models:lenet5", "--method", "halo", "--target", "0.9", "-O",
            "finetune=0.5", "-O", "reg_schedule=[10,0.25]", "-O", "penalize_bias=true", "--limit", "256",
            "--val-limit", "64", "--batch-size", "64", "--epochs", "2", "--out", str(tmp_path / "run")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0, capsys.readouterr().err
    sp = sw.load(tmp_path / "run" / "last.safetensors")
    assert sp.step_count == 8 and sp.method.pruned and sp.method.config.reg_schedule == (10.0, 0.25)
    report = sp.report()
    assert report.exported == pytest.approx(0.9, abs=1e-4) and report.achieved == report.exported
    steered = report.extras["xi"] / 1e-4  # the controller's factor on ξ scales ψ too
    assert report.extras["psi"] == pytest.approx(1e-4 * 10**4 * steered)  # x10 after steps 2, 4, 6 and 8

"""STR: S(w, s) and its gradients, the thresholds' group, the controller and the export's projection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsewrap as sw
from sparsewrap.errors import ConfigError
from sparsewrap.methods.layer_budgets import rescaled_keep_counts
from sparsewrap.parametrizations.threshold import SoftThreshold

from .test_dnw import Two

A = [[1.0, -0.75], [0.5, -0.25]]
B = [[2.0, 3.0], [-4.0, 0.1], [0.2, 6.0]]


def test_soft_threshold_values_and_gradients_exactly() -> None:
    w = torch.tensor([1.0, -0.75, 0.5, -0.25, 0.0, 2.0], requires_grad=True)
    p = SoftThreshold(w, s_init=0.0)  # threshold sigmoid(0) = 0.5
    out = p(w)
    assert torch.equal(out, torch.tensor([0.5, -0.25, 0.0, 0.0, 0.0, 1.5]))
    out.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    assert torch.equal(w.grad, torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 6.0]))  # |w| == 0.5 gets none (relu'(0) = 0)
    # dS/ds = -sign(w) 1[|w| > t] sigmoid'(s): -(1 - 2 + 6) * 0.25
    assert p.s.grad.item() == -1.25


def test_soft_threshold_matches_the_formula_on_random_weights() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 9, dtype=torch.float64, requires_grad=True)
    g = torch.randn(64, 9, dtype=torch.float64)
    p = SoftThreshold(w, s_init=-0.7).double()
    p(w).backward(g)
    w2, s2 = w.detach().clone().requires_grad_(), torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    ref = torch.sign(w2) * torch.relu(w2.abs() - torch.sigmoid(s2))
    ref.backward(g)
    assert torch.equal(p(w), ref)
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)
    torch.testing.assert_close(p.s.grad, s2.grad)


def test_the_cpu_softshrink_path_has_the_bits_of_the_clamp_form_and_zeros_counts_ties() -> None:
    torch.manual_seed(1)
    w = torch.cat([torch.randn(4000) * 0.3, torch.tensor([0.5, -0.5, 0.0])]).requires_grad_()  # +-t itself too
    g = torch.randn(4003)
    p = SoftThreshold(w, s_init=0.0)  # t = 0.5
    out = p(w)
    assert torch.equal(out, w.detach() - torch.clamp(w.detach(), -0.5, 0.5))  # the formula's two-pass form
    out.backward(g)
    kept = w.detach().abs() > 0.5
    assert torch.equal(w.grad, torch.where(kept, g, 0))
    torch.testing.assert_close(p.s.grad, -(g * torch.sign(w.detach()) * kept).sum() * 0.25)
    assert int(p.zeros(w)) == int((w.detach().abs() <= 0.5).sum())


def test_the_paper_init_is_the_identity_and_gives_s_no_gradient() -> None:
    w = torch.tensor([0.3, -1e-6, 2.0], requires_grad=True)
    p = SoftThreshold(w, s_init=-3200.0)
    out = p(w)
    assert torch.equal(out, w)
    out.sum().backward()
    assert p.s.grad.item() == 0.0  # sigmoid'(-3200) underflows to 0 in float32 (METHODS.md 4.3)


def test_one_threshold_per_layer_in_its_own_group() -> None:
    sp = sw.sparsify(Two(A, B), "str", target=0.5, s_init=-3.0, s_weight_decay=5e-4)
    groups = {g["name"]: g for g in sp.param_groups(lr=0.1, weight_decay=1e-4)}
    thresholds = groups["thresholds"]
    assert [p.shape for p in thresholds["params"]] == [torch.Size([]), torch.Size([])]
    assert thresholds["weight_decay"] == 5e-4 and groups["weights"]["weight_decay"] == 1e-4
    assert [p.item() for p in thresholds["params"]] == [-3.0, -3.0]
    keys = {k for k in sp.model.state_dict() if k.endswith(".s")}
    assert keys == {"a.parametrizations.weight.0.s", "b.parametrizations.weight.0.s"}


def test_the_controller_undoes_the_optimizers_common_move_and_shifts_every_threshold_alike() -> None:
    sp = sw.sparsify(Two(A, B), "str", target=0.7, s_init=0.0, drive=0.1, learn=1.0)
    layers = sp.method.layers
    with torch.no_grad():  # as an optimizer step would: +0.3 and +0.1, a common move of +0.2
        layers[0].s.add_(0.3)
        layers[1].s.add_(0.1)
    sp.step()
    # the common move is undone (s = 0.1, -0.1), the sparsity measured there, every s moved by the same step
    t_a, t_b = torch.sigmoid(torch.tensor(0.1)), torch.sigmoid(torch.tensor(-0.1))
    zeros = int((torch.tensor(A).abs() <= t_a).sum()) + int((torch.tensor(B).abs() <= t_b).sum())
    assert zeros == 4
    delta = 0.1 * (0.7 - zeros / 10)
    assert layers[0].s.item() == pytest.approx(0.1 + delta)
    assert layers[1].s.item() == pytest.approx(-0.1 + delta)
    assert sp.report(exported=False).extras["threshold shift"] == pytest.approx(delta)
    sp.step()  # no move in between: only the controller's step
    zeros = int((torch.tensor(A).abs() <= torch.sigmoid(torch.tensor(0.1 + delta))).sum())
    zeros += int((torch.tensor(B).abs() <= torch.sigmoid(torch.tensor(-0.1 + delta))).sum())
    assert layers[0].s.item() == pytest.approx(0.1 + delta + 0.1 * (0.7 - zeros / 10))


@pytest.mark.parametrize("learn", [0.0, 0.25])
def test_the_controller_keeps_the_share_learn_of_the_optimizers_differences(learn: float) -> None:
    sp = sw.sparsify(Two(A, B), "str", target=0.7, s_init=0.0, drive=0.1, learn=learn)
    layers = sp.method.layers
    with torch.no_grad():  # moves +0.3 and +0.1: mean +0.2, differences +0.1 and -0.1
        layers[0].s.add_(0.3)
        layers[1].s.add_(0.1)
    sp.step()
    s_a, s_b = 0.1 * learn, -0.1 * learn  # from s^last = 0: learn * (m_l - m)
    zeros = int((torch.tensor(A).abs() <= torch.sigmoid(torch.tensor(s_a))).sum())
    zeros += int((torch.tensor(B).abs() <= torch.sigmoid(torch.tensor(s_b))).sum())
    delta = 0.1 * (0.7 - zeros / 10)
    assert layers[0].s.item() == pytest.approx(s_a + delta)
    assert layers[1].s.item() == pytest.approx(s_b + delta)


def test_the_controller_reaches_the_target_and_keeps_the_layers_apart() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 60), nn.ReLU(), nn.Linear(60, 30), nn.ReLU(), nn.Linear(30, 2))
    sp = sw.sparsify(model, "str", target=0.8, s_init=-10.0, learn=1.0)
    with torch.no_grad():  # layers apart, as an optimizer would have set them: the differences are kept
        sp.method.layers[0].s.fill_(-9.0)
    gap0 = (sp.method.layers[0].s - sp.method.layers[1].s).item()
    assert gap0 == pytest.approx(1.0)
    for _ in range(400):
        sp.step()
    extras = sp.report().extras
    assert abs(extras["gap to target"]) < 0.01
    assert extras["learned sparsity"] == pytest.approx(sp.sparsity())
    gap = (sp.method.layers[0].s - sp.method.layers[1].s).item()
    assert gap == pytest.approx(gap0, abs=1e-4)  # float32 s moved by 400 common shifts
    sp_off = sw.sparsify(Two(A, B), "str", target=0.8, drive=0.0)
    sp_off.step()
    assert [p.s.item() for p in sp_off.method.layers] == [-20.0, -20.0]  # drive=0: the paper's behaviour


def test_training_with_adam_ends_at_the_target_before_the_projection_learning_or_not() -> None:
    # Adam moves every s by about its lr per step whatever the gradient's size (here all the same way, which
    # would leave a lasting gap of lr / drive = 0.1); the controller undoes the common part of that move
    for learn in (1.0, 0.0):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
        x, y = torch.randn(256, 20), torch.randn(256, 1)
        sp = sw.sparsify(model, "str", target=0.9, include=["0", "2", "4"], learn=learn)
        opt = torch.optim.Adam(sp.param_groups(lr=1e-2, thresholds={"lr": 0.05}))
        for _ in range(150):
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sp.step()
        extras = sp.report().extras
        assert abs(extras["gap to target"]) < 0.01
        layers = [la.sparsity for la in sp.report().layers]
        assert max(layers) - min(layers) > 0.05  # non-uniform per-layer budgets either way
        levels = {p.s.item() for p in sp.method.layers}
        assert len(levels) == (3 if learn else 1)  # learn=0: one threshold shared by every layer


def test_the_goal_ramps_up_to_the_target_at_end() -> None:
    sp = sw.sparsify(Two(A, B), "str", target=0.8, s_init=-20.0, drive=1.0, start=2, end=6)
    shifts = []
    for _ in range(8):
        sp.step()
        shifts.append(sp.method.state_dict()["shift"])
    # every weight is far above sigmoid(-20) throughout: the step is drive * goal, the goal cubic in [2, 6]
    goals = [0.0, 0.0] + [0.8 * (1 - (1 - k / 4) ** 3) for k in range(5)] + [0.8]
    assert shifts == pytest.approx([sum(goals[: i + 1]) for i in range(8)])


def test_export_writes_shrunk_weights_projected_with_the_learned_budgets() -> None:
    # threshold 0.5 in both layers: a learns 2 zeros of 4, b 2 of 6; learned sparsity 0.4
    sp = sw.sparsify(Two(A, B), "str", target=0.7, s_init=0.0, drive=0.0)
    report = sp.report()
    assert [la.sparsity for la in report.layers] == pytest.approx([0.5, 2 / 6])
    assert report.extras["learned sparsity"] == pytest.approx(0.4)
    assert report.extras["gap to target"] == pytest.approx(-0.3)
    plain = sw.export(sp)  # keep 3: the learned densities 2/4 and 4/6 halved -> 1 and 2 survivors
    assert torch.equal(plain.a.weight, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    assert torch.equal(plain.b.weight, torch.tensor([[0.0, 0.0], [-3.5, 0.0], [0.0, 5.5]]))
    assert report.exported == pytest.approx(0.7)


def test_export_is_the_live_model_when_the_learned_sparsity_is_the_target() -> None:
    sp = sw.sparsify(Two(A, B), "str", target=0.4, s_init=0.0, drive=0.0)
    plain = sw.export(sp)
    assert torch.equal(plain.a.weight, torch.tensor([[0.5, -0.25], [0.0, 0.0]]))
    assert torch.equal(plain.b.weight, torch.tensor([[1.5, 2.5], [-3.5, 0.0], [0.0, 5.5]]))
    assert torch.equal(plain.b.weight, sp.model.b.weight)


def test_export_lowers_a_threshold_when_a_layer_must_keep_more() -> None:
    sp = sw.sparsify(Two(A, B), "str", target=0.3, s_init=0.0, drive=0.0)
    plain = sw.export(sp)  # keep 7: quotas 2.33 and 4.67 -> a keeps its 2, b keeps 5 (drops only 0.1)
    assert torch.equal(plain.a.weight, torch.tensor([[0.5, -0.25], [0.0, 0.0]]))
    w = torch.tensor(B)
    t = torch.nextafter(torch.tensor(0.1), torch.tensor(0.0))
    expected = torch.where(w.abs() > 0.1, torch.sign(w) * (w.abs() - t), torch.zeros(()))
    assert torch.equal(plain.b.weight, expected)
    assert int((plain.b.weight != 0).sum()) == 5
    assert sp.report().exported == pytest.approx(0.3)
    assert torch.equal(sp.model.b.weight[1, 1], torch.tensor(0.0))  # the live model is unchanged


def test_rescaled_keep_counts_caps_full_layers_and_fills_empty_ones_last() -> None:
    assert rescaled_keep_counts([2, 4], [4, 6], 3) == [1, 2]
    assert rescaled_keep_counts([4, 1], [4, 10], 8) == [4, 4]
    assert rescaled_keep_counts([0, 2], [3, 4], 6) == [2, 4]
    assert rescaled_keep_counts([0, 0], [2, 6], 4) == [1, 3]
    assert rescaled_keep_counts([1, 1], [2, 6], 99) == [2, 6]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(s_init=float("nan")), r"s_init=nan must be a finite number, e.g. s_init=-20.0"),
        (dict(s_init=float("inf")), r"s_init=inf must be a finite number"),
        (dict(s_weight_decay=-1e-4), r"s_weight_decay=-0.0001 is negative; give a decay >= 0"),
        (dict(drive=-0.1), r"drive=-0.1 is negative; give a gain >= 0 \(0 turns the controller off\)"),
        (dict(learn=1.5), r"learn=1.5 is outside \[0, 1\]; give the share of the optimizer's per-layer moves"),
        (dict(learn=float("nan")), r"learn=nan must be a finite number, e.g. learn=0.0"),
        (dict(start=5, end=3), r"schedule 'cubic' needs 0 <= start <= end, got start=5, end=3"),
        (dict(target={"a": 0.5}), r"method 'str' learns its own per-layer budgets and takes one overall sparsity"),
    ],
)
def test_bad_options_give_one_line_errors(options: dict, match: str) -> None:
    options = {"target": 0.5, **options}
    model = Two(A, B)
    with pytest.raises(ConfigError, match=match):
        sw.sparsify(model, "str", **options)


def test_a_checkpoint_resumes_the_controller_identically(tmp_path) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    x = torch.randn(32, 8)

    def train(sp: sw.Sparsifier, opt: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            loss = sp.model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sp.step()

    sp = sw.sparsify(build(), "str", target=0.6, include=["0", "2"], end=6)
    train(sp, torch.optim.SGD(sp.param_groups(lr=0.1), momentum=0.0), 3)
    sw.save(sp, tmp_path / "str.safetensors")
    again = sw.load(tmp_path / "str.safetensors", model=build())
    assert again.method.state_dict() == sp.method.state_dict()
    for s in (sp, again):
        train(s, torch.optim.SGD(s.param_groups(lr=0.1), momentum=0.0), 4)
    assert again.method.state_dict() == sp.method.state_dict()
    for a, b in zip(sw.export(sp).state_dict().values(), sw.export(again).state_dict().values()):
        assert torch.equal(a, b)


def test_the_goal_ramp_given_as_fractions_of_the_run_follows_its_length() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    sp = sw.sparsify(model, "str", target=0.5, start=0.0, end=0.5)
    with pytest.raises(ConfigError, match=r"needs the run's length.*sp\.start"):
        sp.step()
    sp.start(total_steps=40)
    assert (sp.method.goal.start, sp.method.goal.end) == (0, 20)


def test_the_eager_path_counts_kept_entries_only_in_a_training_forward(count_nonzero_calls: list[int]) -> None:
    """The count is read only from a training forward with gradients (by the controller): a no-grad forward
    spends no pass on it (these layers are below the native kernels' size: the eager path; an evaluation forward
    shows the export's projection, which counts on its own)."""
    sp = sw.sparsify(Two(A, B), "str", target=0.5, s_init=-1.0)
    calls = count_nonzero_calls
    x = torch.randn(3, 2)
    sp.model.train()
    with torch.no_grad():
        sp.model(x)
    assert calls == [] and all(p.trained_kept is None for p in sp.method.layers)
    sp.model(x)
    assert len(calls) == 2  # one per layer
    t = torch.sigmoid(torch.tensor(-1.0))
    kept = [int((torch.tensor(w).abs() > t).sum()) for w in (A, B)]
    assert [int(p.trained_kept) for p in sp.method.layers] == kept


def test_the_checkpoint_keeps_learn_and_one_from_before_the_option_resumes_as_it_trained(tmp_path) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    sp = sw.sparsify(build(), "str", target=0.6, include=["0", "2"], learn=0.25)
    assert sp.method.state_dict()["learn"] == 0.25
    sw.save(sp, tmp_path / "a.safetensors")
    assert sw.load(tmp_path / "a.safetensors", model=build()).method.config.learn == 0.25
    fresh = sw.sparsify(build(), "str", target=0.6, include=["0", "2"])
    old = {k: v for k, v in sp.method.state_dict().items() if k != "learn"}  # as saved before `learn` existed
    fresh.method.load_state_dict(old)
    assert fresh.method.config.learn == 1.0  # the controller then kept every difference

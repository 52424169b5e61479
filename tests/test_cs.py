"""Continuous Sparsification: the soft mask and its gradients, the temperature, the mask reset, the rewind, the
ticket rule, the driven coefficient, the phases over a ``sw.fit`` run, and bad options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparsewrap as sw
from sparsewrap.errors import ConfigError
from sparsewrap.parametrizations.soft_mask import SoftMask

from .test_dnw import Two

A = [[1.0, -0.75], [0.5, -0.25]]
B = [[2.0, 3.0], [-4.0, 0.1], [0.2, 6.0]]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _train(sp: sw.Sparsifier, x: torch.Tensor, opt: torch.optim.Optimizer, steps: int) -> None:
    sp.model.train()
    for _ in range(steps):
        loss = sp.model(x).pow(2).mean() + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


def _set_scores(sp: sw.Sparsifier, values: list[list[list[float]]]) -> None:
    with torch.no_grad():
        for p, v in zip(sp.method.layers, values):
            p.s.copy_(torch.tensor(v))


def test_soft_mask_and_its_gradients_at_known_beta_and_scores() -> None:
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64, requires_grad=True)
    p = SoftMask(w, mask_init=-0.5).double()
    scores = [[0.1, -0.2], [0.0, 0.3]]
    with torch.no_grad():
        p.s.copy_(torch.tensor(scores, dtype=torch.float64))
    p.beta = 3.0
    g = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    out = p(w)
    out.backward(g)
    c = 1.0 / _sigmoid(-0.5)
    assert p.scale == pytest.approx(c, rel=1e-15)
    for i in range(2):
        for j in range(2):
            wij, sij, gij = float(w.detach()[i, j]), scores[i][j], float(g[i, j])
            m = _sigmoid(3.0 * sij)
            assert float(out.detach()[i, j]) == pytest.approx(wij * c * m, rel=1e-12)
            assert float(w.grad[i, j]) == pytest.approx(gij * c * m, rel=1e-12)
            assert float(p.s.grad[i, j]) == pytest.approx(gij * wij * c * 3.0 * m * (1.0 - m), rel=1e-12)


def test_the_paper_init_starts_at_the_dense_weights() -> None:
    w = torch.randn(5, 7)
    p = SoftMask(w, mask_init=0.0)  # c = 2, sigmoid(0) = 1/2: the product is 1 exactly
    assert p.scale == 2.0
    assert torch.equal(p(w), w)


def test_the_temperature_rises_geometrically_within_each_round() -> None:
    sp = sw.sparsify(Two(A, B), "cs", target=0.5, rounds=2, ticket_start=9, rewind=0)
    # rounds of 4 and 5 steps (the last takes the remainder): beta = 200 ** (k / (L - 1))
    expected = [200 ** (k / 3) for k in range(4)] + [200 ** (k / 4) for k in range(5)]
    got = [sp.method.temperature(t) for t in range(9)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[3] == pytest.approx(200.0) and got[4] == 1.0 and got[8] == pytest.approx(200.0)
    x = torch.randn(4, 2)
    _train(sp, x, torch.optim.SGD(sp.param_groups(lr=0.0)), 5)  # the layers' beta follows the steps
    assert sp.method.layers[0].beta == pytest.approx(200 ** (1 / 4))


def test_the_mask_reset_between_rounds_clips_scores_at_s0_and_resets_their_momentum() -> None:
    torch.manual_seed(0)
    sp = sw.sparsify(Two(A, B), "cs", target=0.5, rounds=2, ticket_start=4, rewind=0, mask_init=-0.1)
    opt = torch.optim.SGD(sp.param_groups(lr=0.0), momentum=0.9)  # lr 0: the scores move only by the reset
    sp.start(total_steps=6, optimizer=opt)
    x = torch.randn(4, 2)
    _train(sp, x, opt, 1)
    a, b = [[0.3, -0.5], [-0.1, 0.05]], [[0.2, -0.3], [1.0, -2.0], [-0.05, 0.0]]
    _set_scores(sp, [a, b])
    buffers = [opt.state[p.s]["momentum_buffer"] for p in sp.method.layers]
    for buf in buffers:
        buf.fill_(1.0)
    _train(sp, x, opt, 1)  # the second step ends the first round
    for p, v, buf in zip(sp.method.layers, [a, b], buffers):
        v = torch.tensor(v)
        assert torch.equal(p.s.detach(), torch.minimum(v, torch.tensor(-0.1)))
        assert torch.equal(buf == 0, v > -0.1)  # only the clipped scores lost their momentum
    assert sp.method.layers[0].beta == 1.0


def test_rewinding_restores_the_saved_weights_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    sp = sw.sparsify(model, "cs", target=0.6, include=["0", "3"], rounds=2, ticket_start=6, rewind=2)
    opt = torch.optim.Adam(sp.param_groups(lr=0.05))
    sp.start(total_steps=8, optimizer=opt)
    x = torch.randn(16, 6)
    _train(sp, x, opt, 2)
    scores = {id(p.s) for p in sp.method.layers}
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if id(v) not in scores}
    saved = {k: v for k, v in saved.items() if not k.endswith("ticket")}
    _train(sp, x, opt, 3)
    assert sp.method.phase == "search"
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in saved.items())  # training moved them
    _train(sp, x, opt, 1)  # the sixth step draws the ticket
    assert sp.method.phase == "ticket"
    now = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(now[k], v), k  # BN running statistics included
    for p in (model[0].parametrizations.weight.original, model[1].weight):
        for key in ("exp_avg", "exp_avg_sq"):  # a fresh optimizer state for the ticket
            assert torch.count_nonzero(opt.state[p][key]) == 0


def test_the_ticket_keeps_the_top_scored_entries_globally_or_per_layer() -> None:
    a, b = [[0.3, -0.5], [-0.1, 0.05]], [[0.2, -0.3], [1.0, -2.0], [0.05, 0.0]]
    sp = sw.sparsify(Two(A, B), "cs", target=0.6, rounds=1, ticket_start=3)  # 10 weights: keep the top 4
    _set_scores(sp, [a, b])
    keep = sp.method.ticket_masks()
    # scores ranked: 1.0, 0.3, 0.2, then 0.05 twice: the earlier tie (in layer a) is dropped first
    assert keep[sp.method.layers[0]].tolist() == [[True, False], [False, False]]
    assert keep[sp.method.layers[1]].tolist() == [[True, False], [True, False], [True, False]]
    uniform = sw.sparsify(Two(A, B), "cs", target=0.5, allocation="uniform", rounds=1, ticket_start=3)
    _set_scores(uniform, [a, b])
    keep = uniform.method.ticket_masks()
    assert keep[uniform.method.layers[0]].tolist() == [[True, False], [False, True]]
    assert keep[uniform.method.layers[1]].tolist() == [[True, False], [True, False], [True, False]]
    paper = sw.sparsify(Two(A, B), "cs", lmbda=1e-8, rounds=1, ticket_start=3)  # no target: 1[s > 0]
    _set_scores(paper, [a, b])
    keep = paper.method.ticket_masks()
    assert keep[paper.method.layers[0]].tolist() == [[True, False], [False, True]]
    assert keep[paper.method.layers[1]].tolist() == [[True, False], [True, False], [True, False]]
    assert paper.report().requested is None


def test_eval_and_export_write_w_times_c_on_the_ticket() -> None:
    a, b = [[0.3, -0.5], [-0.1, 0.05]], [[0.2, -0.3], [1.0, -2.0], [0.06, 0.0]]
    sp = sw.sparsify(Two(A, B), "cs", target=0.6, mask_init=-0.5, rounds=1, ticket_start=3)
    _set_scores(sp, [a, b])
    c = 1.0 / _sigmoid(-0.5)
    plain = sw.export(sp)
    torch.testing.assert_close(plain.a.weight, torch.tensor([[1.0 * c, 0.0], [0.0, 0.0]]), rtol=1e-6, atol=0)
    torch.testing.assert_close(plain.b.weight, torch.tensor([[2.0 * c, 0.0], [-4.0 * c, 0.0], [0.2 * c, 0.0]]),
                               rtol=1e-6, atol=0)  # fmt: skip
    sp.model.eval()
    assert torch.equal(sp.model.b.weight, plain.b.weight)  # eval mode shows the ticket export draws
    sp.model.train()
    assert not torch.equal(sp.model.b.weight, plain.b.weight)  # training uses the soft mask
    assert sp.report().exported == pytest.approx(0.6)


def test_the_penalty_and_the_driven_coefficient() -> None:
    sp = sw.sparsify(Two(A, B), "cs", target=0.8, rounds=1, ticket_start=5, drive=0.5, lmbda_init=1e-3)
    a, b = [[0.3, -0.5], [-0.1, 0.05]], [[0.2, -0.3], [1.0, -2.0], [0.05, 0.0]]
    _set_scores(sp, [a, b])
    total = sum(_sigmoid(v) for row in a + b for v in row)  # beta = 1 at step 0
    assert float(sp.penalty().detach()) == pytest.approx(1e-3 * total, rel=1e-6)
    opt = torch.optim.SGD(sp.param_groups(lr=0.0))
    _train(sp, torch.randn(4, 2), opt, 1)
    density = 5 / 10  # five scores > 0
    assert float(sp.method.log_gain) == pytest.approx(0.5 * (density - 0.2))
    assert float(sp.method.coefficient()) == pytest.approx(1e-3 * math.exp(0.5 * 0.3))
    _set_scores(sp, [[[-1.0] * 2] * 2, [[0.5, -1.0]] + [[-1.0] * 2] * 2])  # density 1/10, below the goal 2/10
    _train(sp, torch.randn(4, 2), opt, 1)  # below the goal the gap is relative: (0.1 - 0.2) / 0.2
    assert float(sp.method.log_gain) == pytest.approx(0.5 * 0.3 + 0.5 * (-0.5))
    fixed = sw.sparsify(Two(A, B), "cs", target=0.8, lmbda=2e-3, rounds=1, ticket_start=5)
    _train(fixed, torch.randn(4, 2), torch.optim.SGD(fixed.param_groups(lr=0.0)), 1)
    assert float(fixed.method.coefficient()) == 2e-3  # lmbda= is the paper's fixed penalty


def test_mask_scores_have_their_own_group_without_weight_decay() -> None:
    sp = sw.sparsify(Two(A, B), "cs", target=0.5)
    groups = {g["name"]: g for g in sp.param_groups(lr=0.1, weight_decay=5e-4)}
    assert groups["mask_scores"]["weight_decay"] == 0.0 and groups["weights"]["weight_decay"] == 5e-4
    assert {id(p) for p in groups["mask_scores"]["params"]} == {id(p.s) for p in sp.method.layers}


def test_fit_for_two_epochs_goes_through_every_phase_and_hits_the_target() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    data = TensorDataset(torch.randn(64, 10), torch.randint(0, 3, (64,)))
    loader = DataLoader(data, batch_size=8)  # 8 steps an epoch, 16 in all: 3 rounds of 4, ticket from step 12
    sp = sw.sparsify(model, "cs", target=0.75)
    seen = []
    sp.method.draw_ticket = (lambda draw: lambda: (seen.append(sp.step_count), draw())[1])(sp.method.draw_ticket)
    sw.fit(sp, loader, epochs=2, optimizer="sgd", lr=0.05, handle_signals=False)
    assert sp.method.layout() == (12, 4, 0)  # rewind 0.025 of a 4-step round rounds to the start
    assert seen == [11] and sp.method.phase == "ticket"
    assert sp.report().exported == pytest.approx(round(0.75 * sp.report().params) / sp.report().params)
    assert sp.report().achieved == sp.report().exported  # the ticket is the export


def test_a_checkpoint_resumes_the_search_identically(tmp_path) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    x = torch.randn(32, 8)
    options = dict(target=0.6, include=["0", "2"], rounds=2, ticket_start=6, rewind=1)
    sp = sw.sparsify(build(), "cs", **options)
    _train(sp, x, torch.optim.SGD(sp.param_groups(lr=0.1)), 3)
    sw.save(sp, tmp_path / "cs.safetensors")
    again = sw.load(tmp_path / "cs.safetensors", model=build())
    for s in (sp, again):
        _train(s, x, torch.optim.SGD(s.param_groups(lr=0.1)), 4)
    assert sp.method.phase == again.method.phase == "ticket"
    for a, b in zip(sw.export(sp).state_dict().values(), sw.export(again).state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(final_temp=1.0), r"final_temp=1.0 must be > 1"),
        (dict(final_temp=float("nan")), r"final_temp=nan must be a finite number"),
        (dict(rounds=0), r"rounds=0 must be an int >= 1"),
        (dict(rounds=2, ticket_start=10, rewind=6), r"rewind=6 is past the first round \(5 steps\)"),
        (dict(rewind=1.5), r"rewind=1.5 is a float outside \[0, 1\]"),
        (dict(rounds=3, ticket_start=2), r"ticket_start=2 leaves fewer steps than rounds=3"),
        (dict(mask_init=float("nan")), r"mask_init=nan must be a finite number"),
        (dict(lmbda=-1.0), r"lmbda=-1.0 is negative"),
        (dict(allocation="layer"), r"allocation='layer' is unknown for method 'cs'; valid: 'erk', 'global'"),
        (dict(target=None), r"method 'cs' needs target= \(the ticket's sparsity\) or lmbda="),
    ],
)
def test_bad_options_give_one_line_errors(options: dict, match: str) -> None:
    options = {"target": 0.5, **options}
    model = Two(A, B)
    with pytest.raises(ConfigError, match=match):
        sw.sparsify(model, "cs", **options)
    assert not any(isinstance(m, SoftMask) for m in model.modules())


def test_the_run_length_is_checked_at_start() -> None:
    sp = sw.sparsify(Two(A, B), "cs", target=0.5, rounds=2, rewind=30)
    with pytest.raises(ConfigError, match=r"rewind=30 is past the first round \(10 steps\)"):
        sp.start(total_steps=30)
    late = sw.sparsify(Two(A, B), "cs", target=0.5, ticket_start=40)
    with pytest.raises(ConfigError, match=r"ticket_start=40 is step 40 of a 40-step run"):
        late.start(total_steps=40)
    rms = sw.sparsify(Two(A, B), "cs", target=0.5)
    with pytest.raises(ConfigError, match=r"cannot for RMSprop; use one of 'Adam', 'AdamW', 'SGD'"):
        rms.start(total_steps=40, optimizer=torch.optim.RMSprop(rms.param_groups(lr=0.1)))


def test_the_learned_sparsity_is_the_search_s_rule_not_the_ticket() -> None:
    sp = sw.sparsify(Two(A, B), "cs", target=0.6, rounds=1, ticket_start=3)  # the ticket keeps 4 of 10
    _set_scores(sp, [[[0.3, -0.5], [-0.1, 0.05]], [[0.2, -0.3], [1.0, -2.0], [0.05, 0.0]]])  # 5 scores > 0
    assert sp.report().extras["learned sparsity"] == pytest.approx(0.5)
    sp.method.draw_ticket()
    _set_scores(sp, [[[-1.0] * 2] * 2, [[-1.0] * 2] * 3])  # the scores no longer matter once the ticket is drawn
    report = sp.report()
    assert report.extras["learned sparsity"] == pytest.approx(0.5)  # as the search left it, before the ticket
    assert report.extras["gap to target"] == pytest.approx(-0.1)
    assert report.achieved == pytest.approx(0.6) and report.exported == pytest.approx(0.6)
    state = sp.method.state_dict()
    fresh = sw.sparsify(Two(A, B), "cs", target=0.6, rounds=1, ticket_start=3)
    fresh.method.load_state_dict(state)
    assert fresh.method.learned_sparsity() == pytest.approx(0.5)  # kept in the checkpoint


def test_the_eager_path_measures_the_mask_only_in_a_training_forward(count_nonzero_calls: list[int]) -> None:
    """The sum and the count of ``s > 0`` are read only from a training forward with gradients: an evaluation
    or no-grad forward spends no pass on them (layers below the native kernels' size: the eager path)."""
    sp = sw.sparsify(Two(A, B), "cs", target=0.5)
    _set_scores(sp, [[[1.0, -1.0], [2.0, 0.5]], [[-1.0, 1.0], [1.0, -2.0], [3.0, 0.0]]])
    calls = count_nonzero_calls
    x = torch.randn(3, 2)
    sp.model.train()
    with torch.no_grad():
        sp.model(x)
    assert calls == [] and all(p.take_positive() is None for p in sp.method.layers)
    sp.model(x)
    assert len(calls) == 2
    assert [int(p.take_positive()) for p in sp.method.layers] == [3, 3]

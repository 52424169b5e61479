"""Sparsity schedules against the formulas of Zhu & Gupta (cubic) and the exponential rule of Mostafa & Wang."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparsewrap as sw
from sparsewrap.errors import ConfigError
from sparsewrap.methods.schedules import Schedule, check_steps, resolve_steps


def test_oneshot_is_the_target_at_every_step_and_never_updates() -> None:
    s = Schedule("oneshot")
    assert [s.sparsity(t, 0.7) for t in (0, 5, 10_000)] == [0.7, 0.7, 0.7]
    assert not any(s.is_update_step(t) for t in range(20))
    assert s.events == 0


def test_cubic_matches_zhu_gupta_by_hand() -> None:
    # start 0, end 100, every 25 -> n = 4 events; s_t = s_f (1 - (1 - k/4)^3)
    s = Schedule("cubic", start=0, end=100, every=25)
    expected = {0: 0.0, 25: 0.8 * (1 - 0.75**3), 50: 0.8 * (1 - 0.5**3), 75: 0.8 * (1 - 0.25**3), 100: 0.8}
    for t, value in expected.items():
        assert s.sparsity(t, 0.8) == pytest.approx(value, abs=1e-12)
    assert s.sparsity(25, 0.8) == pytest.approx(0.4625)  # 0.8 * (1 - 27/64), computed by hand


def test_cubic_holds_between_events_before_start_and_after_end() -> None:
    s = Schedule("cubic", start=10, end=30, every=10)
    assert s.sparsity(0, 0.9) == 0.0 and s.sparsity(9, 0.9) == 0.0
    assert s.sparsity(19, 0.9) == s.sparsity(10, 0.9) == 0.0
    assert s.sparsity(20, 0.9) == s.sparsity(29, 0.9) == pytest.approx(0.9 * (1 - 0.5**3))
    assert s.sparsity(30, 0.9) == s.sparsity(10_000, 0.9) == pytest.approx(0.9)


def test_cubic_with_an_initial_sparsity() -> None:
    s = Schedule("cubic", start=0, end=2, every=1, initial=0.2)
    assert s.sparsity(0, 0.6) == pytest.approx(0.2)
    assert s.sparsity(1, 0.6) == pytest.approx(0.6 + (0.2 - 0.6) * 0.125)
    assert s.sparsity(2, 0.6) == pytest.approx(0.6)


def test_exponential_removes_the_same_fraction_of_survivors_at_every_event() -> None:
    s = Schedule("exponential", start=0, end=40, every=10)  # n = 4
    final = 0.9
    densities = [1 - s.sparsity(t, final) for t in (0, 10, 20, 30, 40)]
    for k, d in enumerate(densities):
        assert d == pytest.approx(0.1 ** (k / 4))
    per_event = 1 - (1 - final) ** (1 / 4)  # METHODS.md 3.3: fraction 1 - (1 - s_f)^(1/n) of the remaining weights
    for before, after in zip(densities, densities[1:]):
        assert after == pytest.approx(before * (1 - per_event))
    assert 1 - densities[-1] == pytest.approx(final)


def test_exponential_with_an_initial_sparsity() -> None:
    s = Schedule("exponential", start=0, end=2, every=1, initial=0.5)
    assert s.sparsity(0, 0.875) == pytest.approx(0.5)
    assert s.sparsity(1, 0.875) == pytest.approx(0.75)  # density 0.5 * (0.25)^(1/2) = 0.25
    assert s.sparsity(2, 0.875) == pytest.approx(0.875)


def test_update_steps_are_start_plus_multiples_of_every_up_to_end() -> None:
    s = Schedule("cubic", start=5, end=20, every=5)
    assert [t for t in range(30) if s.is_update_step(t)] == [5, 10, 15, 20]
    assert s.events == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kind="linear"), r"schedule='linear' is unknown; valid: 'cubic', 'exponential', 'oneshot'"),
        (dict(kind="cubic", start=10, end=5), r"needs 0 <= start <= end, got start=10, end=5"),
        (dict(kind="cubic", start=-1, end=10), r"start=-1"),
        (dict(kind="exponential", start=0, end=10, every=3), r"every=3 must be positive and divide end - start = 10"),
        (dict(kind="cubic", start=0, end=10, every=0), r"every=0"),
    ],
)
def test_bad_schedules_raise_config_errors_naming_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Schedule(**kwargs)


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Schedule("cubic", start=3, end=1)


def test_sparsity_is_monotone_for_both_gradual_kinds() -> None:
    for kind in ("cubic", "exponential"):
        s = Schedule(kind, start=0, end=100, every=10)
        values = [s.sparsity(t, 0.95) for t in range(0, 120)]
        assert all(b >= a for a, b in zip(values, values[1:]))
        assert math.isclose(values[-1], 0.95)


def test_step_options_are_step_counts_or_fractions_of_the_run() -> None:
    assert resolve_steps(7, None, "end", "m") == 7
    assert resolve_steps(0.75, 1000, "end", "m") == 750
    assert resolve_steps(1.0, 37, "end", "m") == 36  # the last step (steps are numbered from 0)
    assert resolve_steps(0.99, 37, "end", "m") == 36
    assert resolve_steps(0.5, 5, "end", "m") == 3  # half up
    for bad, match in [
        (1.5, r"end=1.5 is a float outside \[0, 1\]; a float is a fraction of the run \(e.g. end=0.75\), an int a "
              r"step count \(e.g. end=2\)"),
        (150.0, r"end=150.0 is a float outside \[0, 1\].*an int a step count \(e.g. end=150\)"),
        (-3, r"end=-3 is negative; give a step count >= 0 or a fraction of the run in \[0, 1\]"),
        ("half", r"end='half' must be a step count \(int >= 0\) or a fraction of the run in \[0, 1\]"),
        (True, r"end=True must be a step count"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            check_steps(bad, "end")


def test_a_schedule_given_in_fractions_is_resolved_against_the_run() -> None:
    sched = Schedule("cubic", 0.1, 0.75, every=10)
    with pytest.raises(ConfigError, match=r"fractions of the run; use schedule.resolved\(total_steps, method\)"):
        sched.is_update_step(100)
    with pytest.raises(ConfigError, match=r"start=0.1 is a fraction of the run, but method 'gmp' was not told"):
        sched.resolved(None, "gmp")
    steps = sched.resolved(1000, "gmp")
    assert (steps.start, steps.end, steps.every) == (100, 750, 10)
    odd = Schedule("cubic", 0, 0.75, every=100).resolved(1001, "gmp")  # 751 drops to the last whole interval
    assert (odd.start, odd.end) == (0, 700) and odd.sparsity(700, 0.9) == pytest.approx(0.9)
    assert Schedule("cubic", 0, 40, every=10).resolved(None, "gmp") == Schedule("cubic", 0, 40, every=10)
    with pytest.raises(ConfigError, match=r"needs start <= end, got start=0.8, end=0.5"):
        Schedule("cubic", 0.8, 0.5)
    with pytest.raises(ConfigError, match=r"give steps 12 and 10 of a 20-step run; end must not come before start"):
        Schedule("cubic", 12, 0.5).resolved(20, "gmp")


def test_start_equal_to_end_is_one_prune_event_straight_to_the_target() -> None:
    """Prune once at a chosen step (e.g. after dense training: start=end=1.0, the run's last step)."""
    one = Schedule("cubic", 1.0, 1.0, every=50).resolved(200, "magnitude")
    assert (one.start, one.end, one.events) == (199, 199, 0)
    assert [t for t in range(200) if one.is_update_step(t)] == [199]
    assert one.sparsity(198, 0.9) == 0.0 and one.sparsity(199, 0.9) == 0.9 and one.sparsity(500, 0.9) == 0.9
    fixed = Schedule("exponential", 30, 30, every=7)
    assert [t for t in range(100) if fixed.is_update_step(t)] == [30] and fixed.sparsity(30, 0.5) == 0.5


def test_magnitude_pruned_once_at_the_last_step_trains_dense_until_then() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sp = sw.sparsify(model, "magnitude", target=0.75, schedule="cubic", start=1.0, end=1.0)
    opt = torch.optim.SGD(sp.param_groups(lr=0.1), lr=0.1)
    sp.start(total_steps=5, optimizer=opt)
    for t in range(5):
        model.train()
        loss = model(torch.randn(3, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
        zeros = sum(int((m.weight == 0).sum()) for m in (model[0], model[2]))
        assert (zeros == 0) if t < 4 else (zeros > 0 and sp.report().achieved == pytest.approx(0.75, abs=1e-6))


@pytest.mark.parametrize("bad", ["abc", None, True, -3, 1.5])
def test_a_step_option_of_the_wrong_kind_is_one_clear_error(bad) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"^start=.*(step count|fraction of the run)"):
        sw.sparsify(model, "magnitude", target=0.5, schedule="cubic", start=bad, end=10)

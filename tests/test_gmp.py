"""GMP, the STR repository's name for gradual magnitude pruning: cubic, per layer, exactly at the target at end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsewrap as sw
from sparsewrap.errors import ConfigError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 17), nn.ReLU(), nn.Linear(17, 11), nn.ReLU(), nn.Linear(11, 3))


def _zeros(model: nn.Module) -> list[int]:
    return [int((model[i].weight == 0).sum()) for i in (0, 2)]


def test_the_rate_is_cubic_and_reaches_the_target_exactly_at_end() -> None:
    model = _model()
    sp = sw.sparsify(model, "gmp", target=0.9, start=2, end=10, every=2)
    seen = {}
    for t in range(13):
        sp.step()  # sp.step() at step t applies the rate of t
        seen[t] = _zeros(model)
    for t in range(13):
        k = min(max(t - 2, 0) // 2, 4) if t >= 2 else None
        rate = 0.0 if k is None else 0.9 * (1 - (1 - k / 4) ** 3)  # independent: Zhu & Gupta's cubic
        for zeros, n in zip(seen[t], (153, 187)):
            assert abs(zeros - rate * n) <= 1, (t, zeros, rate * n)  # each layer at the rate, to one weight
    assert sum(seen[10]) == round(0.9 * (153 + 187))  # exactly the target at end, and it stays there
    assert seen[12] == seen[10]
    # the seed's E = end - start + 1 would stop at 0.9 * (1 - (1/E)^3) < 0.9
    assert sp.report(exported=False).achieved == pytest.approx(0.9, abs=0.5 / 340)


def test_gmp_is_magnitude_with_a_cubic_per_layer_schedule() -> None:
    x = torch.randn(4, 9)
    results = []
    for method, options in (("gmp", {}), ("magnitude", dict(schedule="cubic", allocation="uniform"))):
        model = _model()
        sp = sw.sparsify(model, method, target=0.75, start=0, end=4, every=1, **options)
        opt = torch.optim.SGD(sp.param_groups(lr=0.1), momentum=0.9)
        for _ in range(6):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sp.step()
        results.append(sw.export(sp).state_dict())
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert "gmp" in sw.list_methods()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(schedule="exponential", end=4), r"schedule='exponential' is not available for method 'gmp'"),
        (dict(), r"method 'gmp' needs 0 <= start < end, got start=0, end=0; give the step numbers"),
        (dict(start=4, end=2), r"method 'gmp' needs 0 <= start < end, got start=4, end=2"),
        (dict(end=5, every=2), r"every=2 must be positive and divide end - start = 5"),
        (dict(end=4, allocation="nope"), r"allocation='nope' is unknown; valid: 'erk', 'global', 'uniform'"),
        (dict(end=4, target={"0": 0.5}, granularity="channel"), r"per-layer dict target with granularity='weight'"),
    ],
)
def test_bad_options_give_one_line_errors(options: dict, match: str) -> None:
    options = {"target": 0.5, **options}
    with pytest.raises(ConfigError, match=match):
        sw.sparsify(_model(), "gmp", **options)

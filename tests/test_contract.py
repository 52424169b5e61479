"""The shared contract matrix (STYLE.md): every method row × every tiny zoo model.

Adding a method = one row in :data:`METHOD_ROWS`: ``(row id, sparsify keyword arguments)``. The method is
``kwargs["method"]`` if given, else the row id up to its first ``"-"``; the target is ``kwargs["target"]``
(default 0.5). A gradual schedule must end within :data:`STEPS` training steps, so that the live model has
reached its final state when export is checked. Two sets declare what a row allows:

- :data:`IDENTITY_AT_START`: right after :func:`sparsify`, the training-mode outputs equal the dense model's (in
  eval mode a gradual method already shows its export, see test_eval_outputs_equal_the_exported_models_at_every_step).
- :data:`PROJECTED_AT_EXPORT`: the export projects the learned state onto the target (e.g. stochastic gates),
  so the plain model is compared with the method's baked tensors rather than with the live eval model.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import sparsewrap as sw
from sparsewrap.analysis.tracing import analyse, symbolic_trace
from sparsewrap.errors import ConfigError
from sparsewrap.parametrizations import wrapped_tensors

from .l0_reference import check_channel_gated_export, check_weight_gated_export
from .zoo import ZOO, outputs

METHOD_ROWS: list[tuple[str, dict[str, Any]]] = [
    ("magnitude", dict()),
    ("magnitude-uniform", dict(allocation="uniform", target=0.6)),
    ("magnitude-erk", dict(allocation="erk", target=0.7)),
    ("magnitude-channel", dict(granularity="channel")),
    ("magnitude-gradual", dict(schedule="cubic", start=0, end=4, every=2, target=0.8)),
    ("l0", dict()),
    ("l0-channel", dict(granularity="channel", target=0.3)),
    ("dnw", dict()),
    ("dnw-erk", dict(allocation="erk", target=0.7)),
    ("str", dict(target=0.6)),
    ("gmp", dict(start=0, end=4, every=2, target=0.8)),
    ("static", dict(target=0.7)),
    ("set", dict(every=2, end=4, target=0.7)),
    ("set-uniform", dict(distribution="uniform", every=1, end=4, fraction=0.5)),
    ("rigl", dict(every=2, end=4, target=0.7)),
    ("rigl-global", dict(distribution="global", every=1, end=3, decay="constant")),
    ("dsr", dict(every=1, end=4, n_prune=8, threshold=0.05, target=0.7)),
    ("deepr", dict(end=4, anneal=[[2, 1e-4]], temperature=1e-3, eta=0.5, target=0.7)),
    ("hashednet", dict(target=0.6)),
    ("hashednet-sign", dict(sign=True)),
    ("cs", dict(rounds=2, ticket_start=4, rewind=1, target=0.7)),
    ("halo", dict()),
    ("halo-layerwise", dict(layerwise=True, penalize_bias=True, hierarchy="l2", p=1.0, target=0.7)),
    ("sws", dict(target=0.6)),
    ("l1", dict(target=0.8, steer_every=1)),
]
# penalty methods train the plain model until they prune (sparsewrap/methods/penalty/)
IDENTITY_AT_START: set[str] = {"magnitude-gradual", "gmp", "halo", "halo-layerwise", "sws", "l1"}
PROJECTED_AT_EXPORT: set[str] = {"l0", "l0-channel", "str"}
L0_ROWS: set[str] = {"l0", "l0-channel"}  # export checked against tests/l0_reference.py
# rows whose budget is a count of active connections: a connection regrown at zero may still be zero at export, so
# the exported zeros may exceed the target while the masks hold exactly the budget (sparsewrap/methods/dst/)
ACTIVE_MAY_BE_ZERO: set[str] = {"set", "set-uniform", "rigl", "rigl-global", "dsr", "deepr"}
# rows that tie weights to a bank instead of zeroing them: the target is the share of free parameters removed
TIED: set[str] = {"hashednet", "hashednet-sign"}
STEPS = 5

ROW_IDS = [r[0] for r in METHOD_ROWS]
MODELS = sorted(ZOO)


# -- helpers -----------------------------------------------------------------------------------------------------
def _row(row_id: str) -> tuple[str, dict[str, Any]]:
    kwargs = dict(dict(METHOD_ROWS)[row_id])
    method = kwargs.pop("method", row_id.split("-")[0])
    if "density" not in kwargs:
        kwargs.setdefault("target", 0.5)
    return method, kwargs


def _input(name: str) -> Tensor:
    torch.manual_seed(1234)  # the same batch whatever the seed of the model
    return ZOO[name][1]()


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO[name][0]()


def _sparsify(name: str, row_id: str, seed: int = 0) -> sw.Sparsifier:
    method, kwargs = _row(row_id)
    model = _build(name, seed)
    torch.manual_seed(seed)
    return sw.sparsify(model, method, **kwargs)


def _loss(out: Any) -> Tensor:
    return sum(o.float().pow(2).mean() for o in outputs(out))


def _train(sp: sw.Sparsifier, x: Tensor, steps: int = STEPS, seed: int = 7) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.SGD(sp.param_groups(lr=0.05), momentum=0.9)
    sp.start(optimizer=opt)  # methods that regrow connections reset their momentum
    sp.model.train()
    for _ in range(steps):
        loss = _loss(sp.model(x)) + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


def _train_forward(model: nn.Module, x: Tensor) -> list[Tensor]:
    model.train()
    with torch.no_grad():
        return outputs(model(x))


def _eval(model: nn.Module, x: Tensor) -> list[Tensor]:
    model.eval()
    with torch.no_grad():
        return outputs(model(x))


def _assert_outputs_equal(a: list[Tensor], b: list[Tensor], exact: bool = False) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        if exact:
            torch.testing.assert_close(u, v, rtol=0, atol=0)
        else:
            torch.testing.assert_close(u, v)


def _unit_tolerance(sp: sw.Sparsifier, kwargs: dict[str, Any]) -> int:
    """The size of the largest unit the method removes: one weight, or one channel of a whole group."""
    if kwargs.get("granularity", "weight") == "weight":
        return 1
    fan_in = {t.name: t.fan_in for t in sp.targets}
    rows = [sum(fan_in.get(p, 0) for p in g.producers) for g in analyse(sp.model).groups]
    return max(rows + list(fan_in.values()))


def _signature(model: nn.Module) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in symbolic_trace(model).graph.nodes]


@dataclass(frozen=True)
class _Run:
    sp: sw.Sparsifier
    x: Tensor
    live: list[Tensor]  # eval outputs of the trained, wrapped model
    plain: nn.Module


@functools.cache
def _trained(model_name: str, row_id: str) -> _Run:
    """One sparsified model trained for STEPS steps, shared by the read-only tests below (seeds 5 and 11)."""
    x = _input(model_name)
    sp = _sparsify(model_name, row_id, seed=5)
    _train(sp, x, seed=11)
    live = _eval(sp.model, x)
    return _Run(sp, x, live, sw.export(sp))


models = pytest.mark.parametrize("model_name", MODELS)
rows = pytest.mark.parametrize("row_id", ROW_IDS)


# -- the contract --------------------------------------------------------------------------------------------------
@models
@rows
def test_output_shapes_unchanged_and_only_targets_wrapped(model_name: str, row_id: str) -> None:
    x = _input(model_name)
    dense = _eval(_build(model_name), x)
    sp = _sparsify(model_name, row_id)
    sparse = _eval(sp.model, x)
    assert [o.shape for o in sparse] == [o.shape for o in dense]
    assert type(sp.model(x)) is type(_build(model_name)(x))
    targets = {t.name for t in sp.targets}
    groups = analyse(_build(model_name)).groups
    companions = {c for g in groups if targets & set(g.producers) for c in g.companions}
    wrapped = {(m, t) for m, _mod, t, _p in wrapped_tensors(sp.model)}
    if sp.method.wraps_targets:  # penalty methods wrap nothing during training (tests/test_contract_unwrapped.py)
        assert {(n, "weight") for n in targets} <= wrapped
    assert wrapped <= {(n, "weight") for n in targets} | companions
    for name, module in sp.model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and name not in targets:
            assert not parametrize.is_parametrized(module, "weight"), name


@models
@pytest.mark.parametrize("row_id", [r for r in ROW_IDS if r in IDENTITY_AT_START])
def test_identity_at_zero_sparsity(model_name: str, row_id: str) -> None:
    x = _input(model_name)
    dense = _train_forward(_build(model_name), x)
    sp = _sparsify(model_name, row_id)
    assert sp.sparsity() == 0.0
    _assert_outputs_equal(_train_forward(sp.model, x), dense, exact=True)


@models
@rows
def test_gradients_reach_weights_and_method_parameters(model_name: str, row_id: str) -> None:
    sp = _sparsify(model_name, row_id)
    sp.model.train()
    (_loss(sp.model(_input(model_name))) + sp.penalty()).backward()
    for t in sp.targets:
        grad = t.original.grad
        assert grad is not None and torch.isfinite(grad).all(), t.name
        assert grad.abs().sum() > 0, f"no gradient reaches {t.name}.weight"
    for p in sp.method.method_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    groups = sp.param_groups(lr=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in sp.model.parameters()}
    assert groups[0]["name"] == "weights"
    own = {id(p) for p in sp.method.method_parameters()}
    assert not own & {id(p) for p in groups[0]["params"]}


@models
@rows
def test_state_dict_round_trip_into_a_freshly_sparsified_model(model_name: str, row_id: str) -> None:
    x = _input(model_name)
    sp = _sparsify(model_name, row_id, seed=0)
    _train(sp, x, steps=STEPS - 2)
    sp2 = _sparsify(model_name, row_id, seed=1)  # another initialisation: everything must come from the state
    sp2.model.load_state_dict(sp.model.state_dict(), strict=True)
    sp2.load_state_dict(sp.state_dict())
    assert sp2.step_count == sp.step_count
    _assert_outputs_equal(_eval(sp2.model, x), _eval(sp.model, x), exact=True)
    _train(sp, x, steps=2), _train(sp2, x, steps=2)  # the same future: schedules, masks, multipliers
    _assert_outputs_equal(_eval(sp2.model, x), _eval(sp.model, x), exact=True)
    for a, b in zip(sw.export(sp).state_dict().values(), sw.export(sp2).state_dict().values()):
        assert torch.equal(a, b)


@models
@rows
def test_export_keeps_eval_outputs_and_loads_strictly_into_the_original_class(model_name: str, row_id: str) -> None:
    run = _trained(model_name, row_id)
    sp, x, live, plain = run.sp, run.x, run.live, run.plain
    baked = sp.method.bake()
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert type(plain) is type(_build(model_name))
    if row_id in L0_ROWS:  # the zeros and values computed in the test from the gates' formula, not from bake()
        _method, kwargs = _row(row_id)
        beta = sp.method.config.temperature
        if kwargs.get("granularity", "weight") == "weight":
            check_weight_gated_export(sp.targets, plain, kwargs["target"], beta)
        else:
            check_channel_gated_export(list(wrapped_tensors(sp.model)), plain, beta)
        _assert_outputs_equal(_eval(plain, x), live)
    elif row_id in PROJECTED_AT_EXPORT:
        for (mname, tname), value in baked.items():
            torch.testing.assert_close(getattr(plain.get_submodule(mname), tname), value, rtol=0, atol=0)
    else:
        _assert_outputs_equal(_eval(plain, x), live)
    fresh = _build(model_name, seed=3)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    _assert_outputs_equal(_eval(fresh, x), _eval(plain, x), exact=True)
    _assert_outputs_equal(_eval(sp.model, x), live, exact=True)  # export changed nothing in the live model


@models
@rows
def test_wrapped_model_traces_to_the_same_graph(model_name: str, row_id: str) -> None:
    before = _signature(_build(model_name))
    sp = _sparsify(model_name, row_id)
    assert _signature(sp.model) == before
    x = _input(model_name)
    _assert_outputs_equal(_eval(symbolic_trace(sp.model), x), _eval(sp.model, x), exact=True)


@models
@rows
def test_exported_sparsity_equals_the_target_within_one_unit(model_name: str, row_id: str) -> None:
    _method, kwargs = _row(row_id)
    run = _trained(model_name, row_id)
    sp, plain = run.sp, run.plain
    if row_id in TIED:  # the originals are the banks; the exported weights are dense
        target = kwargs.get("target", 0.5)
        weights = [plain.get_submodule(t.name).weight.numel() for t in sp.targets]
        assert [t.numel for t in sp.targets] == [round((1 - target) * n) for n in weights]
        assert sp.report().exported == 0.0 and sp.report().requested == pytest.approx(target)
        return
    total = sum(t.numel for t in sp.targets)
    zeros = sum(int((plain.get_submodule(t.name).weight == 0).sum()) for t in sp.targets)
    target = kwargs["target"] if "target" in kwargs else 1.0 - kwargs["density"]
    if row_id in ACTIVE_MAY_BE_ZERO:
        masked = sum(int((p.mask == 0).sum()) for _m, _mod, _t, p in wrapped_tensors(sp.model))
        assert abs(masked - target * total) <= 0.5 + 1e-9 and zeros >= masked
    else:
        assert abs(zeros - target * total) <= max(_unit_tolerance(sp, kwargs), 0.5 + 1e-9)
    report = sp.report()
    assert math.isclose(report.exported, zeros / total, abs_tol=1e-12)
    assert report.requested == pytest.approx(target)


@models
@rows
def test_same_seed_gives_the_same_result(model_name: str, row_id: str) -> None:
    sp = _sparsify(model_name, row_id, seed=5)  # the seeds of _trained
    _train(sp, _input(model_name), seed=11)
    first, again = _trained(model_name, row_id).plain.state_dict(), sw.export(sp).state_dict()
    assert first.keys() == again.keys()
    for k in first:
        assert torch.equal(first[k], again[k]), k


BAD_CALLS: list[tuple[str, Callable[[nn.Module, str, dict], Any], type[Exception], str]] = [
    ("unknown option", lambda m, meth, kw: sw.sparsify(m, meth, **kw, no_such_option=1), ConfigError,
     r"unknown option 'no_such_option' for method '{method}'; valid options: "),
    ("target above 1", lambda m, meth, kw: sw.sparsify(m, meth, target=1.5), ConfigError,
     r"target=1.5 is outside \(0, 1\)"),
    ("target and density", lambda m, meth, kw: sw.sparsify(m, meth, target=0.5, density=0.5), ConfigError,
     r"give target= \(sparsity\) or density= \(1 - sparsity\), not both"),
    ("include matching nothing", lambda m, meth, kw: sw.sparsify(m, meth, **kw, include="nope.*"), ConfigError,
     r"include pattern 'nope\.\*' matches no Conv/Linear layer"),
]  # fmt: skip


@rows
@pytest.mark.parametrize("bad", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_options_raise_clear_errors_and_leave_the_model_untouched(row_id: str, bad) -> None:
    method, kwargs = _row(row_id)
    model = _build("mlp")  # argument checks do not depend on the model
    _label, call, error, pattern = bad
    with pytest.raises(error, match=pattern.format(method=method)):
        call(model, method, kwargs)
    assert not list(wrapped_tensors(model))
    sw.sparsify(model, method, **kwargs)  # the model is still usable
    with pytest.raises(ConfigError, match=r"MLP is already sparsified; export it first"):
        sw.sparsify(model, method, **kwargs)


# -- the controller and the registry, for every row --------------------------------------------------------------
@rows
def test_density_is_one_minus_the_target(row_id: str) -> None:
    method, kwargs = _row(row_id)
    target = kwargs.pop("target")
    sp = sw.sparsify(_build("mlp"), method, density=1.0 - target, **kwargs)
    assert sp.method.requested_sparsity() == pytest.approx(target)
    assert sp.spec.target == pytest.approx(target)


@rows
def test_param_groups_take_overrides_and_refuse_unknown_groups(row_id: str) -> None:
    sp = _sparsify("mlp", row_id)
    groups = sp.param_groups(lr=0.1, weight_decay=5e-4, weights={"momentum": 0.9})
    weights = groups[0]
    assert weights["lr"] == 0.1 and weights["weight_decay"] == 5e-4 and weights["momentum"] == 0.9
    assert all(g["lr"] is not None for g in groups)
    torch.optim.AdamW(sp.param_groups(lr=1e-3))  # ready for any optimizer
    listed = ", ".join(repr(n) for n in sorted(g["name"] for g in sp.param_groups()))
    with pytest.raises(ConfigError, match=r"param_groups: no group named 'nope'; groups: " + re.escape(listed)):
        sp.param_groups(nope={"lr": 1.0})
    with pytest.raises(ConfigError, match=r"learning rate of group 'weights' is -1.0; it must be >= 0"):
        sp.param_groups(lr=-1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target=True), r"target=True is a bool, not a number"),
        (dict(target=float("nan")), r"target=nan is outside \(0, 1\)"),
        (dict(target=0), r"target=0 is outside \(0, 1\)"),
        (
            dict(density=1.0),
            r"density=1.0 is outside \(0, 1\); density is the fraction of targeted weights that are kept",
        ),
        (dict(target={}), r"target= is an empty dict"),
        (dict(target={"fc1": 2.0}), r"target\['fc1'\]=2.0 is outside \[0, 1\)"),
        (dict(), r"method 'magnitude' needs target= \(sparsity in \(0, 1\)\) or density="),
    ],
)
def test_targets_are_validated_up_front(kwargs: dict, match: str) -> None:
    model = _build("mlp")
    with pytest.raises(ConfigError, match=match):
        sw.sparsify(model, "magnitude", **kwargs)
    assert not list(wrapped_tensors(model))


def test_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(sw.UnknownNameError, match=r"unknown method 'magnitud'; registered methods: .*'magnitude'"):
        sw.sparsify(_build("mlp"), "magnitud", target=0.5)
    with pytest.raises(KeyError):
        sw.sparsify(_build("mlp"), "magnitud", target=0.5)
    with pytest.raises(ConfigError, match=r"model must be an nn.Module, got str"):
        sw.sparsify("resnet18", "magnitude", target=0.5)


@dataclass
class _EveryOtherConfig:
    offset: int = 0

    def __post_init__(self) -> None:
        if self.offset not in (0, 1):
            raise ConfigError(f"offset={self.offset!r} must be 0 or 1")


class _EveryOther(sw.Method):
    """A third-party method: prunes every other weight (a fixed pattern), through the public extension points."""

    name = "test-every-other"
    description = "Every other weight (test method)."
    Config = _EveryOtherConfig

    def attach(self) -> None:
        from sparsewrap.parametrizations import Masked, attach

        for t in self.targets:
            mask = attach(t.module, "weight", Masked(t.shape, t.original)).mask
            mask.view(-1)[self.config.offset :: 2] = 0


def test_a_third_party_method_registers_and_runs_end_to_end(monkeypatch) -> None:
    from sparsewrap.methods import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # leave the global registry as it was
    assert sw.register_method(_EveryOther) is _EveryOther
    assert sw.list_methods()["test-every-other"] == "Every other weight (test method)."
    with pytest.raises(ConfigError, match=r"a method named 'test-every-other' is already registered"):
        sw.register_method(_EveryOther)
    with pytest.raises(ConfigError, match=r"offset=2 must be 0 or 1"):
        sw.sparsify(_build("mlp"), "test-every-other", target=0.5, offset=2)
    sp = sw.sparsify(_build("mlp"), "test-every-other", target=0.5, offset=1)
    plain = sw.export(sp)
    assert (plain.fc1.weight.view(-1)[1::2] == 0).all() and (plain.fc1.weight.view(-1)[0::2] != 0).all()
    assert sp.report().exported == pytest.approx(0.5)


def test_register_method_refuses_bad_classes(monkeypatch) -> None:
    from sparsewrap.methods import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    nameless = type("Nameless", (sw.Method,), {"Config": _EveryOtherConfig})
    with pytest.raises(ConfigError, match=r"Nameless needs a non-empty class attribute 'name'"):
        sw.register_method(nameless)
    plain_config = type("PlainConfig", (sw.Method,), {"name": "test-plain", "Config": dict})
    with pytest.raises(ConfigError, match=r"PlainConfig.Config must be a dataclass"):
        sw.register_method(plain_config)


# -- issue 14: the penalty in either order; the eval model is the exported model at every step -------------------
def _train_in_order(sp: sw.Sparsifier, x: Tensor, steps: int, penalty_first: bool, seed: int = 7) -> None:
    """``_train`` with the penalty written before (``sp.penalty() + loss(model(x))``) or after the forward."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(sp.param_groups(lr=0.05), momentum=0.9)
    sp.start(optimizer=opt)  # methods that regrow connections reset their momentum
    sp.model.train()
    for _ in range(steps):
        if penalty_first:
            penalty = sp.penalty()
            loss = penalty + _loss(sp.model(x))
        else:
            loss = _loss(sp.model(x)) + sp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


@models
@rows
def test_penalty_is_valid_before_or_after_the_forward(model_name: str, row_id: str) -> None:
    x = _input(model_name)
    first, after = _sparsify(model_name, row_id, seed=5), _sparsify(model_name, row_id, seed=5)
    _train_in_order(first, x, steps=3, penalty_first=True)  # per-weight L0 failed here on the second step
    _train_in_order(after, x, steps=3, penalty_first=False)
    # the same training either way: the penalty's value and gradient do not depend on when it is computed
    for (name, a), b in zip(first.model.state_dict().items(), after.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(first.penalty(), after.penalty(), rtol=1e-5, atol=1e-7)


# rows whose export is ahead of the live model mid-schedule: magnitude's bake() prunes to the final target while
# the masks follow the schedule (sparsewrap/methods/magnitude.py); strict, so a fix shows up here
EXPORT_AHEAD_OF_SCHEDULE: set[str] = set()


@models
@pytest.mark.parametrize(
    "row_id",
    [
        pytest.param(r, marks=pytest.mark.xfail(strict=True, reason="export prunes to the final target mid-schedule"))
        if r in EXPORT_AHEAD_OF_SCHEDULE
        else r
        for r in ROW_IDS
    ],
)
def test_eval_outputs_equal_the_exported_models_at_every_step(model_name: str, row_id: str) -> None:
    x = _input(model_name)
    sp = _sparsify(model_name, row_id, seed=5)
    for steps in (0, 1, 3):  # 0, 1 and 4 steps in all
        _train(sp, x, steps=steps, seed=11 + steps)
        live = _eval(sp.model, x)
        _assert_outputs_equal(_eval(sw.export(sp), x), live, exact=True)
        _assert_outputs_equal(_eval(sp.model, x), live, exact=True)  # export changed nothing in the live model

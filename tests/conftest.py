"""Shared fixtures: deterministic seeds, a fixed thread count, quiet timm warnings, the tiny zoo."""

from __future__ import annotations

import random
import signal
import warnings

import pytest
import torch

from .zoo import ZOO

# Test models are tiny: intra-op threads only add synchronisation, and on a busy 2-core machine a second
# thread makes small backward passes ~50x slower (measured). One thread keeps every file fast and stable.
torch.set_num_threads(1)

# A runner that starts the tests in the background (`make test &` in a script, nohup) leaves SIGINT ignored, and
# Python then installs no KeyboardInterrupt handler: the Ctrl-C tests need what a terminal gives.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, whatever ran before it."""
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _quiet_timm():
    """timm emits deprecation and future warnings unrelated to sparsewrap; keep test output readable."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"timm(\.|$)")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm(\.|$)")
        warnings.filterwarnings("ignore", message=r".*torch\.fx.*deprecated", category=UserWarning)
        yield


@pytest.fixture(params=sorted(ZOO))
def zoo_name(request: pytest.FixtureRequest) -> str:
    """The name of each tiny zoo model in turn."""
    return request.param


@pytest.fixture
def count_nonzero_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at each call of ``torch.count_nonzero`` (a counting pass) during the test."""
    calls: list[int] = []
    real = torch.count_nonzero
    monkeypatch.setattr(torch, "count_nonzero", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls

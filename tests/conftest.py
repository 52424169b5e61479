"""Shared fixtures: deterministic seeds, a fixed thread count, quiet timm warnings, the tiny zoo."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from .zoo import ZOO

# The CI machine has 2 cores; more threads than cores only adds contention between tests.
torch.set_num_threads(2)


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

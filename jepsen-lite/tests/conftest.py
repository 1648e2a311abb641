"""Test configuration for jepsen-lite.

Loads the same Hypothesis profiles as the project's ``tests/conftest.py``: ``ci``
(the default: derandomized, no example database, so every run explores the same
cases) and ``explore`` (``HYPOTHESIS_PROFILE=explore``, fresh randomness, more
examples).
"""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, settings
from jepsen_lite.history import HistoryRecorder

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore",
    max_examples=2000,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rec() -> HistoryRecorder:
    """A history recorder whose clock ticks 0, 10, 20, ... (deterministic)."""
    ticks = itertools.count(0, 10)
    return HistoryRecorder(clock=lambda: next(ticks))

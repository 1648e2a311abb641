"""Shared test configuration.

Hypothesis runs derandomized (a fixed seed per test) and without an example
database, so every run of the suite explores the same cases and a failure is
reproducible from its printed example. Set HYPOTHESIS_PROFILE=explore to
search more widely with fresh randomness.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

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

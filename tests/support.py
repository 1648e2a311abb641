"""Helpers shared by the integration and the Docker system tests."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def clean_env() -> dict[str, str]:
    """The environment without KVCLUSTER_* variables, so nothing outside leaks in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KVCLUSTER_")}


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    end = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= end:
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(interval)

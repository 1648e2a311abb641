"""Errors of the harness itself (not of the database under test)."""

from __future__ import annotations

__all__ = ["HarnessError"]


class HarnessError(Exception):
    """The harness could not do its job (bad option, missing tool, cluster would not
    start, ...). The command line reports it on one line and exits with status 2, so it
    is never confused with a verdict about the database."""

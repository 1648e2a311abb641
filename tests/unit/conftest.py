"""Fixtures shared by the unit tests."""

from __future__ import annotations

from typing import Any

import pytest

from kvcluster.server import config as cfg
from kvcluster.server import main as node_main


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[cfg.Config]:
    """Replace kvcluster-node's serve(): record the config the command would run with."""
    configs: list[cfg.Config] = []

    async def fake_serve(config: cfg.Config, ready: Any = None) -> None:
        configs.append(config)

    monkeypatch.setattr(node_main, "serve", fake_serve)
    return configs

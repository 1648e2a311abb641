"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Callable
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


@pytest.fixture
def config_error() -> Callable[[dict[str, Any], dict[str, str], str, str], cfg.ConfigError]:
    """Load ``flags`` and ``env`` (no file), which must be refused: check that the
    ConfigError names ``field`` and ``source`` ("" for a default), in its attributes
    and in its one-line message; return it."""

    def load_refused(
        flags: dict[str, Any], env: dict[str, str], field: str, source: str
    ) -> cfg.ConfigError:
        with pytest.raises(cfg.ConfigError) as info:
            cfg.load(flags, None, env)
        err = info.value
        assert err.field == field
        assert err.source == source
        where = f" (from {source})" if source else ""
        assert str(err).startswith(f"config error: {field}{where}: ")
        assert "\n" not in str(err)
        return err

    return load_refused

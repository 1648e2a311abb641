"""kvcluster.net.transport.split_address: the one host:port parser (config, client, TCP)."""

from __future__ import annotations

import pytest

from kvcluster.client._core import parse_nodes
from kvcluster.errors import InvalidArgument
from kvcluster.net.transport import split_address
from kvcluster.server.config import ConfigError, parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7101", ("127.0.0.1", 7101)),
        ("node-a.example:1", ("node-a.example", 1)),
        ("[::1]:7101", ("[::1]", 7101)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),  # "any port" for a listener
        ("h:65535", ("h", 65535)),
    ],
)
def test_split_address(text: str, expected: tuple[str, int]) -> None:
    assert split_address(text) == expected


@pytest.mark.parametrize("text", ["", "7101", ":7101", "host:", "host:x1", "host:-1", "h:65536"])
def test_split_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a host:port"):
        split_address(text)


@pytest.mark.parametrize("text", ["host:0", "host", "host:70000"])
def test_config_and_client_refuse_what_cannot_be_dialled(text: str) -> None:
    with pytest.raises(ConfigError, match="is not host:port"):
        parse_address(text, "listen")
    with pytest.raises(InvalidArgument, match="is not host:port"):
        parse_nodes([text])

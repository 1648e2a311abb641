"""The ``peer_port_offset`` setting: node-to-node TCP on the listen port + offset.

Default 2000; 0 selects the gRPC transport; otherwise both the listen and the
advertised port moved by the offset must be ports, and the moved listen port
must not be the metrics port. Every rejection is a ConfigError naming the
field (and the source, when not a default), like the rest of the config.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kvcluster.net.tcp_transport import peer_address
from kvcluster.server import config as cfg
from kvcluster.server import main as node_main

FIELD = "peer_port_offset"


def test_default_is_2000() -> None:
    c = cfg.load({}, None, {})
    assert c.peer_port_offset == 2000
    assert peer_address(c.listen, c.peer_port_offset) == "127.0.0.1:9101"
    (field,) = [f for f in cfg.FIELDS if f.name == FIELD]
    assert field.default == 2000
    assert field.kind is int
    assert field.help


@pytest.mark.parametrize(
    ("flags", "env", "toml"),
    [
        ({FIELD: "0"}, {}, None),
        ({FIELD: 0}, {}, None),
        ({}, {"KVCLUSTER_PEER_PORT_OFFSET": "0"}, None),
        ({}, {}, f"{FIELD} = 0\n"),
    ],
    ids=["flag text", "flag int", "env", "toml"],
)
def test_zero_is_accepted_from_every_source(
    tmp_path: Path, flags: dict[str, Any], env: dict[str, str], toml: str | None
) -> None:
    path = None
    if toml is not None:
        path = tmp_path / "node.toml"
        path.write_text(toml)
    assert cfg.load(flags, path, env).peer_port_offset == 0


def test_zero_is_accepted_whatever_the_ports() -> None:
    """Offset 0 means "no TCP listener", so no port arithmetic is checked."""
    c = cfg.load({"listen": "127.0.0.1:65535", "metrics_listen": "off", FIELD: "0"}, None, {})
    assert c.peer_port_offset == 0


@pytest.mark.parametrize(
    ("flags", "offset"),
    [
        ({FIELD: "1"}, 1),
        ({FIELD: "3000"}, 3000),
        ({"listen": "127.0.0.1:7101", FIELD: "58434"}, 58434),  # 65535: the last port
        ({"listen": "127.0.0.1:7101", "metrics_listen": "off", FIELD: "1000"}, 1000),
        ({"listen": "127.0.0.1:7101", "metrics_listen": "127.0.0.1:9999", FIELD: "1000"}, 1000),
    ],
)
def test_valid_offsets(flags: dict[str, Any], offset: int) -> None:
    assert cfg.load(flags, None, {}).peer_port_offset == offset


def test_env_and_flag_precedence() -> None:
    env = {"KVCLUSTER_PEER_PORT_OFFSET": "3000"}
    assert cfg.load({}, None, env).peer_port_offset == 3000
    assert cfg.load({FIELD: "4000"}, None, env).peer_port_offset == 4000


BAD: list[tuple[str, dict[str, Any], dict[str, str], str, str]] = [
    # (id, flags, env, source, words in the message)
    ("negative", {FIELD: "-1"}, {}, "--peer-port-offset", "is not a port"),
    ("very negative", {FIELD: "-7101"}, {}, "--peer-port-offset", "is not a port"),
    ("negative env", {}, {"KVCLUSTER_PEER_PORT_OFFSET": "-5"}, "KVCLUSTER_PEER_PORT_OFFSET", ""),
    ("past 65535", {FIELD: "58435"}, {}, "--peer-port-offset", "is not a port"),
    ("far past 65535", {FIELD: "70000"}, {}, "--peer-port-offset", "is not a port"),
    # the default offset with a listen port near the top: no source, it is the default
    ("default too big", {"listen": "127.0.0.1:64000", "metrics_listen": "off"}, {}, "", "port"),
    (
        "advertised port too big",
        {"listen": "0.0.0.0:7101", "advertise": "10.0.0.5:64000"},
        {},
        "",
        "is not a port",
    ),
    ("the metrics port", {FIELD: "1000"}, {}, "--peer-port-offset", "metrics port"),
    ("not a number", {FIELD: "lots"}, {}, "--peer-port-offset", "is not an integer"),
    ("a fraction", {FIELD: "1.5"}, {}, "--peer-port-offset", "is not an integer"),
]


@pytest.mark.parametrize(
    ("flags", "env", "source", "words"),
    [pytest.param(f, e, s, w, id=name) for name, f, e, s, w in BAD],
)
def test_bad_offset_names_the_field(
    flags: dict[str, Any],
    env: dict[str, str],
    source: str,
    words: str,
    config_error: Callable[..., cfg.ConfigError],
) -> None:
    assert words in str(config_error(flags, env, FIELD, source))


def test_bad_offset_in_a_toml_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    for text in (f"{FIELD} = -2000\n", f'{FIELD} = "far"\n', f"{FIELD} = true\n"):
        path.write_text(text)
        with pytest.raises(cfg.ConfigError) as info:
            cfg.load({}, path, {})
        assert info.value.field == FIELD
        assert info.value.source == str(path)


def test_every_accepted_offset_gives_a_valid_peer_address() -> None:
    """What config accepts, main's peer_address() must accept too (no ValueError at start)."""
    rejected: set[tuple[str, int]] = set()
    for listen in ("127.0.0.1:1", "127.0.0.1:7101", "127.0.0.1:63535"):
        for offset in (1, 999, 1001, 2000, 65534):
            try:
                c = cfg.load({"listen": listen, FIELD: str(offset)}, None, {})
            except cfg.ConfigError as exc:
                assert exc.field in (FIELD, "metrics_listen")
                rejected.add((listen, offset))
                continue
            peer = peer_address(c.listen, c.peer_port_offset)
            assert peer not in (c.listen, c.metrics_listen)
    # only the moves past port 65535 are refused: the rest were all checked above
    assert rejected == {("127.0.0.1:7101", 65534), ("127.0.0.1:63535", 65534)}


# -- the kvcluster-node command ---------------------------------------------------------------


def test_node_command_flag_and_env(served: list[cfg.Config]) -> None:
    runner = CliRunner()
    result = runner.invoke(node_main.cli, ["--peer-port-offset", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(node_main.cli, [], env={"KVCLUSTER_PEER_PORT_OFFSET": "3000"})
    assert result.exit_code == 0, result.output
    result = runner.invoke(node_main.cli, [])
    assert result.exit_code == 0, result.output
    assert [c.peer_port_offset for c in served] == [0, 3000, 2000]


def test_node_command_bad_offset_is_one_line_exit_2(served: list[cfg.Config]) -> None:
    result = CliRunner().invoke(node_main.cli, ["--peer-port-offset", "-1"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "kvcluster-node: config error: peer_port_offset (from --peer-port-offset): "
        "listen port + -1 is not a port"
    ]
    assert served == []


def test_a_taken_peer_port_is_a_config_error_naming_the_field() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(cfg.ConfigError) as info:
            node_main._check_free(f"127.0.0.1:{port}", FIELD)
        assert info.value.field == FIELD

"""Node configuration: precedence (defaults < TOML < env < flags) and validation.

Every validation error must name its field (``ConfigError.field`` and the
message) and, when it did not come from a default, the source it came from.
The ``kvcluster-node`` command is exercised with click's CliRunner and a fake
``serve`` (no node is started).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kvcluster.node.settings import NodeSettings
from kvcluster.server import config as cfg
from kvcluster.server import main as node_main


def load(
    flags: dict[str, Any] | None = None,
    toml: str | None = None,
    env: dict[str, str] | None = None,
    tmp_path: Path | None = None,
) -> cfg.Config:
    path = None
    if toml is not None:
        assert tmp_path is not None
        path = tmp_path / "node.toml"
        path.write_text(toml)
    return cfg.load(flags or {}, path, env or {})


# -- defaults and derived values ------------------------------------------------------------


def test_defaults() -> None:
    c = cfg.load({}, None, {})
    assert c.listen == "127.0.0.1:7101"
    assert c.advertise == "127.0.0.1:7101"
    assert c.node_id == "127.0.0.1:7101"  # the advertised address
    assert c.data_dir == Path("./kvcluster-data")
    assert c.seeds == ()
    assert c.metrics_listen == "127.0.0.1:8101"  # listen port + 1000
    assert c.log_level == "info"
    assert c.commit_window == 0.002
    assert c.settings == NodeSettings()


def test_every_field_has_a_flag_an_env_var_and_help() -> None:
    names = [f.name for f in cfg.FIELDS]
    assert len(names) == len(set(names))
    settings_fields = set(NodeSettings.__dataclass_fields__)
    assert settings_fields <= set(names)
    for f in cfg.FIELDS:
        assert f.help
        assert cfg.env_name(f.name) == "KVCLUSTER_" + f.name.upper()
        assert cfg.flag_name(f.name) == "--" + f.name.replace("_", "-")


def test_derived_values() -> None:
    c = load({"listen": "0.0.0.0:7200", "advertise": "10.0.0.5:7200"})
    assert c.node_id == "10.0.0.5:7200"
    assert c.metrics_listen == "0.0.0.0:8200"
    assert load({"metrics_listen": "off"}).metrics_listen is None
    assert load({"metrics_listen": "127.0.0.1:9999"}).metrics_listen == "127.0.0.1:9999"
    assert load({"log_level": "DEBUG"}).log_level == "debug"
    seeded = load(
        {"node_id": "n2", "listen": "127.0.0.1:7102"},
        env={"KVCLUSTER_SEEDS": "n2=127.0.0.1:7102, n1=127.0.0.1:7101 ,"},
    )
    assert seeded.seeds == (
        cfg.Seed("n1", "127.0.0.1:7101"),
        cfg.Seed("n2", "127.0.0.1:7102"),
    )  # sorted by id; blanks ignored


# -- precedence -----------------------------------------------------------------------------


def test_precedence_defaults_toml_env_flags(tmp_path: Path) -> None:
    toml = "request_timeout = 1.5\nn_val = 5\nr = 3\nlog_level = 'warning'\n"
    env = {"KVCLUSTER_REQUEST_TIMEOUT": "2.5", "KVCLUSTER_R": "4"}
    flags = {"request_timeout": "3.5"}

    assert cfg.load({}, None, {}).settings.request_timeout == 5.0
    only_toml = load(toml=toml, tmp_path=tmp_path)
    assert only_toml.settings.request_timeout == 1.5
    assert (only_toml.settings.n_val, only_toml.settings.r) == (5, 3)
    toml_env = load(toml=toml, env=env, tmp_path=tmp_path)
    assert toml_env.settings.request_timeout == 2.5
    assert toml_env.settings.r == 4
    everything = load(flags, toml=toml, env=env, tmp_path=tmp_path)
    assert everything.settings.request_timeout == 3.5  # flag beats env beats file
    assert everything.settings.r == 4  # env beats file
    assert everything.settings.n_val == 5  # the file beats the default
    assert everything.log_level == "warning"
    assert everything.settings.w == 2  # untouched: the default


def test_flags_given_as_none_are_absent() -> None:
    c = load({"n_val": None, "r": None}, env={"KVCLUSTER_N_VAL": "4"})
    assert c.settings.n_val == 4
    assert c.settings.r == 2


def test_config_file_from_env(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text("partitions = 128\n")
    c = cfg.load({}, None, {"KVCLUSTER_CONFIG": str(path)})
    assert c.settings.partitions == 128
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("partitions = 32\n")
    assert cfg.load({}, explicit, {"KVCLUSTER_CONFIG": str(path)}).settings.partitions == 32


def test_typed_flag_values_are_taken_as_is() -> None:
    c = cfg.load(
        {"n_val": 5, "unsafe_lww": True, "seeds": ["a=127.0.0.1:7101"], "node_id": "a"}, None, {}
    )
    assert c.settings.n_val == 5
    assert c.settings.unsafe_lww is True
    assert c.seeds == (cfg.Seed("a", "127.0.0.1:7101"),)
    assert c.node_id == "a"


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("off", False)],
)
def test_bool_env_values(text: str, value: bool) -> None:
    assert cfg.load({}, None, {"KVCLUSTER_UNSAFE_LWW": text}).settings.unsafe_lww is value


def test_toml_integers_may_be_written_as_whole_floats(tmp_path: Path) -> None:
    assert load(toml="n_val = 3.0\n", tmp_path=tmp_path).settings.n_val == 3
    assert load(toml="request_timeout = 2\n", tmp_path=tmp_path).settings.request_timeout == 2.0


# -- validation: every error names its field and source ----------------------------------------

BAD: list[tuple[str, dict[str, Any], dict[str, str], str, str]] = [
    # (id, flags, env, field, source)
    ("listen no port", {"listen": "localhost"}, {}, "listen", "--listen"),
    ("listen port 0", {"listen": "127.0.0.1:0"}, {}, "listen", "--listen"),
    ("listen port too big", {"listen": "127.0.0.1:65536"}, {}, "listen", "--listen"),
    ("listen port text", {"listen": "127.0.0.1:http"}, {}, "listen", "--listen"),
    ("listen no host", {"listen": ":7101"}, {}, "listen", "--listen"),
    ("listen env", {}, {"KVCLUSTER_LISTEN": "x"}, "listen", "KVCLUSTER_LISTEN"),
    ("advertise bad", {"advertise": "nope"}, {}, "advertise", "--advertise"),
    ("advertise wildcard", {"advertise": "0.0.0.0:7101"}, {}, "advertise", "--advertise"),
    ("listen wildcard no advertise", {"listen": "0.0.0.0:7101"}, {}, "advertise", ""),
    ("node_id with =", {"node_id": "a=b"}, {}, "node_id", "--node-id"),
    ("node_id with ,", {"node_id": "a,b"}, {}, "node_id", "--node-id"),
    ("node_id too long", {"node_id": "n" * 129}, {}, "node_id", "--node-id"),
    ("seed without =", {"seeds": "n1"}, {}, "seeds", "--seeds"),
    ("seed without id", {"seeds": "=127.0.0.1:1"}, {}, "seeds", "--seeds"),
    ("seed bad address", {"seeds": "n1=nohost"}, {}, "seeds", "--seeds"),
    (
        "seed twice",
        {"node_id": "n1", "seeds": "n1=127.0.0.1:7101,n1=127.0.0.1:7102"},
        {},
        "seeds",
        "--seeds",
    ),
    ("not among seeds", {"node_id": "n9", "seeds": "n1=127.0.0.1:7101"}, {}, "seeds", "--seeds"),
    (
        "seed address differs",
        {"node_id": "n1", "seeds": "n1=127.0.0.1:7999"},
        {},
        "seeds",
        "--seeds",
    ),
    ("metrics bad", {"metrics_listen": "nohost"}, {}, "metrics_listen", "--metrics-listen"),
    ("metrics port overflow", {"listen": "127.0.0.1:65000"}, {}, "metrics_listen", ""),
    ("log level", {"log_level": "loud"}, {}, "log_level", "--log-level"),
    ("map size", {"map_size_mb": "0"}, {}, "map_size_mb", "--map-size-mb"),
    (
        "pending writes",
        {"max_pending_writes": "0"},
        {},
        "max_pending_writes",
        "--max-pending-writes",
    ),
    ("commit window negative", {"commit_window": "-0.1"}, {}, "commit_window", "--commit-window"),
    (
        "commit window too long",
        {},
        {"KVCLUSTER_COMMIT_WINDOW": "2"},
        "commit_window",
        "KVCLUSTER_COMMIT_WINDOW",
    ),
    ("partitions not power of 2", {"partitions": "48"}, {}, "partitions", "--partitions"),
    ("partitions zero", {"partitions": "0"}, {}, "partitions", "--partitions"),
    ("n_val zero", {"n_val": "0"}, {}, "n_val", "--n-val"),
    ("n_val too big", {"n_val": "17"}, {}, "n_val", "--n-val"),
    ("r over n_val", {"r": "4"}, {}, "r", "--r"),
    ("w over n_val", {"w": "4"}, {}, "w", "--w"),
    ("w zero env", {}, {"KVCLUSTER_W": "0"}, "w", "KVCLUSTER_W"),
    ("w not a number env", {}, {"KVCLUSTER_W": "abc"}, "w", "KVCLUSTER_W"),
    ("w fraction", {"w": "1.5"}, {}, "w", "--w"),
    ("max value", {"max_value_bytes": "0"}, {}, "max_value_bytes", "--max-value-bytes"),
    ("timeout zero", {"request_timeout": "0"}, {}, "request_timeout", "--request-timeout"),
    ("timeout text", {"request_timeout": "fast"}, {}, "request_timeout", "--request-timeout"),
    ("heartbeat", {"heartbeat_interval": "-1"}, {}, "heartbeat_interval", "--heartbeat-interval"),
    ("rpc timeout", {}, {"KVCLUSTER_RPC_TIMEOUT": "0"}, "rpc_timeout", "KVCLUSTER_RPC_TIMEOUT"),
    ("handoff", {"handoff_interval": "0"}, {}, "handoff_interval", "--handoff-interval"),
    ("phi order", {"phi_suspect": "9"}, {}, "phi_suspect", "--phi-suspect"),
    (
        "tombstone grace",
        {"tombstone_grace": "60", "hint_max_age": "120"},
        {},
        "tombstone_grace",
        "--tombstone-grace",
    ),
    ("bool", {}, {"KVCLUSTER_UNSAFE_LWW": "maybe"}, "unsafe_lww", "KVCLUSTER_UNSAFE_LWW"),
]


@pytest.mark.parametrize(
    ("flags", "env", "field", "source"),
    [pytest.param(f, e, fi, s, id=name) for name, f, e, fi, s in BAD],
)
def test_bad_value_names_field_and_source(
    flags: dict[str, Any],
    env: dict[str, str],
    field: str,
    source: str,
    config_error: Callable[..., cfg.ConfigError],
) -> None:
    config_error(flags, env, field, source)


BAD_TOML: list[tuple[str, str, str]] = [
    ("unknown key", "n_val = 3\nbogus = 1\n", "bogus"),
    ("wrong type int", 'n_val = "three"\n', "n_val"),
    ("bool for int", "n_val = true\n", "n_val"),
    ("fraction for int", "n_val = 2.5\n", "n_val"),
    ("int for str", "listen = 7101\n", "listen"),
    ("list of ints", "seeds = [1, 2]\n", "seeds"),
    ("str for bool", 'unsafe_lww = "maybe"\n', "unsafe_lww"),
    ("w over n_val", "n_val = 1\nr = 1\nw = 2\n", "w"),
]


@pytest.mark.parametrize(
    ("toml", "field"), [pytest.param(t, f, id=name) for name, t, f in BAD_TOML]
)
def test_bad_toml_value_names_field_and_file(tmp_path: Path, toml: str, field: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        load(toml=toml, tmp_path=tmp_path)
    assert info.value.field == field
    assert info.value.source == str(tmp_path / "node.toml")
    assert str(info.value).startswith(f"config error: {field} (from {tmp_path / 'node.toml'})")


def test_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load({}, tmp_path / "missing.toml", {})
    assert info.value.field == "config"
    assert "does not exist" in str(info.value)

    broken = tmp_path / "broken.toml"
    broken.write_text("n_val = = 3\n")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load({}, broken, {})
    assert info.value.field == "config"
    assert str(broken) in str(info.value)
    assert "not valid TOML" in str(info.value)

    with pytest.raises(cfg.ConfigError) as info:
        cfg.load({}, tmp_path, {})  # a directory
    assert info.value.field == "config"


def test_a_later_source_can_fix_an_earlier_bad_value() -> None:
    """Values are checked after merging: a flag overriding a bad env value is fine."""
    c = load({"w": "1"}, env={"KVCLUSTER_W": "abc"})
    assert c.settings.w == 1


# -- the kvcluster-node command --------------------------------------------------------------


def test_node_command_precedence(tmp_path: Path, served: list[cfg.Config]) -> None:
    path = tmp_path / "node.toml"
    path.write_text("n_val = 5\nr = 3\nw = 3\n")
    result = CliRunner().invoke(
        node_main.cli,
        ["--config", str(path), "--w", "4", "--data-dir", str(tmp_path / "d")],
        env={"KVCLUSTER_R": "2", "KVCLUSTER_W": "1"},
    )
    assert result.exit_code == 0, result.output
    (config,) = served
    assert (config.settings.n_val, config.settings.r, config.settings.w) == (5, 2, 4)
    assert config.data_dir == tmp_path / "d"


def test_node_command_bool_flags(served: list[cfg.Config]) -> None:
    result = CliRunner().invoke(
        node_main.cli, ["--no-unsafe-lww"], env={"KVCLUSTER_UNSAFE_LWW": "true"}
    )
    assert result.exit_code == 0, result.output
    assert served[0].settings.unsafe_lww is False


@pytest.mark.parametrize(
    ("args", "env", "line"),
    [
        (["--w", "4"], {}, "kvcluster-node: config error: w (from --w): 4 is outside 1..n_val (3)"),
        (
            [],
            {"KVCLUSTER_W": "abc"},
            "kvcluster-node: config error: w (from KVCLUSTER_W): 'abc' is not an integer",
        ),
        (
            ["--listen", "nowhere"],
            {},
            "kvcluster-node: config error: listen (from --listen): 'nowhere' is not host:port",
        ),
    ],
)
def test_node_command_bad_config_one_line_exit_2(
    served: list[cfg.Config], args: list[str], env: dict[str, str], line: str
) -> None:
    result = CliRunner().invoke(node_main.cli, args, env=env)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [line]
    assert result.stdout == ""
    assert served == []  # never started


def test_node_command_help_lists_every_setting() -> None:
    result = CliRunner().invoke(node_main.cli, ["--help"])
    assert result.exit_code == 0
    for f in cfg.FIELDS:
        assert cfg.flag_name(f.name) in result.output
        assert cfg.env_name(f.name) in result.output

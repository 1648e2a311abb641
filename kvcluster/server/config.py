"""Node configuration: defaults < TOML file < ``KVCLUSTER_*`` variables < flags.

One table (:data:`FIELDS`) describes every setting once; the command-line
flags, the TOML keys and the environment variables are all derived from it,
so they cannot drift apart. Every value is checked at start: a bad one stops
the node with a :class:`ConfigError` that names the field and the source it
came from, e.g. ``config error: w = 4 (from KVCLUSTER_W): outside 1..n_val (3)``.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kvcluster.net.transport import split_address
from kvcluster.node.settings import NodeSettings
from kvcluster.storage import lmdb_store

ENV_PREFIX = "KVCLUSTER_"


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field."""

    def __init__(self, field: str, message: str, source: str = "") -> None:
        where = f" (from {source})" if source else ""
        super().__init__(f"config error: {field}{where}: {message}")
        self.field = field
        self.source = source


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: type  # int, float, bool, str, list
    default: Any
    help: str


def _settings_default(name: str) -> Any:
    return next(f.default for f in fields(NodeSettings) if f.name == name)


_NODE_FIELDS = [
    Field(
        "node_id", str, "", "Unique, stable name of this node (default: the advertised address)."
    ),
    Field("listen", str, "127.0.0.1:7101", "host:port the gRPC server binds."),
    Field("advertise", str, "", "host:port other nodes and clients use (default: listen)."),
    Field("data_dir", str, "./kvcluster-data", "Directory of this node's LMDB store."),
    Field(
        "seeds",
        list,
        [],
        "Initial cluster as id=host:port entries, this node included (like etcd's "
        "--initial-cluster). A majority of them must agree on the first ring. "
        "Empty: a single-node cluster of this node alone.",
    ),
    Field(
        "metrics_listen",
        str,
        "",
        "host:port of the Prometheus endpoint ('' = listen port + 1000, 'off' = none).",
    ),
    Field(
        "peer_port_offset",
        int,
        2000,
        "Node-to-node messages travel over plain TCP on the listen port + this offset "
        "(like Cassandra's storage port); must be the same on every node. "
        "0 = carry them over the gRPC port instead (simpler firewalling, slower).",
    ),
    Field("log_level", str, "info", "debug, info, warning or error."),
    Field("map_size_mb", int, 16384, "Largest size the LMDB store may grow to, in MiB."),
    Field(
        "max_pending_writes",
        int,
        lmdb_store.DEFAULT_MAX_PENDING,
        "Writes queued for the disk before new ones are rejected.",
    ),
    Field(
        "commit_window",
        float,
        lmdb_store.DEFAULT_COMMIT_WINDOW,
        "Group commit: when writes are concurrent, seconds a busy disk writer waits so "
        "that more of them share one synced commit; a lone client's writes never wait. "
        "0 = never wait.",
    ),
]

_SETTINGS_HELP = {
    "partitions": "Number of partitions Q (a power of two), fixed when the cluster is created.",
    "n_val": "Replicas per key (N).",
    "r": "Default read quorum (R).",
    "w": "Default write quorum (W).",
    "request_timeout": "Seconds a request may take before it fails with a timeout.",
    "speculative_read": "Seconds a read waits for a replica before also asking another one.",
    "max_value_bytes": "Largest value accepted, in bytes.",
    "max_batch_items": "Most items in one PutMany / GetMany call.",
    "replication_batch": "Most records in one replication message to a peer.",
    "replication_queue": "Records queued per peer before writes are rejected as overloaded.",
    "heartbeat_interval": "Seconds between heartbeats to each member.",
    "rpc_timeout": "Seconds to wait for a node-to-node reply (heartbeats, metadata).",
    "phi_suspect": "Phi-accrual level at which a member is suspect.",
    "phi_down": "Phi-accrual level at which a member is down (fallbacks take its writes).",
    "hint_max_per_target": "Most hints kept for one down node; further ones are dropped.",
    "hint_max_age": "Seconds after which an undelivered hint is dropped.",
    "handoff_interval": "Seconds between hinted-handoff delivery rounds.",
    "handoff_batch": "Records per handoff message.",
    "aae_interval": "Seconds between background anti-entropy rounds (0 = off).",
    "aae_concurrency": "Partitions exchanged at once by background anti-entropy.",
    "aae_pause": "Seconds background anti-entropy pauses after each batch of keys (throttle).",
    "tombstone_grace": "Seconds a tombstone is kept after every primary holds it.",
    "unsafe_ack_before_w": "UNSAFE, for checker tests: acknowledge writes after one copy.",
    "unsafe_lww": "UNSAFE, for checker tests: resolve siblings last-write-wins.",
}

FIELDS: list[Field] = _NODE_FIELDS + [
    Field(
        f.name, type(_settings_default(f.name)), _settings_default(f.name), _SETTINGS_HELP[f.name]
    )
    for f in fields(NodeSettings)
]
_BY_NAME = {f.name: f for f in FIELDS}


@dataclass(frozen=True, slots=True)
class Seed:
    node_id: str
    address: str


@dataclass(frozen=True, slots=True)
class Config:
    node_id: str
    listen: str
    advertise: str
    data_dir: Path
    seeds: tuple[Seed, ...]
    metrics_listen: str | None
    peer_port_offset: int
    log_level: str
    map_size_mb: int
    max_pending_writes: int
    commit_window: float
    settings: NodeSettings


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def load(
    flags: Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge the sources and validate; raise :class:`ConfigError` on any problem.

    ``flags`` holds only the options given on the command line (None = absent).
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, tuple[Any, str]] = {f.name: (f.default, "default") for f in FIELDS}
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = environ[ENV_PREFIX + "CONFIG"]
    if config_file is not None:
        for name, value in _read_toml(Path(config_file)).items():
            raw[name] = (value, f"{config_file}")
    for f in FIELDS:
        text = environ.get(env_name(f.name))
        if text is not None:
            raw[f.name] = (_parse_text(f, text, env_name(f.name)), env_name(f.name))
    for name, value in (flags or {}).items():
        if value is None or name not in _BY_NAME:
            continue
        f = _BY_NAME[name]
        parsed = _parse_text(f, value, flag_name(name)) if isinstance(value, str) else value
        raw[name] = (parsed, flag_name(name))
    values = {name: _coerce(_BY_NAME[name], value, source) for name, (value, source) in raw.items()}
    return _build(values, {name: source for name, (_, source) in raw.items()})


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("config", f"file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    unknown = sorted(set(data) - set(_BY_NAME))
    if unknown:
        raise ConfigError(unknown[0], f"unknown setting in {path}", str(path))
    return data


def _parse_text(f: Field, text: str, source: str) -> Any:
    if f.kind is list:
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(f: Field, value: Any, source: str) -> Any:
    src = "" if source == "default" else source
    try:
        if f.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if f.kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if f.kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if f.kind is list:
            if isinstance(value, str):
                return _parse_text(f, value, source)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return list(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(
            f.kind, "a list of strings" if f.kind is list else "a string"
        )
        raise ConfigError(f.name, f"{value!r} is not {expected}", src) from None


def parse_address(text: str, field: str, source: str = "") -> tuple[str, int]:
    with contextlib.suppress(ValueError):
        host, port = split_address(text)
        if port:
            return host, port
    raise ConfigError(field, f"{text!r} is not host:port", source)


def _build(v: dict[str, Any], sources: dict[str, str]) -> Config:
    def fail(name: str, message: str) -> ConfigError:
        src = sources.get(name, "")
        return ConfigError(name, message, "" if src == "default" else src)

    host, port = parse_address(v["listen"], "listen", sources["listen"])
    advertise = v["advertise"] or v["listen"]
    adv_host, adv_port = parse_address(advertise, "advertise", sources["advertise"])
    if adv_host in ("0.0.0.0", "::", "[::]"):
        raise fail("advertise", "must name an address others can reach (listen is a wildcard)")
    node_id = v["node_id"] or advertise
    if any(c in node_id for c in "\x00=,") or len(node_id) > 128:
        raise fail("node_id", f"{node_id!r} may not contain NUL, '=' or ',' (max 128 chars)")
    seeds = _parse_seeds(v["seeds"], fail)
    if seeds and node_id not in {s.node_id for s in seeds}:
        raise fail("seeds", f"this node ({node_id}) must be one of the seeds")
    for s in seeds:
        if s.node_id == node_id and s.address != advertise:
            raise fail(
                "seeds", f"entry for {node_id} says {s.address}, but it advertises {advertise}"
            )
    metrics: str | None
    if v["metrics_listen"] == "off":
        metrics = None
    elif v["metrics_listen"]:
        parse_address(v["metrics_listen"], "metrics_listen", sources["metrics_listen"])
        metrics = v["metrics_listen"]
    else:
        if port + 1000 > 65535:
            raise fail("metrics_listen", "listen port + 1000 is not a port; set it explicitly")
        metrics = f"{host}:{port + 1000}"
    offset = v["peer_port_offset"]
    if offset:
        if offset < 0 or not (0 < port + offset < 65536 and 0 < adv_port + offset < 65536):
            raise fail("peer_port_offset", f"listen port + {offset} is not a port")
        if metrics is not None and metrics == f"{host}:{port + offset}":
            raise fail("peer_port_offset", f"listen port + {offset} is the metrics port")
    if v["log_level"].lower() not in ("debug", "info", "warning", "error"):
        raise fail("log_level", f"{v['log_level']!r} is not debug, info, warning or error")
    if v["map_size_mb"] < 1:
        raise fail("map_size_mb", "must be at least 1")
    if v["max_pending_writes"] < 1:
        raise fail("max_pending_writes", "must be at least 1")
    try:
        lmdb_store.check_commit_window(v["commit_window"])
    except ValueError as exc:
        raise fail("commit_window", str(exc).partition(": ")[2]) from None
    settings = NodeSettings(**{f.name: v[f.name] for f in fields(NodeSettings)})
    try:
        settings.validate()
    except ValueError as exc:
        name, _, message = str(exc).partition(": ")
        raise fail(name, message) from None
    return Config(
        node_id=node_id,
        listen=v["listen"],
        advertise=advertise,
        data_dir=Path(v["data_dir"]),
        seeds=seeds,
        metrics_listen=metrics,
        peer_port_offset=offset,
        log_level=v["log_level"].lower(),
        map_size_mb=v["map_size_mb"],
        max_pending_writes=v["max_pending_writes"],
        commit_window=v["commit_window"],
        settings=settings,
    )


def _parse_seeds(items: list[str], fail: Callable[[str, str], ConfigError]) -> tuple[Seed, ...]:
    seeds: list[Seed] = []
    for item in items:
        node_id, sep, address = item.partition("=")
        if not sep or not node_id:
            raise fail("seeds", f"{item!r} is not id=host:port")
        try:
            parse_address(address, "seeds")
        except ConfigError:
            raise fail("seeds", f"{item!r}: {address!r} is not host:port") from None
        seeds.append(Seed(node_id, address))
    ids = [s.node_id for s in seeds]
    if len(set(ids)) != len(ids):
        raise fail("seeds", "a node id appears twice")
    return tuple(sorted(seeds, key=lambda s: s.node_id))

"""Bad input is rejected with a clear error and changes nothing (issue A, "Done when" 2 and 4).

- kvctl: exactly one line on stderr, a non-zero exit (2 for bad input, 1 for an
  unreachable node), and with ``--json`` an error object on stdout;
- Client and AsyncClient: the right :mod:`kvcluster.errors` class with its data
  (``InvalidArgument.field``, ``Unreachable.addresses``), never a gRPC error;
- the node itself rejects what a client would have caught (raw gRPC requests);
- nothing is stored: the key is absent afterwards and the number of keys the
  nodes hold (``kvctl cluster status --json`` "keys") is unchanged;
- ``kvcluster-node`` with a bad configuration exits 2 with one line naming the
  field, before it creates anything.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvcluster import AsyncClient, Client, errors
from kvcluster.wire.v1 import kv_pb2, kv_pb2_grpc
from tests.integration.conftest import Cluster, StartCluster, run_kvctl
from tests.support import clean_env

pytestmark = pytest.mark.integration

PORT = 7410  # this module uses 7410-7419
SINGLE_PORT = PORT  # 1 node
TRIO_PORT = PORT + 1  # 3 nodes: 7411-7413
NODE_PORT = PORT + 7  # kvcluster-node runs that must fail before binding
BUSY_PORT = PORT + 8  # a port this test holds open
DEAD = f"127.0.0.1:{PORT + 9}"  # nothing ever listens here
MAX_VALUE = 1000
KEY = "bad/key"
HANG_GUARD = 60.0  # seconds; never a performance assertion


class _NonEmptyText:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)

    def __hash__(self) -> int:
        return 0


ANY: Any = _NonEmptyText()


@pytest.fixture(scope="module", params=[1, 3], ids=["1node", "3nodes"])
def cluster(request: pytest.FixtureRequest, start_module_cluster: StartCluster) -> Cluster:
    size: int = request.param
    return start_module_cluster(
        size,
        SINGLE_PORT if size == 1 else TRIO_PORT,
        settings={"max_value_bytes": MAX_VALUE},
    )


def total_keys(cluster: Cluster) -> int:
    """Keys stored over all nodes: the "keys" of each node's status (what
    ``kvctl cluster status --json`` prints; asked in-process to keep this fast)."""
    with cluster.client() as kv:
        return sum(int(kv.status(cluster.address(i))["keys"]) for i in cluster.ids)


def test_key_count_from_kvctl_matches_the_client(cluster: Cluster) -> None:
    via_kvctl = 0
    for node_id in cluster.ids:
        st = cluster.kvctl("cluster", "status", "--node", cluster.address(node_id)).ok().json()
        assert st["node_id"] == node_id
        via_kvctl += int(st["keys"])
    assert via_kvctl == total_keys(cluster)


@pytest.fixture
def unchanged(cluster: Cluster) -> Iterator[None]:
    """Assert that the test stored nothing: KEY absent, key count as before."""
    before = total_keys(cluster)
    yield
    with cluster.client() as kv:
        assert not kv.get(KEY, r="all").found
    assert total_keys(cluster) == before


# -- kvctl -------------------------------------------------------------------------------

LONG_KEY = "k" * 1025
WIDE_KEY = "é" * 513  # 513 characters, 1026 bytes: the limit counts bytes

KVCTL_BAD_INPUT: list[tuple[str, list[str], str]] = [
    ("empty key", ["put", "", "v"], "key"),
    ("empty key get", ["get", ""], "key"),
    ("empty key delete", ["delete", ""], "key"),
    ("key over 1 KiB", ["put", LONG_KEY, "v"], "key"),
    ("key over 1 KiB blind", ["put", "--blind", LONG_KEY, "v"], "key"),
    ("key over 1 KiB get", ["get", LONG_KEY], "key"),
    ("utf-8 key over 1 KiB", ["put", WIDE_KEY, "v"], "key"),
    ("value over the limit", ["put", KEY, "x" * (MAX_VALUE + 1)], "value"),
    ("value over the limit blind", ["put", "--blind", KEY, "x" * (MAX_VALUE + 1)], "value"),
    ("context not base64", ["put", "--context", "!!not base64!!", KEY, "v"], "context"),
    (
        "context not a context",
        ["put", "--context", base64.b64encode(b"garbage").decode(), KEY, "v"],
        "context",
    ),
    (
        "context truncated",
        ["put", "--context", base64.b64encode(b"\x01\x92").decode(), KEY, "v"],
        "context",
    ),
    ("delete context not base64", ["delete", "--context", "%%%", KEY], "context"),
    ("blind and context", ["put", "--blind", "--context", "AQ==", KEY, "v"], "context"),
    ("no value", ["put", KEY], "value"),
    ("quorum word", ["put", "--w", "lots", KEY, "v"], "w"),
    ("quorum zero", ["get", "--r", "0", KEY], "r"),
    ("quorum over n", ["put", "--blind", "--w", "9", KEY, "v"], "w"),
    ("read quorum over n", ["get", "--r", "9", KEY], "r"),
]


@pytest.mark.parametrize(
    ("args", "field"),
    [pytest.param(args, field, id=name) for name, args, field in KVCTL_BAD_INPUT],
)
@pytest.mark.usefixtures("unchanged")
def test_kvctl_rejects_bad_input(cluster: Cluster, args: list[str], field: str) -> None:
    result = cluster.kvctl(*args)
    line = result.one_line_error()
    assert result.code == 2, result
    assert result.json() == {"error": {"kind": "invalid_argument", "field": field, "message": ANY}}
    assert line == f"kvctl: {result.json()['error']['message']}"

    text = cluster.kvctl(*args, as_json=False)
    assert text.one_line_error() == line
    assert text.code == 2
    assert text.stdout == ""


@pytest.mark.usefixtures("unchanged")
def test_kvctl_unknown_flag(cluster: Cluster) -> None:
    for args, option in (
        (["put", "--bogus", KEY, "v"], "--bogus"),
        (["--bogus", "get", KEY], "--bogus"),
        (["get", KEY, "--r"], "'--r'"),  # given without its value
    ):
        result = cluster.kvctl(*args)
        line = result.one_line_error()
        assert result.code == 2
        assert option in line, (args, line)
        assert result.stdout == ""


def test_kvctl_limits_are_inclusive(cluster: Cluster) -> None:
    """A key of exactly 1 KiB and a value of exactly max_value_bytes are accepted."""
    key = "k" * 1024
    before = total_keys(cluster)
    cluster.kvctl("put", key, "x" * MAX_VALUE).ok()
    with cluster.client() as kv:
        assert kv.get(key, r="all").values == [b"x" * MAX_VALUE]
    assert total_keys(cluster) == before + len(cluster.ids)  # every node holds it


def test_kvctl_unreachable_node() -> None:
    for args in (["get", KEY], ["put", KEY, "v"], ["delete", KEY], ["cluster", "status"]):
        result = run_kvctl("--nodes", DEAD, "--json", "--timeout", "2", *args)
        line = result.one_line_error()
        assert result.code == 1, result
        err = result.json()["error"]
        assert err["kind"] == "unreachable"
        assert err["addresses"] == [DEAD]
        assert DEAD in line


def test_kvctl_malformed_node_address() -> None:
    for nodes in ("nonsense", "127.0.0.1:0", "127.0.0.1:99999", "host:port", ","):
        result = run_kvctl("--nodes", nodes, "--json", "get", KEY)
        result.one_line_error()
        assert result.code == 2
        assert result.json()["error"]["field"] == "nodes"
    env_result = run_kvctl("get", KEY, env={"KVCLUSTER_NODES": "not-an-address"})
    assert "not-an-address" in env_result.one_line_error()
    assert env_result.code == 2


# -- Client and AsyncClient ---------------------------------------------------------------

SyncCall = Callable[[Client], Any]

CLIENT_BAD_INPUT: list[tuple[str, SyncCall, str]] = [
    ("empty key", lambda kv: kv.put(b"", b"v"), "key"),
    ("empty str key get", lambda kv: kv.get(""), "key"),
    ("empty key delete", lambda kv: kv.delete(b""), "key"),
    ("key over 1 KiB", lambda kv: kv.put(b"k" * 1025, b"v"), "key"),
    ("utf-8 key over 1 KiB", lambda kv: kv.get(WIDE_KEY), "key"),
    ("key not bytes", lambda kv: kv.put(42, b"v"), "key"),  # type: ignore[arg-type]
    ("value not bytes", lambda kv: kv.put(KEY, 4.2), "value"),  # type: ignore[arg-type]
    ("value over the limit", lambda kv: kv.put(KEY, b"x" * (MAX_VALUE + 1)), "value"),
    ("value far over the limit", lambda kv: kv.put(KEY, b"x" * (2 << 20)), "value"),
    ("context garbage", lambda kv: kv.put(KEY, b"v", context=b"garbage"), "context"),
    ("context truncated", lambda kv: kv.put(KEY, b"v", context=b"\x01\x92"), "context"),
    ("delete context garbage", lambda kv: kv.delete(KEY, context=b"garbage"), "context"),
    ("w zero", lambda kv: kv.put(KEY, b"v", w=0), "w"),
    ("w word", lambda kv: kv.put(KEY, b"v", w="lots"), "w"),
    ("w over n", lambda kv: kv.put(KEY, b"v", w=4), "w"),
    ("w bool", lambda kv: kv.put(KEY, b"v", w=True), "w"),
    ("r over n", lambda kv: kv.get(KEY, r=9), "r"),
    ("delete r over n", lambda kv: kv.delete(KEY, r=9), "r"),
    ("batch item shape", lambda kv: kv.put_many([(KEY,)]), "items"),  # type: ignore[list-item]
]


@pytest.mark.parametrize(
    ("call", "field"),
    [pytest.param(call, field, id=name) for name, call, field in CLIENT_BAD_INPUT],
)
@pytest.mark.usefixtures("unchanged")
def test_client_rejects_bad_input(cluster: Cluster, call: SyncCall, field: str) -> None:
    with cluster.client() as kv, pytest.raises(errors.InvalidArgument) as info:
        call(kv)
    assert info.value.field == field
    assert info.value.message


AsyncCall = Callable[[AsyncClient], Awaitable[Any]]

ASYNC_BAD_INPUT: list[tuple[str, AsyncCall, str]] = [
    ("empty key", lambda kv: kv.put(b"", b"v"), "key"),
    ("key over 1 KiB", lambda kv: kv.get(b"k" * 1025), "key"),
    ("value over the limit", lambda kv: kv.put(KEY, b"x" * (MAX_VALUE + 1)), "value"),
    ("context garbage", lambda kv: kv.put(KEY, b"v", context=b"garbage"), "context"),
    ("delete context garbage", lambda kv: kv.delete(KEY, context=b"garbage"), "context"),
    ("w over n", lambda kv: kv.put(KEY, b"v", w=4), "w"),
    ("r word", lambda kv: kv.get(KEY, r="most"), "r"),
]


@pytest.mark.parametrize(
    ("call", "field"),
    [pytest.param(call, field, id=name) for name, call, field in ASYNC_BAD_INPUT],
)
@pytest.mark.usefixtures("unchanged")
def test_async_client_rejects_bad_input(cluster: Cluster, call: AsyncCall, field: str) -> None:
    async def scenario() -> errors.InvalidArgument:
        async with AsyncClient(cluster.addresses) as kv:
            with pytest.raises(errors.InvalidArgument) as info:
                await call(kv)
            return info.value

    err = asyncio.run(scenario())
    assert err.field == field
    assert err.message


def test_batch_reports_bad_items_and_stores_only_good_ones(cluster: Cluster) -> None:
    before = total_keys(cluster)
    with cluster.client() as kv:
        results = kv.put_many([("bad/batch-ok", b"fine"), (KEY, b"x" * (MAX_VALUE + 1))])
        assert not isinstance(results[0], errors.KVError)
        assert isinstance(results[1], errors.InvalidArgument)
        assert results[1].field == "value"
        assert kv.get("bad/batch-ok", r="all").values == [b"fine"]
        assert not kv.get(KEY, r="all").found
    assert total_keys(cluster) == before + len(cluster.ids)  # the good key, on every node


@pytest.mark.usefixtures("unchanged")
def test_node_itself_rejects_what_the_client_would_catch(cluster: Cluster) -> None:
    """A request that bypasses the client's checks gets INVALID_ARGUMENT and the error detail."""
    requests = [
        ("Put", kv_pb2.PutRequest(key=b"", value=b"v"), "key"),
        ("Put", kv_pb2.PutRequest(key=b"k" * 1025, value=b"v"), "key"),
        ("Get", kv_pb2.GetRequest(key=b""), "key"),
        ("Delete", kv_pb2.DeleteRequest(key=b"k" * 2000), "key"),
        ("Put", kv_pb2.PutRequest(key=KEY.encode(), value=b"v", w=kv_pb2.Quorum(count=0)), "w"),
    ]
    with grpc.insecure_channel(cluster.address("n1")) as channel:
        stub = kv_pb2_grpc.KVStub(channel)
        for method, request, field in requests:
            with pytest.raises(grpc.RpcError) as info:
                getattr(stub, method)(request, timeout=10)
            err = info.value
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, request)
            trailing = {m.key: m.value for m in err.trailing_metadata() or ()}
            detail = trailing["kvcluster-error-bin"]
            assert json.loads(detail)["field"] == field
            assert json.loads(detail)["kind"] == "invalid_argument"


def test_clients_raise_unreachable() -> None:
    with Client([DEAD], timeout=2) as kv:
        for call in (lambda: kv.get(KEY), lambda: kv.put(KEY, b"v"), kv.status):
            with pytest.raises(errors.Unreachable) as info:
                call()
            assert info.value.addresses == [DEAD]

    async def scenario() -> None:
        async with AsyncClient([DEAD], timeout=2) as kv:
            with pytest.raises(errors.Unreachable) as ainfo:
                await kv.put(KEY, b"v")
            assert ainfo.value.addresses == [DEAD]
            with pytest.raises(errors.Unreachable) as ainfo:
                await kv.get(KEY)
            assert ainfo.value.addresses == [DEAD]

    asyncio.run(scenario())


def test_clients_reject_bad_construction() -> None:
    for nodes in ("nonsense", "", "127.0.0.1:0", ["127.0.0.1:7410", "x"]):
        with pytest.raises(errors.InvalidArgument) as info:
            Client(nodes)
        assert info.value.field == "nodes"
        with pytest.raises(errors.InvalidArgument) as info:
            AsyncClient(nodes)
        assert info.value.field == "nodes"
    with pytest.raises(errors.InvalidArgument) as info:
        Client(DEAD, timeout=0)
    assert info.value.field == "timeout"


# -- kvcluster-node with a bad configuration -------------------------------------------------


def run_node(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Start kvcluster-node; it must exit by itself (a hang guard kills it otherwise)."""
    base = [
        "--listen",
        f"127.0.0.1:{NODE_PORT}",
        "--data-dir",
        str(tmp_path / "data"),
        "--metrics-listen",
        "off",
    ]
    return subprocess.run(
        [sys.executable, "-m", "kvcluster.server.main", *base, *args],
        capture_output=True,
        text=True,
        env={**clean_env(), **(env or {})},
        timeout=HANG_GUARD,
        check=False,
    )


NODE_BAD_CONFIG: list[tuple[str, str, list[str], dict[str, str], str]] = [
    # (id, config file text or "", flags, env, expected start of the message)
    ("bad toml", "n_val = = 3\n", [], {}, "config error: config: "),
    ("unknown key", "n_val = 3\nbogus_setting = 1\n", [], {}, "config error: bogus_setting "),
    ("toml wrong type", 'n_val = "three"\n', [], {}, "config error: n_val "),
    ("w over n_val flag", "", ["--w", "4"], {}, "config error: w (from --w): 4 is outside"),
    ("w over n_val toml", "w = 5\n", [], {}, "config error: w (from "),
    ("r over n_val", "", ["--n-val", "1", "--r", "2"], {}, "config error: r (from --r)"),
    ("bad listen", "", ["--listen", "nonsense"], {}, "config error: listen (from --listen)"),
    ("bad listen port", "", ["--listen", "127.0.0.1:99999"], {}, "config error: listen"),
    ("wildcard advertise", "", ["--advertise", "0.0.0.0:7417"], {}, "config error: advertise"),
    ("bad seeds", "", ["--seeds", "n1=nohostport"], {}, "config error: seeds (from --seeds)"),
    ("bad metrics", "", ["--metrics-listen", "x"], {}, "config error: metrics_listen"),
    (
        "bad env var",
        "",
        [],
        {"KVCLUSTER_W": "abc"},
        "config error: w (from KVCLUSTER_W): 'abc' is not an integer",
    ),
    ("bad env listen", "", [], {"KVCLUSTER_ADVERTISE": "nohost"}, "config error: advertise"),
    ("missing config file", "", [], {"KVCLUSTER_CONFIG": "/nonexistent/kv.toml"}, "config error"),
    ("partitions", "", ["--partitions", "48"], {}, "config error: partitions (from --partitions)"),
]


@pytest.mark.parametrize(
    ("toml", "flags", "env", "message"),
    [pytest.param(t, f, e, m, id=name) for name, t, f, e, m in NODE_BAD_CONFIG],
)
def test_node_bad_config_fails_with_one_line_naming_the_field(
    tmp_path: Path, toml: str, flags: list[str], env: dict[str, str], message: str
) -> None:
    args = list(flags)
    if toml:
        path = tmp_path / "node.toml"
        path.write_text(toml)
        args += ["--config", str(path)]
    proc = run_node(tmp_path, *args, env=env)
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("kvcluster-node: " + message), lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "data").exists()  # stopped before creating anything


def test_node_bad_toml_message_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[unclosed\n")
    proc = run_node(tmp_path, "--config", str(path))
    assert proc.returncode == 2
    assert str(path) in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "data").exists()


def test_node_unknown_flag_exits_2_naming_it(tmp_path: Path) -> None:
    proc = run_node(tmp_path, "--no-such-setting", "1")
    assert proc.returncode == 2
    assert "--no-such-setting" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not (tmp_path / "data").exists()


def run_node_on_the_busy_port(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run kvcluster-node with ``args`` while this test listens on BUSY_PORT."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", BUSY_PORT))
        busy.listen()
        return run_node(tmp_path, *args)


def test_node_metrics_port_in_use_fails_with_one_line(tmp_path: Path) -> None:
    proc = run_node_on_the_busy_port(tmp_path, "--metrics-listen", f"127.0.0.1:{BUSY_PORT}")
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert lines == [
        f"kvcluster-node: config error: metrics_listen: cannot bind 127.0.0.1:{BUSY_PORT}: "
        "Address already in use"
    ]


def test_node_listen_port_in_use_exits_2_naming_listen(tmp_path: Path) -> None:
    proc = run_node_on_the_busy_port(tmp_path, "--listen", f"127.0.0.1:{BUSY_PORT}")
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr  # nothing from gRPC's C core before it
    assert lines[0].startswith(
        f"kvcluster-node: config error: listen: cannot bind 127.0.0.1:{BUSY_PORT}"
    )


def test_node_peer_port_in_use_exits_2_naming_peer_port_offset(tmp_path: Path) -> None:
    """The TCP peer port (listen port + offset) is checked like the others, before
    anything binds: one line naming the setting, not a traceback."""
    offset = str(BUSY_PORT - NODE_PORT)
    proc = run_node_on_the_busy_port(tmp_path, "--peer-port-offset", offset)
    assert proc.returncode == 2, proc
    assert proc.stderr.splitlines() == [
        f"kvcluster-node: config error: peer_port_offset: cannot bind 127.0.0.1:{BUSY_PORT}: "
        "Address already in use"
    ]

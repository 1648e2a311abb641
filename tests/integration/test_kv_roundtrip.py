"""put / get / delete round trips on real node processes (issue A, "Done when" 1 and 4).

Every test runs against a single node and against a 3-node cluster (N=3, R=2,
W=2), through ``kvctl`` as a separate process (``--json`` parsed) and through
both :class:`Client` and :class:`AsyncClient`. A node's health check and
metrics endpoint are checked on a node of their own.
"""

from __future__ import annotations

import asyncio
import base64
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvcluster import AsyncClient, Client, ReadResult, WriteResult, errors
from tests.integration.conftest import Cluster, StartCluster, run_kvctl
from tests.support import wait_until

pytestmark = pytest.mark.integration

PORT = 7400  # this module uses 7400-7409
SINGLE_PORT = PORT  # 1 node
TRIO_PORT = PORT + 1  # 3 nodes: 7401-7403
OPS_PORT = PORT + 4  # 1 node for health and metrics
OPS_METRICS_PORT = PORT + 5


@pytest.fixture(scope="module", params=[1, 3], ids=["1node", "3nodes"])
def cluster(request: pytest.FixtureRequest, start_module_cluster: StartCluster) -> Cluster:
    size: int = request.param
    return start_module_cluster(size, SINGLE_PORT if size == 1 else TRIO_PORT)


@pytest.fixture
def key(request: pytest.FixtureRequest) -> str:
    """A key of this test's own (tests share a cluster)."""
    return f"rt/{request.node.name}"


@pytest.fixture
def client(cluster: Cluster) -> Iterator[Client]:
    with cluster.client() as kv:
        yield kv


# -- kvctl ----------------------------------------------------------------------------


def test_kvctl_put_get_delete_round_trip(cluster: Cluster, key: str) -> None:
    missing = cluster.kvctl("get", key)
    assert missing.code == 1
    assert missing.json()["found"] is False
    assert missing.json()["values"] == []

    put = cluster.kvctl("put", key, "v1").ok().json()
    assert put["ok"] is True
    assert put["values"] == ["v1"]
    assert base64.b64decode(put["context"])

    got = cluster.kvctl("get", key).ok().json()
    assert got["found"] is True
    assert got["values"] == ["v1"]
    assert got["encoding"] == "utf-8"

    # a plain put reads first, so it replaces what it saw instead of adding a sibling
    cluster.kvctl("put", key, "v2").ok()
    assert cluster.kvctl("get", key).ok().json()["values"] == ["v2"]

    deleted = cluster.kvctl("delete", key).ok().json()
    assert deleted == {"ok": True, "found": True}
    gone = cluster.kvctl("get", key)
    assert gone.code == 1
    assert gone.json()["found"] is False
    assert gone.json()["values"] == []
    assert cluster.kvctl("delete", key).ok().json() == {"ok": True, "found": False}


def test_kvctl_text_output(cluster: Cluster, key: str) -> None:
    assert cluster.kvctl("put", key, "hello", as_json=False).ok().stdout == "OK\n"
    got = cluster.kvctl("get", key, as_json=False).ok()
    assert got.stdout == "hello\n"
    assert got.stderr == ""
    cluster.kvctl("delete", key, as_json=False).ok()
    missing = cluster.kvctl("get", key, as_json=False)
    assert missing.code == 1
    assert missing.stdout == ""
    assert missing.stderr_lines == [f"kvctl: {key}: not found"]


def test_kvctl_blind_puts_become_siblings_and_context_resolves_them(
    cluster: Cluster, key: str
) -> None:
    cluster.kvctl("put", "--blind", key, "a").ok()
    cluster.kvctl("put", "--blind", key, "b").ok()
    got = cluster.kvctl("get", key).ok().json()
    assert sorted(got["values"]) == ["a", "b"]

    text = cluster.kvctl("get", key, as_json=False).ok()
    assert sorted(text.stdout.splitlines()) == ["a", "b"]
    assert text.stderr_lines == ["# 2 siblings"]

    cluster.kvctl("put", "--context", got["context"], key, "c").ok()
    assert cluster.kvctl("get", key).ok().json()["values"] == ["c"]


def test_kvctl_stale_context_keeps_the_newer_write(cluster: Cluster, key: str) -> None:
    first = cluster.kvctl("put", key, "one").ok().json()
    cluster.kvctl("put", key, "two").ok()  # supersedes "one"
    # a write with the context of "one" only supersedes "one": "two" stays as a sibling
    cluster.kvctl("put", "--context", first["context"], key, "three").ok()
    assert sorted(cluster.kvctl("get", key).ok().json()["values"]) == ["three", "two"]


def test_kvctl_utf8_keys_and_values(cluster: Cluster) -> None:
    key, value = "ключ/✓/日本", "значение ✓ — 値"
    cluster.kvctl("put", key, value).ok()
    got = cluster.kvctl("get", key).ok().json()
    assert got["values"] == [value]
    assert got["encoding"] == "utf-8"
    assert cluster.kvctl("get", key, as_json=False).ok().stdout == value + "\n"
    with cluster.client() as kv:
        assert kv.get(key.encode()).values == [value.encode()]


def test_kvctl_binary_value_from_file_and_stdin(cluster: Cluster, key: str, tmp_path: Path) -> None:
    blob = bytes(range(256)) * 4  # not UTF-8
    path = tmp_path / "blob"
    path.write_bytes(blob)
    cluster.kvctl("put", key, "--file", str(path)).ok()
    got = cluster.kvctl("get", key).ok().json()
    assert got["encoding"] == "base64"
    assert [base64.b64decode(v) for v in got["values"]] == [blob]
    text = cluster.kvctl("get", key, as_json=False).ok().stdout
    assert text == "base64:" + base64.b64encode(blob).decode() + "\n"

    piped = run_kvctl("--nodes", cluster.nodes_arg, "put", key, "--file", "-", stdin=b"piped")
    piped.ok()
    with cluster.client() as kv:
        assert kv.get(key).values == [b"piped"]


def test_kvctl_and_client_see_each_others_writes(cluster: Cluster, client: Client) -> None:
    client.put("interop/1", b"from-client")
    assert cluster.kvctl("get", "interop/1").ok().json()["values"] == ["from-client"]
    cluster.kvctl("put", "interop/2", "from-kvctl").ok()
    assert client.get("interop/2").values == [b"from-kvctl"]


# -- Client ------------------------------------------------------------------------------


def test_client_put_get_delete_round_trip(client: Client, key: str) -> None:
    missing = client.get(key)
    assert missing == ReadResult(False, [], missing.context)
    assert missing.value is None

    written = client.put(key, b"v1")
    assert isinstance(written, WriteResult)
    assert written.values == [b"v1"]
    assert written.context

    got = client.get(key)
    assert got.found
    assert got.values == [b"v1"]
    assert got.value == b"v1"

    client.put(key, b"v2", context=got.context)
    assert client.get(key).values == [b"v2"]

    assert client.delete(key) is True
    gone = client.get(key)
    assert not gone.found
    assert gone.values == []
    assert client.delete(key) is False


def test_client_concurrent_puts_are_siblings(client: Client, key: str) -> None:
    client.put(key, b"x")
    second = client.put(key, b"y")  # no context: supersedes nothing
    assert b"y" in second.values
    got = client.get(key)
    assert sorted(got.values) == [b"x", b"y"]
    with pytest.raises(ValueError, match="2 siblings"):
        _ = got.value

    client.put(key, b"z", context=got.context)  # the context covers both siblings
    resolved = client.get(key)
    assert resolved.values == [b"z"]
    assert resolved.value == b"z"


def test_client_delete_with_context_removes_what_it_saw(client: Client, key: str) -> None:
    client.put(key, b"a")
    seen = client.get(key)
    assert client.delete(key, context=seen.context) is True
    assert not client.get(key).found
    # a delete with an old context does not remove a later write
    client.put(key, b"b")
    client.delete(key, context=seen.context)
    assert client.get(key).values == [b"b"]


def test_client_str_keys_and_values_are_utf8(client: Client) -> None:
    client.put("ключ-✓", "значение ✓")
    assert client.get("ключ-✓".encode()).values == ["значение ✓".encode()]
    assert client.get("ключ-✓").values == ["значение ✓".encode()]
    client.put(b"bytes-key", bytearray(b"\x00\xff"))  # type: ignore[arg-type]
    assert client.get("bytes-key").values == [b"\x00\xff"]


def test_client_quorum_levels(client: Client, key: str) -> None:
    for w in (1, "one", "quorum", "all", None):
        r = client.get(key, r="all")
        client.put(key, f"w={w}", w=w, context=r.context)
        assert client.get(key, r="all").values == [f"w={w}".encode()]
    assert client.get(key, r=1).found
    assert client.get(key, r="quorum", strict=True).found
    client.put(key, b"strict", w="all", strict=True, context=client.get(key, r="all").context)
    assert client.get(key, r="all").values == [b"strict"]


def test_client_batches(client: Client) -> None:
    items = [(f"batch/{i}", f"value-{i}") for i in range(40)]
    written = client.put_many(items)
    assert all(isinstance(w, WriteResult) for w in written), written
    results = client.get_many([k for k, _ in items] + ["batch/absent"])
    assert [r.values if isinstance(r, ReadResult) else r for r in results] == [
        [v.encode()] for _, v in items
    ] + [[]]


def test_client_session_is_sticky_and_reads_its_writes(client: Client, key: str) -> None:
    session = client.session()
    assert session.coordinator is None
    session.put(key, b"mine")
    coordinator = session.coordinator
    assert coordinator is not None
    assert session.get(key).values == [b"mine"]
    assert session.coordinator == coordinator
    assert session.delete(key) is True


# -- AsyncClient -----------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", [False, True], ids=["unary", "pipelined"])
def test_async_client_round_trip(cluster: Cluster, key: str, pipeline: bool) -> None:
    async def scenario() -> None:
        async with AsyncClient(cluster.addresses, pipeline=pipeline) as kv:
            assert not (await kv.get(key)).found
            written = await kv.put(key, b"v1")
            assert written.values == [b"v1"]
            got = await kv.get(key)
            assert got.values == [b"v1"]

            await kv.put(key, b"v2")  # no context: a sibling
            both = await kv.get(key)
            assert sorted(both.values) == [b"v1", b"v2"]
            await kv.put(key, b"v3", context=both.context)
            assert (await kv.get(key, r="all")).values == [b"v3"]

            await kv.put(f"{key}/ключ", "значение ✓")
            assert (await kv.get(f"{key}/ключ".encode())).values == ["значение ✓".encode()]

            written_many = await kv.put_many([(f"{key}/{i}", b"%d" % i) for i in range(10)])
            assert all(isinstance(w, WriteResult) for w in written_many)
            read_many = await kv.get_many([f"{key}/{i}" for i in range(10)])
            assert [r.values for r in read_many if isinstance(r, ReadResult)] == [
                [b"%d" % i] for i in range(10)
            ]

            session = kv.session()
            await session.put(key, b"session", context=(await kv.get(key)).context)
            assert (await session.get(key)).values == [b"session"]

            assert await kv.delete(key) is True
            assert not (await kv.get(key)).found
            assert await kv.delete(key) is False

    asyncio.run(scenario())


def test_async_client_sees_sync_client_writes(cluster: Cluster, client: Client, key: str) -> None:
    client.put(key, b"sync")

    async def read() -> ReadResult:
        async with AsyncClient(cluster.nodes_arg) as kv:
            return await kv.get(key)

    assert asyncio.run(read()).values == [b"sync"]


# -- the node as a service: health check and metrics -----------------------------------------


@pytest.fixture(scope="module")
def ops_node(start_module_cluster: StartCluster) -> Cluster:
    return start_module_cluster(
        1, OPS_PORT, settings={"metrics_listen": f"127.0.0.1:{OPS_METRICS_PORT}"}
    )


def test_health_check_answers_serving(ops_node: Cluster) -> None:
    with grpc.insecure_channel(ops_node.address("n1")) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

        # the node's health status follows its ring a moment after Admin.Status says
        # ready (it is refreshed every 0.2 s), so poll like a readiness probe would
        wait_until(serving, 10.0, "the health check to answer SERVING")
        for service in ("", "kvcluster.wire.v1.KV"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        body: bytes = resp.read()
        return body.decode()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name{labels}`` (labels in any order), 0 if absent."""
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if not m:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(2))
    return 0.0


def test_metrics_endpoint_counts_requests(ops_node: Cluster) -> None:
    before = _metrics(OPS_METRICS_PORT)
    assert "kvcluster_requests_total" in before
    writes = _sample(before, "kvcluster_storage_writes_total")
    commits = _sample(before, "kvcluster_storage_commits_total")
    puts = _sample(before, "kvcluster_requests_total", op="put", outcome="ok")
    bad = _sample(before, "kvcluster_requests_total", op="get", outcome="invalid_argument")
    with ops_node.client() as kv:
        kv.put("metrics/1", b"a")
        kv.put("metrics/2", b"b")
        with pytest.raises(errors.InvalidArgument):
            kv.get("metrics/1", r=5)  # rejected by the node: only n=1 replica
    after = _metrics(OPS_METRICS_PORT)
    assert _sample(after, "kvcluster_requests_total", op="put", outcome="ok") == puts + 2
    assert (
        _sample(after, "kvcluster_requests_total", op="get", outcome="invalid_argument") == bad + 1
    )
    assert "kvcluster_request_seconds" in after
    assert "# TYPE kvcluster_hints_pending gauge" in after
    # each acknowledged put is a synced store write (one node: one copy each), and
    # the second put starts after the first is acknowledged: two commits at least
    assert _sample(after, "kvcluster_storage_writes_total") >= writes + 2
    assert _sample(after, "kvcluster_storage_commits_total") >= commits + 2
    assert _sample(after, "kvcluster_storage_bytes") > 0

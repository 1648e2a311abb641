"""The Backend protocol: how jepsen-lite starts a cluster and breaks it.

A backend owns the node processes of one test run and the faults injected into
them. jepsen-lite ships two (:mod:`~jepsen_lite.backends.local`: processes on
loopback with in-process faults; :mod:`~jepsen_lite.backends.netns`: one network
namespace per node, iptables for partitions and loss); a ``docker`` backend can be
added by subclassing :class:`Backend`.

Writing a backend
-----------------

Subclass :class:`Backend`, set ``name``, and implement the hooks marked
*abstract*. They are small on purpose; the base class keeps the bookkeeping:

- :meth:`Backend._start_cluster` starts N nodes with the given node settings
  and returns their ids once **every** node is ready (Admin ``Status.ready``);
- :meth:`Backend.address` is the ``host:port`` the harness (clients, admin calls)
  uses for a node. It must be the address the node *advertises*, because the client
  routes requests to the addresses listed in the ring;
- :meth:`Backend._kill_node` (SIGKILL or equivalent: no clean shutdown),
  :meth:`Backend._start_node` (start a stopped node with its old data and wait until
  it is ready), :meth:`Backend._pause_node` / :meth:`Backend._resume_node` (SIGSTOP /
  SIGCONT or equivalent);
- :meth:`Backend._apply_faults` installs the complete fault set of one node
  (:class:`NodeFaults`: blocked peers, loss, latency, clock offset), replacing what
  was there. It is only called for a running, unpaused node; the base class calls
  it again after a restart or resume, so in-process faults (which a restart forgets)
  are restored. Use real network rules where the backend can (iptables in a
  namespace or container) and :func:`set_inprocess_faults` (the node's
  ``Admin.SetFaults`` RPC) for the rest. There is no netem on this machine's kernel:
  latency and clock offset are always in-process (:meth:`NodeFaults.latency_and_clock`);
- :meth:`Backend._stop_cluster` stops every process and removes everything the
  backend created (namespaces, links, rules, containers). It must be safe to call
  after a failed or partial start and more than once;
- :meth:`Backend.logs` returns each node's log file.

Everything else (status, ring, hinted-handoff drain, anti-entropy repair, reading
each replica's own copy of a key) goes through the nodes' gRPC APIs and works for
any backend. Node ids are ``n1``, ``n2``, ... in every backend.

Faults are symmetric where that matters: :meth:`Backend.set_partition` takes, for
every node, the set of peers it cannot talk to, and the base class makes the
relation symmetric before applying it. Clients always reach every node, as in
Jepsen: a partition cuts the links between database nodes, not the clients.
"""

from __future__ import annotations

import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import grpc

from jepsen_lite.errors import HarnessError
from kvcluster import Client, errors
from kvcluster.cli import dev
from kvcluster.core.hashing import partition_of, pkey
from kvcluster.core.quorum import quorum_size
from kvcluster.core.record import decode_record, live_values
from kvcluster.net import codec
from kvcluster.net.messages import ReplicaRead, ReplicaReadReply
from kvcluster.wire.v1 import admin_pb2, internal_pb2, internal_pb2_grpc

__all__ = [
    "Backend",
    "NodeFaults",
    "NodeState",
    "ReplicaStates",
    "blocked_from_groups",
    "bridged_traffic_crosses_iptables",
    "dev_errors",
    "replication",
    "set_inprocess_faults",
    "settings_env",
]

NodeState = Literal["running", "paused", "killed"]

#: The id the harness uses in node-to-node metadata when it reads a replica directly.
HARNESS_ID = "jepsen-lite"


@dataclass(frozen=True)
class NodeFaults:
    """Every fault in force on one node; the default is a healthy node."""

    blocked: frozenset[str] = frozenset()  # peers this node cannot exchange messages with
    loss: float = 0.0  # probability that a message to or from a peer is lost
    delay_ms: tuple[float, float] = (0.0, 0.0)  # extra latency range on messages to peers
    clock_offset_ms: int = 0  # skew of the node's wall clock

    @property
    def healthy(self) -> bool:
        return self == NodeFaults()

    def latency_and_clock(self) -> NodeFaults:
        """Only the faults that are always in-process (latency, clock offset), for a
        backend that cuts links and loses packets with network rules."""
        return NodeFaults(delay_ms=self.delay_ms, clock_offset_ms=self.clock_offset_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "blocked": sorted(self.blocked),
            "loss": self.loss,
            "delay_ms": list(self.delay_ms),
            "clock_offset_ms": self.clock_offset_ms,
        }


@dataclass
class ReplicaStates:
    """What each replica holds for each key, read directly from its own store.

    ``states[node][key]`` is the list of live sibling values (UTF-8 text) on that
    node; a key the node owns but does not hold maps to ``[]``. ``owners[key]`` is the
    key's preference list (the nodes that should hold it). ``errors[node]`` says why a
    node could not be read.
    """

    states: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    owners: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"states": self.states, "owners": self.owners, "errors": self.errors}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReplicaStates:
        return cls(
            states={n: {k: list(v) for k, v in s.items()} for n, s in d["states"].items()},
            owners={k: list(v) for k, v in d["owners"].items()},
            errors=dict(d.get("errors", {})),
        )


def blocked_from_groups(
    groups: Sequence[Collection[str]], ids: Sequence[str]
) -> dict[str, set[str]]:
    """The blocked-peers map of a partition into ``groups`` (unnamed nodes form one more
    group): every node is cut off from every node outside its group."""
    named = [set(g) for g in groups]
    seen: set[str] = set()
    for g in named:
        unknown = g - set(ids)
        if unknown:
            raise HarnessError(f"partition names unknown nodes {sorted(unknown)}")
        if g & seen:
            raise HarnessError(f"partition groups overlap on {sorted(g & seen)}")
        seen |= g
    rest = [i for i in ids if i not in seen]
    if rest:
        named.append(set(rest))
    blocked: dict[str, set[str]] = {}
    for node in ids:
        mine = next(g for g in named if node in g)
        blocked[node] = {i for i in ids if i not in mine}
    return blocked


def settings_env(settings: Mapping[str, Any]) -> dict[str, str]:
    """Node settings as ``KVCLUSTER_*`` environment variables (every setting, booleans
    included, can be given this way; see ``kvcluster-node --help``)."""
    env: dict[str, str] = {}
    for name, value in sorted(settings.items()):
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list | tuple):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value)
        env["KVCLUSTER_" + name.upper()] = text
    return env


def replication(settings: Mapping[str, Any], nodes: int) -> tuple[dict[str, Any], int, int, int]:
    """Split ``n_val``, ``r`` and ``w`` off node settings: ``(other settings, N, R, W)``,
    N defaulting to min(3, nodes) and R and W to a quorum of N (as ``kvctl dev up``)."""
    opts = dict(settings)
    n = int(opts.pop("n_val", dev.default_n_val(nodes)))
    quorum = quorum_size(n)
    return opts, n, int(opts.pop("r", quorum)), int(opts.pop("w", quorum))


def bridged_traffic_crosses_iptables() -> bool:
    """Whether bridged packets go through the host's iptables (``br_netfilter`` with
    ``bridge-nf-call-iptables`` on)."""
    bridged = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    return bridged.exists() and bridged.read_text().strip() == "1"


@contextlib.contextmanager
def dev_errors() -> Iterator[None]:
    """Report the errors of the launcher (:mod:`kvcluster.cli.dev`) as the harness's."""
    try:
        yield
    except dev.DevError as exc:
        raise HarnessError(str(exc)) from None


def set_inprocess_faults(address: str, faults: NodeFaults, timeout: float = 3.0) -> None:
    """Make ``faults`` the in-process faults of the node at ``address`` (``Admin.SetFaults``;
    see :mod:`kvcluster.net.faults`). ``NodeFaults()`` heals it."""
    with dev_errors():
        dev.set_faults(
            address,
            blocked=faults.blocked,
            loss=faults.loss,
            delay_ms=faults.delay_ms,
            clock_offset_ms=faults.clock_offset_ms,
            timeout=timeout,
        )


class Backend(ABC):
    """A cluster under test and its faults (see the module docstring)."""

    name: ClassVar[str] = "backend"

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self._ids: list[str] = []
        self._state: dict[str, NodeState] = {}
        self._faults: dict[str, NodeFaults] = {}
        # Held by every lifecycle and fault change, and by stop(): a nemesis thread
        # in the middle of restarting a node finishes before the cluster is stopped,
        # and nothing is started after it.
        self._lock = threading.RLock()
        self._stopped = False

    # ----------------------------------------------------------------- hooks to implement

    @abstractmethod
    def _start_cluster(self, nodes: int, settings: Mapping[str, Any]) -> list[str]:
        """Start ``nodes`` nodes (ids ``n1``..) with these node settings (names of
        ``kvcluster-node`` settings, e.g. ``{"request_timeout": 2, "unsafe_lww": True}``);
        return the ids once every node is ready. Raise :class:`HarnessError` on failure
        (:meth:`start` then calls :meth:`_stop_cluster` to remove what was started)."""

    @abstractmethod
    def address(self, node: str) -> str:
        """``host:port`` of ``node`` as the harness reaches it (= the advertised address)."""

    @abstractmethod
    def _kill_node(self, node: str) -> None:
        """Kill the node's process without a clean shutdown (SIGKILL) and wait until gone."""

    @abstractmethod
    def _start_node(self, node: str) -> None:
        """Start a killed node again with its data and wait until it is ready."""

    @abstractmethod
    def _pause_node(self, node: str) -> None:
        """Freeze the node's process (SIGSTOP)."""

    @abstractmethod
    def _resume_node(self, node: str) -> None:
        """Thaw a paused node (SIGCONT)."""

    @abstractmethod
    def _apply_faults(self, node: str, faults: NodeFaults) -> None:
        """Make ``faults`` exactly the faults of the running ``node`` (replace, not add)."""

    @abstractmethod
    def _stop_cluster(self) -> None:
        """Stop every process and remove everything the backend created. Idempotent."""

    @abstractmethod
    def logs(self) -> dict[str, Path]:
        """Each node's log file."""

    # ----------------------------------------------------------------- lifecycle

    def start(self, nodes: int, settings: Mapping[str, Any]) -> None:
        """Start the cluster and wait until every node is ready; if that fails (or is
        interrupted), remove what was started and raise."""
        if not 1 <= nodes <= 9:
            raise HarnessError(f"--nodes must be within 1..9, got {nodes}")
        try:
            ids = self._start_cluster(nodes, settings)
        except BaseException:
            self._stop_cluster()
            raise
        with self._lock:
            self._ids = list(ids)
            self._state = {n: "running" for n in ids}
            self._faults = {n: NodeFaults() for n in ids}

    def stop(self) -> None:
        """Stop everything (safe to call more than once, and after a failed start)."""
        with self._lock:
            self._stopped = True
            self._stop_cluster()

    @property
    def node_ids(self) -> list[str]:
        return list(self._ids)

    @property
    def addresses(self) -> list[str]:
        return [self.address(n) for n in self._ids]

    def state(self, node: str) -> NodeState:
        with self._lock:
            return self._state[self._check(node)]

    def faults(self, node: str) -> NodeFaults:
        with self._lock:
            return self._faults[self._check(node)]

    def _check(self, node: str) -> str:
        if self._stopped:
            raise HarnessError("the cluster has been stopped")
        if node not in self._state:
            raise HarnessError(f"unknown node {node!r} (nodes: {', '.join(self._ids)})")
        return node

    def kill(self, node: str) -> None:
        with self._lock:
            if self.state(node) == "killed":
                return
            if self._state[node] == "paused":
                self._resume_node(node)
            self._kill_node(node)
            self._state[node] = "killed"

    def start_node(self, node: str) -> None:
        self._transition(node, "killed", self._start_node, "running")

    def restart(self, node: str) -> None:
        self.kill(node)
        self.start_node(node)

    def pause(self, node: str) -> None:
        self._transition(node, "running", self._pause_node, "paused")

    def resume(self, node: str) -> None:
        self._transition(node, "paused", self._resume_node, "running")

    def _transition(
        self, node: str, before: NodeState, hook: Callable[[str], None], after: NodeState
    ) -> None:
        """Move ``node`` from state ``before`` to ``after`` by calling ``hook``; a node in
        any other state is left alone. A node that runs again gets its faults back."""
        with self._lock:
            if self.state(node) != before:
                return
            hook(node)
            self._state[node] = after
            if after == "running":
                self._reapply(node)

    # ----------------------------------------------------------------- faults

    def _update(self, node: str, **changes: Any) -> None:
        """Change some of ``node``'s faults; installed now if it runs, else when it runs again."""
        with self._lock:
            old = self._faults[self._check(node)]
            faults = self._faults[node] = replace(old, **changes)
            if faults != old and self._state[node] == "running":
                self._apply_faults(node, faults)

    def _reapply(self, node: str) -> None:
        faults = self._faults[node]
        if not faults.healthy:
            self._apply_faults(node, faults)

    def set_partition(self, blocked: Mapping[str, Collection[str]]) -> None:
        """Cut links: ``blocked[a]`` are the peers ``a`` cannot talk to (made symmetric).
        Nodes not named keep no blocked peers. Replaces any earlier partition."""
        full: dict[str, set[str]] = {n: set() for n in self._ids}
        for a, peers in blocked.items():
            self._check(a)
            for b in peers:
                self._check(b)
                if a != b:
                    full[a].add(b)
                    full[b].add(a)
        for node in self._ids:
            self._update(node, blocked=frozenset(full[node]))

    def partition(self, groups: Sequence[Collection[str]]) -> None:
        """Split the cluster into ``groups`` (nodes not named form one more group)."""
        self.set_partition(blocked_from_groups(groups, self._ids))

    def heal_partition(self) -> None:
        self.set_partition({})

    def set_loss(self, node: str, probability: float) -> None:
        """Lose this fraction of the messages between ``node`` and its peers (0 heals)."""
        if not 0.0 <= probability <= 1.0:
            raise HarnessError(f"loss must be within 0..1, got {probability}")
        self._update(node, loss=probability)

    def set_latency(self, node: str, min_ms: float, max_ms: float) -> None:
        """Delay every message ``node`` sends to a peer by U(min, max) ms (0, 0 heals)."""
        if not 0 <= min_ms <= max_ms:
            raise HarnessError(f"latency must be 0 <= min <= max, got {min_ms}..{max_ms}")
        self._update(node, delay_ms=(min_ms, max_ms))

    def set_clock_offset(self, node: str, offset_ms: int) -> None:
        """Skew ``node``'s wall clock by ``offset_ms`` (0 heals)."""
        self._update(node, clock_offset_ms=offset_ms)

    def heal(self) -> list[str]:
        """Undo every fault: resume paused nodes, start killed ones, remove partitions,
        loss, latency and clock offsets. Returns what it had to do (for the log)."""
        done: list[str] = []
        for node in self._ids:
            if self.state(node) == "paused":
                self.resume(node)
                done.append(f"resumed {node}")
        for node in self._ids:
            if self.state(node) == "killed":
                self.start_node(node)
                done.append(f"started {node}")
        for node in self._ids:
            with self._lock:
                if not self.faults(node).healthy:
                    done.append(f"healed {node}")
                self._faults[node] = NodeFaults()
                # A node may hold faults the bookkeeping does not know (e.g. a failed call
                # left them half applied): install the healthy state unconditionally.
                self._apply_faults(node, NodeFaults())
        return done

    # ----------------------------------------------------------------- cluster APIs

    def _admin_client(self, node: str) -> Client:
        return Client([self.address(node)], timeout=5.0)

    def status(self, node: str, timeout: float = 2.0) -> admin_pb2.StatusResponse | None:
        """The node's Admin.Status, or None if it does not answer."""
        return dev.node_status(self.address(node), timeout=timeout)

    def wait_ready(self, nodes: Iterable[str] | None = None, timeout: float = 60.0) -> None:
        """Wait until the nodes answer with an agreed ring; HarnessError if they do not."""
        self._await_ready(self._ids if nodes is None else nodes, timeout)

    def _await_ready(
        self,
        nodes: Iterable[str],
        timeout: float,
        *,
        exited: Callable[[str], str | None] | None = None,
        status_timeout: float = 1.0,
        interval: float = 0.2,
    ) -> None:
        """Poll until every node in ``nodes`` is ready. HarnessError after ``timeout``,
        or at once with the message ``exited(node)`` returns for a node that is gone."""
        pending = list(nodes)
        end = time.monotonic() + timeout
        while pending:
            for node in list(pending):
                why = None if exited is None else exited(node)
                if why is not None:
                    raise HarnessError(why)
                st = self.status(node, status_timeout)
                if st is not None and st.ready:
                    pending.remove(node)
            if not pending:
                return
            if time.monotonic() > end:
                raise HarnessError(f"{', '.join(pending)} not ready after {timeout:g}s")
            time.sleep(interval)

    def hints_pending(self) -> dict[str, int | None]:
        """Hints each node still holds for others (None: the node did not answer)."""
        out: dict[str, int | None] = {}
        for node in self._ids:
            st = self.status(node)
            out[node] = None if st is None else int(st.hints_pending)
        return out

    def ring(self) -> dict[str, Any]:
        """The agreed ring as one node reports it (``partitions``, ``members``, ``owners``)."""
        last: Exception | None = None
        for node in self._ids:
            try:
                with self._admin_client(node) as client:
                    return client.ring(self.address(node))
            except errors.KVError as exc:
                last = exc
        raise HarnessError(f"no node reported the ring: {last}")

    def repair(self, node: str, timeout: float = 120.0, attempts: int = 5) -> dict[str, Any]:
        """Run anti-entropy now on ``node`` (every partition it owns); the final progress.

        Retried a few times: right after a node was resumed or restarted, a new gRPC
        channel may still see the old connection's reconnect backoff."""
        for attempt in range(1, attempts + 1):
            last: dict[str, Any] = {}
            try:
                with self._admin_client(node) as client:
                    for progress in client.repair(address=self.address(node), timeout=timeout):
                        last = progress
                return last
            except (errors.Unreachable, errors.Timeout, errors.NotReady):
                if attempt == attempts:
                    raise
                time.sleep(1.0)
        raise AssertionError("unreachable")

    def replica_states(self, keys: Iterable[str], timeout: float = 10.0) -> ReplicaStates:
        """Each owner's own copy of each key, read from its store without read repair
        (the node-to-node ``ReplicaRead`` message), as live sibling values."""
        ring = self.ring()
        q = int(ring["partitions"])
        members = {m["id"]: m["address"] for m in ring["members"]}
        owners_of = [list(p.get("owners", [])) for p in ring["owners"]]
        result = ReplicaStates()
        wanted: dict[str, list[tuple[str, bytes]]] = {n: [] for n in members}
        for key in sorted(set(keys)):
            raw = key.encode()
            part = partition_of(raw, q)
            result.owners[key] = owners_of[part]
            for node in owners_of[part]:
                wanted.setdefault(node, []).append((key, pkey(part, raw)))
        for node, items in sorted(wanted.items()):
            address = members.get(node)
            if address is None:
                result.errors[node] = "not a ring member"
                continue
            records: list[bytes | None] | None = None
            for attempt in range(3):
                try:
                    records = _replica_read(address, [pk for _, pk in items], timeout)
                    break
                except HarnessError as exc:
                    result.errors[node] = str(exc)
                    time.sleep(1.0 + attempt)
            if records is None:
                continue
            result.errors.pop(node, None)
            result.states[node] = {
                key: [] if rec is None else [v.decode(errors="replace") for v in _live(rec)]
                for (key, _), rec in zip(items, records, strict=True)
            }
        return result


def _live(record: bytes) -> list[bytes]:
    return live_values(decode_record(record))


def _replica_read(address: str, pkeys: Sequence[bytes], timeout: float) -> list[bytes | None]:
    out: list[bytes | None] = []
    with grpc.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)]
    ) as channel:
        stub = internal_pb2_grpc.InternalStub(channel)
        for i in range(0, len(pkeys), 256):
            msg = ReplicaRead(tuple(pkeys[i : i + 256]))
            frame = internal_pb2.Frame(payload=codec.encode(msg))
            try:
                reply = stub.Call(
                    frame, timeout=timeout, metadata=(("kvcluster-from", HARNESS_ID),)
                )
            except grpc.RpcError as exc:
                raise HarnessError(f"{address}: replica read failed: {exc.details()}") from None
            if reply.error_json:
                raise HarnessError(f"{address}: replica read refused: {reply.error_json!r}")
            decoded = codec.decode(reply.payload)
            if not isinstance(decoded, ReplicaReadReply):
                raise HarnessError(f"{address}: unexpected reply {type(decoded).__name__}")
            out.extend(decoded.records)
    return out

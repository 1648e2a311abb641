"""Tunables of a node's cluster logic, with their defaults.

The server's configuration (``kvcluster.server.config``) builds one of these
from flags, a TOML file and ``KVCLUSTER_*`` variables; the simulator builds
them directly. Times are seconds unless the name says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Keys are non-empty byte strings of at most 1 KiB (DESIGN §2): a contract of
#: the data model shared by client and server, not a setting.
MAX_KEY_BYTES = 1024


@dataclass(frozen=True, slots=True)
class NodeSettings:
    # placement and quorums
    partitions: int = 64  # Q, fixed when the cluster is created
    n_val: int = 3
    r: int = 2
    w: int = 2
    # request handling
    request_timeout: float = 5.0
    speculative_read: float = 0.25  # ask one more replica when a read waits this long
    max_value_bytes: int = 1024 * 1024
    max_batch_items: int = 1000  # PutMany / GetMany
    # replication to peers: one batch in flight per peer
    replication_batch: int = 256
    replication_queue: int = 20_000  # items waiting per peer before Overloaded
    # membership and failure detection
    heartbeat_interval: float = 0.25
    rpc_timeout: float = 1.0  # node-to-node calls other than replication
    phi_suspect: float = 5.0
    phi_down: float = 8.0
    # hinted handoff
    hint_max_per_target: int = 100_000
    hint_max_age: float = 3 * 3600.0
    handoff_interval: float = 1.0
    handoff_batch: int = 256
    # anti-entropy
    aae_interval: float = 300.0  # 0 disables the background schedule
    aae_concurrency: int = 1
    aae_pause: float = 0.01  # background pause after each batch of keys (throttle)
    tombstone_grace: float = 24 * 3600.0  # must exceed hint_max_age (no zombies)
    # deliberately unsafe switches, for proving the checkers catch data loss
    unsafe_ack_before_w: bool = False  # acknowledge a write after the local copy only
    unsafe_lww: bool = False  # resolve siblings last-write-wins on every write

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        q = self.partitions
        if q < 1 or q > 65536 or q & (q - 1):
            raise ValueError(f"partitions: {q} is not a power of two in 1..65536")
        if not 1 <= self.n_val <= 16:
            raise ValueError(f"n_val: {self.n_val} is outside 1..16")
        for name in ("r", "w"):
            v = getattr(self, name)
            if not 1 <= v <= self.n_val:
                raise ValueError(f"{name}: {v} is outside 1..n_val ({self.n_val})")
        if self.max_value_bytes < 1:
            raise ValueError(f"max_value_bytes: {self.max_value_bytes} must be positive")
        for name in (
            "request_timeout",
            "speculative_read",
            "heartbeat_interval",
            "rpc_timeout",
            "handoff_interval",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive")
        if not 0 < self.phi_suspect < self.phi_down:
            raise ValueError("phi_suspect: must be positive and below phi_down")
        if self.tombstone_grace <= self.hint_max_age:
            raise ValueError(
                "tombstone_grace: must exceed hint_max_age, or a late hint could "
                "resurrect a deleted key"
            )

"""The ``local`` backend: node processes on 127.0.0.1, faults injected in-process.

Nodes are started by :mod:`kvcluster.cli.dev` (the launcher shared with ``kvctl dev``
and the integration tests) in ``<workdir>/cluster.json``; kill / pause / resume /
restart act on the PIDs recorded there. Partitions, loss, latency and clock offset
go through each node's ``Admin.SetFaults`` RPC (:mod:`kvcluster.net.faults`), so no
root is needed.

Ports: only 7500-7599 (other test suites use other ranges). A run takes N
consecutive free ports and holds a lock file for each while it runs, so several
runs on one machine never collide; the Prometheus endpoints are turned off (they
would take port + 1000).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from jepsen_lite.backends.base import (
    Backend,
    NodeFaults,
    dev_errors,
    replication,
    set_inprocess_faults,
    settings_env,
)
from jepsen_lite.errors import HarnessError
from kvcluster.cli import dev

__all__ = ["LocalBackend"]

PORT_MIN, PORT_MAX = 7500, 7599
LOCK_DIR = Path(os.environ.get("JEPSEN_LITE_LOCK_DIR", "/tmp/jepsen-lite-ports"))


class LocalBackend(Backend):
    name = "local"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self._locks: list[IO[str]] = []
        self._cluster: dev.DevCluster | None = None
        self._started = False

    # -- ports ---------------------------------------------------------------------

    def _reserve_ports(self, count: int) -> int:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        for base in range(PORT_MIN, PORT_MAX - count + 2):
            held: list[IO[str]] = []
            for port in range(base, base + count):
                fh: IO[str] = open(LOCK_DIR / f"{port}.lock", "w")  # noqa: SIM115
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    fh.close()
                    break
                if not dev.port_free(port):
                    fh.close()
                    break
                held.append(fh)
            if len(held) == count:
                self._locks = held
                return base
            for fh in held:
                fh.close()
        raise HarnessError(f"no {count} consecutive free ports in {PORT_MIN}-{PORT_MAX}")

    def _release_ports(self) -> None:
        for fh in self._locks:
            with contextlib.suppress(OSError):
                fh.close()
        self._locks = []

    # -- hooks ------------------------------------------------------------------------

    def _start_cluster(self, nodes: int, settings: Mapping[str, Any]) -> list[str]:
        base = self._reserve_ports(nodes)
        opts, n_val, r, w = replication(settings, nodes)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._started = True
        try:
            self._cluster = dev.up(
                self.workdir,
                nodes=nodes,
                base_port=base,
                n_val=n_val,
                r=r,
                w=w,
                settings={"metrics_listen": "off"},
                env=settings_env(opts),
                timeout=60.0,
            )
        except dev.DevError as exc:
            raise HarnessError(f"local cluster did not start: {exc}") from None
        return [n.id for n in self._cluster.nodes]

    def _dev(self) -> dev.DevCluster:
        if self._cluster is None:
            raise HarnessError("the local cluster is not running")
        return self._cluster

    def address(self, node: str) -> str:
        return self._dev().node(node).address

    def _kill_node(self, node: str) -> None:
        with dev_errors():
            dev.kill(self.workdir, node)

    def _start_node(self, node: str) -> None:
        with dev_errors():
            dev.restart(self.workdir, node, wait=True, timeout=60.0)

    def _pause_node(self, node: str) -> None:
        with dev_errors():
            dev.pause(self.workdir, node)

    def _resume_node(self, node: str) -> None:
        with dev_errors():
            dev.resume(self.workdir, node)

    def _apply_faults(self, node: str, faults: NodeFaults) -> None:
        set_inprocess_faults(self.address(node), faults)

    def _stop_cluster(self) -> None:
        if self._started and (self.workdir / dev.STATE_FILE).exists():
            with contextlib.suppress(dev.DevError):
                dev.down(self.workdir, timeout=10.0)
        self._release_ports()

    def logs(self) -> dict[str, Path]:
        if self._cluster is None:
            return {}
        return {n.id: Path(n.log) for n in self._cluster.nodes}

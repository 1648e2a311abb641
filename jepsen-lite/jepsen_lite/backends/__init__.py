"""Cluster backends: where the nodes run and how faults reach them.

``make_backend(name, workdir)`` returns a :class:`~jepsen_lite.backends.base.Backend`;
see :mod:`jepsen_lite.backends.base` for the protocol a new backend implements.
"""

from __future__ import annotations

from pathlib import Path

from jepsen_lite.backends.base import Backend, NodeFaults, ReplicaStates, blocked_from_groups
from jepsen_lite.errors import HarnessError

__all__ = [
    "BACKENDS",
    "Backend",
    "NodeFaults",
    "ReplicaStates",
    "blocked_from_groups",
    "make_backend",
]

BACKENDS = ("local", "netns", "docker")


def make_backend(name: str, workdir: Path) -> Backend:
    """The backend called ``name``, keeping its files (data, logs) under ``workdir``."""
    if name == "local":
        from jepsen_lite.backends.local import LocalBackend

        return LocalBackend(workdir)
    if name == "netns":
        from jepsen_lite.backends.netns import NetnsBackend, preflight

        preflight()
        return NetnsBackend(workdir)
    if name == "docker":
        from jepsen_lite.backends.docker import DockerBackend
        from jepsen_lite.backends.docker import preflight as docker_preflight

        docker_preflight()
        return DockerBackend(workdir)
    raise HarnessError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")

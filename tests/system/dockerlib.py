"""Helpers for the Docker system tests: engine checks, image builds, compose.

Everything here shells out to the ``docker`` CLI (and ``docker compose`` or
``docker-compose``), the way an operator would. The image is built from the
repository's Dockerfile on the local base image that
``scripts/build-base-image.sh`` makes from Debian packages, because no
container registry is reachable on the machines this suite runs on; the
Python packages come from a wheelhouse built on the host
(``scripts/build-image.sh``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from kvcluster.cli.dev import port_free
from tests import support

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("KVCLUSTER_BASE_IMAGE", "kvcluster-base:bookworm")
#: Docker tests publish client ports in 7600-7699 only (other suites use other ranges).
PORT_MIN, PORT_MAX = 7600, 7699
PORT_LOCK_DIR = Path(os.environ.get("KVCLUSTER_SYSTEST_LOCK_DIR", "/tmp/kvcluster-systest-ports"))
#: Hang guards for single commands, never performance assertions.
BUILD_GUARD = 1800.0
COMMAND_GUARD = 300.0

T = TypeVar("T")


class DockerError(AssertionError):
    """A docker command failed; the message holds its output."""


def run(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = COMMAND_GUARD,
    check: bool = True,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        check=False,
    )
    if check and proc.returncode != 0:
        raise DockerError(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout[-4000:]}\nstderr: {proc.stderr[-4000:]}"
        )
    return proc


def skip_reason() -> str | None:
    """Why the Docker tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "Docker system tests need root (debootstrap, docker network, iptables)"
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "the Docker engine is not reachable: `docker info` hung for 60 s"
    if info.returncode != 0 or not info.stdout.strip():
        err = (info.stderr.strip() or info.stdout.strip()).splitlines()
        return f"the Docker engine is not reachable: docker info: {err[-1] if err else '?'}"
    if compose_command() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    return None


def compose_command() -> list[str] | None:
    """``docker compose`` (v2) when available, else ``docker-compose`` (v1)."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        if (
            subprocess.run(
                ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
            ).returncode
            == 0
        ):
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def engine_description() -> str:
    server = run(["docker", "version", "--format", "{{.Server.Version}}"], check=False)
    compose = compose_command() or ["?"]
    version = run([*compose, "version", "--short"], check=False) if compose != ["?"] else None
    return (
        f"Docker engine {server.stdout.strip() or '?'}, "
        f"{' '.join(compose)} {version.stdout.strip() if version else '?'}"
    )


@dataclass
class BuiltImage:
    tag: str
    base_seconds: float
    image_seconds: float


def build_image(tag: str) -> BuiltImage:
    """The local base image (cached), then the kvcluster image ``tag`` on it."""
    start = time.monotonic()
    run(["scripts/build-base-image.sh", "--image", BASE_IMAGE], timeout=BUILD_GUARD)
    base_done = time.monotonic()
    run(
        ["scripts/build-image.sh", "--base", BASE_IMAGE, "--tag", tag],
        env={"PYTHON": sys.executable},
        timeout=BUILD_GUARD,
    )
    return BuiltImage(tag, base_done - start, time.monotonic() - base_done)


def remove_image(tag: str) -> None:
    """Remove ``tag`` and the dangling build-stage images the Dockerfile labels
    (the base image stays cached)."""
    run(["docker", "image", "rm", "-f", tag], check=False)
    run(
        [
            "docker",
            "image",
            "prune",
            "-f",
            "--filter",
            "label=org.kvcluster.stage=build",
        ],
        check=False,
    )


def unique_name(prefix: str) -> str:
    return f"{prefix}{os.getpid()}{uuid.uuid4().hex[:6]}"


class PortBlock:
    """``count`` free loopback ports in 7600-7699, held by lock files until released."""

    def __init__(self, count: int) -> None:
        self.ports: list[int] = []
        self._locks: list[IO[str]] = []
        PORT_LOCK_DIR.mkdir(parents=True, exist_ok=True)
        for port in range(PORT_MIN, PORT_MAX + 1):
            if len(self.ports) == count:
                break
            fh = open(PORT_LOCK_DIR / f"{port}.lock", "w")  # noqa: SIM115 (held while in use)
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            if not port_free(port):
                fh.close()
                continue
            self.ports.append(port)
            self._locks.append(fh)
        if len(self.ports) < count:
            self.release()
            raise DockerError(f"no {count} free ports in {PORT_MIN}-{PORT_MAX}")

    def release(self) -> None:
        for fh in self._locks:
            with contextlib.suppress(OSError):
                fh.close()
        self._locks = []


def wait_until(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25
) -> T:
    """:func:`tests.support.wait_until`, polling every 0.25 s unless told otherwise."""
    return support.wait_until(predicate, timeout, what, interval)


@dataclass
class ComposeCluster:
    """The repository's docker-compose.yml, started under its own project name."""

    project: str
    image: str
    ports: list[int]
    compose: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = {"KVC_IMAGE": self.image, "KVC_RESTART": "no"}
        for i, port in enumerate(self.ports, start=1):
            env[f"KVC_PORT_{i}"] = str(port)
        return env

    def dc(
        self, *args: str, check: bool = True, timeout: float = COMMAND_GUARD
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [*self.compose, "-f", str(ROOT / "docker-compose.yml"), "-p", self.project, *args],
            env=self.env,
            check=check,
            timeout=timeout,
        )

    @property
    def ids(self) -> list[str]:
        return [f"n{i}" for i in range(1, len(self.ports) + 1)]

    def address(self, node: str) -> str:
        """The node's published client address on the host."""
        return f"127.0.0.1:{self.ports[int(node[1:]) - 1]}"

    @property
    def addresses(self) -> list[str]:
        return [self.address(n) for n in self.ids]

    @property
    def nodes_arg(self) -> str:
        return ",".join(self.addresses)

    @property
    def cluster_network(self) -> str:
        """The internal node-to-node network (compose prefixes the project name)."""
        return f"{self.project}_cluster"

    def container(self, node: str) -> str:
        """The container id of service ``node``."""
        out = self.dc("ps", "-q", node).stdout.strip()
        if not out:
            raise DockerError(f"no container for service {node}")
        return out.splitlines()[0]

    def inspect(self, node: str) -> dict[str, Any]:
        data = json.loads(run(["docker", "inspect", self.container(node)]).stdout)
        return dict(data[0])

    def health(self, node: str) -> str:
        state = self.inspect(node)["State"]
        if not state.get("Running"):
            return "stopped"
        return str(state.get("Health", {}).get("Status", "none"))

    def wait_healthy(self, nodes: Sequence[str] | None = None, timeout: float = 180.0) -> None:
        wanted = list(nodes or self.ids)
        wait_until(
            lambda: all(self.health(n) == "healthy" for n in wanted),
            timeout,
            f"{', '.join(wanted)} healthy ({self.project})",
            interval=1.0,
        )

    def logs(self, tail: int = 60) -> str:
        proc = self.dc("logs", "--no-color", "--tail", str(tail), check=False)
        return proc.stdout + proc.stderr

    def up(self) -> None:
        self.dc("up", "-d", timeout=600)

    def down(self) -> None:
        self.dc("down", "-v", "--remove-orphans", "-t", "10", check=False, timeout=600)

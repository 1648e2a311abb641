"""Fixtures for the Docker system tests (test_docker*.py).

They skip, with the reason printed in the summary, only when the machine
cannot run them: not root, or no reachable Docker engine (``docker info``
fails), or no compose. The kvcluster image is built once per session on the
local base image (``scripts/build-base-image.sh``, cached across runs) under
a unique tag, and removed at the end of the session; clusters are torn down
with their volumes and networks when their module ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.system import dockerlib

_SKIP: dict[str, str | None] = {}
_BUILDS: list[dockerlib.BuiltImage] = []


def docker_skip_reason() -> str | None:
    if "reason" not in _SKIP:
        _SKIP["reason"] = dockerlib.skip_reason()
    return _SKIP["reason"]


@pytest.fixture(scope="session")
def docker_available() -> None:
    reason = docker_skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def kvcluster_image(docker_available: None) -> Iterator[str]:
    """A kvcluster image built from this checkout (tag unique to the session)."""
    tag = os.environ.get("KVCLUSTER_TEST_IMAGE")
    if tag:  # a prebuilt image: use it, never remove it
        yield tag
        return
    tag = f"kvcluster:systest-{dockerlib.unique_name('')}"
    try:
        _BUILDS.append(dockerlib.build_image(tag))
        yield tag
    finally:
        dockerlib.remove_image(tag)


@pytest.fixture(scope="module")
def compose_cluster(kvcluster_image: str) -> Iterator[dockerlib.ComposeCluster]:
    """docker-compose.yml up under a unique project on free ports 76xx; down -v at the end."""
    compose = dockerlib.compose_command()
    assert compose is not None
    ports = dockerlib.PortBlock(3)
    cluster = dockerlib.ComposeCluster(
        dockerlib.unique_name("kvcsys"), kvcluster_image, ports.ports, compose
    )
    try:
        cluster.up()
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.down()
        ports.release()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach the containers' logs to a failed test's report."""
    report = yield
    cluster = item.funcargs.get("compose_cluster") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(cluster, dockerlib.ComposeCluster):
        report.sections.append((f"compose logs {cluster.project}", cluster.logs()))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    reason = _SKIP.get("reason")
    if "reason" in _SKIP and reason is not None:
        terminalreporter.write_line(f"Docker system tests skipped: {reason}", yellow=True)
    for b in _BUILDS:
        terminalreporter.write_line(
            f"Docker image {b.tag}: base image {b.base_seconds:.0f}s (cached after the first "
            f"run), kvcluster image {b.image_seconds:.0f}s"
        )

"""kvcluster.cli.dev.port_free: the free-port check benchmarks, jepsen-lite and tests share."""

from __future__ import annotations

import socket

from kvcluster.cli.dev import port_free


def test_a_listening_port_is_taken_and_free_again_once_closed() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert not port_free(port)
    assert port_free(port)


def test_a_port_left_in_time_wait_counts_as_free() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server side closes first: its end goes to TIME_WAIT
        client.close()
    assert port_free(port)

"""``kvcluster-node``: run one node (gRPC server + LMDB store).

Settings come from flags, a TOML file (``--config``) and ``KVCLUSTER_*``
variables (see ``kvcluster-node --help``). A bad setting stops the start
with a one-line message naming it and exit status 2. SIGTERM and SIGINT stop
the node cleanly: it stops accepting requests, lets running ones finish for
a grace period, and closes the store after its last group commit.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import click
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvcluster import errors
from kvcluster.clock import SystemClock
from kvcluster.metrics import Metrics
from kvcluster.net.faults import FaultState, FaultyTransport
from kvcluster.net.grpc_options import SERVER_OPTIONS
from kvcluster.net.grpc_transport import GrpcTransport, InternalService
from kvcluster.net.tcp_transport import TcpServer, TcpTransport, peer_address
from kvcluster.net.transport import Transport
from kvcluster.node.node import Node
from kvcluster.server import config as cfg
from kvcluster.server.services import AdminService, KVService
from kvcluster.storage.lmdb_store import LmdbStorage
from kvcluster.wire.v1 import admin_pb2, admin_pb2_grpc, internal_pb2_grpc, kv_pb2, kv_pb2_grpc

log = logging.getLogger("kvcluster.node")

SHUTDOWN_GRACE = 5.0


async def serve(config: cfg.Config, ready: asyncio.Event | None = None) -> None:
    """Run a node until SIGTERM/SIGINT (or cancellation)."""
    loop = asyncio.get_running_loop()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    storage = LmdbStorage.open(
        config.data_dir,
        map_size=config.map_size_mb * 1024 * 1024,
        max_pending=config.max_pending_writes,
        commit_window=config.commit_window,
    )
    metrics = Metrics(config.node_id)
    clock = SystemClock()
    faults = FaultState(clock)
    inner: Transport
    if config.peer_port_offset:
        inner = TcpTransport(config.node_id, config.peer_port_offset)
    else:
        inner = GrpcTransport(config.node_id)
    transport = FaultyTransport(inner, faults)
    seeds = {s.node_id: s.address for s in config.seeds}
    node = Node(
        config.node_id,
        config.advertise,
        config.settings,
        storage,
        transport,
        clock,
        random.Random(),
        seeds,
        metrics,
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    kv_pb2_grpc.add_KVServicer_to_server(KVService(node), server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(node, faults), server)
    internal_pb2_grpc.add_InternalServicer_to_server(
        InternalService(node.handle, faults.drops_from), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            kv_pb2.DESCRIPTOR.services_by_name["KV"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    # Not serving until a ring is agreed (the servicer's default would say SERVING).
    for service in ("", "kvcluster.wire.v1.KV"):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    _check_free(config.listen, "listen")
    peer_server: TcpServer | None = None
    if config.peer_port_offset:
        peer_listen = peer_address(config.listen, config.peer_port_offset)
        _check_free(peer_listen, "peer_port_offset")
        peer_server = TcpServer(node.handle, faults.drops_from)
        await peer_server.start(peer_listen)
    try:
        server.add_insecure_port(config.listen)
    except RuntimeError as exc:
        raise cfg.ConfigError("listen", f"cannot bind {config.listen}: {exc}") from None
    # bind the metrics port before the gRPC server runs: if it is taken, the node
    # stops with its one-line config error instead of a running server's teardown noise
    metrics_server = _start_metrics(config.metrics_listen, metrics)
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await node.start()
    serving = asyncio.create_task(_track_health(node, health_servicer, stop))
    log.info(
        "node %s serving on %s (advertised %s), data in %s",
        config.node_id,
        config.listen,
        config.advertise,
        config.data_dir,
    )
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("node %s stopping", config.node_id)
        serving.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(SHUTDOWN_GRACE)
        if peer_server is not None:
            await peer_server.close()
        await node.stop()
        await transport.close()
        await storage.close()
        if metrics_server is not None:
            metrics_server.shutdown()
        log.info("node %s stopped", config.node_id)


async def _track_health(node: Node, servicer: Any, stop: asyncio.Event) -> None:
    """SERVING once the node has an agreed ring, NOT_SERVING before."""
    serving = None
    while not stop.is_set():
        ready = node.membership.meta is not None
        if ready != serving:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await servicer.set("", status)
            await servicer.set("kvcluster.wire.v1.KV", status)
            serving = ready
        await asyncio.sleep(0.2)


def _check_free(address: str, field: str) -> None:
    """Fail with a one-line ConfigError if ``address`` cannot be bound.

    Checked before gRPC binds it, because gRPC's C core would first log its
    own multi-line complaint about the port.
    """
    host, port = cfg.parse_address(address, field)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise cfg.ConfigError(field, f"cannot resolve {host}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            raise cfg.ConfigError(field, f"cannot bind {address}: {exc.strerror}") from None


def _start_metrics(address: str | None, metrics: Metrics) -> Any:
    if address is None:
        return None
    from wsgiref.simple_server import make_server

    from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

    host, port = cfg.parse_address(address, "metrics_listen")
    app = make_wsgi_app(metrics.registry)

    def refreshing_app(environ: Any, start_response: Any) -> Any:
        metrics.refresh()
        return app(environ, start_response)

    try:
        httpd = make_server(host, port, refreshing_app, ThreadingWSGIServer)
    except OSError as exc:
        raise cfg.ConfigError("metrics_listen", f"cannot bind {address}: {exc.strerror}") from None
    import threading

    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return httpd


def _options(func: Any) -> Any:
    """One click option per configuration field (flags override env and file)."""
    for f in reversed(cfg.FIELDS):
        name = cfg.flag_name(f.name)
        help_text = f"{f.help} [env {cfg.env_name(f.name)}; default {f.default!r}]"
        if f.kind is bool:
            func = click.option(f"{name}/--no-{name[2:]}", f.name, default=None, help=help_text)(
                func
            )
        else:
            func = click.option(
                name, f.name, default=None, help=help_text, metavar=f.kind.__name__.upper()
            )(func)
    return func


@click.command(
    "kvcluster-node",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML file with settings (keys: the option names with underscores) "
    "[env KVCLUSTER_CONFIG].",
)
@_options
def cli(config_file: str | None, **flags: Any) -> None:
    """Run one kvcluster node.

    Precedence: flags > KVCLUSTER_* environment > --config file > defaults.

    \b
    Single node:   kvcluster-node --data-dir /tmp/n1
    Three nodes:   kvcluster-node --node-id n1 --listen 127.0.0.1:7101 \\
                     --seeds n1=127.0.0.1:7101,n2=127.0.0.1:7102,n3=127.0.0.1:7103
    """
    try:
        config = cfg.load(flags, config_file)
    except cfg.ConfigError as exc:
        click.echo(f"kvcluster-node: {exc}", err=True)
        sys.exit(2)
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s {config.node_id} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(config))
    except cfg.ConfigError as exc:
        click.echo(f"kvcluster-node: {exc}", err=True)
        sys.exit(2)
    except errors.StorageFull as exc:
        click.echo(f"kvcluster-node: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"kvcluster-node: cannot use data_dir {Path(config.data_dir)}: {exc}", err=True)
        sys.exit(1)


def main() -> None:
    """Entry point: usage errors are one line on stderr with exit status 2."""
    try:
        cli.main(prog_name="kvcluster-node", standalone_mode=False)
    except click.UsageError as exc:
        click.echo(
            f"kvcluster-node: {exc.format_message()} (see 'kvcluster-node --help')", err=True
        )
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"kvcluster-node: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()
